"""GRPO policy loss (PPO clipped surrogate with decoupled clip, truncated IS, k3 KL) and logit helpers.

Everything here runs once per microbatch inside Megatron's forward step, so it is pure tensor code with no host syncs
(no ``.item()``, ``.tolist()``, ``.cpu()`` or Python branches on tensor values): a sync per microbatch would serialise
the pipeline schedule and, with backward reductions in flight, can deadlock. Metrics come back as 0-dim detached
tensors; the caller accumulates them (see ``mismatch.MetricAccumulator``) and syncs once per step.

Token-level inputs are ``[num_tokens]`` or any layout, as long as all of them share one shape. ``mask`` (bool or float)
is 1 on valid response tokens; values at masked positions are never used, even if they are NaN/inf (they are
selected away with ``where`` before any arithmetic that could propagate them into sums or gradients).
All arithmetic is done in at least fp32 (fp64 inputs stay fp64), whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PolicyLossConfig",
    "masked_sum",
    "masked_mean",
    "policy_loss",
    "entropy_from_logits",
    "token_logprobs_from_logits",
]

# |log ratio| bound before exp(): e^20 ~ 4.9e8 is far outside any clip range, and the bound keeps exp() finite so a
# garbage logprob cannot produce inf * 0 = NaN in the backward of the clipped branch.
_MAX_LOG_RATIO = 20.0


@dataclass
class PolicyLossConfig:
    """Hyper-parameters of :func:`policy_loss`. The trainer fills them from megatron's flags (--grpo-clamp-eps-lower,
    --grpo-clamp-eps-upper, --rl-importance-sampling-truncation-coef, --grpo-kl-beta); the clip defaults here are
    the RL overrides of megatron's defaults for those flags (`train/arguments.rl_overrides`)."""

    clip_ratio_low: float = 0.2
    """Ratio lower bound is 1 - clip_ratio_low (must be in [0, 1))."""
    clip_ratio_high: float = 0.28
    """Ratio upper bound is 1 + clip_ratio_high (decoupled "clip-higher", DAPO style; >= 0)."""
    tis_cap: float | None = None
    """Truncated importance sampling cap on exp(old_logp - rollout_logp), correcting the train/inference mismatch;
    None disables TIS. Must be > 0 when set."""
    kl_coef: float = 0.0
    """Weight of the k3 KL penalty to the reference policy; 0 disables it. Must be >= 0."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_ratio_low < 1.0:
            raise ValueError(f"PolicyLossConfig: clip_ratio_low must be in [0, 1), got {self.clip_ratio_low}")
        if not self.clip_ratio_high >= 0.0:
            raise ValueError(f"PolicyLossConfig: clip_ratio_high must be >= 0, got {self.clip_ratio_high}")
        if self.tis_cap is not None and not self.tis_cap > 0.0:
            raise ValueError(f"PolicyLossConfig: tis_cap must be > 0 or None, got {self.tis_cap}")
        if not self.kl_coef >= 0.0:
            raise ValueError(f"PolicyLossConfig: kl_coef must be >= 0, got {self.kl_coef}")


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """At least fp32; fp64 if any floating input is fp64."""
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_same_shape(fn: str, ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(
                f"{fn}: {name} shape {tuple(t.shape)} does not match {ref_name} shape {tuple(ref.shape)}"
            )


def _divide_by_denominator(fn: str, name: str, total: Tensor, denom: Tensor | float) -> Tensor:
    """``total / denom`` where a denominator <= 0 (no valid tokens anywhere) counts as 1: the result is 0, not NaN.

    A tensor denominator is fixed with ``where`` on the denominator itself (not on the quotient), which keeps the
    backward NaN-free and needs no host sync; a Python number is fixed in Python and used as a scalar operand, so
    no host-to-device copy is made.
    """
    if isinstance(denom, Tensor):
        if denom.numel() != 1:
            raise ValueError(f"{fn}: {name} must be a scalar, got shape {tuple(denom.shape)}")
        # Kept on its own device: a 0-dim CPU tensor is a legal scalar operand for a CUDA tensor (no copy, no sync).
        d = denom.detach().reshape(()).to(dtype=total.dtype)
        return total / torch.where(d > 0, d, torch.ones_like(d))
    d = float(denom)
    return total / (d if d > 0 else 1.0)


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``x * mask`` over all elements; masked positions contribute exactly 0 even if ``x`` is NaN/inf there.

    Computed in at least fp32. Returns a 0-dim tensor (differentiable w.r.t. ``x``).
    """
    _check_same_shape("masked_sum", "x", x, mask=mask)
    dtype = _compute_dtype(x, mask)
    m = mask.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    return torch.where(m != 0, x.to(dtype) * m, zero).sum()


