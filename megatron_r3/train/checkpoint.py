"""Save and resume a GRPO run: model, optimizer, LR schedule, RNG, data position and step.

Model and optimizer go through megatron-core's dist checkpointing (layout independent: a run may resume on another
parallel layout). A save is atomic: everything is written into `step_NNNNNNN.tmp/`, renamed to `step_NNNNNNN/` once
every rank has finished, and only then does the `latest` tracker file (itself replaced atomically) point at it. A
crash mid-save leaves the previous checkpoint and tracker untouched; a stale `.tmp` is removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_r3.model.dist_checkpoint import load_model_state_dict, model_sharded_state_dict
from megatron_r3.platform.parallel_context import ParallelContext
from megatron_r3.train.checkpoint_integrity import verify_checkpoint, write_manifest

TRACKER = "latest"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:07d}")


def latest_step(root: Optional[str]) -> Optional[int]:
    """The step the tracker points at, or None when there is no complete checkpoint."""
    if not root:
        return None
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        return None
    with open(tracker) as handle:
        text = handle.read().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker} should hold a step number, found {text!r}")
    step = int(text)
    if not os.path.isdir(step_dir(root, step)):
        raise FileNotFoundError(f"{tracker} points at step {step}, but {step_dir(root, step)} is missing")
    return step


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def optimizer_sharding_metadata(optimizer) -> dict | None:
    """The `metadata` megatron's optimizers need for a dist checkpoint (what megatron.training passes them).

    `--use-distributed-optimizer`: megatron's default for a bare `sharded_state_dict` call,
    `fully_sharded_model_space`, builds flattened-range tensors that 0.19.2's dist checkpointing refuses
    ("ShardedTensor.flattened_range is not supported."), and `fully_reshardable` cannot load into torch's Adam (no
    apex/TE: `KeyError: 'step'` in `_set_main_param_and_optimizer_states`). `dp_reshardable` (megatron.training's
    default) works: the optimizer state reshards across data-parallel sizes; on another TP/PP/EP layout resume with
    `--no-load-optim` (the model's tensors load into any layout). Other optimizers need no metadata (None: the
    checkpoint carries no sharding-type key)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    optimizers = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    if any(isinstance(o, DistributedOptimizer) for o in optimizers):
        return {"distrib_optim_sharding_type": "dp_reshardable"}
    return None


def _materialize_distributed_optimizer_state(optimizer) -> None:
    """Before loading into a fresh `DistributedOptimizer`: give its torch Adam per-parameter state to load into.

    Without apex/TransformerEngine (torch's Adam), `DistributedOptimizer.state_dict()` reads every state's `step`
    and a fresh optimizer has none (a bare `AssertionError` at `assert len(steps) == 1`). megatron's own
    `_init_optimizer_states_with_dummy_values` (a zero-gradient step) creates the state; the loaded checkpoint then
    replaces it in place (steps, moments and fp32 main parameters)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """After `DistributedOptimizer.load_state_dict` without apex/TE: every parameter's torch-Adam `step` from the
    checkpoint's step, in a tensor of its own.

    megatron stores the common step in the param groups, but the per-parameter states come back with the step of the
    dummy state made before loading (1), and megatron's non-TE path hands one step tensor to every state, which torch's
    Adam then increments once per parameter. Either way the resumed run's bias corrections differ from the
    uninterrupted run's (its first update after resume differs)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if not isinstance(inner, DistributedOptimizer):
            continue
        for group in inner.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.optimizer.state.get(param)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = torch.full_like(state["step"], float(group["step"]))


def _sharded_state(chunks, optimizer, is_loading: bool, with_optimizer: bool = True) -> dict:
    sharded = model_sharded_state_dict(chunks)
    if with_optimizer:
        if is_loading:
            _materialize_distributed_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=is_loading,
                                                            metadata=optimizer_sharding_metadata(optimizer))
    return sharded


def save_checkpoint(root: str, step: int, chunks, optimizer, trainer_state: dict, parallel: ParallelContext) -> str:
    """Write checkpoint `step` (every rank calls this with its `parallel` context). `chunks` are the unwrapped model
    chunks."""
    from megatron.core import dist_checkpointing

    final, tmp = step_dir(root, step), step_dir(root, step) + ".tmp"
    if parallel.is_global_rank_zero:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(_sharded_state(chunks, optimizer, is_loading=False), tmp)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{parallel.rank:05d}.pt"))
    if parallel.is_global_rank_zero:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as handle:
            json.dump(trainer_state, handle, indent=1, sort_keys=True)
    _barrier()
    write_manifest(tmp, step, parallel)  # checksums of every file, inside the step dir: atomic with it
    if parallel.is_global_rank_zero:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as handle:
            handle.write(str(step))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _barrier()
    return final


def load_checkpoint(root: str, step: int, chunks, optimizer, parallel: ParallelContext, load_optimizer: bool = True,
                    load_rng: bool = True) -> dict:
    """Load checkpoint `step` into the chunks and optimizer, restore this rank's RNG; returns the trainer state.

    `load_optimizer=False` (megatron's `--no-load-optim`) loads the weights only: the optimizer starts fresh, and
    its main (fp32) copies of the parameters are refreshed from the loaded weights. `load_rng=False`
    (`--no-load-rng`) keeps this run's seeds."""
    from megatron.core import dist_checkpointing

    directory = step_dir(root, step)
    verify_checkpoint(root, step, parallel)  # damage -> one error naming the file and the last good step, on every rank
    loaded = dist_checkpointing.load(
        _sharded_state(chunks, optimizer, is_loading=True, with_optimizer=load_optimizer), directory
    )
    load_model_state_dict(chunks, loaded)
    if load_optimizer:
        try:
            with torch.no_grad():  # fp32 params of a distributed optimizer are copied into in place (leaf views)
                optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_steps(optimizer)
        except ValueError as error:
            if "Could not find parameter group" not in str(error):
                raise
            raise ValueError(
                f"--load {root}: this run's optimizer parameter groups (learning rate, weight decay) differ from the "
                f"checkpoint's; pass --no-load-optim to start a fresh optimizer (and --override-opt_param-scheduler "
                f"to use this run's schedule). megatron-core: {error}"
            ) from None
    else:
        optimizer.reload_model_params()
    rng_file = os.path.join(directory, "rng", f"rank_{parallel.rank:05d}.pt")
    if load_rng and os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    with open(os.path.join(directory, "trainer_state.json")) as handle:
        return json.load(handle)
