"""Model inputs of one microbatch on one rank, built with the same slot indices as the routes.

`microbatch_inputs` packs token sequences (BSHD padded or THD packed, see `replay.layout`), splits them for this
context-parallel rank with `cp_local_slots`, and returns what `GPTModel.forward` takes. The routes of the same
microbatch go through `router_token_slots`, which starts from the very same `cp_local_slots`; that shared origin
is what keeps every route row on the token it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_r3.replay.layout import PackedLayout, cp_local_slots, pack_per_slot, slot_positions


@dataclass
class MicrobatchInputs:
    """`GPTModel` inputs in model order `[b, s_local]` for this CP rank."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    packed_seq_params: Optional[object] = None

    def to(self, device, non_blocking: bool = True) -> "MicrobatchInputs":
        return MicrobatchInputs(
            tokens=self.tokens.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            loss_mask=self.loss_mask.to(device, non_blocking=non_blocking),
            position_ids=self.position_ids.to(device, non_blocking=non_blocking),
            packed_seq_params=self.packed_seq_params,
        )


def microbatch_inputs(
    sequences: Sequence[torch.Tensor],
    layout: PackedLayout,
    *,
    loss_masks: Optional[Sequence[torch.Tensor]] = None,
    context_parallel_size: int = 1,
    cp_rank: int = 0,
    pad_token_id: int = 0,
) -> MicrobatchInputs:
    """Inputs for full token sequences `[T_j]`: the model reads tokens `0..T_j-2` and predicts `1..T_j-1`, so each
    sample occupies `n_j = T_j - 1` slots (the rows a rollout engine returns routes for).

    loss_masks: per sample, float/bool `[T_j - 1]` over predicted positions (e.g. response tokens only);
    default all ones. Padding slots always get mask 0.
    """
    inputs = [seq[:-1] for seq in sequences]
    targets = [seq[1:] for seq in sequences]
    masks = loss_masks if loss_masks is not None else [torch.ones(len(seq) - 1) for seq in sequences]
    masks = [mask.float() for mask in masks]
    local = cp_local_slots(layout, context_parallel_size, cp_rank)  # [b, s_local]
    tokens = pack_per_slot(inputs, layout, pad_token_id)[local]
    labels = pack_per_slot(targets, layout, pad_token_id)[local]
    loss_mask = pack_per_slot(masks, layout, 0.0)[local]
    position_ids = slot_positions(layout)[local]
    packed_seq_params = None
    if layout.qkv_format == "thd":
        from megatron.core.packed_seq_params import PackedSeqParams

        cu_seqlens = layout.cu_seqlens(padded=True)
        max_seqlen = max(layout.padded_lengths)
        packed_seq_params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            cu_seqlens_q_padded=cu_seqlens,
            cu_seqlens_kv_padded=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_kv=max_seqlen,
        )
    return MicrobatchInputs(tokens, labels, loss_mask, position_ids, packed_seq_params)
