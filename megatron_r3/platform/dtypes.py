"""The one dtype table: how flags, files and wire formats name torch dtypes.

Flags say `bf16` / `fp16` / `fp32` (megatron's spelling); HF `config.json` (`"dtype": "bfloat16"`) and SGLang's weight
update requests (the server resolves each name with `getattr(torch, name)`) use torch's attribute names. Every
conversion between the two goes through `torch_dtype` and `dtype_name`, so a new spelling is added here once. The
table itself imports no torch (flag parsers and config dataclasses read it before the heavy imports).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import torch

SHORT_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""Megatron's flag spellings (`--bf16`, `--rollout-dtype bf16`, the conversion tools' `--dtype fp32`) -> torch names."""


def torch_dtype(value: Union["torch.dtype", str]) -> "torch.dtype":
    """`value` as a torch dtype: a torch dtype, a short name (`bf16`), or a torch name (`bfloat16`,
    `torch.bfloat16`, any case)."""
    import torch

    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        found = getattr(torch, SHORT_NAMES.get(key, key), None)
        if isinstance(found, torch.dtype):
            return found
    raise ValueError(f"unknown dtype {value!r}: use a torch dtype, a torch dtype name (bfloat16) or one of "
                     f"{', '.join(sorted(SHORT_NAMES))}")


def dtype_name(dtype: Union["torch.dtype", str]) -> str:
    """torch's attribute name of `dtype` (`bfloat16`): what HF `config.json` and SGLang's `getattr(torch, name)`
    read."""
    return str(torch_dtype(dtype)).removeprefix("torch.")
