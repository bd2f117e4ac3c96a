"""Forward+backward of Qwen3-30B-A3B-shaped MoE layers without TransformerEngine: megatron's local modules
(`SequentialMLP` experts + unfused attention) vs the fast path (`GroupedExperts` + SDPA `FusedDotProductAttention`),
with step time, model TFLOP/s, MFU, the bf16 agreement of the two expert modules, and router replay on the fast path.

    python bench/layer_mfu.py --device cuda --json out.json      # H100/H200: hidden 2048, 128 experts top-8, ...
    python bench/layer_mfu.py --device cpu --preset cpu-tiny      # the same code path on a laptop (seconds)

Parts
  1 peak      the card's bf16 matmul rate (8192³, best of 10) next to the data-sheet peak (model/flops.py).
  2 step      GPTModel (the preset's layers, small vocabulary so the LM head stays ~1% of the FLOPs), one
              micro-batch of `seq` tokens through megatron's forward_backward_func; median step time of --steps
              interleaved steps per arm; model FLOPs from model/flops.py (causal half, active experts, 3x forward);
              TFLOP/s and MFU against the data-sheet peak and the measured matmul peak.
  3 experts   SequentialMLP vs GroupedExperts alone, same weights, bf16, the preset's token count x top-k routed rows
              (routing from a random router): relative L2 error of each against an fp32 evaluation of the same
              math; pass when the grouped error <= 2 x the sequential one + 1e-3 (both are bf16 roundings of one
              computation; a wrong expert or a dropped gate weight gives errors of order 1). Each module's fwd+bwd
              time alone, and core attention alone (megatron's unfused vs SDPA), with their TFLOP/s.
  4 replay    on the fast model: R3 replay of the model's own routes vs native routing, interleaved: step ratio;
              every router used exactly the installed ids (device counter), the replays' loss equals the recording
              run's within 2 x the range of several native runs (kernel nondeterminism; 0 = bitwise on deterministic
              kernels; see `replay_checks` for why), shifted routes move the loss by more than that (the check can
              fail); host syncs R3 - off with bench/sync_count.py's calibrated counter (CUDA only).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, print_table, select_device, write_json  # noqa: E402

import torch  # noqa: E402

PRESETS = {
    "qwen3-30b-a3b-4l": dict(num_layers=4, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
                             kv_channels=128, num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768,
                             ffn_hidden_size=6144, seq_length=4096, vocab_size=2048),
    "cpu-tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                     num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32, ffn_hidden_size=128,
                     seq_length=128, vocab_size=256),
}


def make_config(preset: dict, dtype: torch.dtype, grouped: bool):
    """The preset as a TransformerConfig; `grouped` (the fast arm): GroupedExperts, and megatron's SwiGLU fusion where
    `model/fusions.py` compiles it (CUDA + Triton; the norms follow the same switch)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_r3.model.fusions import compiled_fusions_available

    return TransformerConfig(
        num_layers=preset["num_layers"], hidden_size=preset["hidden_size"],
        num_attention_heads=preset["num_attention_heads"], num_query_groups=preset["num_query_groups"],
        kv_channels=preset["kv_channels"], ffn_hidden_size=preset["ffn_hidden_size"],
        num_moe_experts=preset["num_moe_experts"], moe_router_topk=preset["moe_router_topk"],
        moe_ffn_hidden_size=preset["moe_ffn_hidden_size"], moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=grouped, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32", normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False,
        qk_layernorm=True, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, pipeline_dtype=dtype, use_cpu_initialization=not torch.cuda.is_available(),
        apply_rope_fusion=False, bias_activation_fusion=grouped and compiled_fusions_available(),
        masked_softmax_fusion=False,
    )


def build(preset: dict, dtype: torch.dtype, fast: bool):
    from megatron_r3.model.gpt import build_gpt_chunks
    from megatron_r3.platform.distributed import parallel_context
    from megatron_r3.platform.parallel_context import ParallelSizes

    config = make_config(preset, dtype, grouped=fast)
    torch.manual_seed(1234)
    chunks = build_gpt_chunks(config, parallel_context(ParallelSizes()), vocab_size=preset["vocab_size"],
                              max_sequence_length=preset["seq_length"], fused_attention=fast)
    return config, chunks[0]


