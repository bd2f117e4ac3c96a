"""Rollout samples -> this rank's mini-batches of microbatches, with tokens, per-token targets and routes aligned.

Sharding is per mini-batch: global mini-batch m is samples `[m*G, (m+1)*G)` of the step (G = --global-batch-size)
and data-parallel rank r takes the r-th of `dp` equal slices of it. So every layout optimises the same global
mini-batches, which is what makes step metrics comparable across layouts.

Within a rank, samples are packed into microbatches either as padded rows (BSHD, `--micro-batch-size` samples) or
by a token budget (THD, `--max-tokens-per-microbatch`). Every per-token quantity (inputs, labels, loss mask,
advantages, rollout logprobs) and the routes go through the same `PackedLayout` and the same CP slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_r3.platform.parallel_context import ParallelContext
from megatron_r3.replay.layout import (
    PackedLayout,
    cp_local_slots,
    pack_bshd,
    pack_per_slot,
    pack_thd,
    padded_length,
    router_token_slots,
)
from megatron_r3.replay.microbatch import MicrobatchRoutes, localize_routes
from megatron_r3.replay.routes import Routes
from megatron_r3.train.batch import MicrobatchInputs, microbatch_inputs


@dataclass
class TrainSample:
    """One rollout sample as the trainer sees it (the same on every rank, except which routes it carries)."""

    index: int  # position in the step's rollout batch
    tokens: torch.Tensor  # [T] prompt + response
    prompt_length: int
    rollout_logprobs: torch.Tensor  # [T - prompt_length]
    reward: float
    advantage: float
    routes: Optional[Routes] = None  # rows 0..T-2 (validated)
    free_rows: Optional[torch.Tensor] = None  # bool [T-1]: rows routed natively (counted fallback)
    # the global layer numbers of `routes`' layer axis when rank 0 shipped only this rank's layers (None: all)
    route_layer_numbers: Optional[tuple[int, ...]] = None
    # bool [T - prompt_length]: the model's own tokens (True) vs tokens a multi-turn rollout inserted (None: all own)
    response_mask: Optional[torch.Tensor] = None

    @property
    def num_slots(self) -> int:
        """Positions fed to the model (all but the last token), i.e. route rows."""
        return self.tokens.shape[0] - 1

    def loss_mask(self) -> torch.Tensor:
        """Over predicted positions 0..T-2: 1 where the *target* is a response token the model generated (tokens a
        multi-turn rollout inserted, tool/user turns, are inputs only)."""
        mask = torch.zeros(self.num_slots)
        mask[self.prompt_length - 1 :] = 1.0 if self.response_mask is None else self.response_mask.float()
        return mask

    def per_slot_rollout_logprobs(self) -> torch.Tensor:
        out = torch.zeros(self.num_slots)
        out[self.prompt_length - 1 :] = self.rollout_logprobs.float()
        return out


@dataclass
class TrainMicrobatch:
    """One microbatch on this rank: model inputs and per-token tensors in model order `[b, s_local]`."""

    samples: list[TrainSample]
    layout: PackedLayout
    inputs: MicrobatchInputs
    advantages: torch.Tensor
    rollout_logp: torch.Tensor
    token_slots: torch.Tensor
    routes: Optional[MicrobatchRoutes] = None
    # filled by the passes (on device, last pipeline stage only)
    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    recorded: Optional[dict] = None


@dataclass
class StepPlan:
    """All microbatches of one step on this rank, grouped by mini-batch (optimizer step)."""

    minibatches: list[list[TrainMicrobatch]]
    seq_length: int  # the length handed to megatron's schedule (PP needs one shape for all microbatches)
    pad_multiple: int
    # rows per microbatch as megatron's schedule sees them (the `micro_batch_size` it is given: pipeline stages
    # allocate `[seq_length, micro_batch_size, hidden]` receive buffers): one packed row under THD
    micro_batch_size: int = 1

    @property
    def microbatches(self) -> list[TrainMicrobatch]:
        return [mb for minibatch in self.minibatches for mb in minibatch]


def shard_minibatches(
    samples: Sequence[TrainSample], global_batch_size: int, parallel: ParallelContext
) -> list[list[TrainSample]]:
    """Global mini-batches of `global_batch_size` samples, each split in `dp` equal contiguous slices: this rank's
    slices (`ParallelContext.minibatch_slice`, the samples `ParallelContext.owns_sample` names)."""
    if len(samples) % global_batch_size:
        raise ValueError(f"{len(samples)} samples do not split into mini-batches of {global_batch_size}")
    return [list(samples[parallel.minibatch_slice(m, global_batch_size)])
            for m in range(len(samples) // global_batch_size)]


def group_by_size(samples: Sequence[TrainSample], micro_batch_size: int) -> list[list[TrainSample]]:
    return [list(samples[i : i + micro_batch_size]) for i in range(0, len(samples), micro_batch_size)]


def group_by_tokens(
    samples: Sequence[TrainSample], max_tokens: int, pad_multiple: int, min_groups: int = 1
) -> list[list[TrainSample]]:
    """Greedy in-order packing by padded token count; then the largest groups are split until there are at
    least `min_groups` (ranks that must run the same number of microbatches, e.g. an expert-parallel group)."""
    groups: list[list[TrainSample]] = []
    used = 0
    for sample in samples:
        size = padded_length(sample.num_slots, pad_multiple)
        if size > max_tokens:
            raise ValueError(
                f"sample {sample.index} needs {size} tokens, more than --max-tokens-per-microbatch {max_tokens}"
            )
        if groups and used + size <= max_tokens:
            groups[-1].append(sample)
            used += size
        else:
            groups.append([sample])
            used = size
    while len(groups) < min_groups:
        largest = max(range(len(groups)), key=lambda i: len(groups[i]))
        if len(groups[largest]) < 2:
            raise ValueError(f"cannot split {len(samples)} samples into {min_groups} microbatches")
        group = groups.pop(largest)
        half = len(group) // 2
        groups[largest:largest] = [group[:half], group[half:]]
    return groups


def build_microbatch(
    samples: Sequence[TrainSample],
    layout: PackedLayout,
    parallel: ParallelContext,
    *,
    moe_layer_numbers: Sequence[int],
    num_experts: int,
    with_routes: bool,
) -> TrainMicrobatch:
    """Model inputs, per-token targets and (optionally) this rank's routes for one microbatch."""
    cp, cp_rank = parallel.cp_size, parallel.cp_rank
    inputs = microbatch_inputs(
        [s.tokens for s in samples], layout, loss_masks=[s.loss_mask() for s in samples],
        context_parallel_size=cp, cp_rank=cp_rank,
    )
    local = cp_local_slots(layout, cp, cp_rank)
    advantages = pack_per_slot([torch.full((s.num_slots,), float(s.advantage)) for s in samples], layout, 0.0)[local]
    rollout_logp = pack_per_slot([s.per_slot_rollout_logprobs() for s in samples], layout, 0.0)[local]
    token_slots = router_token_slots(
        layout, context_parallel_size=cp, cp_rank=cp_rank,
        tensor_model_parallel_size=parallel.tp_size, tp_rank=parallel.tp_rank,
        sequence_parallel=parallel.sequence_parallel,
    )
    routes = None
    if with_routes:
        missing = [s.index for s in samples if s.routes is None]
        if missing:
            raise ValueError(f"samples {missing} carry no routes; the rollout engine must return routed experts")
        shipped_layers = {s.route_layer_numbers for s in samples}
        if len(shipped_layers) != 1:
            raise ValueError(f"the samples of one microbatch carry routes of different layers: {shipped_layers}")
        routes = localize_routes(
            [s.routes.expert_ids for s in samples], layout, token_slots, moe_layer_numbers, num_experts,
            free_rows=[s.free_rows for s in samples], source_layer_numbers=shipped_layers.pop(),
        )
    return TrainMicrobatch(
        samples=list(samples), layout=layout, inputs=inputs, advantages=advantages, rollout_logp=rollout_logp,
        token_slots=token_slots, routes=routes,
    )


