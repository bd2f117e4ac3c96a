"""Reward functions: ``fn(response_text: str, record: PromptRecord) -> float``.

Built-ins (all compare against the *cleaned* response, `clean_response`):
  exact_match   1.0 if the response equals `record.answer`, else 0.0.
  prefix_match  1.0 if the response starts with `record.answer`, else 0.0.
  synthetic     the synthetic task's own verifier (`tasks.Task.score`, task named by `record.metadata["task"]`):
                1.0 exact, partial credit otherwise (0.6 right answer then junk, 0.1 a wrong digit, 0 no digit).

`get_reward_fn(spec)` resolves a built-in name or ``"package.module:function"`` (any importable module; the function
must accept ``(response_text, record)``). `score` applies one to a batch and returns a float32 tensor; an exception in
the reward function becomes a `RewardError` naming the sample, never a silent zero.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from typing import Callable, Sequence, Union

import torch

from megatron_r3.train.data import PromptRecord
from megatron_r3.train.tasks import get_task

RewardFn = Callable[[str, PromptRecord], float]

# Text after the first of these is not part of the response (a rollout decoded without skip_special_tokens).
EOS_MARKERS = ("<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")
PAD_MARKERS = ("<pad>", "<|pad|>")


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not a finite number."""


def clean_response(text: str) -> str:
    """The response as rewards see it: cut at the first EOS marker, pad markers removed, whitespace stripped."""
    cut = len(text)
    for marker in EOS_MARKERS:
        i = text.find(marker)
        if i != -1:
            cut = min(cut, i)
    text = text[:cut]
    for marker in PAD_MARKERS:
        text = text.replace(marker, "")
    return text.strip()


def exact_match(response_text: str, record: PromptRecord) -> float:
    return 1.0 if clean_response(response_text) == record.answer.strip() else 0.0


def prefix_match(response_text: str, record: PromptRecord) -> float:
    return 1.0 if clean_response(response_text).startswith(record.answer.strip()) else 0.0


def synthetic(response_text: str, record: PromptRecord) -> float:
    name = record.metadata.get("task") if isinstance(record.metadata, dict) else None
    if name is None:
        raise ValueError(
            "the 'synthetic' reward needs records from make_synthetic_dataset (metadata['task']); "
            f"record {record.index} has none"
        )
    return get_task(name).score(clean_response(response_text), record.answer)


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "prefix_match": prefix_match,
    "synthetic": synthetic,
}


def _check_signature(fn, spec: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # some builtins/extensions have no signature; calling them will tell
    try:
        sig.bind("", PromptRecord(prompt="", answer="", index=0))
    except TypeError:
        raise TypeError(
            f"reward function '{spec}' must accept (response_text, record); its signature is {sig}"
        ) from None


def get_reward_fn(spec: Union[str, RewardFn]) -> RewardFn:
    """A built-in name (exact_match, prefix_match, synthetic), ``"package.module:function"``, or a callable."""
    if callable(spec):
        _check_signature(spec, getattr(spec, "__qualname__", repr(spec)))
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"reward spec must be a non-empty string or a callable, got {spec!r}")
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if spec.count(":") != 1:
        raise ValueError(
            f"unknown reward '{spec}': use a built-in ({', '.join(BUILTIN_REWARDS)}) or 'package.module:function'"
        )
    module_name, attr = spec.split(":")
    if not module_name or not attr:
        raise ValueError(f"bad reward spec '{spec}': use 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"reward spec '{spec}': cannot import module '{module_name}': {e}") from e
    fn = module
    for part in attr.split("."):  # allows "module:Class.method"
        if not hasattr(fn, part):
            raise AttributeError(f"reward spec '{spec}': module '{module_name}' has no attribute '{attr}'")
        fn = getattr(fn, part)
    if not callable(fn):
        raise TypeError(f"reward spec '{spec}': '{attr}' is a {type(fn).__name__}, not a function")
    _check_signature(fn, spec)
    return fn


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or repr(fn)


def score(
    responses: Sequence[str], records: Sequence[PromptRecord], reward_fn: Union[str, RewardFn]
) -> torch.Tensor:
    """Rewards `[len(responses)]` float32: `reward_fn(responses[i], records[i])` for each sample."""
    fn = get_reward_fn(reward_fn)
    if len(responses) != len(records):
        raise ValueError(f"score: {len(responses)} responses but {len(records)} records")
    out = []
    for i, (text, record) in enumerate(zip(responses, records)):
        try:
            value = fn(text, record)
        except Exception as e:
            raise RewardError(
                f"reward function {_name(fn)} failed on sample {i} (prompt index {record.index}): "
                f"{type(e).__name__}: {e}"
            ) from e
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real):  # bools and numpy scalars are fine
            raise RewardError(
                f"reward function {_name(fn)} returned {type(value).__name__} for sample {i} "
                f"(prompt index {record.index}); expected a float"
            )
        if not math.isfinite(float(value)):
            raise RewardError(
                f"reward function {_name(fn)} returned {value} for sample {i} (prompt index {record.index}); "
                "rewards must be finite"
            )
        out.append(float(value))
    return torch.tensor(out, dtype=torch.float32)