def copy_weights(slow, fast) -> None:
    """The slow model's weights into the fast one (SequentialMLP names -> GroupedExperts' per-expert views)."""
    from megatron_r3.model.hf_mapping import per_expert_named_parameters

    target = dict(per_expert_named_parameters(fast))
    with torch.no_grad():
        for name, param in slow.named_parameters():
            mapped = re.sub(r"experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight", r"experts.\2.weight\1", name)
            target.pop(mapped).copy_(param)
    if target:
        raise RuntimeError(f"fast-model parameters without a source: {sorted(target)[:4]}")


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measured_matmul_tflops(dev, dtype) -> float:
    n = 8192 if dev.type == "cuda" else 512
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(12):
        sync(dev)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(dev)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * n ** 3 / best / 1e12


class Stepper:
    """One micro-batch forward+backward of `model` through megatron's schedule, optionally replaying routes."""

    def __init__(self, model, preset, dev):
        from megatron_r3.replay.layout import pack_bshd, router_token_slots
        from megatron_r3.replay.schedule import ReplayRouters

        self.model, self.dev, self.seq = model, dev, preset["seq_length"]
        self.routers = ReplayRouters([model])
        self.layout = pack_bshd([self.seq])
        self.slots = router_token_slots(self.layout)
        gen = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, preset["vocab_size"], (1, self.seq), generator=gen).to(dev)
        self.positions = torch.arange(self.seq, device=dev).expand(1, self.seq)
        self.experts, self.topk = preset["num_moe_experts"], preset["moe_router_topk"]
        self.loss = None

    def forward_step(self, data_iterator, model):
        output = model(self.tokens, self.positions, None, labels=self.tokens)

        def loss_func(out):
            loss = out.float().mean()
            self.loss = loss.detach()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    def run(self, action=None, routes=None, forward_only=False, collect_agreement=False):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_r3.platform.distributed import host_group
        from megatron_r3.replay.schedule import run_schedule

        return run_schedule(get_forward_backward_func(), self.routers, action=action, routes=routes,
                            collect_agreement=collect_agreement, host_group=host_group(),
                            forward_step_func=self.forward_step, data_iterator=iter([None]), model=self.model,
                            num_microbatches=1, forward_only=forward_only, seq_length=self.seq, micro_batch_size=1)

    def own_routes(self):
        """The model's own routes, as per-sample [T, L, K] uint8 arrays (what a rollout engine sends)."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        from megatron_r3.replay.r2 import gather_recorded_routes

        with torch.no_grad():
            recorded = self.run(RouterReplayAction.RECORD, forward_only=True).recorded
        return gather_recorded_routes(recorded, [self.layout], [self.slots], num_layers=len(self.routers.layer_numbers),
                                      topk=self.topk, dtype=torch.uint8)[0]

    def step(self, sample_routes=None, local=None) -> float:
        """One timed fwd+bwd step; `local`: routes already localized on the host (page-locked on CUDA), copied to
        the device inside the timed region; `sample_routes`: per-sample routes, localized inside it too."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        from megatron_r3.replay.microbatch import localize_routes

        sync(self.dev)
        start = time.perf_counter()
        routes = None
        if sample_routes is not None:
            local = localize_routes(sample_routes, self.layout, self.slots, self.routers.layer_numbers, self.experts)
            local = local.pin_memory() if self.dev.type == "cuda" else local
        if local is not None:
            routes = [local.to(self.dev, non_blocking=True)]
        self.run(RouterReplayAction.REPLAY_FORWARD if routes else None, routes)
        sync(self.dev)
        elapsed = time.perf_counter() - start
        self.model.zero_grad(set_to_none=True)
        return elapsed


def time_arms(arms: dict, steps: int, warmup: int) -> dict:
    times = {name: [] for name in arms}
    for index in range(warmup + steps):
        for name, fn in arms.items():
            seconds = fn()
            if index >= warmup:
                times[name].append(seconds)
    return times


