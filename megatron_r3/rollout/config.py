"""The rollout flags every engine shares (a light module: no torch, so the command line can be checked first)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class RolloutConfig:
    """Rollout engine (every engine)."""

    rollout_engine: str = "hf"
    """Which registered rollout engine generates the rollouts (megatron_r3/rollout/engines/__init__.py)."""
    rollout_dtype: Literal["bf16", "fp32"] = "bf16"
    """dtype of the embedded hf rollout engine (bf16 vs fp32 training reproduces the real train/inference mismatch)."""
    max_new_tokens: int = 32
    """Most tokens generated per sample (a prompt may have at most --seq-length minus this many tokens)."""
    rollout_failure_policy: Literal["raise", "skip"] = "raise"
    """Prompts the rollout engine could not serve (after retries): raise (default), or skip their groups (and trim whole groups to fill mini-batches of --global-batch-size), reported as rollout/failed_prompts and rollout/trimmed_prompts."""