def plan_step(
    samples: Sequence[TrainSample],
    parallel: ParallelContext,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    max_tokens_per_microbatch: Optional[int],
    pad_multiple: int,
    equal_seq_length: bool,
    moe_layer_numbers: Sequence[int],
    num_experts: int,
    with_routes: bool,
    min_microbatches: Optional[Sequence[int]] = None,
) -> StepPlan:
    """Split the step's samples into this rank's mini-batches and microbatches.

    equal_seq_length: one sequence length for every microbatch (pipeline parallelism sends fixed shapes).
    min_microbatches: per mini-batch, the microbatch count every rank of the data-parallel group must reach
        (token-budget packing can give ranks different counts; the trainer agrees on the max first).
    """
    groups_per_minibatch = []
    for m, minibatch in enumerate(shard_minibatches(samples, global_batch_size, parallel)):
        target = 1 if min_microbatches is None else min_microbatches[m]
        if max_tokens_per_microbatch:
            groups = group_by_tokens(minibatch, max_tokens_per_microbatch, pad_multiple, min_groups=target)
        else:
            groups = group_by_size(minibatch, micro_batch_size)
        groups_per_minibatch.append(groups)
    thd = bool(max_tokens_per_microbatch)
    if thd:
        lengths = [sum(padded_length(s.num_slots, pad_multiple) for s in g) for gs in groups_per_minibatch for g in gs]
    else:
        lengths = [max(s.num_slots for s in g) for gs in groups_per_minibatch for g in gs]
    seq_length = padded_length(max(lengths), pad_multiple)
    if thd and equal_seq_length:
        seq_length = max(seq_length, padded_length(max_tokens_per_microbatch, pad_multiple))
    minibatches = []
    for groups in groups_per_minibatch:
        built = []
        for group in groups:
            n = [s.num_slots for s in group]
            if thd:
                layout = pack_thd(n, pad_multiple=pad_multiple, seq_length=seq_length if equal_seq_length else None)
            else:
                layout = pack_bshd(n, seq_length=seq_length if equal_seq_length else None, pad_multiple=pad_multiple)
            built.append(
                build_microbatch(group, layout, parallel, moe_layer_numbers=moe_layer_numbers, num_experts=num_experts,
                                 with_routes=with_routes)
            )
        minibatches.append(built)
    return StepPlan(minibatches=minibatches, seq_length=seq_length, pad_multiple=pad_multiple,
                    micro_batch_size=1 if thd else micro_batch_size)


def microbatch_counts(samples, parallel: ParallelContext, *, global_batch_size, micro_batch_size,
                      max_tokens_per_microbatch, pad_multiple) -> list[int]:
    """This rank's natural microbatch count per mini-batch (before agreeing on the max across ranks)."""
    counts = []
    for minibatch in shard_minibatches(samples, global_batch_size, parallel):
        if max_tokens_per_microbatch:
            counts.append(len(group_by_tokens(minibatch, max_tokens_per_microbatch, pad_multiple)))
        else:
            counts.append(len(group_by_size(minibatch, micro_batch_size)))
    return counts
