"""Route pipeline cost per microbatch: lay out (CPU) -> pin -> host-to-device copy -> per-layer int64 ids.

    python bench/layout_cost.py --device cpu                       # this machine's CPU
    python bench/layout_cost.py --device cuda --json out.json      # lent GPU (layout on its host CPU)
    python bench/layout_cost.py --device cpu --baseline af9bcad    # also time the implementation of a git revision
                                                                   # (interleaved, same inputs) and check equality

Default microbatch: 32768 tokens (8 samples of 4096, packed THD) x 48 MoE layers x top-8, uint8 ids of 128 experts
(Qwen3-30B-A3B's router shape). Stages, medians of --repeats calls:
  localize   `localize_routes`: this rank's tokens (router order) and MoE layers, pad rows filled (CPU)
  pin        `MicrobatchRoutes.pin_memory()` (CUDA only; free when localize already allocated page-locked memory)
  h2d        `.to("cuda", non_blocking=True)` + synchronize (CUDA only)
  int64      every layer's `for_layer(n).expert_ids.long()` as the routers do at the moment of use (+ synchronize)
Per-rank variants (TP2+SP, CP2, PP2 stage, BSHD) show what one rank of a parallel layout pays. The step-time
comparison uses an estimate (FLOPs of a Qwen3-30B-A3B forward+backward on the microbatch at an assumed achieved
bf16 throughput; printed with its basis) unless --step-ms gives a measured step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (environment, median_ms, print_table, resolve_device, revision_source, time_calls,  # noqa: E402
                     write_json)

import torch  # noqa: E402

from megatron_r3.replay.layout import (  # noqa: E402
    distinct_fill_ids,
    pack_bshd,
    pack_per_slot,
    pack_thd,
    router_token_slots,
    sequence_pad_multiple,
)
from megatron_r3.replay.microbatch import localize_routes  # noqa: E402


# ----------------------------------------------------------------------------------------------- step estimate
def qwen3_30b_a3b_step_flops(tokens: int, sequence_length: int, recompute: bool = False) -> dict:
    """Forward+backward FLOPs of Qwen3-30B-A3B (48 layers, hidden 2048, 32 q / 4 kv heads of 128, 128 experts
    top-8 of ffn 768, vocab 151936) on `tokens` tokens packed as sequences of `sequence_length` (causal)."""
    hidden, layers, heads, kv_heads, head_dim, topk, ffn, vocab = 2048, 48, 32, 4, 128, 8, 768, 151936
    attn_proj = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    experts = topk * 3 * hidden * ffn  # gate, up, down of the 8 chosen experts
    router = hidden * 128
    matmul_params = layers * (attn_proj + experts + router) + hidden * vocab  # + output layer
    dense = 2 * matmul_params * tokens  # forward multiply-adds
    causal_attention = layers * 2 * (tokens * sequence_length) * heads * head_dim  # QK^T and AV, causal half
    forward = dense + causal_attention
    total = 3 * forward + (forward if recompute else 0)
    return {"active_matmul_params": matmul_params, "forward_flops": forward, "step_flops": total}


# ----------------------------------------------------------------------------------------------- baseline
def load_baseline(rev: str):
    """`localize_routes` as it was at git revision `rev` (layout.py and microbatch.py of that revision)."""

    def source(path):
        return revision_source(rev, path)

    name = f"_baseline_layout_{rev}"
    layout_module = types.ModuleType(name)
    sys.modules[name] = layout_module
    exec(compile(source("megatron_r3/replay/layout.py"), f"{rev}:layout.py", "exec"), layout_module.__dict__)
    mb_source = source("megatron_r3/replay/microbatch.py").replace(
        "from megatron_r3.replay.layout import", f"from {name} import")
    mb_name = f"_baseline_microbatch_{rev}"
    mb_module = types.ModuleType(mb_name)
    sys.modules[mb_name] = mb_module
    exec(compile(mb_source, f"{rev}:microbatch.py", "exec"), mb_module.__dict__)
    return mb_module.localize_routes, layout_module.pack_per_slot


def equality_cases(seed: int = 0):
    """Small layouts of every kind: BSHD/THD, padding, CP2 ranks, TP2+SP ranks, layer subsets, free rows, int16."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for fmt in ("bshd", "thd"):
        for tp, cp, sp in ((1, 1, False), (2, 1, True), (1, 2, False), (2, 2, True)):
            multiple = sequence_pad_multiple(tp, cp, sp)
            for experts, dtype in ((8, torch.uint8), (300, torch.int16)):
                lengths = [int(x) for x in torch.randint(1, 19, (3,), generator=gen)]
                layout = pack_thd(lengths, pad_multiple=multiple) if fmt == "thd" else pack_bshd(
                    lengths, pad_multiple=multiple)
                samples = [torch.argsort(torch.rand(n, 6, experts, generator=gen), -1)[..., :3].to(dtype)
                           for n in lengths]
                free = [None, torch.rand(lengths[1], generator=gen) < 0.3, None]
                for layers in ((2, 3, 4, 5, 6), (1, 2, 3, 4, 5, 6), (2, 4, 6), (4,), ()):
                    for cp_rank in range(cp):
                        for tp_rank in range(tp):
                            slots = router_token_slots(layout, context_parallel_size=cp, cp_rank=cp_rank,
                                                       tensor_model_parallel_size=tp, tp_rank=tp_rank,
                                                       sequence_parallel=sp)
                            cases.append((samples, layout, slots, layers, experts, free if cp_rank == 0 else None))
    return cases


