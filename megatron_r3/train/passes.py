"""The three kinds of model passes of a GRPO step, each one call of megatron's schedule through `run_schedule`.

- logprob pass (forward only): the policy's old logprobs (and the rollout/train mismatch metrics), or the reference
  model's logprobs for the KL term;
- update pass (forward + backward): the PPO loss of one mini-batch; megatron's per-token loss mode divides the
  gradients by the mini-batch's global token count, so the loss is an exact token mean over all data-parallel ranks.

Losses and metrics are computed on the last pipeline stage; everything stays on device (metric sums are
accumulated without host syncs and reduced once per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.router_replay import RouterReplayAction

from megatron_r3.grpo.losses import PolicyLossConfig, masked_sum, policy_loss
from megatron_r3.grpo.mismatch import MetricAccumulator
from megatron_r3.grpo.vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs
from megatron_r3.platform import metric_names
from megatron_r3.platform.parallel_context import ParallelContext
from megatron_r3.replay.microbatch import MicrobatchRoutes
from megatron_r3.replay.schedule import ReplayRouters, ScheduleResult, run_schedule
from megatron_r3.train.microbatching import TrainMicrobatch

POLICY_METRICS = ("ppo_kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean")


@dataclass
class PassContext:
    """What every pass needs to know about the model it runs."""

    chunks: list  # model chunks as the schedule takes them (DDP-wrapped for the policy)
    routers: ReplayRouters
    temperature: float
    vocab_size: int
    seq_length: int
    micro_batch_size: int
    device: torch.device
    parallel: ParallelContext  # this rank's coordinates and groups (TP group of the vocabulary reductions)

    def logprobs(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_logprobs(logits, labels, self.temperature, vocab_size=self.vocab_size,
                                       tp_rank=self.parallel.tp_rank, group=self.parallel.groups.tp)

    def entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """Every TP rank must call it (vocabulary reductions), whether or not it counts the result."""
        return vocab_parallel_entropy(logits, self.temperature, self.parallel.groups.tp, vocab_size=self.vocab_size,
                                      tp_rank=self.parallel.tp_rank)

    @property
    def computes_loss(self) -> bool:
        """Last pipeline stage; with TP every rank holds the same per-token values, so one of them counts them."""
        return self.parallel.computes_loss


def _run(ctx: PassContext, microbatches: Sequence[TrainMicrobatch], loss_of, *, action, routes, forward_only,
         collect_agreement) -> ScheduleResult:
    """One schedule over `microbatches`; `loss_of(mb, inputs, logits)` is megatron's loss_func for microbatch `mb`
    (called on the last pipeline stage) and returns (loss, num_tokens, reduced dict)."""

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        inputs, output = _forward(ctx, model, mb)
        return output, lambda logits: loss_of(mb, inputs, logits)

    vp = len(ctx.chunks) > 1
    iterators = [iter(microbatches) for _ in ctx.chunks] if vp else iter(microbatches)
    return run_schedule(
        get_forward_backward_func(pp_size=ctx.parallel.pp_size, vp_size=ctx.parallel.vp_size),
        ctx.routers,
        action=action,
        routes=routes,
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=ctx.chunks if vp else ctx.chunks[0],
        num_microbatches=len(microbatches),
        forward_only=forward_only,
        collect_agreement=collect_agreement,
        seq_length=ctx.seq_length,
        micro_batch_size=ctx.micro_batch_size,
        host_group=ctx.parallel.host_group,
    )


def _forward(ctx: PassContext, model, mb: TrainMicrobatch):
    inputs = mb.inputs.to(ctx.device)
    packed = inputs.packed_seq_params
    if packed is not None:
        packed = _packed_on(packed, ctx.device)
    output = model(inputs.tokens, inputs.position_ids, None, packed_seq_params=packed)
    return inputs, output


def _packed_on(packed, device):
    from dataclasses import replace

    moved = {
        name: getattr(packed, name).to(device, non_blocking=True)
        for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded")
        if getattr(packed, name, None) is not None
    }
    return replace(packed, **moved)


def logprob_pass(
    ctx: PassContext,
    microbatches: Sequence[TrainMicrobatch],
    *,
    target: str,
    action: Optional[RouterReplayAction],
    routes: Optional[list[MicrobatchRoutes]],
    metrics: MetricAccumulator,
    collect_agreement: bool = False,
) -> ScheduleResult:
    """Forward-only pass storing per-token logprobs on each microbatch (`mb.old_logp` or `mb.ref_logp`).

    For the policy (`target="old"`) it also accumulates the rollout/train mismatch metrics and the entropy.
    """
    if target not in ("old", "ref"):
        raise ValueError(f"target must be 'old' or 'ref', got {target!r}")

    def loss_of(mb, inputs, logits):
        logp = ctx.logprobs(logits, inputs.labels)
        mask = inputs.loss_mask
        setattr(mb, f"{target}_logp", logp.detach())
        if target == "old":
            entropy = ctx.entropy(logits)
            if ctx.computes_loss:
                metrics.add_mismatch(logp, mb.rollout_logp.to(ctx.device, non_blocking=True), mask)
                metrics.add_sums(metric_names.TRAIN_ENTROPY, masked_sum(entropy, mask), mask.sum())
        return logp.sum() * 0.0, mask.sum().to(torch.int), {}

    with torch.no_grad():
        return _run(ctx, microbatches, loss_of, action=action, routes=routes, forward_only=True,
                    collect_agreement=collect_agreement)


def update_pass(
    ctx: PassContext,
    microbatches: Sequence[TrainMicrobatch],
    *,
    loss_config: PolicyLossConfig,
    action: Optional[RouterReplayAction],
    routes: Optional[list[MicrobatchRoutes]],
    metrics: Sequence[MetricAccumulator],
    entropy_weight: float = 0.0,
    use_rollout_logprobs: bool = False,
    use_reference: bool = False,
    collect_agreement: bool = False,
) -> ScheduleResult:
    """Forward + backward of one mini-batch with the PPO-clip loss (gradients land in the DDP buffers).

    metrics: accumulators that all receive the policy metrics (e.g. the step's and the first update's)."""

    def add(name, total, count):
        for accumulator in metrics:
            accumulator.add_sums(name, total, count)

    def loss_of(mb, inputs, logits):
        logp = ctx.logprobs(logits, inputs.labels)
        mask = inputs.loss_mask
        loss_sum, stats = policy_loss(
            logp, mb.old_logp, mb.advantages.to(ctx.device, non_blocking=True), mask, loss_config,
            rollout_logp=mb.rollout_logp.to(ctx.device, non_blocking=True) if use_rollout_logprobs else None,
            ref_logp=mb.ref_logp if use_reference else None,
            loss_denominator=1.0,
        )
        if entropy_weight:
            loss_sum = loss_sum - entropy_weight * masked_sum(ctx.entropy(logits), mask)
        if ctx.computes_loss:
            count = stats["valid_tokens"]
            for name in POLICY_METRICS:
                add(metric_names.TRAIN_PREFIX + name, stats[name] * count, count)
            add(metric_names.TRAIN_LOSS, loss_sum.detach(), count)
            if use_rollout_logprobs and "tis_weight_mean" in stats:
                add(metric_names.TRAIN_TIS_WEIGHT_MEAN, stats["tis_weight_mean"] * count, count)
            if use_reference and "ref_kl" in stats:
                add(metric_names.TRAIN_REF_KL, stats["ref_kl"] * count, count)
        return loss_sum, mask.sum().to(torch.int), {"loss": loss_sum.detach()}

    return _run(ctx, microbatches, loss_of, action=action, routes=routes, forward_only=False,
                collect_agreement=collect_agreement)


def declare_metrics(metrics: MetricAccumulator, names: Sequence[str], mismatch: bool) -> None:
    """Ranks that compute no loss add zeros under every name, so all ranks reduce the same stacked tensor."""
    for name in names:
        metrics.add_sums(name, 0.0, 0.0)
    if mismatch:
        zeros = torch.zeros(1)
        metrics.add_mismatch(zeros, zeros, zeros)


def step_metric_names(*, tis: bool, reference: bool) -> list[str]:
    names = [metric_names.TRAIN_ENTROPY, metric_names.TRAIN_LOSS]
    names += [metric_names.TRAIN_PREFIX + name for name in POLICY_METRICS]
    if tis:
        names.append(metric_names.TRAIN_TIS_WEIGHT_MEAN)
    if reference:
        names.append(metric_names.TRAIN_REF_KL)
    return names



def run_custom_pass(ctx: PassContext, microbatches: Sequence[TrainMicrobatch], loss_of, *,
                    forward_only: bool) -> ScheduleResult:
    """One schedule with a caller-defined megatron loss_func `loss_of(mb, inputs, logits) -> (loss, num_tokens,
    dict)` and native routing (no replay): e.g. the supervised warm-up's cross-entropy (`train/sft_warmup.py`)."""
    return _run(ctx, microbatches, loss_of, action=None, routes=None, forward_only=forward_only,
                collect_agreement=False)