def experts_agreement(preset, dev, dtype) -> dict:
    """SequentialMLP vs GroupedExperts (same weights) in `dtype`, each against fp32, at the preset's routed rows."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_r3.model.grouped_experts import GroupedExperts, grouped_mm_supported

    config = make_config(preset, dtype, grouped=True)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    experts, topk, tokens = preset["num_moe_experts"], preset["moe_router_topk"], preset["seq_length"]
    sequential = LocalSpecProvider().grouped_mlp_modules(False)(experts, config, pg_collection=pgs).to(dev)
    grouped = GroupedExperts(experts, config, pg_collection=pgs).to(dev)
    with torch.no_grad():
        for e, expert in enumerate(sequential.local_experts):
            grouped.linear_fc1.weight[e].copy_(expert.linear_fc1.weight)
            grouped.linear_fc2.weight[e].copy_(expert.linear_fc2.weight)
    gen = torch.Generator(device=dev).manual_seed(3)
    logits = torch.randn(tokens, experts, device=dev, generator=gen)
    top = torch.topk(logits, topk, dim=-1)
    ids = top.indices.reshape(-1)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=experts)
    x = torch.randn(tokens, preset["hidden_size"], device=dev, generator=gen)[order // topk]
    probs = torch.softmax(top.values, dim=-1).reshape(-1)[order].float()
    grad_out = torch.randn(x.shape, device=dev, generator=gen)

    def run(module, cast):
        inp = x.detach().to(cast).clone().requires_grad_(True)
        out, _ = module(inp, counts, probs)
        out.backward(grad_out.to(out.dtype))
        grads = [p.grad.float().flatten() for _, p in sorted(module.named_parameters())]
        result = (out.float().detach(), inp.grad.float(), torch.cat(grads))
        module.zero_grad(set_to_none=True)
        return result

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    seq = run(sequential, dtype)
    grp = run(grouped, dtype)
    # fp32 truth: the grouped module's loop path on fp32 copies of the same weights
    truth_module = GroupedExperts(experts, make_config(preset, torch.float32, grouped=True), pg_collection=pgs).to(dev)
    truth_module.backend = "loop"
    with torch.no_grad():
        for src, dst in zip(grouped.parameters(), truth_module.parameters()):
            dst.copy_(src.float())
    truth = run(truth_module, torch.float32)
    # grads of the fp32 module are in GroupedExperts name order; line up the sequential ones the same way
    seq_grads = _grouped_order_grads(sequential, grouped, dtype, x, counts, probs, grad_out)
    rows = {}
    for label, index in (("output", 0), ("input grad", 1)):
        rows[label] = (rel(seq[index], truth[index]), rel(grp[index], truth[index]), rel(grp[index], seq[index]))
    rows["weight grads"] = (rel(seq_grads, truth[2]), rel(grp[2], truth[2]), rel(grp[2], seq_grads))
    ok = all(g <= 2 * s + 1e-3 for s, g, _ in rows.values())
    flops = 3 * 2.0 * ids.numel() * preset["hidden_size"] * preset["moe_ffn_hidden_size"] * 3
    timing = {}

    def fwd_bwd(module):
        inp = x.detach().to(dtype).clone().requires_grad_(True)
        out, _ = module(inp, counts, probs)
        out.backward(grad_out.to(out.dtype))
        module.zero_grad(set_to_none=True)

    for label, module, repeats in (("SequentialMLP", sequential, 2), ("GroupedExperts", grouped, 10)):
        fwd_bwd(module)  # warm-up
        seconds = []
        for _ in range(repeats):
            sync(dev)
            start = time.perf_counter()
            fwd_bwd(module)
            sync(dev)
            seconds.append(time.perf_counter() - start)
        timing[label] = (statistics.median(seconds) * 1e3, flops / statistics.median(seconds) / 1e12)
    return {"rows": rows, "pass": ok, "grouped_mm": grouped_mm_supported(dev, dtype), "routed_rows": int(ids.numel()),
            "timing_ms_tflops": timing}


def attention_timing(preset, dev, dtype) -> dict:
    """Core attention alone, fwd+bwd, megatron's DotProductAttention vs FusedDotProductAttention (causal, GQA)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_r3.model.fused_attention import FusedDotProductAttention

    config = make_config(preset, dtype, grouped=True)
    seq, heads, groups, dim = (preset["seq_length"], preset["num_attention_heads"], preset["num_query_groups"],
                               preset["kv_channels"])
    gen = torch.Generator(device=dev).manual_seed(5)
    q = torch.randn(seq, 1, heads, dim, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(seq, 1, groups, dim, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(seq, 1, groups, dim, device=dev, dtype=dtype, generator=gen)
    grad = torch.randn(seq, 1, heads * dim, device=dev, dtype=dtype, generator=gen)
    flops = 3 * 2.0 * 2 * heads * dim * seq * (seq + 1) / 2
    out = {}
    results = {}
    for label, cls, repeats in (("megatron DotProductAttention (unfused)", DotProductAttention, 3),
                                ("FusedDotProductAttention (SDPA)", FusedDotProductAttention, 10)):
        module = cls(config, 1, AttnMaskType.causal, "self").to(dev)

        def once():
            inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
            result = module(*inputs, None)
            result.backward(grad)
            return result.detach().float()

        results[label] = once()
        seconds = []
        for _ in range(repeats):
            sync(dev)
            start = time.perf_counter()
            once()
            sync(dev)
            seconds.append(time.perf_counter() - start)
        out[label] = (statistics.median(seconds) * 1e3, flops / statistics.median(seconds) / 1e12)
    a, b = results.values()
    out["relative L2 difference of the outputs"] = float((a - b).norm() / a.norm())
    return out


def _grouped_order_grads(sequential, grouped, dtype, x, counts, probs, grad_out):
    inp = x.detach().to(dtype).clone().requires_grad_(True)
    out, _ = sequential(inp, counts, probs)
    out.backward(grad_out.to(out.dtype))
    by_name = {}
    for name, p in sequential.named_parameters():
        match = re.search(r"local_experts\.(\d+)\.(linear_fc[12])\.weight", name)
        by_name[match[2], int(match[1])] = p.grad.float().flatten()
    sequential.zero_grad(set_to_none=True)
    # GroupedExperts' stacked `linear_fc{1,2}.weight` flatten expert by expert
    return torch.cat([by_name[name.removesuffix(".weight"), e] for name, _ in grouped.named_parameters()
                      for e in range(grouped.num_local_experts)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--slow-steps", type=int, default=3, help="steps of the slow (SequentialMLP) arm")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the data-sheet peak")
    parser.add_argument("--skip-slow", action="store_true")
    parser.add_argument("--no-compiled-fusions", action="store_true",
                        help="megatron's disable_jit_fuser(): eager RMSNorm and SwiGLU on the fast arm too")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.device = select_device(args.device)
    args.preset = args.preset or ("qwen3-30b-a3b-4l" if args.device == "cuda" else "cpu-tiny")
    preset = PRESETS[args.preset]
    if args.no_compiled_fusions:
        from megatron.core.jit import disable_jit_fuser

        disable_jit_fuser()

    from megatron.core.transformer.moe.router_replay import RouterReplayAction  # noqa: F401

    from megatron_r3.model.flops import peak_tflops, shape_from_config
    from megatron_r3.platform.distributed import device, initialize_model_parallel
    from megatron_r3.platform.parallel_context import ParallelSizes

    initialize_model_parallel(ParallelSizes())
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    results = {"environment": environment(args.device), "args": vars(args), "preset": preset}
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"

    # 1. peak
    sheet = peak_tflops(card if dev.type == "cuda" else None, args.peak_tflops)
    measured = measured_matmul_tflops(dev, dtype)
    results["peak"] = {"data_sheet_tflops": sheet, "measured_matmul_tflops": measured}
    print_table(f"Peak on {card}", ["quantity", "TFLOP/s"],
                [("data-sheet dense bf16" if sheet else "data-sheet (unknown device)", sheet or float("nan")),
                 (f"measured {dtype} matmul 8192^3" if dev.type == "cuda" else "measured matmul 512^3", measured)])

    # 2. step time, fast vs slow
    config, fast = build(preset, dtype, fast=True)
    shape = shape_from_config(config, preset["vocab_size"])
    flops = 3 * shape.forward_flops([preset["seq_length"]])
    fast_stepper = Stepper(fast, preset, dev)
    arms = {"fast: GroupedExperts + SDPA": lambda: fast_stepper.step()}
    slow_stepper = None
    if not args.skip_slow:
        _, slow = build(preset, dtype, fast=False)
        copy_weights(slow, fast)
        slow_stepper = Stepper(slow, preset, dev)
    times = time_arms(arms, args.steps, args.warmup)
    if slow_stepper is not None:
        times.update(time_arms({"megatron local: SequentialMLP + unfused": lambda: slow_stepper.step()},
                               args.slow_steps, 1))
        with torch.no_grad():
            slow_stepper.run(forward_only=True)
            fast_stepper.run(forward_only=True)
        results["loss_slow_vs_fast"] = (float(slow_stepper.loss), float(fast_stepper.loss))
    rows = []
    for name, samples in times.items():
        seconds = statistics.median(samples)
        tflops = flops / seconds / 1e12
        rows.append((name, seconds * 1e3, tflops, tflops / sheet if sheet else float("nan"), tflops / measured))
    results["step"] = {"model_tflop_per_step": flops / 1e12, "rows": rows, "times_s": times}
    print_table(f"fwd+bwd, {args.preset}: {preset['num_layers']} layers, {preset['seq_length']} tokens, {dtype}, "
                f"{flops / 1e12:.2f} model TFLOP per step (median of {args.steps} / {args.slow_steps} steps)",
                ["arm", "step ms", "TFLOP/s", "MFU (data sheet)", "MFU (measured matmul peak)"], rows)
    if slow_stepper is not None:
        slow_ms, fast_ms = statistics.median(times[next(iter(times.keys() - arms.keys()))]), \
            statistics.median(times["fast: GroupedExperts + SDPA"])
        print_table("speed-up", ["quantity", "value"],
                    [("SequentialMLP+unfused / fast step time", slow_ms / fast_ms),
                     ("loss slow, fast (same weights, same tokens)", "%.6f, %.6f" % results["loss_slow_vs_fast"])])
        del slow_stepper, slow
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # 3. experts agreement
    agreement = experts_agreement(preset, dev, dtype)
    results["experts_agreement"] = agreement
    print_table(f"SequentialMLP vs GroupedExperts, {dtype}, {agreement['routed_rows']} routed rows, relative L2 "
                f"errors against fp32 (torch._grouped_mm: {agreement['grouped_mm']}); "
                f"{'PASS' if agreement['pass'] else 'FAIL'} (grouped <= 2 x sequential + 1e-3)",
                ["tensor", "SequentialMLP vs fp32", "GroupedExperts vs fp32", "grouped vs sequential"],
                [(k, *v) for k, v in agreement["rows"].items()])

    rows = [(label, *agreement["timing_ms_tflops"][label]) for label in ("SequentialMLP", "GroupedExperts")]
    print_table(f"experts alone, fwd+bwd, {agreement['routed_rows']} routed rows", ["module", "ms", "TFLOP/s"], rows)
    attention = attention_timing(preset, dev, dtype)
    results["attention"] = attention
    print_table(f"core attention alone, fwd+bwd, {preset['seq_length']} tokens causal, {preset['num_attention_heads']} "
                f"heads / {preset['num_query_groups']} KV", ["module", "ms", "TFLOP/s"],
                [(k, *v) for k, v in attention.items() if isinstance(v, tuple)]
                + [("relative L2 difference of the outputs", attention["relative L2 difference of the outputs"], "")])

    # 4. replay on the fast path
    replay = replay_checks(fast_stepper, dev, args)
    results["replay"] = replay
    print_table("router replay on the fast path (own routes)", ["quantity", "value"], list(replay.items()))
    write_json(args.json, results)
    if (not agreement["pass"] or not replay["replay exact (routing equal and R3 loss diff <= tol)"]
            or not replay["shifted routes change the loss by > tol"]):
        raise SystemExit("a check failed (see the tables)")


def replay_checks(stepper: Stepper, dev, args) -> dict:
    """Router replay on the fast model, checked so that kernel nondeterminism alone cannot fail it.

    Why not "R3 loss == off loss": on a GPU the fast path is not bitwise reproducible (the dispatcher's unpermute
    sums the top-k expert outputs of a token with atomic adds, cuBLAS/SDPA may split reductions differently), so
    two native runs of the same batch differ (4e-5 on the loss at the Qwen3-30B-A3B shape on an H200), and a near-tie
    in a router's top-k can flip between runs, so a later native run may even route differently from the run whose
    routes were recorded. Comparing one R3 sample with one off sample therefore tests the noise, not replay.

    What is checked instead, all forward-only under the same conditions as the recording:
      1. routing: every router *used* exactly the installed ids (the router's device counter `match` == `valid`
         over all tokens, layers and repeats; counted on the device, read once at the end);
      2. loss: each of `repeats` R3 replays of the recorded routes differs from the recording run's loss by no more
         than tol = 2 x the range (max - min) of `repeats` native runs. The recording
         and the replays use identical routes, so their difference is kernel nondeterminism at fixed routing, which
         is inside the native spread (which also contains routing flips); the range of several samples, doubled,
         bounds a new difference (one sample would not: the first GPU run compared one pair and failed on noise).
         With deterministic kernels the range is 0 and this is bitwise equality (tests/gpu/gpu_checks.py's
         replay_bf16 checks that under torch.use_deterministic_algorithms);
      3. the check can fail: replaying shifted routes (expert id + 1) moves the loss by more than tol.
    """
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_r3.replay.microbatch import localize_routes

    repeats = 6
    routes = stepper.own_routes()  # a RECORD pass; stepper.loss is the recording run's loss
    recorded_loss = stepper.loss.clone()
    if dev.type == "cuda":
        routes = [r.pin_memory() for r in routes]

    def local_routes(sample_routes):
        local = localize_routes(sample_routes, stepper.layout, stepper.slots, stepper.routers.layer_numbers,
                                stepper.experts)
        return [local.to(dev)]

    own_local = local_routes(routes)
    shifted = [((r.long() + 1) % stepper.experts).to(r.dtype) for r in routes]
    stepper.routers.statistics(reset=True)
    native, replayed = [], []
    with torch.no_grad():
        for _ in range(repeats):
            stepper.run(forward_only=True)
            native.append(stepper.loss.clone())
            stepper.run(RouterReplayAction.REPLAY_FORWARD, own_local, forward_only=True, collect_agreement=True)
            replayed.append(stepper.loss.clone())
        counters = stepper.routers.statistics(reset=True).layer_counters
        stepper.run(RouterReplayAction.REPLAY_FORWARD, local_routes(shifted), forward_only=True)
        shifted_loss = stepper.loss.clone()
    native_t, replayed_t = torch.stack(native).double(), torch.stack(replayed).double()
    spread = float(native_t.max() - native_t.min())
    tol = 2 * spread
    replay_diff = float((replayed_t - float(recorded_loss)).abs().max())
    shifted_diff = float((shifted_loss.double() - float(recorded_loss)).abs())
    valid = sum(int(c["valid"]) for c in counters.values())
    match = sum(int(c["match"]) for c in counters.values())
    agree = sum(int(c["agree"]) for c in counters.values())
    compared = sum(int(c["compared"]) for c in counters.values())
    routing_exact = valid > 0 and match == valid and len(counters) == len(stepper.routers.layer_numbers)
    # the trainer localizes a batch's routes on the host while the previous micro-batch runs; here they are
    # localized (into page-locked memory) once, and the timed R3 step includes their host-to-device copy
    own_host = localize_routes(routes, stepper.layout, stepper.slots, stepper.routers.layer_numbers, stepper.experts)
    own_host = own_host.pin_memory() if dev.type == "cuda" else own_host
    times = time_arms({"off": lambda: stepper.step(), "R3": lambda: stepper.step(local=own_host)},
                      args.steps, args.warmup)
    out = {
        f"router rows used == installed (device counter, {repeats} replays x {len(counters)} layers)":
            f"{match} / {valid}",
        "native top-k == recorded ids in those replays (near-tie flips)": agree / max(compared, 1),
        f"loss off, range of {repeats} runs (kernel nondeterminism)": spread,
        "tolerance = 2 x range": tol,
        f"loss R3 replays vs recording run: max abs diff ({repeats} runs)": replay_diff,
        "loss shifted routes vs recording run: abs diff": shifted_diff,
        "replay exact (routing equal and R3 loss diff <= tol)": routing_exact and replay_diff <= tol,
        "shifted routes change the loss by > tol": shifted_diff > tol,
        "off step ms (median)": statistics.median(times["off"]) * 1e3,
        "R3 step ms (median)": statistics.median(times["R3"]) * 1e3,
        "R3 / off": statistics.median(times["R3"]) / statistics.median(times["off"]),
    }
    if dev.type == "cuda":
        from sync_count import SyncCounter

        counter = SyncCounter()
        counts = {}
        for name, fn in (("off", lambda: stepper.step()), ("R3", lambda: stepper.step(local=own_host))):
            fn()
            with counter.region():
                fn()
            counts[name] = counter.implicit + counter.explicit
            out[f"host sync sites {name}"] = "; ".join(f"{site} x{n}" for site, n in sorted(counter.sites.items()))
        out["host syncs off"] = counts["off"]
        out["host syncs R3"] = counts["R3"]
        out["host syncs R3 - off"] = counts["R3"] - counts["off"]
    return out


if __name__ == "__main__":
    main()
