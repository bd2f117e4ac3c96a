"""GRPO for Mixture-of-Experts models on megatron-core, with router replay (R2 / R3).

    python pretrain_grpo.py --config configs/demo_tiny.yaml --router-replay R3
    torchrun --nproc-per-node 4 pretrain_grpo.py --config configs/demo_tiny.yaml --router-replay R3 \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Megatron's own flags (parallelism, recompute, optimizer, --grpo-* / --rl-*) plus megatron_r3's (--router-replay,
--config, --rollout-engine, ...; see `python pretrain_grpo.py --help`). The resolved configuration is printed by
megatron on rank 0 and saved as RUN_DIR/config.yaml.
"""

import os
import sys
import traceback

import torch.distributed as dist

from megatron_r3.platform.distributed import end_finished_run, exit_without_teardown, initialize_torch_distributed
from megatron_r3.train.arguments import parse_grpo_args, save_resolved_config
from megatron_r3.train.trainer import GRPOTrainer


def main(argv=None):
    args = parse_grpo_args(argv)
    initialize_torch_distributed()
    if dist.get_rank() == 0:
        save_resolved_config(args, os.path.join(args.run_dir, "config.yaml"))
    return GRPOTrainer(args).train()


def run_cli(argv=None) -> None:
    """The process entry: a finished run ends through `end_finished_run`; a failed one prints its traceback and
    exits 1 at once, without the interpreter's teardown of process groups (which can block for minutes on gloo's
    transport threads), so its sockets close and the other ranks (e.g. other pipeline stages blocked in a
    receive from it) fail and exit promptly too."""
    try:
        main(argv)
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - any failure ends this rank now
        traceback.print_exc()
        sys.stderr.flush()
        exit_without_teardown(1)
    end_finished_run(0)


if __name__ == "__main__":
    run_cli()
