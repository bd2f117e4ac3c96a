"""One microbatch's routes on one rank: sliced to this rank's tokens and MoE layers before they travel.

`localize_routes` is the CPU-side step: it selects the MoE layers this rank's model chunks own, packs the samples
exactly like the tokens (`layout.pack_routes`), and keeps only this rank's router rows (CP split + SP scatter, in
router order). The result stays in the compact dtype (1 byte per id when experts <= 256) until a router turns one
layer's slice into int64 at the moment of use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from megatron_r3.model.replay_router import InstalledRoutes
from megatron_r3.replay.layout import PackedLayout, distinct_fill_ids, pack_per_slot


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
) -> MicrobatchRoutes:
    """Build this rank's `MicrobatchRoutes`.

    samples: per-sample routes `[n_j, L_all, K]` (all decoder layers, as rollout engines send them), `n_j` =
        the sample's tokens in the layout.
    token_slots: `layout.router_token_slots(...)` for this rank.
    layer_numbers: the global layer numbers of this rank's MoE routers (all its model chunks).
    free_rows: per sample, None or bool `[n_j]` rows that must route natively (validated-bad rows).
    """
    layer_numbers = tuple(int(n) for n in layer_numbers)
    num_layers_all = samples[0].shape[1]
    if layer_numbers and (min(layer_numbers) < 1 or max(layer_numbers) > num_layers_all):
        raise ValueError(f"layer numbers {layer_numbers} outside the routes' {num_layers_all} layers")
    topk = samples[0].shape[2]
    layer_index = torch.tensor([n - 1 for n in layer_numbers], dtype=torch.long)
    selected = [sample.index_select(1, layer_index) for sample in samples]
    fill = distinct_fill_ids(layout.num_slots, topk, num_experts, samples[0].dtype)
    fill = fill.unsqueeze(1).expand(-1, len(layer_numbers), -1)
    packed = pack_per_slot(selected, layout, fill)
    expert_ids = packed.index_select(0, token_slots).contiguous()
    valid = layout.valid.index_select(0, token_slots)
    free = None
    if free_rows is not None and any(rows is not None for rows in free_rows):
        per_sample = [
            torch.zeros(n, dtype=torch.bool) if rows is None else rows.bool()
            for rows, n in zip(free_rows, layout.lengths)
        ]
        free = pack_per_slot(per_sample, layout, False).index_select(0, token_slots)
    return MicrobatchRoutes(
        expert_ids=expert_ids,
        layer_numbers=layer_numbers,
        valid=valid,
        free_rows=free,
        num_valid=int(valid.sum()),
        num_free=0 if free is None else int(free.sum()),
    )


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
