"""One-process probes of the trainer's failure paths, printed as JSON (run by test_trainer_failures.py):

- a crash in the middle of a checkpoint save leaves the previous checkpoint loadable and the tracker on it;
- a non-finite gradient norm skips the optimizer step (parameters and optimizer state untouched) and is counted.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main(run_dir: str) -> None:
    import torch

    from megatron_r3.platform.distributed import initialize_torch_distributed
    from megatron_r3.train import checkpoint as ckpt
    from megatron_r3.train.arguments import parse_grpo_args
    from megatron_r3.train.trainer import GRPOTrainer

    args = parse_grpo_args([
        "--config", "configs/demo_tiny.yaml", "--grpo-prompts-per-step", "4", "--grpo-group-size", "4",
        "--global-batch-size", "16", "--micro-batch-size", "8", "--router-replay", "R3", "--train-iters", "1",
        "--run-dir", run_dir, "--no-progress", "--save-interval", "1000",
    ])
    initialize_torch_distributed()
    trainer = GRPOTrainer(args)
    out = {}
    trainer.train_step()
    trainer.step = 1
    trainer.save()
    weights = {name: p.detach().clone() for name, p in trainer.setup.chunks[0].named_parameters()}
    # a "crash" during the next save: the temporary directory is half written and never renamed
    crashed = ckpt.step_dir(args.save, 2) + ".tmp"
    os.makedirs(crashed)
    with open(os.path.join(crashed, "metadata.json"), "w") as handle:
        handle.write("{ half written")
    out["latest_after_crash"] = ckpt.latest_step(args.save)
    for p in trainer.setup.chunks[0].parameters():
        p.data.add_(1.0)
    state = ckpt.load_checkpoint(args.save, 1, trainer.setup.chunks, trainer.setup.optimizer, trainer.setup.parallel)
    out["restored_step"] = state["step"]
    out["weights_restored"] = all(
        torch.equal(p, weights[name]) for name, p in trainer.setup.chunks[0].named_parameters()
    )
    # non-finite gradients: every rank computes the same norm (nan) and skips alike
    trainer.setup.zero_grad()
    first = next(iter(trainer.setup.model[0].parameters()))
    first.main_grad.fill_(float("nan"))
    before = {name: p.detach().clone() for name, p in trainer.setup.chunks[0].named_parameters()}
    norm = trainer._optimizer_step()
    out["skip_norm_is_nan"] = norm != norm
    out["skipped_steps"] = trainer.skipped_steps
    out["params_untouched"] = all(
        torch.equal(p, before[name]) for name, p in trainer.setup.chunks[0].named_parameters()
    )
    print("PROBE " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
