"""Train-vs-inference mismatch metrics (the numbers R3 exists to shrink) and an exact, layout-invariant accumulator.

With Δ = logp_train − logp_rollout per valid response token (the same token scored by the trainer and by the
inference engine that sampled it) and r = π_train / π_infer = exp(Δ):

    rollout_train_logp_abs_diff       mean |Δ|
    rollout_train_logp_sq_diff        mean Δ²
    rollout_train_k3_kl               mean (r − 1 − log r) = mean (exp(Δ) − 1 − Δ)
    rollout_train_extreme_frac_tau2   mean 1[|Δ| > ln 2]   (= F(2), fraction with max(r, 1/r) > 2; strict >)
    rollout_train_extreme_frac_tau5   mean 1[|Δ| > ln 5]
    token_mult_prob_error             exp(mean |Δ|)        (typical multiplicative probability error)
    rollout_train_valid_tokens        number of valid tokens

Direction of the k3 KL: tokens are sampled from the inference policy q = π_infer, and E_q[r − 1 − log r] with
r = p/q, p = π_train, equals E_q[log q/p] = KL(π_infer ‖ π_train). Each term is ≥ 0, so the estimate is never
negative (the low-variance k3 estimator of the R3 paper, which reports 1.5e-3 for a MoE without R3).

Means are over valid tokens (``mask`` != 0, float masks act as weights). Zero valid tokens give 0 for every metric,
never NaN. Per-microbatch code is pure tensor code without host syncs; ``MetricAccumulator.means`` is the only sync.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_r3.platform import collectives

__all__ = ["MISMATCH_KEYS", "rollout_train_mismatch", "MetricAccumulator"]

_LN2 = math.log(2.0)
_LN5 = math.log(5.0)

# Metrics that are token means of a per-token statistic, in the order _mismatch_sums stacks them.
_MEAN_KEYS = (
    "rollout_train_logp_abs_diff",
    "rollout_train_logp_sq_diff",
    "rollout_train_k3_kl",
    "rollout_train_extreme_frac_tau2",
    "rollout_train_extreme_frac_tau5",
)
_MULT_KEY = "token_mult_prob_error"
_COUNT_KEY = "rollout_train_valid_tokens"
MISMATCH_KEYS = _MEAN_KEYS + (_MULT_KEY, _COUNT_KEY)


def _mismatch_sums(train_logp: Tensor, rollout_logp: Tensor, mask: Tensor, fn: str) -> tuple[Tensor, Tensor]:
    """Per-statistic sums over valid tokens, stacked as ``[len(_MEAN_KEYS)]``, and the valid-token count (0-dim).

    Detached and in at least fp32. Masked positions are selected away before any arithmetic, so NaN/inf logprobs
    there (e.g. prompt tokens the engine did not score) cannot leak into the sums.
    """
    if rollout_logp.shape != train_logp.shape:
        raise ValueError(
            f"{fn}: rollout_logp shape {tuple(rollout_logp.shape)} does not match train_logp shape "
            f"{tuple(train_logp.shape)}"
        )
    if mask.shape != train_logp.shape:
        raise ValueError(
            f"{fn}: mask shape {tuple(mask.shape)} does not match train_logp shape {tuple(train_logp.shape)}"
        )
    dtype = torch.float32
    for t in (train_logp, rollout_logp):
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    with torch.no_grad():
        m = mask.detach().to(dtype)
        valid = m != 0
        zero = torch.zeros((), dtype=dtype, device=m.device)
        delta = torch.where(valid, train_logp.detach().to(dtype) - rollout_logp.detach().to(dtype), zero)
        abs_delta = delta.abs()
        stats = torch.stack(
            [
                abs_delta,
                delta * delta,
                torch.expm1(delta) - delta,  # exp(Δ) − 1 − Δ, expm1 keeps precision for tiny Δ
                (abs_delta > _LN2).to(dtype),
                (abs_delta > _LN5).to(dtype),
            ]
        ).reshape(len(_MEAN_KEYS), -1)
        sums = torch.where(valid.reshape(1, -1), stats * m.reshape(1, -1), zero).sum(dim=1)
        return sums, m.sum()


def rollout_train_mismatch(train_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Mismatch metrics of one batch as 0-dim detached tensors (keys: ``MISMATCH_KEYS``; see the module docstring).

    These are LOCAL means. For step metrics over several microbatches / data-parallel ranks use
    ``MetricAccumulator.add_mismatch``: a mean of per-microbatch means is not a token mean when microbatches hold
    different numbers of tokens. Raises ValueError on shape mismatches.
    """
    sums, count = _mismatch_sums(train_logp, rollout_logp, mask, "rollout_train_mismatch")
    has_tokens = count > 0
    means = sums / torch.where(has_tokens, count, torch.ones_like(count))
    out = {k: means[i] for i, k in enumerate(_MEAN_KEYS)}
    out[_MULT_KEY] = torch.where(has_tokens, torch.exp(means[0]), torch.zeros_like(count))
    out[_COUNT_KEY] = count
    return out


