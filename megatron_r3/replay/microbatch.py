"""One microbatch's routes on one rank: sliced to this rank's tokens and MoE layers before they travel.

`localize_routes` is the CPU-side step: it selects the MoE layers this rank's model chunks own, packs the samples
exactly like the tokens (`layout.pack_per_slot`; padding slots hold `layout.distinct_fill_ids`), and keeps only this rank's router rows (CP split + SP scatter, in
router order). The result stays in the compact dtype (1 byte per id when experts <= 256) until a router turns one
layer's slice into int64 at the moment of use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from megatron_r3.replay.router import InstalledRoutes
from megatron_r3.replay.layout import PackedLayout, _concat_index, check_per_sample_rows, fill_ids_for_slots


@dataclass(frozen=True)
class MicrobatchRoutes:
    """Routes of one microbatch for the routers of this rank.

    expert_ids: `[num_tokens, len(layer_numbers), topk]`, router order, compact dtype.
    layer_numbers: global 1-based `layer_number` of each entry of axis 1.
    valid: bool `[num_tokens]`, False on padding slots.
    free_rows: optional bool `[num_tokens]`, True where the sample's routes were unusable and the user allowed a
        counted fallback to native routing.
    num_valid / num_free: host-side counts of real tokens and of fallback tokens (counted on the CPU when the
        routes were localized, so logging them never syncs the device).
    """

    expert_ids: torch.Tensor
    layer_numbers: tuple[int, ...]
    valid: torch.Tensor
    free_rows: Optional[torch.Tensor] = None
    num_valid: int = 0
    num_free: int = 0
    observe_only: bool = False

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def nbytes(self) -> int:
        free = 0 if self.free_rows is None else self.free_rows.nbytes
        return self.expert_ids.nbytes + self.valid.nbytes + free

    def to(self, device, non_blocking: bool = True) -> "MicrobatchRoutes":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, expert_ids=move(self.expert_ids), valid=move(self.valid), free_rows=move(self.free_rows))

    def pin_memory(self) -> "MicrobatchRoutes":
        """Page-locked host copies, so the host-to-device copy is asynchronous (no host sync on the GPU path)."""
        if not torch.cuda.is_available():
            return self
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return replace(self, expert_ids=pin(self.expert_ids), valid=pin(self.valid), free_rows=pin(self.free_rows))

    def for_layer(self, layer_number: int) -> InstalledRoutes:
        try:
            index = self.layer_numbers.index(layer_number)
        except ValueError:
            raise KeyError(f"no routes for layer {layer_number}; this microbatch has layers {self.layer_numbers}")
        return InstalledRoutes(
            expert_ids=self.expert_ids[:, index], valid=self.valid, free_rows=self.free_rows,
            observe_only=self.observe_only,
        )

    def observed(self) -> "MicrobatchRoutes":
        """The same routes, to be compared with native routing instead of replayed."""
        return replace(self, observe_only=True)


def localize_routes(
    samples: Sequence[torch.Tensor],
    layout: PackedLayout,
    token_slots: torch.Tensor,
    layer_numbers: Sequence[int],
    num_experts: int,
    free_rows: Optional[Sequence[Optional[torch.Tensor]]] = None,
    source_layer_numbers: Optional[Sequence[int]] = None,
) -> MicrobatchRoutes:
    """Build this rank's `MicrobatchRoutes`.

    samples: per-sample routes `[n_j, L_all, K]` (all decoder layers, as rollout engines send them), `n_j` =
        the sample's tokens in the layout.
    token_slots: `layout.router_token_slots(...)` for this rank.
    layer_numbers: the global layer numbers of this rank's MoE routers (all its model chunks).
    free_rows: per sample, None or bool `[n_j]` rows that must route natively (validated-bad rows).
    source_layer_numbers: the global layer numbers the samples' layer axis holds, when it holds only some layers
        (routes shipped to a pipeline stage carry only its layers); None: every decoder layer, 1..L_all.

    Equal to packing every sample into slots like the tokens (padding slots: `distinct_fill_ids`), then keeping
    `token_slots`, but copied straight into this rank's rows: one strided copy per run of consecutive tokens of a
    sample (a sample, or its CP chunks, per batch column), so each id this rank keeps is copied once and the slots
    of other ranks never; with too many short runs, one gather from the concatenated samples instead. On a CUDA host the result is
    allocated in page-locked memory, so `pin_memory()` is free and the host-to-device copy asynchronous.
    """
    layer_numbers = tuple(int(n) for n in layer_numbers)
    positions = _layer_positions(layer_numbers, samples[0].shape[1], source_layer_numbers)
    topk = samples[0].shape[2]
    dtype = samples[0].dtype
    if topk > num_experts:  # raised for any layout, as the pad fill would (even when this rank has no pad)
        fill_ids_for_slots(token_slots[:0], topk, num_experts, dtype)
    check_per_sample_rows(samples, layout)
    count = len(layer_numbers)
    token_slots = token_slots.reshape(-1)
    num_rows = token_slots.shape[0]
    # row of torch.cat(samples) every router row reads (-1 on padding)
    source_rows = _concat_index(layout).index_select(0, token_slots)
    valid = layout.valid.index_select(0, token_slots)
    num_valid = int(valid.sum())
    expert_ids = _empty_host((num_rows, count, topk), dtype)
    if count and num_rows:
        first = positions[0]
        if positions == tuple(range(first, first + count)):  # one contiguous range (PP stage, all)
            select = lambda sample: sample.narrow(1, first, count)  # noqa: E731 - a view, no copy
        else:
            index = torch.tensor(positions, dtype=torch.long)
            select = lambda sample: sample.index_select(1, index)  # noqa: E731
        columns = layout.batch_size if num_rows % layout.batch_size == 0 else 1
        runs = _copy_runs(token_slots, layout, columns)
        if runs is not None:  # few runs (the usual case): one strided copy per run, straight from the sample
            grid = expert_ids.view(-1, columns, count, topk)  # router order is [s, b] sequence-major
            for column, row, length, sample, position in runs:
                grid[row : row + length, column].copy_(select(samples[sample].narrow(0, position, length)))
        else:  # many short runs: one source, one gather
            pieces = [select(sample) for sample in samples]
            source = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            torch.index_select(source, 0, source_rows.clamp_min(0), out=expert_ids)
        if num_valid < num_rows:
            pad = torch.nonzero(~valid).squeeze(1)
            fill = fill_ids_for_slots(token_slots.index_select(0, pad), topk, num_experts, dtype)
            expert_ids.index_copy_(0, pad, fill.unsqueeze(1).expand(-1, count, -1).contiguous())
    free = None
    num_free = 0
    if free_rows is not None and any(rows is not None for rows in free_rows):
        per_sample = [
            torch.zeros(n, dtype=torch.bool) if rows is None else rows.bool()
            for rows, n in zip(free_rows, layout.lengths)
        ]
        check_per_sample_rows(per_sample, layout)
        free = torch.cat(per_sample).index_select(0, source_rows.clamp_min(0)) & valid
        num_free = int(free.sum())
    return MicrobatchRoutes(
        expert_ids=expert_ids,
        layer_numbers=layer_numbers,
        valid=valid,
        free_rows=free,
        num_valid=num_valid,
        num_free=num_free,
    )


def _layer_positions(
    layer_numbers: tuple[int, ...], num_layers: int, source_layer_numbers: Optional[Sequence[int]]
) -> tuple[int, ...]:
    """Index along the routes' layer axis of each wanted global layer number."""
    if source_layer_numbers is None:
        if layer_numbers and (min(layer_numbers) < 1 or max(layer_numbers) > num_layers):
            raise ValueError(f"layer numbers {layer_numbers} outside the routes' {num_layers} layers")
        return tuple(n - 1 for n in layer_numbers)
    source = tuple(int(n) for n in source_layer_numbers)
    if len(source) != num_layers:
        raise ValueError(f"source_layer_numbers {source} name {len(source)} layers, the routes hold {num_layers}")
    where = {n: i for i, n in enumerate(source)}
    missing = [n for n in layer_numbers if n not in where]
    if missing:
        raise ValueError(f"this rank's routers need layers {missing}, but the routes carry only layers {source}")
    return tuple(where[n] for n in layer_numbers)


