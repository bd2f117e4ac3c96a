"""The one bucketer: a stream of (name, tensor) pairs cut into lists of at most `bucket_bytes` bytes.

Its users: the weight export (`model/weights.export_hf_buckets`, where every rank must cut the same buckets although
only rank 0 holds tensors), the safetensors shards of `model/safetensors_writer.py`, and SGLang's weight update
requests (`rollout/engines/sglang/weight_sync.py`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch

NamedTensor = tuple[str, Optional[torch.Tensor]]


def tensor_nbytes(name: str, tensor: Optional[torch.Tensor]) -> int:
    """The default size of an item: its tensor's bytes."""
    return tensor.numel() * tensor.element_size()


def iter_buckets(
    items: Iterable[NamedTensor],
    bucket_bytes: int,
    nbytes_of: Callable[[str, Optional[torch.Tensor]], int] = tensor_nbytes,
) -> Iterator[list[NamedTensor]]:
    """Consecutive items grouped into lists of at most `bucket_bytes` bytes; an item larger than that forms a list
    of its own. Sizes come from `nbytes_of(name, tensor)`: a caller whose tensors are None on some ranks sizes them
    by name, so every rank cuts the same buckets."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket, size = [], 0
    for name, tensor in items:
        nbytes = nbytes_of(name, tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