def same_routes(a, b) -> bool:
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype
                                             and torch.equal(x, y))

    return (eq(a.expert_ids, b.expert_ids) and eq(a.valid, b.valid) and eq(a.free_rows, b.free_rows)
            and a.layer_numbers == b.layer_numbers and a.num_valid == b.num_valid and a.num_free == b.num_free)


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8, help="samples packed into the microbatch")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--baseline", default=None, help="git revision whose localize_routes to time alongside")
    parser.add_argument("--step-ms", type=float, default=None, help="a measured step time to compare with")
    parser.add_argument("--achieved-tflops", type=float, default=400.0,
                        help="bf16 throughput assumed for the step estimate (H100 dense peak 989; ~40%% MFU)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    env = environment(device)
    dtype = torch.uint8 if args.experts <= 256 else torch.int16

    gen = torch.Generator().manual_seed(0)
    per_sample = args.tokens // args.samples
    routes = [torch.randint(0, args.experts, (per_sample, args.layers, args.topk), generator=gen, dtype=dtype)
              for _ in range(args.samples)]
    all_layers = tuple(range(1, args.layers + 1))
    thd = pack_thd([per_sample] * args.samples)
    thd_slots = router_token_slots(thd)
    results: dict = {"environment": env, "config": vars(args)}

    # ---- 1. the whole pipeline for one rank holding every token and layer
    stage_ms = {}
    local = localize_routes(routes, thd, thd_slots, all_layers, args.experts)
    stage_ms["localize"] = median_ms(time_calls(
        lambda: localize_routes(routes, thd, thd_slots, all_layers, args.experts), args.repeats))
    if cuda:
        stage_ms["pin"] = median_ms(time_calls(lambda: local.pin_memory(), args.repeats))
        pinned = local.pin_memory()
        stage_ms["h2d"] = median_ms(time_calls(lambda: pinned.to("cuda", non_blocking=True), args.repeats, sync=sync))
        on_device = pinned.to("cuda")
    else:
        stage_ms["pin"] = float("nan")
        stage_ms["h2d"] = float("nan")
        on_device = local
    stage_ms["int64"] = median_ms(time_calls(
        lambda: [on_device.for_layer(n).expert_ids.long() for n in all_layers], args.repeats, sync=sync))
    stage_ms["host part (localize + pin)"] = stage_ms["localize"] + (stage_ms["pin"] if cuda else 0.0)
    stage_ms["total"] = sum(stage_ms[k] for k in ("localize", "pin", "h2d", "int64") if stage_ms[k] == stage_ms[k])
    bytes_total = local.expert_ids.nbytes
    ids = args.tokens * args.layers * args.topk
    flops = qwen3_30b_a3b_step_flops(args.tokens, per_sample)
    estimate_ms = flops["step_flops"] / (args.achieved_tflops * 1e12) * 1e3
    step_ms = args.step_ms or estimate_ms
    step_basis = "measured (--step-ms)" if args.step_ms else (
        f"estimate: {flops['step_flops']:.3e} FLOP fwd+bwd (Qwen3-30B-A3B, {flops['active_matmul_params'] / 1e9:.2f}B "
        f"active matmul params, {args.samples} causal sequences of {per_sample}) at {args.achieved_tflops:.0f} TFLOP/s")
    where = {"localize": "host CPU", "pin": "host CPU", "h2d": "PCIe", "int64": device,
             "host part (localize + pin)": "host CPU", "total": ""}
    rows = [(stage, where[stage], round(ms, 3), f"{100 * ms / step_ms:.3f}%" if ms == ms else "n/a")
            for stage, ms in stage_ms.items()]
    title = (f"Route pipeline, {args.tokens} tokens x {args.layers} layers x top-{args.topk} ({dtype}, "
             f"{args.experts} experts, {bytes_total / 1e6:.1f} MB, {bytes_total / ids:.0f} B/id) on {device}; "
             f"step {step_ms:.0f} ms ({step_basis})")
    print_table(title, ["stage", "runs on", "ms (median)", "% of step"], rows)
    results["pipeline_ms"] = stage_ms
    results["bytes_per_microbatch"] = bytes_total
    results["step_ms"] = step_ms
    results["step_basis"] = step_basis
    results["target_1pct_met_host_part"] = stage_ms["host part (localize + pin)"] <= 0.01 * step_ms
    results["target_1pct_met_total"] = stage_ms["total"] <= 0.01 * step_ms

    # ---- 2. what one rank of a parallel layout pays
    variants = []
    bshd = pack_bshd([per_sample] * args.samples)
    half = tuple(range(1, args.layers // 2 + 1))
    for name, layout, slot_kwargs, layers in (
        ("THD, 1 rank (all tokens, all layers)", thd, {}, all_layers),
        ("BSHD, 1 rank", bshd, {}, all_layers),
        ("THD, TP2+SP rank 0", thd, dict(tensor_model_parallel_size=2, tp_rank=0, sequence_parallel=True), all_layers),
        ("THD, CP2 rank 0", thd, dict(context_parallel_size=2, cp_rank=0), all_layers),
        ("THD, PP2 stage 0 (layers 1-24)", thd, {}, half),
        ("THD, every other layer (non-contiguous)", thd, {}, all_layers[::2]),
        ("THD, CP2+TP2(SP)+PP2 rank", thd, dict(context_parallel_size=2, cp_rank=1, tensor_model_parallel_size=2,
                                                 tp_rank=1, sequence_parallel=True), half),
    ):
        slots = router_token_slots(layout, **slot_kwargs)
        out = localize_routes(routes, layout, slots, layers, args.experts)
        ms = median_ms(time_calls(lambda: localize_routes(routes, layout, slots, layers, args.experts),
                                  max(5, args.repeats // 2)))
        variants.append((name, out.expert_ids.shape[0], len(layers), round(out.expert_ids.nbytes / 1e6, 2),
                         f"{out.expert_ids.nbytes / bytes_total:.3f}", round(ms, 3)))
    print_table("localize_routes per rank", ["rank holds", "tokens", "layers", "MB", "fraction", "ms"], variants)
    results["variants"] = [dict(zip(("rank", "tokens", "layers", "MB", "fraction", "ms"), v)) for v in variants]

    # ---- 3. components (the profile behind the optimisation)
    fill = distinct_fill_ids(thd.num_slots, args.topk, args.experts, dtype)
    components = [
        ("distinct_fill_ids(32k slots)", median_ms(time_calls(
            lambda: distinct_fill_ids(thd.num_slots, args.topk, args.experts, dtype), args.repeats))),
        ("pack_per_slot(routes, tensor fill) [all slots, all layers]", median_ms(time_calls(
            lambda: pack_per_slot(routes, thd, fill.unsqueeze(1).expand(-1, args.layers, -1)),
            max(5, args.repeats // 2)))),
        ("pack_per_slot(tokens int64, scalar fill)", median_ms(time_calls(
            lambda: pack_per_slot([torch.zeros(per_sample, dtype=torch.long)] * args.samples, thd, 0),
            args.repeats))),
        ("memcpy of the same bytes (floor)", median_ms(time_calls(lambda: local.expert_ids.clone(), args.repeats))),
    ]
    print_table("Components (CPU)", ["call", "ms (median)"], [(n, round(v, 3)) for n, v in components])
    results["components_ms"] = dict(components)

    # ---- 4. before / after, interleaved on the same inputs, with an equality check
    baseline = None
    if args.baseline:
        try:
            baseline = load_baseline(args.baseline)
        except (OSError, subprocess.CalledProcessError) as error:  # no git / no history on this machine
            print(f"baseline {args.baseline} unavailable ({error}); skipping the before/after comparison")
    if baseline is not None:
        old_localize, old_pack = baseline
        cases = equality_cases()
        from megatron_r3.replay import microbatch

        equal = all(same_routes(localize_routes(*c), old_localize(*c)) for c in cases)
        runs = microbatch._copy_runs
        microbatch._copy_runs = lambda *a, **k: None  # the gather path too (taken when runs are many and short)
        try:
            equal = equal and all(same_routes(localize_routes(*c), old_localize(*c)) for c in cases)
        finally:
            microbatch._copy_runs = runs
        old_ms, new_ms = [], []
        for _ in range(max(5, args.repeats // 2)):
            old_ms += time_calls(lambda: old_localize(routes, thd, thd_slots, all_layers, args.experts), 1, 0)
            new_ms += time_calls(lambda: localize_routes(routes, thd, thd_slots, all_layers, args.experts), 1, 0)
        old_pack_ms = median_ms(time_calls(
            lambda: old_pack([torch.zeros(per_sample, dtype=torch.long)] * args.samples, thd, 0), args.repeats))
        rows = [
            (f"localize_routes @ {args.baseline}", round(median_ms(old_ms), 3)),
            ("localize_routes (working tree)", round(median_ms(new_ms), 3)),
            ("speed-up", round(median_ms(old_ms) / median_ms(new_ms), 1)),
            (f"pack_per_slot(tokens) @ {args.baseline}", round(old_pack_ms, 3)),
            ("pack_per_slot(tokens) (working tree)", round(components[2][1], 3)),
            (f"identical results on {len(cases)} layouts (BSHD/THD, CP2, TP2+SP, layer subsets, free rows, int16; "
             "copy-run and gather paths)", equal),
        ]
        print_table("Before / after (interleaved, same inputs)", ["", "value"], rows)
        results["baseline"] = {"rev": args.baseline, "old_ms": median_ms(old_ms), "new_ms": median_ms(new_ms),
                               "old_pack_tokens_ms": old_pack_ms, "identical": equal, "cases": len(cases)}
        if not equal:
            raise SystemExit("the working tree's localize_routes differs from the baseline's")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
