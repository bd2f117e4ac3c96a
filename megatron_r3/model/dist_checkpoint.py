"""Megatron dist checkpoints of GPTModel chunks: layout-independent save/load (tensors under their global keys, so a
checkpoint saved from one parallel layout loads into any other), with the HF config stored beside the tensors."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch.distributed as dist

from megatron_r3.model.families import hf_config_to_json_dict, load_hf_config
from megatron_r3.platform.parallel_context import ParallelContext

HF_CONFIG_IN_DIST_CHECKPOINT = "hf_config.json"


def model_sharded_state_dict(chunks) -> dict:
    """Megatron's sharded state dict of this rank's chunks, under megatron's own keys (`model` for one chunk,
    `model0`, `model1`, ... with virtual pipeline stages). The tensors are stored under their *global* keys (layer
    numbers include the PP/VP offset, experts their global id, TP shards their offsets), so a checkpoint saved from
    one layout loads into any other."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def load_model_state_dict(chunks, state_dict: Mapping[str, Any]) -> None:
    """Put a `dist_checkpointing.load(model_sharded_state_dict(chunks), ...)` result back into the chunks."""
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        missing, unexpected = chunk.load_state_dict(state_dict[key], strict=False)
        missing = [name for name in missing if not name.endswith("_extra_state")]
        if missing or unexpected:
            raise KeyError(f"checkpoint and model chunk disagree: missing {missing[:8]}, unexpected {unexpected[:8]}")


def save_dist_checkpoint(chunks, directory: str, parallel: ParallelContext, *, hf_config=None) -> None:
    """`megatron.core.dist_checkpointing.save` of the chunks (every rank calls it with its `ParallelContext`); global
    rank 0 also writes the HF config as `hf_config.json` so that the checkpoint alone says which model it holds."""
    from megatron.core import dist_checkpointing

    if parallel.is_global_rank_zero:
        os.makedirs(directory, exist_ok=True)
        if hf_config is not None:
            with open(os.path.join(directory, HF_CONFIG_IN_DIST_CHECKPOINT), "w") as handle:
                json.dump(hf_config_to_json_dict(hf_config), handle, indent=2, sort_keys=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), directory)


def load_dist_checkpoint(chunks, directory: str) -> None:
    """Load a checkpoint written by `save_dist_checkpoint` (from any layout) into this rank's chunks."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), directory)
    load_model_state_dict(chunks, loaded)


def hf_config_of_dist_checkpoint(directory: str):
    """The HF config stored next to a dist checkpoint by `save_dist_checkpoint` (checked against the families)."""
    return load_hf_config(os.path.join(directory, HF_CONFIG_IN_DIST_CHECKPOINT))
