"""Several GRPO runs through the CLI's own code path (`parse_grpo_args` -> `GRPOTrainer(args).train()`) in ONE launch.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 tests/e2e/grpo_runs.py --runs RUNS.json --out results.json
    python tests/e2e/grpo_runs.py --runs RUNS.json --out results.json              # one process

RUNS.json: a list of {"name": str, "flags": [CLI flags]} run in order (a later run may `--load` an earlier run's
checkpoints). Each run gets `--run-dir ROOT/NAME` (ROOT = the --root argument). Rank 0 writes
[{"name", "metrics": [metrics.jsonl rows], "experts": [class names of the routed-experts modules]}] to --out.

A run may add "gpu_settings": {argument: value}, set on the parsed arguments before the trainer is built: the
settings `train.arguments.apply_trainer_dtype` makes only on a GPU (`moe_grouped_gemm`, whose megatron flag
`validate_args` refuses without CUDA), so the CPU runs the GPU's code path (`GroupedExperts` in the layer spec,
their weight load/export and dist checkpoint). Only the names in `GPU_SETTINGS` are accepted.

One interpreter per launch instead of one per run: megatron's import and the process-group set-up (most of a tiny
run's time on a small CPU) are paid once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

GPU_SETTINGS = ("moe_grouped_gemm",)


def experts_modules(chunks) -> list[str]:
    """Class names of the routed-experts modules (`MoELayer.experts`) of the trainer's model chunks."""
    import torch

    names = set()
    for chunk in chunks:
        for module in chunk.modules():
            experts = getattr(module, "experts", None)
            if isinstance(experts, torch.nn.Module) and hasattr(module, "router"):
                names.add(type(experts).__name__)
    return sorted(names)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    options = parser.parse_args()
    with open(options.runs) as handle:
        runs = json.load(handle)

    import torch.distributed as dist

    from megatron_r3.platform.distributed import initialize_torch_distributed
    from megatron_r3.train.arguments import parse_grpo_args
    from megatron_r3.train.trainer import GRPOTrainer
    from tests.distributed.launch import finish_launch

    initialize_torch_distributed()
    records = []
    for run in runs:
        run_dir = os.path.join(options.root, run["name"])
        args = parse_grpo_args([*run["flags"], "--run-dir", run_dir])
        for name, value in run.get("gpu_settings", {}).items():
            if name not in GPU_SETTINGS:
                raise ValueError(f"gpu_settings {name!r}: only {GPU_SETTINGS} are settings the GPU adds")
            setattr(args, name, value)
        trainer = GRPOTrainer(args)
        experts = experts_modules(trainer.setup.chunks)
        trainer.train()
        dist.barrier()
        metrics = []
        path = os.path.join(run_dir, "metrics.jsonl")
        if dist.get_rank() == 0 and os.path.exists(path):
            with open(path) as handle:
                metrics = [json.loads(line) for line in handle if line.strip()]
        records.append({"name": run["name"], "metrics": metrics, "experts": experts})
        if dist.get_rank() == 0:
            print(f"RUN {run['name']} done ({len(metrics)} steps)", flush=True)
    finish_launch(records, options.out)


if __name__ == "__main__":
    main()
