"""GRPO math: advantages, the policy loss and train/inference mismatch metrics (pure tensor code, no process groups)."""

from .advantages import broadcast_to_tokens, group_normalized_advantages
from .losses import (
    PolicyLossConfig,
    entropy_from_logits,
    masked_mean,
    masked_sum,
    policy_loss,
    token_logprobs_from_logits,
)
from .mismatch import MISMATCH_KEYS, MetricAccumulator, rollout_train_mismatch

__all__ = [
    "group_normalized_advantages",
    "broadcast_to_tokens",
    "PolicyLossConfig",
    "masked_sum",
    "masked_mean",
    "policy_loss",
    "entropy_from_logits",
    "token_logprobs_from_logits",
    "MISMATCH_KEYS",
    "rollout_train_mismatch",
    "MetricAccumulator",
]
