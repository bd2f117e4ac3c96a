"""Is the fast path's fwd+bwd step bound by the host (Python, kernel launches) or by the GPU, and where does the host
time go? bench/layer_mfu.py's fast model (GroupedExperts + SDPA, Qwen3-30B-A3B-shaped layers).

    python bench/host_profile.py --device cuda [--json out.json]     # ~20 s on an H200
    python bench/host_profile.py --device cpu                         # the CPU preset (seconds)

Tables
  issue vs wall  per step: the time until the Python call returns (the host has issued all the work; the step has no
                 host sync left on the fast path) and the time until the GPU has finished it. Issue ~ wall means the
                 GPU waits for the host: host-bound; issue << wall means the GPU is the limit.
  python         cProfile over --steps steps: the top functions by own (self) time and by cumulative time, per step.
                 cProfile slows Python down (~1.5-2x), so read the shares, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, print_table, select_device, write_json  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.device = select_device(args.device)

    from layer_mfu import PRESETS, Stepper, build, sync

    from megatron_r3.platform.distributed import device, initialize_model_parallel
    from megatron_r3.platform.parallel_context import ParallelSizes

    args.preset = args.preset or ("qwen3-30b-a3b-4l" if args.device == "cuda" else "cpu-tiny")
    preset = PRESETS[args.preset]
    initialize_model_parallel(ParallelSizes())
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    results = {"environment": environment(args.device), "args": vars(args)}
    _, model = build(preset, dtype, fast=True)
    stepper = Stepper(model, preset, dev)
    for _ in range(args.warmup):
        stepper.step()

    issue, wall = [], []
    for _ in range(max(args.steps, 5)):
        sync(dev)
        start = time.perf_counter()
        stepper.run()
        issue.append(time.perf_counter() - start)
        sync(dev)
        wall.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    rows = [("host issue ms (Python call returns)", statistics.median(issue) * 1e3),
            ("wall ms (GPU finished)", statistics.median(wall) * 1e3),
            ("issue / wall", statistics.median(issue) / statistics.median(wall))]
    results["issue_vs_wall"] = rows
    print_table(f"host issue time vs wall time per step, {args.preset}, {dtype} (median of {len(wall)})",
                ["quantity", "value"], rows)

    profiler = cProfile.Profile()
    for _ in range(args.steps):
        sync(dev)
        profiler.enable()
        stepper.run()
        model.zero_grad(set_to_none=True)
        profiler.disable()
    sync(dev)
    stats = pstats.Stats(profiler)
    entries = []
    for (filename, line, name), (_, calls, self_s, cum_s, _) in stats.stats.items():
        where = f"{os.path.basename(filename)}:{line}({name})" if filename != "~" else name
        entries.append((where[:100].replace("|", "/"), self_s * 1e3 / args.steps, cum_s * 1e3 / args.steps,
                        calls / args.steps))
    total = sum(e[1] for e in entries)
    results["python_total_ms_per_step"] = total
    for key, index in (("self", 1), ("cumulative", 2)):
        rows = sorted(entries, key=lambda e: -e[index])[:args.top]
        results[f"python_top_{key}"] = rows
        print_table(f"Python under cProfile, top {args.top} by {key} time ({total:.1f} ms of Python per step)",
                    ["function", "self ms / step", "cumulative ms / step", "calls / step"], rows)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