def masked_mean(x: Tensor, mask: Tensor, denom: Tensor | float | None = None) -> Tensor:
    """Token mean of ``x`` over ``mask``: ``masked_sum(x, mask) / denom``.

    ``denom=None`` uses the local number of valid tokens ``mask.sum()``. Pass the GLOBAL number of valid tokens across
    all microbatches of the step (and data-parallel ranks, if gradients are summed rather than averaged over DP) to
    make the sum of the per-microbatch results equal one global token mean, independent of how tokens were split.
    A denominator <= 0 (no valid tokens) is treated as 1, so an empty mask gives 0, never NaN.
    """
    s = masked_sum(x, mask)
    if denom is None:
        denom = mask.to(s.dtype).sum()
    return _divide_by_denominator("masked_mean", "denom", s, denom)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: PolicyLossConfig,
    *,
    rollout_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    loss_denominator: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss for GRPO, token-mean aggregated. Returns ``(loss, metrics)``.

    Per valid token, with ratio = exp(logp - old_logp):
        pg   = -A * ratio
        pg2  = -A * clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
        loss = max(pg, pg2)                                      (pessimistic bound; decoupled clip)
        loss = loss * w,  w = min(exp(old_logp - rollout_logp), tis_cap), detached     if config.tis_cap
        loss = loss + kl_coef * k3,  k3 = exp(ref - logp) - (ref - logp) - 1          if config.kl_coef > 0

    TIS reweights tokens by how much more likely the trainer's old policy finds them than the inference engine that
    sampled them (the train/inference mismatch R3 shrinks); the weight is detached so it only rescales the gradient.
    The KL term is not TIS-weighted. ``old_logp``, ``advantages``, ``rollout_logp`` and ``ref_logp`` are treated as
    constants (detached); gradients flow only through ``logp``. The log ratio and the KL log difference are clamped
    to +-20 before exp() as a numerical guard (irrelevant for any sane policy, keeps exp() finite).

    Aggregation: sum over valid tokens / ``loss_denominator`` if given (pass the global valid-token count of the step
    so microbatch losses add up to a global token mean), else / local ``mask.sum()`` (at least 1).

    Metrics (0-dim detached tensors, LOCAL token means over ``mask`` regardless of ``loss_denominator``):
        ppo_kl          mean(old_logp - logp)  (k1 estimate of KL(old || new), what the field logs)
        clip_frac       fraction of tokens where the clipped term was active (pg2 > pg)
        clip_frac_low   ... active on the low side  (ratio < 1 - clip_ratio_low, A < 0)
        clip_frac_high  ... active on the high side (ratio > 1 + clip_ratio_high, A > 0)
        ratio_mean, ratio_max   (ratio_max is a masked max; 0 when there are no valid tokens)
        tis_weight_mean         only when TIS is on
        ref_kl                  mean k3 to the reference, only when the KL term is on
        valid_tokens            local mask.sum(); lets the caller turn the means back into sums for accumulation
    Raises ValueError on shape mismatches or when TIS/KL is on and its logprobs are missing.
    """
    fn = "policy_loss"
    _check_same_shape(fn, "logp", logp, old_logp=old_logp, advantages=advantages, mask=mask,
                      rollout_logp=rollout_logp, ref_logp=ref_logp)
    use_tis = config.tis_cap is not None
    use_kl = config.kl_coef > 0.0
    if use_tis and rollout_logp is None:
        raise ValueError("policy_loss: config.tis_cap is set but rollout_logp was not given")
    if use_kl and ref_logp is None:
        raise ValueError("policy_loss: config.kl_coef > 0 but ref_logp was not given")

    dtype = _compute_dtype(logp, old_logp, advantages, rollout_logp if use_tis else None, ref_logp if use_kl else None)
    device = logp.device
    m = mask.to(dtype)
    valid = m != 0
    zero = torch.zeros((), dtype=dtype, device=device)

    def _masked(t: Tensor) -> Tensor:
        # Select away masked positions first so NaN/inf there never reaches arithmetic (or its backward).
        return torch.where(valid, t.to(dtype), zero)

    lp = _masked(logp)
    old = _masked(old_logp.detach())
    adv = _masked(advantages.detach())

    log_ratio = lp - old
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    pg = -adv * ratio
    clipped_ratio = ratio.clamp(1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high)
    pg2 = -adv * clipped_ratio
    per_token = torch.maximum(pg, pg2)

    tis_w = None
    if use_tis:
        tis_w = torch.exp(old - _masked(rollout_logp.detach())).clamp(max=config.tis_cap).detach()
        per_token = per_token * tis_w

    k3 = None
    if use_kl:
        log_diff = (_masked(ref_logp.detach()) - lp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        k3 = torch.exp(log_diff) - log_diff - 1.0
        per_token = per_token + config.kl_coef * k3

    loss_sum = torch.where(valid, per_token * m, zero).sum()
    count = m.sum()
    denom = count if loss_denominator is None else loss_denominator
    loss = _divide_by_denominator(fn, "loss_denominator", loss_sum, denom)

    with torch.no_grad():
        local = torch.where(count > 0, count, torch.ones_like(count))

        def _mean(t: Tensor) -> Tensor:
            return torch.where(valid, t * m, zero).sum() / local

        active = (pg2 > pg) & valid
        metrics: dict[str, Tensor] = {
            "ppo_kl": _mean(-log_ratio),
            "clip_frac": _mean(active.to(dtype)),
            "clip_frac_low": _mean((active & (ratio < 1.0 - config.clip_ratio_low)).to(dtype)),
            "clip_frac_high": _mean((active & (ratio > 1.0 + config.clip_ratio_high)).to(dtype)),
            "ratio_mean": _mean(ratio),
            # ratio > 0 everywhere, so a 0 fill is a neutral element of the max and gives 0 for an empty mask.
            "ratio_max": torch.where(valid, ratio, zero).amax() if ratio.numel() > 0 else zero.clone(),
        }
        if tis_w is not None:
            metrics["tis_weight_mean"] = _mean(tis_w)
        if k3 is not None:
            metrics["ref_kl"] = _mean(k3)
        metrics["valid_tokens"] = count.clone()
        metrics = {k: v.detach() for k, v in metrics.items()}
    return loss, metrics


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim, in at least fp32: ``H = -sum p log p`` with log p = x - lse(x).

    Numerically stable (log-sum-exp shift), and -inf logits (masked vocab entries) contribute exactly 0 in forward and
    backward (their log p is replaced by 0 before the product, so no 0 * -inf NaN). Differentiable.
    """
    x = logits.to(_compute_dtype(logits))
    logp = x - torch.logsumexp(x, dim=-1, keepdim=True)
    p = torch.exp(logp)
    logp = torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return -(p * logp).sum(dim=-1)


def token_logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) at ``labels``, in at least fp32, shape ``labels.shape``.

    Computed as ``x[label] - logsumexp(x)`` with x = logits / T: no full-vocabulary log_softmax tensor is materialised
    (for fp32 logits with T = 1 no vocabulary-sized copy at all; otherwise one fp32 copy for the cast/scale).
    ``labels`` must hold valid ids in [0, vocab) everywhere, including at positions the caller masks out (use e.g. 0
    for padding, not -100): values are not checked, as that would need a host sync. Assumes the full vocabulary is
    present in ``logits``; with vocab-parallel (TP-sharded) logits use Megatron's vocab-parallel cross entropy.
    Temperature must match the one used for sampling so logprobs are comparable with the rollout's.
    """
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"token_logprobs_from_logits: labels shape {tuple(labels.shape)} must equal logits shape without the "
            f"vocab dim {tuple(logits.shape[:-1])}"
        )
    if not temperature > 0.0:
        raise ValueError(f"token_logprobs_from_logits: temperature must be > 0, got {temperature}")
    x = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        x = x / temperature
    picked = torch.gather(x, -1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(x, dim=-1)
