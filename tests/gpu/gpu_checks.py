"""GPU checks for the lent H100 (one rank, NCCL), written to a report. Run from the repository root:

    python tests/gpu/gpu_checks.py --out DIR [--skip-bench]

Sections
  replay_bf16   the gloo replay checks of tests/distributed/replay_checks.py (R2 record/replay, R3 exact routes,
                own-routes bitwise losses/grads, R2 inverse gather, missing/extra/unconsumed errors), in bf16 on the
                GPU, recompute none / full / selective moe, with torch's deterministic algorithms on
  sync_error    route layout (localize_routes), the asynchronous host-to-device copy, installation and the router's
                replay path (a ReplayTopKRouter forward in REPLAY_FORWARD and in a recompute) run under
                torch.cuda.set_sync_debug_mode("error"): any host sync raises
  sync_count    host syncs of a whole training step (forward, backward; recompute none and full), R3 replay vs
                native routing, with bench/sync_count.py's calibrated counter
  cp_attention  the TE-free context-parallel core attention at CP=1 vs megatron's DotProductAttention on CUDA
                (BSHD through our global-position path, and packed THD vs each document alone)
  trainer       pretrain_grpo.py for 3 steps with --router-replay R3 and off on the GPU (NCCL world of one)
  bench         bench/replay_overhead.py at Qwen3-30B-A3B-shaped layers, recompute none and full
Results: DIR/gpu_report.md (human) and DIR/gpu_report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)

import torch  # noqa: E402


def section(results: dict, name: str):
    def wrap(fn):
        start = time.time()
        try:
            results[name] = {"ok": True, **fn()}
        except Exception as exc:  # the report must say what failed, and the next section still runs
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.time() - start, 1)
        print(f"[{name}] {json.dumps(results[name])[:2000]}", flush=True)
        return fn

    return wrap


def replay_bf16() -> dict:
    from tests.distributed import replay_checks

    torch.use_deterministic_algorithms(True)
    try:
        out = {}
        for recompute in ("none", "full", "moe"):
            out[recompute] = replay_checks.check_layout("dp4", recompute, with_errors=recompute == "none",
                                                        dtype=torch.bfloat16)
            # the same with grouped-GEMM experts (torch._grouped_mm in bf16)
            out[f"grouped_{recompute}"] = replay_checks.check_layout("dp4_grouped", recompute, with_errors=False,
                                                                     dtype=torch.bfloat16)
        out["all_passed"] = all(all(v.values()) for v in out.values() if isinstance(v, dict))
        return out
    finally:
        torch.use_deterministic_algorithms(False)


def tiny_model(recompute: str = "none"):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_r3.model.gpt import build_gpt_chunks
    from megatron_r3.platform.distributed import parallel_context
    from megatron_r3.platform.parallel_context import ParallelSizes

    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if recompute == "full" else {}
    config = TransformerConfig(
        num_layers=4, hidden_size=256, ffn_hidden_size=512, num_attention_heads=8, num_moe_experts=16,
        moe_router_topk=4, moe_ffn_hidden_size=128, moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, normalization="RMSNorm",
        gated_linear_unit=True, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.bfloat16, bf16=True, pipeline_dtype=torch.bfloat16, apply_rope_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, **extra,
    )
    return config, build_gpt_chunks(config, parallel_context(ParallelSizes()), vocab_size=512, max_sequence_length=1024)


def routes_for(chunks, seq: int, batch: int):
    from megatron_r3.replay.layout import pack_bshd, router_token_slots
    from megatron_r3.replay.schedule import ReplayRouters

    routers = ReplayRouters(chunks)
    layers = chunks[0].config.num_layers
    experts, topk = chunks[0].config.num_moe_experts, chunks[0].config.moe_router_topk
    gen = torch.Generator().manual_seed(0)
    samples = [torch.argsort(torch.rand(seq, layers, experts, generator=gen), -1)[..., :topk].to(torch.uint8).pin_memory()
               for _ in range(batch)]
    layout = pack_bshd([seq] * batch)
    return routers, samples, layout, router_token_slots(layout), experts


def sync_error() -> dict:
    """Layout + copy + install + router replay under set_sync_debug_mode('error')."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_r3.replay.microbatch import localize_routes

    config, chunks = tiny_model()
    routers, samples, layout, slots, experts = routes_for(chunks, seq=512, batch=2)
    numbers = routers.layer_numbers
    hidden = torch.randn(512, 2, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        local = localize_routes(samples, layout, slots, numbers, experts).pin_memory().to("cuda", non_blocking=True)
        outputs = []
        for chunk_routers in routers.by_chunk:
            for number, router in chunk_routers.items():
                router.replay.install(local.for_layer(number))
                router.replay.action = RouterReplayAction.REPLAY_FORWARD
                router.replay.training_pass = True
                router.replay.collect_agreement = True
                with torch.no_grad():  # a checkpointed forward: the ids are queued for the recompute
                    outputs.append(router(hidden))
                router.replay.action = RouterReplayAction.REPLAY_BACKWARD
                with torch.enable_grad():
                    outputs.append(router(hidden))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # the replayed routing maps are the installed ids (checked after leaving the no-sync region)
    index, ok = 0, True
    for chunk_routers in routers.by_chunk:
        for number in chunk_routers:
            expected = torch.zeros(1024, experts, dtype=torch.bool, device="cuda").scatter(
                1, local.for_layer(number).expert_ids.long(), True)
            ok &= torch.equal(outputs[index][1], expected) and torch.equal(outputs[index + 1][1], expected)
            index += 2
    return {"no_sync_raised": True, "routing_maps_equal_installed_ids": bool(ok), "layers": len(numbers),
            "route_bytes_on_device": local.expert_ids.nbytes}


def sync_count() -> dict:
    """Host syncs of one training step (fwd + bwd, recompute none and full), R3 vs off, with bench/sync_count.py's
    calibrated counter (torch's sync debug mode alone misses `Event.synchronize`, which megatron's dispatcher uses)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from sync_count import SyncCounter, calibrate, count_step

    counter = SyncCounter()
    out = {"calibration_ok": all(case[-1] for case in calibrate(counter))}
    for recompute in ("none", "full"):
        out[recompute] = count_step(counter, recompute)
    out["replay_adds_no_sync"] = out["calibration_ok"] and all(out[r]["replay_adds"] <= 0 for r in ("none", "full"))
    return out


def cp_attention() -> dict:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_r3.model.cp_attention import ContextParallelDotProductAttention

    config = TransformerConfig(num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=2,
                               attention_dropout=0.0, params_dtype=torch.float32)
    reference = DotProductAttention(config, 1, AttnMaskType.causal, "self").cuda()
    ours = ContextParallelDotProductAttention(config, 1, AttnMaskType.causal, "self").cuda()
    ours.delegate_cp1_bshd = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(64, 2, 8, 32, device="cuda", generator=gen)
    k = torch.randn(64, 2, 2, 32, device="cuda", generator=gen)
    v = torch.randn(64, 2, 2, 32, device="cuda", generator=gen)
    bshd_diff = (ours(q, k, v, None) - reference(q, k, v, None)).abs().max().item()
    # packed THD: three documents (real 11/16/2 of padded 16/16/8) vs megatron on each document alone
    real = (11, 16, 2)  # of padded lengths 16, 16, 8
    cu_padded = torch.tensor([0, 16, 32, 40], dtype=torch.int32, device="cuda")
    cu_real = torch.tensor([0, 11, 27, 29], dtype=torch.int32, device="cuda")
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real,
                             cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                             max_seqlen_q=16, max_seqlen_kv=16)
    tq, tk, tv = q[:40, 0], k[:40, 0], v[:40, 0]
    out = ours(tq, tk, tv, None, packed_seq_params=params)
    thd_diff = 0.0
    for start, n in zip((0, 16, 32), real):
        piece = [t[start : start + n].unsqueeze(1) for t in (tq, tk, tv)]
        thd_diff = max(thd_diff, (out[start : start + n] - reference(*piece, None).squeeze(1)).abs().max().item())
    return {"bshd_max_abs_diff": bshd_diff, "thd_max_abs_diff": thd_diff,
            "within_1e-5": bshd_diff < 1e-5 and thd_diff < 1e-5}


def layout_cost() -> dict:
    """Route pipeline cost for one microbatch of 32k tokens x 48 layers x top-8 (uint8, 128 experts): lay out
    (CPU), copy to the GPU, and turn every layer's slice into the router's int64 ids; medians of 10."""
    import statistics

    from megatron_r3.replay.layout import pack_thd, router_token_slots
    from megatron_r3.replay.microbatch import localize_routes

    tokens, layers, topk, experts, samples = 32768, 48, 8, 128, 8
    gen = torch.Generator().manual_seed(0)
    per_sample = tokens // samples
    routes = [torch.randint(0, experts, (per_sample, layers, topk), generator=gen, dtype=torch.uint8).pin_memory()
              for _ in range(samples)]
    layout = pack_thd([per_sample] * samples)
    slots = router_token_slots(layout)
    numbers = tuple(range(1, layers + 1))
    cpu_ms, copy_ms, use_ms = [], [], []
    for _ in range(12):
        start = time.perf_counter()
        local = localize_routes(routes, layout, slots, numbers, experts).pin_memory()
        cpu_ms.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
        start = time.perf_counter()
        on_device = local.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        copy_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        ids = [on_device.for_layer(n).expert_ids.long() for n in numbers]
        torch.cuda.synchronize()
        use_ms.append((time.perf_counter() - start) * 1e3)
        del ids
    median = lambda xs: round(statistics.median(xs[2:]), 3)  # noqa: E731
    return {"tokens": tokens, "layers": layers, "topk": topk, "bytes_per_microbatch": local.expert_ids.nbytes,
            "localize_cpu_ms": median(cpu_ms), "h2d_copy_ms": median(copy_ms), "to_int64_all_layers_ms": median(use_ms)}


def run_subprocess(cmd: list[str], timeout: int) -> tuple[int, str]:
    # a fresh world of one: drop the rendezvous variables this process set for its own process group
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    return proc.returncode, (proc.stdout + proc.stderr)


def trainer(out_dir: str) -> dict:
    result = {}
    for mode in ("R3", "off"):
        run_dir = os.path.join(out_dir, f"grpo_{mode}")
        code, log = run_subprocess(
            [sys.executable, "pretrain_grpo.py", "--config", "configs/demo_tiny.yaml", "--router-replay", mode,
             "--train-iters", "3", "--run-dir", run_dir, "--no-progress", "--save-interval", "1000"], 600)
        lines = [line for line in log.splitlines() if " iteration " in line]
        result[mode] = {"exit_code": code, "iterations": lines[-3:] if code == 0 else log[-3000:]}
        if code == 0:
            with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
                last = json.loads(handle.read().strip().splitlines()[-1])
            keep = ("step", "reward/mean", "train/ppo_kl_first_minibatch", "replay/routing_agreement",
                    "replay/used_route_match", "r3/rollout_train_k3_kl", "timing/step_s")
            result[mode]["last_metrics"] = {k: last.get(k) for k in keep}
    return result


def bench() -> dict:
    out = {}
    for recompute in ("none", "full"):
        path = f"/tmp/bench_{recompute}.json"
        code, log = run_subprocess([sys.executable, "bench/replay_overhead.py", "--preset", "qwen3-30b-a3b-4l",
                                    "--recompute", recompute, "--steps", "20", "--warmup", "3", "--json", path], 560)
        out[recompute] = {"exit_code": code, "table": "\n".join(l for l in log.splitlines() if l.startswith("|"))}
        if code != 0:
            out[recompute]["log"] = log[-3000:]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_out"))
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_checks.py needs CUDA")
    from megatron_r3.platform.distributed import initialize_model_parallel
    from megatron_r3.platform.parallel_context import ParallelSizes

    initialize_model_parallel(ParallelSizes())
    results = {"environment": {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
    }}
    import megatron.core
    import transformers

    results["environment"].update(megatron_core=megatron.core.__version__, transformers=transformers.__version__)
    wanted = lambda name: args.only is None or name in args.only  # noqa: E731
    checks = [("replay_bf16", replay_bf16), ("sync_error", sync_error), ("sync_count", sync_count),
              ("cp_attention", cp_attention), ("trainer", lambda: trainer(args.out))]
    if not args.skip_bench:
        checks.append(("bench", bench))
    checks.insert(4, ("layout_cost", layout_cost))
    for name, fn in checks:
        if wanted(name):
            section(results, name)(fn)
            write_report(results, args.out)  # after every section: a timeout still leaves what was measured


def write_report(results: dict, out: str) -> None:
    with open(os.path.join(out, "gpu_report.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    with open(os.path.join(out, "gpu_report.md"), "w") as handle:
        handle.write(f"# GPU checks ({results['environment']['date']}, {results['environment']['device']})\n\n")
        handle.write("```json\n" + json.dumps(results, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
