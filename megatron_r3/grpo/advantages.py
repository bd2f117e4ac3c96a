"""GRPO advantages: group-normalised rewards, broadcast to response tokens.

Pure tensor code: no process groups and no host syncs, so it can run on the device inside the step without stalling
the stream. Results are computed in at least fp32 (fp64 inputs stay fp64) because rewards are often bf16/int and a
group mean/std in half precision loses the small differences GRPO learns from.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_normalized_advantages", "broadcast_to_tokens"]


def _compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 for anything narrower (bf16, fp16, ints, bool); fp64 stays fp64."""
    if t.is_floating_point():
        return torch.promote_types(t.dtype, torch.float32)
    return torch.float32


def group_normalized_advantages(
    rewards: Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO advantage of each sample relative to the other samples drawn for the same prompt.

    Samples are laid out group-contiguous: the first ``group_size`` entries of ``rewards`` belong to prompt 0, the
    next ``group_size`` to prompt 1, and so on (the order the rollout produces them). For every group

        A_i = (r_i - mean_group) / (std_group + eps)     if normalize_std   (std with unbiased=False)
        A_i =  r_i - mean_group                           otherwise         (Dr. GRPO style, no std scaling)

    A group whose samples all got the same reward has A = 0 for all of them: it carries no learning signal.
    ``eps`` is added to the std (not under a square root) so that such a group yields exactly 0, not 0/0.

    Returns a ``[num_samples]`` tensor in fp32 (fp64 if ``rewards`` is fp64) on the rewards' device.
    Raises ValueError if ``rewards`` is not 1-D, ``group_size`` < 1, or num_samples is not a multiple of group_size.
    """
    if rewards.dim() != 1:
        raise ValueError(
            f"group_normalized_advantages: rewards must be 1-D [num_samples], got shape {tuple(rewards.shape)}"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_normalized_advantages: group_size must be a positive int, got {group_size!r}")
    num_samples = rewards.shape[0]
    if num_samples % group_size != 0:
        raise ValueError(
            f"group_normalized_advantages: num_samples {num_samples} is not divisible by group_size {group_size}"
        )
    r = rewards.detach().to(_compute_dtype(rewards)).view(-1, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        centered = centered / (r.std(dim=1, correction=0, keepdim=True) + eps)
    return centered.reshape(num_samples)


def broadcast_to_tokens(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Per-token advantages ``[num_samples, seq]``: each valid response token gets its sample's advantage.

    Outside ``response_mask`` (prompt and padding) the result is exactly 0, selected with ``where`` rather than a
    multiplication so that a non-finite advantage cannot leak NaN into masked positions.
    Returns fp32 (fp64 if ``advantages`` is fp64). Raises ValueError on mismatched shapes.
    """
    if advantages.dim() != 1:
        raise ValueError(
            f"broadcast_to_tokens: advantages must be 1-D [num_samples], got shape {tuple(advantages.shape)}"
        )
    if response_mask.dim() != 2 or response_mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"broadcast_to_tokens: response_mask must be [num_samples, seq] with num_samples={advantages.shape[0]}, "
            f"got shape {tuple(response_mask.shape)}"
        )
    a = advantages.to(_compute_dtype(advantages))
    return torch.where(response_mask != 0, a.unsqueeze(1), torch.zeros((), dtype=a.dtype, device=a.device))
