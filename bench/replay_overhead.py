"""Training-step time with R3 router replay / without, measured side by side in one process.

    python bench/replay_overhead.py --preset cpu-tiny            # laptop CPU, seconds
    python bench/replay_overhead.py --preset qwen3-30b-a3b-4l    # lent H100: hidden 2048, 128 experts, top-8
    python bench/replay_overhead.py --preset qwen3-30b-a3b-4l --recompute full

Each "off" step is a forward+backward of megatron's GPTModel through megatron's schedule with native routing; each
"R3" step is the same plus everything replay adds on the training path: laying out the microbatch's routes for
this rank (`localize_routes`, CPU), the asynchronous copy to the device, installing them through `run_schedule`,
and the routers' gather. The replayed routes are the model's own (recorded once and gathered back to per-sample
arrays), so both arms send the same tokens to the same experts. Steps alternate off / R3 (interleaved, so drift hits both alike); the table reports the
median of --steps steps each, after --warmup. Single rank (no model parallelism); the layout, not the parallelism,
is what replay touches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PRESETS = {
    # name: (num_layers, hidden, heads, query groups, head_dim, experts, topk, expert ffn, dense ffn, seq, micro batch)
    "cpu-tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                     num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=64, ffn_hidden_size=128,
                     seq_length=256, micro_batch_size=2, vocab_size=128),
    "cpu-30b-shape": dict(num_layers=2, hidden_size=2048, num_attention_heads=32, num_query_groups=4, kv_channels=128,
                          num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768, ffn_hidden_size=6144,
                          seq_length=512, micro_batch_size=1, vocab_size=4096),
    "qwen3-30b-a3b-4l": dict(num_layers=4, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
                             kv_channels=128, num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768,
                             ffn_hidden_size=6144, seq_length=4096, micro_batch_size=1, vocab_size=151936),
}


def build(parallel, preset: dict, recompute: str, dtype: torch.dtype, grouped_gemm: bool, expert_parallel: int = 1):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_r3.model.gpt import build_gpt_chunks

    extra = {"expert_model_parallel_size": expert_parallel} if expert_parallel > 1 else {}
    if recompute == "full":
        extra.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "moe":
        extra.update(recompute_granularity="selective", recompute_modules=["moe"])
    config = TransformerConfig(
        num_layers=preset["num_layers"], hidden_size=preset["hidden_size"],
        num_attention_heads=preset["num_attention_heads"], num_query_groups=preset["num_query_groups"],
        kv_channels=preset["kv_channels"], ffn_hidden_size=preset["ffn_hidden_size"],
        num_moe_experts=preset["num_moe_experts"], moe_router_topk=preset["moe_router_topk"],
        moe_ffn_hidden_size=preset["moe_ffn_hidden_size"], moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=grouped_gemm, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False, qk_layernorm=True,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype, use_cpu_initialization=not torch.cuda.is_available(),
        apply_rope_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False, **extra,
    )
    chunks = build_gpt_chunks(config, parallel, vocab_size=preset["vocab_size"],
                              max_sequence_length=preset["seq_length"])
    return config, chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available (cpu hides the GPUs)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    parser.add_argument("--recompute", choices=("none", "full", "moe"), default="none")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None)
    parser.add_argument("--grouped-gemm", action="store_true")
    parser.add_argument("--router-iters", type=int, default=200,
                        help="also time one router's forward+backward alone, native vs replay (0: skip)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--expert-model-parallel-size", type=int, default=1,
                        help="under torchrun: experts split over this many ranks (alltoall dispatcher); rank 0 reports")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")

    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_r3.platform.distributed import device, initialize_model_parallel
    from megatron_r3.platform.dtypes import torch_dtype
    from megatron_r3.platform.parallel_context import ParallelSizes
    from megatron_r3.replay.layout import pack_bshd, router_token_slots
    from megatron_r3.replay.microbatch import localize_routes
    from megatron_r3.replay.schedule import ReplayRouters, run_schedule

    parallel = initialize_model_parallel(ParallelSizes(expert_model_parallel_size=args.expert_model_parallel_size))
    rank0 = parallel.is_global_rank_zero
    preset = PRESETS[args.preset]
    dtype = torch_dtype(args.dtype or ("bf16" if torch.cuda.is_available() else "fp32"))
    config, chunks = build(parallel, preset, args.recompute, dtype, args.grouped_gemm, args.expert_model_parallel_size)
    model = chunks[0]
    routers = ReplayRouters(chunks)
    dev = device()
    b, s, experts, topk = preset["micro_batch_size"], preset["seq_length"], preset["num_moe_experts"], preset["moe_router_topk"]
    layers = preset["num_layers"]
    tokens = torch.randint(0, preset["vocab_size"], (b, s), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(s).expand(b, s)
    layout = pack_bshd([s] * b)
    slots = router_token_slots(layout)
    tokens, positions = tokens.to(dev), positions.to(dev)

    def forward_step(data_iterator, model):
        output = model(tokens, positions, None, labels=tokens)
        return output, lambda out: (out.float().mean(), {"loss": out.detach().float().mean()})

    # Rollout-style routes that are the model's own: recorded once, gathered back to per-sample [T, L_all, K]
    # uint8 arrays (the format engines send), so both arms route every token to the same experts and only the
    # replay machinery differs (random routes would change the experts' load, not measure replay).
    from megatron_r3.replay.r2 import gather_recorded_routes

    with torch.no_grad():
        recorded = run_schedule(
            get_forward_backward_func(), routers, action=RouterReplayAction.RECORD, forward_step_func=forward_step,
            data_iterator=iter([None]), model=model, num_microbatches=1, forward_only=True, seq_length=s,
            micro_batch_size=b, host_group=parallel.host_group,
        ).recorded
    sample_routes = gather_recorded_routes(recorded, [layout], [slots], num_layers=layers, topk=topk,
                                           dtype=torch.uint8)[0]
    if torch.cuda.is_available():
        sample_routes = [r.pin_memory() for r in sample_routes]

    def step(replay: bool) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        routes = None
        if replay:
            local = localize_routes(sample_routes, layout, slots, routers.layer_numbers, experts)
            routes = [local.pin_memory().to(dev)]
        run_schedule(
            get_forward_backward_func(), routers,
            action=RouterReplayAction.REPLAY_FORWARD if replay else None, routes=routes,
            forward_step_func=forward_step, data_iterator=iter([None]), model=model, num_microbatches=1,
            forward_only=False, seq_length=s, micro_batch_size=b, host_group=parallel.host_group,
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {False: [], True: []}
    for i in range(args.warmup + args.steps):
        for replay in (False, True):
            seconds = step(replay)
            if i >= args.warmup:
                times[replay].append(seconds)
            model.zero_grad(set_to_none=True)
    off, r3 = statistics.median(times[False]), statistics.median(times[True])
    pair = sorted(b / a for a, b in zip(times[False], times[True]))
    quartile = lambda q: pair[min(len(pair) - 1, int(q * len(pair)))]  # noqa: E731
    router = router_times(model, b * s, preset, dtype, dev, args.router_iters) if args.router_iters else None
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    rows = [
        ("device", card), ("expert parallel", args.expert_model_parallel_size), ("preset", args.preset), ("recompute", args.recompute), ("dtype", str(dtype)),
        ("tokens/step", b * s), ("steps (median of)", args.steps),
        ("off  step ms", f"{off * 1e3:.2f}"), ("R3   step ms", f"{r3 * 1e3:.2f}"), ("R3 / off", f"{r3 / off:.4f}"),
        ("pairwise R3/off median [IQR]", f"{statistics.median(pair):.4f} [{quartile(0.25):.4f}, {quartile(0.75):.4f}]"),
        ("off step ms min / max", f"{min(times[False]) * 1e3:.2f} / {max(times[False]) * 1e3:.2f}"),
    ]
    if router is not None:
        native_us, replay_us = router
        calls = layers * (2 if args.recompute != "none" else 1)  # router forwards per step (recompute re-runs them)
        rows += [
            ("router fwd+bwd native us (median)", f"{native_us:.1f}"),
            ("router fwd+bwd replay us (median)", f"{replay_us:.1f}"),
            ("router replay - native, per step ms", f"{(replay_us - native_us) * calls / 1e3:.3f}"),
            ("  as % of the off step", f"{100 * (replay_us - native_us) * calls / 1e3 / (off * 1e3):.3f}%"),
        ]
    if not rank0:
        return
    width = max(len(k) for k, _ in rows)
    print("| " + "metric".ljust(width) + " | value |\n|" + "-" * (width + 2) + "|-------|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")
    if args.json:
        import json

        with open(args.json, "w") as handle:
            # (the lists are seconds per step, despite their historical names)
            json.dump({k: v for k, v in rows} | {"off_ms": times[False], "r3_ms": times[True]}, handle, indent=1)


def router_times(model, num_tokens: int, preset: dict, dtype, dev, iters: int) -> tuple[float, float]:
    """Median microseconds of one router's forward + backward, native top-k vs replaying installed ids.

    This is everything replay changes inside the model (a gather of the installed ids instead of a top-k), timed
    alone, without the step's noise. Arms alternate; CUDA events on the GPU, perf_counter on the CPU."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_r3.replay.router import InstalledRoutes, ReplayTopKRouter

    router = next(m for m in model.modules() if isinstance(m, ReplayTopKRouter))
    state = router.replay
    hidden = torch.randn(num_tokens, 1, preset["hidden_size"], device=dev, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        ids = torch.topk(router.gating(hidden.view(num_tokens, -1)).float(), preset["moe_router_topk"], dim=-1)[1]
    ids = ids.to(torch.uint8 if preset["num_moe_experts"] <= 256 else torch.int16)
    cuda = dev.type == "cuda"

    def once(replay: bool) -> float:
        state.action = RouterReplayAction.REPLAY_FORWARD if replay else None
        if replay:
            state.install(InstalledRoutes(expert_ids=ids))
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        probs, routing_map = router(hidden)
        probs.float().sum().backward()
        if cuda:
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) * 1e3
        else:
            elapsed = (time.perf_counter() - t0) * 1e6
        hidden.grad = None
        router.zero_grad(set_to_none=True)
        return elapsed

    samples = {False: [], True: []}
    for i in range(iters + 10):
        for replay in (False, True):
            elapsed = once(replay)
            if i >= 10:
                samples[replay].append(elapsed)
    state.reset()
    return statistics.median(samples[False]), statistics.median(samples[True])


if __name__ == "__main__":
    main()