def _copy_runs(token_slots: torch.Tensor, layout: PackedLayout, columns: int, max_runs: int = 4096):
    """Split this rank's router rows into runs that read consecutive rows of one sample, or None if there are more
    than `max_runs` (then one gather is cheaper than a Python loop of copies).

    Router rows are `[s, b]` sequence-major (b = `columns`): along `s` within one batch column, a sample's tokens
    are consecutive except where the CP zigzag, the SP split or padding cuts them. Returns (column, first row along
    s, length, sample, first position in the sample) per run of real tokens; padding rows belong to no run.
    """
    b = columns
    sample_of = layout.slot_sample.index_select(0, token_slots).view(-1, b).t().contiguous()  # [b, s], -1 on pad
    position = layout.slot_position.index_select(0, token_slots).view(-1, b).t().contiguous()
    real = sample_of >= 0
    continues = torch.zeros_like(real)  # the row continues the previous row of its column (same sample, next token)
    continues[:, 1:] = real[:, 1:] & (sample_of[:, 1:] == sample_of[:, :-1]) & (position[:, 1:] == position[:, :-1] + 1)
    begins = real & ~continues
    if int(begins.sum()) > max_runs:
        return None
    ends = real.clone()  # the row is the last of its run
    ends[:, :-1] &= ~continues[:, 1:]
    column, row = torch.nonzero(begins, as_tuple=True)
    _, last = torch.nonzero(ends, as_tuple=True)  # row-major order: the i-th end closes the i-th begin
    return list(zip(column.tolist(), row.tolist(), (last - row + 1).tolist(), sample_of[column, row].tolist(),
                    position[column, row].tolist()))


def _empty_host(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Host tensor for data bound to the GPU: page-locked when CUDA is available (torch caches such blocks)."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())


def routes_from_recorded(recorded: dict[int, torch.Tensor], valid: torch.Tensor, num_valid: int) -> MicrobatchRoutes:
    """R2 with the same microbatch partition: replay what the routers recorded, row for row (padding rows too).

    This is the cheap path (no gather, nothing leaves the device) and it reproduces the recorded forward bit for
    bit, because even padding tokens keep their experts and so every expert sees the same token count.
    """
    numbers = tuple(sorted(recorded))
    if not numbers:  # a rank (pipeline stage) whose layers are all dense records nothing
        expert_ids = torch.empty((valid.shape[0], 0, 0), dtype=torch.uint8, device=valid.device)
        return MicrobatchRoutes(expert_ids=expert_ids, layer_numbers=(), valid=valid, num_valid=num_valid)
    expert_ids = torch.stack([recorded[n] for n in numbers], dim=1)
    return MicrobatchRoutes(expert_ids=expert_ids, layer_numbers=numbers, valid=valid, num_valid=num_valid)
