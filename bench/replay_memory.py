"""Replay state held per microbatch: the installed routes (`MicrobatchRoutes`) and the routers' recompute queues.

    python bench/replay_memory.py --device cpu [--baseline af9bcad] [--json out.json]
    python bench/replay_memory.py --device cuda --preset qwen3-30b-a3b-4l --baseline af9bcad

1. `MicrobatchRoutes.nbytes` for a microbatch of --tokens x --layers x top-k (uint8 up to 256 experts, int16 beyond):
   bytes per (token x layer x k) id held from `localize_routes` until each router widens its slice.
2. The recompute queue: with activation recompute (full, or selective `moe`) every replayed router call of the
   checkpointed forward queues its ids until the recompute in backward pops them (one microbatch per router here;
   pipeline warm-up keeps up to `pp` microbatches in flight). Measured inside a real training step (megatron's
   schedule through `run_schedule`, R3 replay of the model's own routes) at the moment the loss is computed, i.e.
   after the forward, before the backward: the tensors queued, and the bytes they own beyond the installed routes.
   With --baseline REV the routers' state class of that git revision runs the same step (before / after). On CUDA
   the allocator's `memory_allocated()` at that moment is reported too.
Target: <= 2 bytes per token x layer x k until use.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, print_table, resolve_device, revision_source, write_json  # noqa: E402

import torch  # noqa: E402

MEMORY_PRESETS = {
    # a CPU-sized model with the queue-relevant shape: tokens x MoE layers x top-k
    "cpu-small": dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                      num_moe_experts=16, moe_router_topk=4, moe_ffn_hidden_size=64, ffn_hidden_size=128,
                      seq_length=1024, micro_batch_size=2, vocab_size=128),
}


def load_baseline_state(rev: str):
    try:
        source = revision_source(rev, "megatron_r3/replay/router.py")
    except (OSError, subprocess.CalledProcessError):  # revisions before the router moved into replay/
        source = revision_source(rev, "megatron_r3/model/replay_router.py")
    name = f"_baseline_replay_router_{rev}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source, f"{rev}:replay_router.py", "exec"), module.__dict__)
    return module.RouterReplayState


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", default=None, help="cpu-small, or a bench/replay_overhead.py preset")
    parser.add_argument("--tokens", type=int, default=32768, help="microbatch of part 1")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--baseline", default=None, help="git revision whose RouterReplayState to compare")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    results: dict = {"environment": environment(device)}

    from megatron_r3.replay.layout import pack_bshd, pack_thd, router_token_slots
    from megatron_r3.replay.microbatch import localize_routes

    # ------------------------------------------------------------------ 1. MicrobatchRoutes
    rows = []
    for experts in (128, 512):
        dtype = torch.uint8 if experts <= 256 else torch.int16
        per = args.tokens // 8
        gen = torch.Generator().manual_seed(0)
        samples = [torch.randint(0, experts, (per - 5, args.layers, args.topk), generator=gen, dtype=dtype)
                   for _ in range(8)]  # 5 pad rows per sample
        layout = pack_thd([per - 5] * 8, pad_multiple=8)
        free = [None] * 7 + [torch.zeros(per - 5, dtype=torch.bool)]
        for with_free in (False, True):
            local = localize_routes(samples, layout, router_token_slots(layout), range(1, args.layers + 1), experts,
                                    free_rows=free if with_free else None)
            ids = local.expert_ids.numel()
            rows.append((experts, str(dtype).replace("torch.", ""), "yes" if with_free else "no", local.num_tokens,
                         round(local.nbytes / 1e6, 3), round(local.nbytes / ids, 4)))
    print_table(f"MicrobatchRoutes held per microbatch ({args.tokens} tokens x {args.layers} layers x top-{args.topk}); "
                "target <= 2 B/id", ["experts", "dtype", "fallback rows", "tokens", "MB", "bytes / id"], rows)
    results["microbatch_routes"] = [dict(zip(("experts", "dtype", "free_rows", "tokens", "MB", "bytes_per_id"), r))
                                    for r in rows]

    # ------------------------------------------------------------------ 2. recompute queue inside a training step
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_r3.platform.distributed import initialize_model_parallel
    from megatron_r3.platform.parallel_context import ParallelSizes
    from megatron_r3.replay.r2 import gather_recorded_routes
    from megatron_r3.replay.schedule import ReplayRouters, run_schedule
    from replay_overhead import PRESETS, build

    parallel = initialize_model_parallel(ParallelSizes())
    presets = dict(PRESETS, **MEMORY_PRESETS)
    preset = presets[args.preset or ("qwen3-30b-a3b-4l" if device == "cuda" else "cpu-small")]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, s = preset["micro_batch_size"], preset["seq_length"]
    experts, topk, layers = preset["num_moe_experts"], preset["moe_router_topk"], preset["num_layers"]
    arms = [("working tree", None)]
    if args.baseline:
        try:
            arms.insert(0, (f"@ {args.baseline}", load_baseline_state(args.baseline)))
        except (OSError, subprocess.CalledProcessError) as error:  # no git / no history on this machine
            print(f"baseline {args.baseline} unavailable ({error}); measuring the working tree only")
    queue_rows = []
    for recompute in ("full", "moe"):
        config, chunks = build(parallel, preset, recompute, dtype, grouped_gemm=False)
        model = chunks[0]
        if device == "cuda":
            model.cuda()
        routers = ReplayRouters(chunks)
        tokens = torch.randint(0, preset["vocab_size"], (b, s), generator=torch.Generator().manual_seed(0))
        tokens, positions = tokens.to(device), torch.arange(s).expand(b, s).to(device)
        layout = pack_bshd([s] * b)
        slots = router_token_slots(layout)
        original_states = {id(r): r.router_replay for per in routers.by_chunk for r in per.values()}

        def plain_step(data_iterator, model):
            output = model(tokens, positions, None, labels=tokens)
            return output, lambda out: (out.float().mean(), {"loss": out.detach().float().mean()})

        with torch.no_grad():  # the model's own routes, as rollout-style per-sample arrays
            recorded = run_schedule(get_forward_backward_func(), routers, action=RouterReplayAction.RECORD,
                                    forward_step_func=plain_step, data_iterator=iter([None]), model=model,
                                    num_microbatches=1, forward_only=True, seq_length=s, micro_batch_size=b,
                                    host_group=parallel.host_group).recorded
        sample_routes = gather_recorded_routes(recorded, [layout], [slots], num_layers=layers, topk=topk,
                                               dtype=torch.uint8 if experts <= 256 else torch.int16)[0]
        for arm, state_class in arms:
            for per in routers.by_chunk:
                for router in per.values():
                    fresh = state_class() if state_class is not None else original_states[id(router)]
                    fresh.layer_number = original_states[id(router)].layer_number
                    router.router_replay = fresh
            for fallback in (False, True):
                free = [torch.zeros(s, dtype=torch.bool) for _ in range(b)] if fallback else None
                if fallback:
                    free[0][::7] = True  # a few counted native rows: the queue can no longer reuse the installed ids
                local = localize_routes(sample_routes, layout, slots, routers.layer_numbers, experts,
                                        free_rows=free).to(device)
                installed = local.expert_ids.untyped_storage().data_ptr()
                snapshot = {}

                def forward_step(data_iterator, model):
                    output = model(tokens, positions, None, labels=tokens)

                    def loss(out):
                        queued = [t for state in routers.states() for t in state._backward]
                        snapshot["ids"] = sum(t.numel() for t in queued)
                        snapshot["bytes"] = sum(t.numel() * t.element_size() for t in queued)
                        snapshot["own_bytes"] = sum(t.numel() * t.element_size() for t in queued
                                                    if t.untyped_storage().data_ptr() != installed)
                        snapshot["dtypes"] = sorted({str(t.dtype).replace("torch.", "") for t in queued})
                        if device == "cuda":
                            snapshot["allocated"] = torch.cuda.memory_allocated()
                        return out.float().mean(), {"loss": out.detach().float().mean()}

                    return output, loss

                if device == "cuda":
                    torch.cuda.synchronize()
                run_schedule(get_forward_backward_func(), routers, action=RouterReplayAction.REPLAY_FORWARD,
                             routes=[local], forward_step_func=forward_step, data_iterator=iter([None]), model=model,
                             num_microbatches=1, forward_only=False, seq_length=s, micro_batch_size=b,
                             host_group=parallel.host_group)
                model.zero_grad(set_to_none=True)
                ids = snapshot["ids"] or 1
                queue_rows.append((recompute, arm, "yes" if fallback else "no", snapshot["ids"],
                                   "/".join(snapshot["dtypes"]), round(snapshot["bytes"] / 1e6, 4),
                                   round(snapshot["own_bytes"] / 1e6, 4), round(snapshot["own_bytes"] / ids, 3),
                                   round(snapshot.get("allocated", float("nan")) / 1e6, 2)
                                   if device == "cuda" else "n/a"))
        for per in routers.by_chunk:
            for router in per.values():
                router.router_replay = original_states[id(router)]
    print_table(f"Recompute queue after the forward of one microbatch ({b}x{s} tokens, {layers} MoE layers, "
                f"top-{topk} of {experts}, {device})",
                ["recompute", "router state", "fallback rows", "queued ids", "dtype", "queued MB", "new MB",
                 "new bytes / id", "allocated MB (cuda)"], queue_rows)
    results["recompute_queue"] = [dict(zip(("recompute", "state", "fallback_rows", "ids", "dtype", "queued_MB",
                                            "new_MB", "new_bytes_per_id", "allocated_MB"), r)) for r in queue_rows]
    write_json(args.json, results)


if __name__ == "__main__":
    main()
