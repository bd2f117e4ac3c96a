"""GRPO for Mixture-of-Experts models on megatron-core, with router replay (R2 / R3).

    python pretrain_grpo.py --config configs/demo_tiny.yaml --router-replay R3
    torchrun --nproc-per-node 4 pretrain_grpo.py --config configs/demo_tiny.yaml --router-replay R3 \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel

Megatron's own flags (parallelism, recompute, optimizer, --grpo-* / --rl-*) plus megatron_r3's (--router-replay,
--config, --rollout-engine, ...; see `python pretrain_grpo.py --help`). The resolved configuration is saved as
RUN_DIR/config.yaml; megatron's argument dump, warnings and the traceback of a failed run go to RUN_DIR/logs/.
Bad inputs end the run with one line `error: ...` (see megatron_r3/train/launch.py).
"""

import sys
import traceback

from megatron_r3.train.launch import run_main  # light: no torch before the command line has been checked


def _main(argv, run_log):
    import os

    import torch.distributed as dist

    from megatron_r3.platform.distributed import initialize_torch_distributed
    from megatron_r3.platform.logging import get_logger
    from megatron_r3.train.arguments import parse_grpo_args, save_resolved_config
    from megatron_r3.train.trainer import GRPOTrainer

    args = parse_grpo_args(argv, run_log=run_log)
    initialize_torch_distributed()
    trainer = GRPOTrainer(args)  # refuses first what would overwrite an earlier run's outputs
    if dist.get_rank() == 0:
        save_resolved_config(args, os.path.join(args.run_dir, "config.yaml"))
    history = trainer.train()
    get_logger("megatron_r3.pretrain_grpo").info(
        f"done: {len(history)} steps; outputs in {args.run_dir}/ (metrics.jsonl, config.yaml, "
        f"{os.path.relpath(args.save, args.run_dir) if args.save.startswith(args.run_dir) else args.save}/, "
        f"tensorboard/, logs/)")
    return history


def main(argv=None):
    return run_main(_main, argv)


def run_cli(argv=None) -> None:
    """The process entry. A bad command line (exit 2) leaves before torch is imported. A finished run ends through
    `end_finished_run`; a failed one (its one-line error already printed by `run_main`, or the traceback of an
    unexpected error) exits 1 at once, without the interpreter's teardown of process groups (which can block for
    minutes on gloo's transport threads), so its sockets close and the other ranks (e.g. other pipeline stages
    blocked in a receive from it) fail and exit promptly too."""
    try:
        code = main(argv)
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - any failure ends this rank now
        traceback.print_exc()
        sys.stderr.flush()
        code = 1
    if code == 2:
        sys.exit(code)
    from megatron_r3.platform.distributed import end_finished_run, exit_without_teardown

    if code == 0:
        end_finished_run(0)
    exit_without_teardown(code)


if __name__ == "__main__":
    run_cli()