def _exp_or_inf(x: float) -> float:
    """exp(x), or inf where math.exp would raise OverflowError (a logprob gap of ~710 nats or more: a finite but
    absurd engine logprob such as -1e30 must give an infinite metric, not crash the step)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _to_floats(values: list[Tensor | float]) -> list[float]:
    """Python floats of 0-dim tensors / numbers with one device-to-host transfer per device (normally one)."""
    out: list[float] = [v if not isinstance(v, Tensor) else 0.0 for v in values]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, Tensor):
            by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        host = torch.stack([values[i].reshape(()).to(torch.float64) for i in idx]).tolist()
        for i, x in zip(idx, host):
            out[i] = x
    return out


class MetricAccumulator:
    """Sums of per-token statistics across microbatches (and, via ``.all_reduce(group)``, across data-parallel ranks:
    ONE all_reduce of one stacked tensor at step end), so that step metrics are exact global token means, independent
    of how tokens were split into microbatches or ranks.

    Each named metric is a pair (total, count) kept as float64 0-dim tensors on the device of the tensors added (no
    host syncs while adding; float64 keeps counts exact far beyond 2**24 tokens and sums independent of the split to
    ~1e-12). ``means()`` returns total / count per name (0 when count is 0). After ``add_mismatch`` it also returns
    ``token_mult_prob_error`` = exp(global mean |Δ|) and ``rollout_train_valid_tokens`` = global valid-token count.

    Usage per step: ``acc = MetricAccumulator()``; per microbatch ``acc.add_mismatch(...)`` / ``acc.add_sums(...)``;
    at step end ``acc.all_reduce(dp_group)`` (every rank must have added the same set of names: checked in
    ``means()``), then ``acc.means()`` once. Call ``reset()`` (or make a new one) for the next step.
    """

    def __init__(self) -> None:
        self._totals: dict[str, Tensor | float] = {}
        self._counts: dict[str, Tensor | float] = {}
        self._reduced = False
        self._name_check: tuple[Tensor, float] | None = None

    def reset(self) -> None:
        """Forget everything (start of a new step)."""
        self.__init__()

    def __len__(self) -> int:
        return len(self._totals)

    def _check_open(self) -> None:
        if self._reduced:
            raise RuntimeError("MetricAccumulator: cannot add after all_reduce(); call reset() for the next step")

    @staticmethod
    def _as64(x: Tensor | float, what: str, name: str) -> Tensor | float:
        if isinstance(x, Tensor):
            if x.numel() != 1:
                raise ValueError(f"MetricAccumulator.add_sums: {what} for {name!r} must be a scalar, "
                                 f"got shape {tuple(x.shape)}")
            return x.detach().reshape(()).to(torch.float64)
        return float(x)

    def add_sums(self, name: str, total: Tensor | float, count: Tensor | float) -> None:
        """Add ``total`` (sum of a per-token statistic) and ``count`` (its number of tokens / weight) to ``name``.

        Scalars only (0-dim tensors or numbers); tensors stay on their device, no sync.
        """
        self._check_open()
        t = self._as64(total, "total", name)
        c = self._as64(count, "count", name)
        if name in self._totals:
            self._totals[name] = self._totals[name] + t
            self._counts[name] = self._counts[name] + c
        else:
            self._totals[name] = t
            self._counts[name] = c

    def add_mismatch(self, train_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> None:
        """Accumulate the sums behind the rollout/train mismatch metrics of one microbatch (no sync)."""
        self._check_open()
        sums, count = _mismatch_sums(train_logp, rollout_logp, mask, "MetricAccumulator.add_mismatch")
        sums = sums.to(torch.float64)
        count = count.to(torch.float64)
        for i, key in enumerate(_MEAN_KEYS):
            self.add_sums(key, sums[i], count)

    def all_reduce(self, group=None) -> None:
        """Sum totals and counts over ``group`` with ONE all_reduce of one stacked float64 tensor.

        No-op when torch.distributed is unavailable / not initialised or the group has one rank. Call once per step,
        after the last backward (a metric all_reduce interleaved with in-flight gradient reductions can deadlock).
        Names are sorted so ranks agree on the layout; a checksum of the names rides along and ``means()`` raises if
        ranks added different names. Every rank must call this, even one that added nothing for a name set it shares.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group)
        if world == 1:
            return
        if self._reduced:
            raise RuntimeError("MetricAccumulator: all_reduce() called twice for the same step")
        names = sorted(self._totals)
        device = self._pick_device(group)
        checksum = float(zlib.crc32("\0".join(names).encode()))
        values = [torch.as_tensor(checksum, dtype=torch.float64, device=device)]
        for n in names:
            values.append(torch.as_tensor(self._totals[n], dtype=torch.float64).to(device))
            values.append(torch.as_tensor(self._counts[n], dtype=torch.float64).to(device))
        buf = torch.stack(values)
        collectives.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        self._name_check = (buf[0], checksum * world)
        for i, n in enumerate(names):
            self._totals[n] = buf[1 + 2 * i]
            self._counts[n] = buf[2 + 2 * i]
        self._reduced = True

    def _pick_device(self, group) -> torch.device:
        # the group's backend decides (a pipeline stage without loss holds only CPU zeros, and NCCL refuses them)
        from megatron_r3.platform.distributed import collective_device

        return collective_device(group)

    def means(self) -> dict[str, float]:
        """Global token means per name (0 when nothing was counted). The only host sync: one transfer of all values.

        Raises RuntimeError if ``all_reduce`` found that ranks accumulated different metric names.
        """
        names = sorted(self._totals)
        raw: list[Tensor | float] = []
        for n in names:
            raw.append(self._totals[n])
            raw.append(self._counts[n])
        if self._name_check is not None:
            raw.append(self._name_check[0])
        flat = _to_floats(raw)
        if self._name_check is not None and flat[-1] != self._name_check[1]:
            raise RuntimeError(
                "MetricAccumulator: data-parallel ranks accumulated different metric names; "
                f"this rank had {names}"
            )
        out: dict[str, float] = {}
        for i, n in enumerate(names):
            total, count = flat[2 * i], flat[2 * i + 1]
            out[n] = total / count if count > 0 else 0.0
        if _MEAN_KEYS[0] in self._totals:
            count = flat[2 * names.index(_MEAN_KEYS[0]) + 1]
            out[_MULT_KEY] = _exp_or_inf(out[_MEAN_KEYS[0]]) if count > 0 else 0.0
            out[_COUNT_KEY] = count
        return out
