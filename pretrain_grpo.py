"""GRPO for Mixture-of-Experts models on megatron-core, with router replay (R2 / R3).

    python pretrain_grpo.py --config configs/demo_tiny.yaml --router-replay R3
    torchrun --nproc-per-node 4 pretrain_grpo.py --config configs/demo_tiny.yaml --router-replay R3 \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Megatron's own flags (parallelism, recompute, optimizer, --grpo-* / --rl-*) plus megatron_r3's (--router-replay,
--config, --rollout-engine, ...; see `python pretrain_grpo.py --help`). The resolved configuration is printed by
megatron on rank 0 and saved as RUN_DIR/config.yaml.
"""

import os

import torch.distributed as dist

from megatron_r3.platform.distributed import end_finished_run, initialize_torch_distributed
from megatron_r3.train.arguments import parse_grpo_args, save_resolved_config
from megatron_r3.train.trainer import GRPOTrainer


def main(argv=None):
    args = parse_grpo_args(argv)
    initialize_torch_distributed()
    if dist.get_rank() == 0:
        save_resolved_config(args, os.path.join(args.run_dir, "config.yaml"))
    return GRPOTrainer(args).train()


if __name__ == "__main__":
    main()
    end_finished_run(0)  # only after a finished run: errors propagate with their traceback and exit code
