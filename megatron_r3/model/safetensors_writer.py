"""The one safetensors writer: a stream of (HF checkpoint name, full tensor) pairs as a HF model directory.

Layout (what `transformers`' `from_pretrained` and SGLang's loader read): one `model.safetensors`, or shards
`model-0000k-of-0000N.safetensors` listed in `model.safetensors.index.json` (`{"metadata": {"total_size": bytes},
"weight_map": {name: file}}`), plus `config.json` when a HF config is given. Its producers: the checkpoint export on
global rank 0 (`model/weights.save_hf_checkpoint`, also the trainer's disk weight sync) and a single process pushing
full tensors to SGLang (`rollout/engines/sglang/weight_sync.push_named_tensors`).

Tensors are streamed: at most one shard (`max_shard_bytes`, cut by `platform/buckets.iter_buckets`) is held on the
host at a time. Shards are written under temporary names and renamed once their count is known.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import torch

from megatron_r3.model.families import hf_config_to_json_dict
from megatron_r3.platform.buckets import iter_buckets, tensor_nbytes
from megatron_r3.platform.dtypes import dtype_name

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def shard_file_name(index: int, total: int) -> str:
    """The file of shard `index` (0-based) of `total`, as `transformers` names them."""
    return SAFE_SINGLE if total == 1 else f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def write_hf_directory(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    directory: str,
    *,
    hf_config=None,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write `named_tensors` (in their dtypes: the caller casts) into `directory`; returns the written file names.

    `hf_config` (a HF `PretrainedConfig`) becomes `config.json`, with `"dtype"` set to `dtype` when given. An
    index left by an earlier sharded write into the same directory is removed when this write is a single file."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    parts: list[tuple[str, list[str]]] = []
    total_size = 0
    on_host = ((name, tensor.detach().cpu().contiguous()) for name, tensor in named_tensors)
    for shard in iter_buckets(on_host, max_shard_bytes):
        temp = f"model-part-{len(parts):05d}.safetensors.tmp"
        save_file(dict(shard), os.path.join(directory, temp), metadata={"format": "pt"})
        parts.append((temp, [name for name, _ in shard]))
        total_size += sum(tensor_nbytes(name, tensor) for name, tensor in shard)
    written, weight_map = [], {}
    for index, (temp, names) in enumerate(parts):
        final = shard_file_name(index, len(parts))
        os.replace(os.path.join(directory, temp), os.path.join(directory, final))
        written.append(final)
        weight_map.update((name, final) for name in names)
    index_path = os.path.join(directory, SAFE_INDEX)
    if len(parts) > 1:
        with open(index_path, "w") as handle:
            json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, handle, indent=2)
        written.append(SAFE_INDEX)
    elif os.path.exists(index_path):
        os.remove(index_path)
    if hf_config is not None:
        config = hf_config_to_json_dict(hf_config)
        if dtype is not None:
            config["dtype"] = dtype_name(dtype)
        with open(os.path.join(directory, "config.json"), "w") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
        written.append("config.json")
    return written
