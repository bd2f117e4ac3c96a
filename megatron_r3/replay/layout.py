"""Route layout: pure functions that put per-sample routes exactly where megatron puts the tokens.

The rule every implementation in the field got wrong at least once: a route row must go through *the same*
packing, padding, context-parallel split and sequence-parallel scatter as its token. So the transform is written
once, as integer "slot" indices computed from sizes alone, and applied to everything: input ids, labels, loss
masks, position ids and routes. No process group is needed; every function here is unit-tested by hand.

Vocabulary
- slot: one position of the packed microbatch, flattened. BSHD (padded): `b * S` slots, row-major, sample `j` in
  row `j` at positions `0 .. n_j-1` (left-aligned, right-padded). THD (packed): one row of `S = sum(padded n_j)`
  slots, sample `j` at `cu_seqlens_padded[j] ..`.
- model order: the `[b, s_local]` token order this CP rank feeds to `GPTModel` (input_ids, labels, ...).
- router order: the order the router sees tokens in: hidden states `[s, b, h]` are flattened sequence-major to
  `[s*b, h]`, after the CP split and after the sequence-parallel scatter along `s`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

PAD = -1


def sequence_pad_multiple(
    tensor_model_parallel_size: int = 1, context_parallel_size: int = 1, sequence_parallel: bool = False
) -> int:
    """Smallest multiple every (BSHD row / THD sample) length must be padded to.

    CP splits each sequence into 2*cp equal chunks; SP splits each CP rank's local sequence into tp equal parts.
    """
    multiple = 2 * context_parallel_size if context_parallel_size > 1 else 1
    if sequence_parallel and tensor_model_parallel_size > 1:
        multiple *= tensor_model_parallel_size
    return multiple


def padded_length(value: int, multiple: int) -> int:
    """`value` rounded up to a multiple of `multiple` (a sample's or a row's length after padding)."""
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class PackedLayout:
    """Where each sample's tokens sit in a microbatch; `slot_sample`/`slot_position` are -1 on padding."""

    qkv_format: str  # "bshd" or "thd"
    lengths: tuple[int, ...]
    batch_size: int
    seq_length: int
    padded_lengths: tuple[int, ...]
    slot_sample: torch.Tensor
    slot_position: torch.Tensor

    @property
    def num_slots(self) -> int:
        return self.batch_size * self.seq_length

    @property
    def valid(self) -> torch.Tensor:
        """bool [num_slots]: True on real tokens."""
        return self.slot_sample >= 0

    def cu_seqlens(self, padded: bool = False) -> torch.Tensor:
        """THD cumulative sequence lengths (int32), real or padded, as megatron's PackedSeqParams wants them."""
        if self.qkv_format != "thd":
            raise ValueError("cu_seqlens only exist for the packed (thd) layout")
        lengths = self.padded_lengths if padded else self.lengths
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _check_lengths(lengths: Sequence[int]) -> tuple[int, ...]:
    lengths = tuple(int(n) for n in lengths)
    if not lengths:
        raise ValueError("a microbatch needs at least one sample")
    if min(lengths) < 1:
        raise ValueError(f"every sample needs at least one token, got lengths {list(lengths)}")
    return lengths


def pack_bshd(lengths: Sequence[int], *, seq_length: Optional[int] = None, pad_multiple: int = 1) -> PackedLayout:
    """Padded layout: one row per sample, row length `seq_length` (default: longest sample), padded up to a
    multiple of `pad_multiple`."""
    lengths = _check_lengths(lengths)
    longest = max(lengths)
    if seq_length is None:
        seq_length = longest
    if seq_length < longest:
        raise ValueError(f"seq_length {seq_length} is shorter than the longest sample ({longest} tokens)")
    seq_length = padded_length(seq_length, pad_multiple)
    positions = torch.arange(seq_length).expand(len(lengths), seq_length)
    real = positions < torch.tensor(lengths).unsqueeze(1)
    rows = torch.arange(len(lengths)).unsqueeze(1).expand_as(positions)
    return PackedLayout(
        qkv_format="bshd",
        lengths=lengths,
        batch_size=len(lengths),
        seq_length=seq_length,
        padded_lengths=(seq_length,) * len(lengths),
        slot_sample=torch.where(real, rows, PAD).reshape(-1),
        slot_position=torch.where(real, positions, PAD).reshape(-1),
    )


def pack_thd(lengths: Sequence[int], *, pad_multiple: int = 1, seq_length: Optional[int] = None) -> PackedLayout:
    """Packed layout: samples concatenated in one row, each padded up to a multiple of `pad_multiple`.

    seq_length: the row's length when it must be longer than the samples need (pipeline parallelism sends one
    shape for every microbatch): the last sample's padding grows to fill it (rounded up to `pad_multiple`)."""
    lengths = _check_lengths(lengths)
    padded = [padded_length(n, pad_multiple) for n in lengths]
    if seq_length is not None:
        seq_length = padded_length(seq_length, pad_multiple)
        if seq_length < sum(padded):
            raise ValueError(f"seq_length {seq_length} is shorter than the {sum(padded)} packed (padded) tokens")
        padded[-1] += seq_length - sum(padded)
    padded = tuple(padded)
    slot_sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(padded))
    slot_position = _thd_positions(padded)
    real = slot_position < torch.repeat_interleave(torch.tensor(lengths), torch.tensor(padded))
    return PackedLayout(
        qkv_format="thd",
        lengths=lengths,
        batch_size=1,
        seq_length=sum(padded),
        padded_lengths=padded,
        slot_sample=torch.where(real, slot_sample, PAD),
        slot_position=torch.where(real, slot_position, PAD),
    )


def slot_positions(layout: PackedLayout) -> torch.Tensor:
    """Position id of every slot: the token's position in its sample; padding slots continue the count (their
    values never reach a real token under causal attention, but must stay in RoPE's range)."""
    if layout.qkv_format == "bshd":
        return torch.arange(layout.seq_length).repeat(layout.batch_size)
    return _thd_positions(layout.padded_lengths)


def _thd_positions(padded_lengths: Sequence[int]) -> torch.Tensor:
    """Position of every slot of a packed row within its (padded) sample, padding included."""
    padded = torch.tensor(padded_lengths)
    starts = torch.tensor([0, *padded_lengths[:-1]]).cumsum(0)
    return torch.arange(int(sum(padded_lengths))) - torch.repeat_interleave(starts, padded)


def cp_zigzag_positions(seq_length: int, context_parallel_size: int, cp_rank: int) -> torch.Tensor:
    """Positions of one sequence kept by `cp_rank`: chunks `cp_rank` and `2*cp-1-cp_rank` of 2*cp equal chunks,
    in that order (megatron's load-balanced split for causal attention)."""
    if context_parallel_size == 1:
        return torch.arange(seq_length)
    if not 0 <= cp_rank < context_parallel_size:
        raise ValueError(f"cp_rank {cp_rank} is outside context_parallel_size {context_parallel_size}")
    chunks = 2 * context_parallel_size
    if seq_length % chunks:
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2 * context_parallel_size = {chunks}; pad it "
            f"(sequence_pad_multiple) before the context-parallel split"
        )
    chunk = seq_length // chunks
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((chunks - 1 - cp_rank) * chunk, (chunks - cp_rank) * chunk)
    return torch.cat([first, second])


def cp_local_slots(layout: PackedLayout, context_parallel_size: int = 1, cp_rank: int = 0) -> torch.Tensor:
    """Slot indices `[b, s_local]` of the tokens this CP rank feeds to the model, in model order.

    BSHD: every row is split like one sequence. THD: every sample (padded length) is split on its own and the
    local pieces are concatenated in sample order, which is what per-document CP balancing does.
    """
    if layout.qkv_format == "bshd":
        positions = cp_zigzag_positions(layout.seq_length, context_parallel_size, cp_rank)
        rows = torch.arange(layout.batch_size).unsqueeze(1) * layout.seq_length
        return rows + positions.unsqueeze(0)
    pieces, start = [], 0
    for padded in layout.padded_lengths:
        pieces.append(start + cp_zigzag_positions(padded, context_parallel_size, cp_rank))
        start += padded
    return torch.cat(pieces).unsqueeze(0)


def sp_local_range(num_rows: int, tensor_model_parallel_size: int, tp_rank: int) -> tuple[int, int]:
    """[start, end) of the rows (sequence positions) this TP rank keeps, like
    `scatter_to_sequence_parallel_region` (equal contiguous split of dim 0)."""
    if num_rows % tensor_model_parallel_size:
        raise ValueError(
            f"sequence length {num_rows} on this context-parallel rank is not divisible by "
            f"tensor_model_parallel_size {tensor_model_parallel_size} (sequence parallelism needs equal splits)"
        )
    part = num_rows // tensor_model_parallel_size
    return tp_rank * part, (tp_rank + 1) * part


def router_token_slots(
    layout: PackedLayout,
    *,
    context_parallel_size: int = 1,
    cp_rank: int = 0,
    tensor_model_parallel_size: int = 1,
    tp_rank: int = 0,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Slot index of every token the router of this rank sees, in router order ([s*b], sequence-major)."""
    model_order = cp_local_slots(layout, context_parallel_size, cp_rank)  # [b, s_local]
    sequence_major = model_order.t()  # [s_local, b]
    if sequence_parallel and tensor_model_parallel_size > 1:
        start, end = sp_local_range(sequence_major.shape[0], tensor_model_parallel_size, tp_rank)
        sequence_major = sequence_major[start:end]
    return sequence_major.reshape(-1)


def pack_per_slot(values: Sequence[torch.Tensor], layout: PackedLayout, fill) -> torch.Tensor:
    """Place per-sample tensors `[n_j, ...]` into slots `[num_slots, ...]`; padding slots get `fill`.

    `fill` is a scalar or a tensor of shape `[num_slots, ...]` (e.g. distinct pad routes)."""
    check_per_sample_rows(values, layout)
    trailing = tuple(values[0].shape[1:])
    if torch.is_tensor(fill):
        out = fill.clone(memory_format=torch.contiguous_format)
    else:
        out = torch.full((layout.num_slots, *trailing), fill, dtype=values[0].dtype)
    # one index_copy_ of the real rows (a boolean-mask assignment is ~10x slower on big route tensors)
    valid_slots = torch.nonzero(layout.valid).squeeze(1)
    source = values[0] if len(values) == 1 else torch.cat(list(values))
    rows = _concat_index(layout).index_select(0, valid_slots)
    if not torch.equal(rows, torch.arange(rows.shape[0])):  # pack_bshd / pack_thd keep samples in order
        source = source.index_select(0, rows)
    out.index_copy_(0, valid_slots, source.to(out.dtype))
    return out


def check_per_sample_rows(values: Sequence[torch.Tensor], layout: PackedLayout) -> None:
    """Raise ValueError unless `values` holds one tensor per sample of `layout`, with the sample's row count."""
    if len(values) != len(layout.lengths):
        raise ValueError(f"got {len(values)} samples for a layout of {len(layout.lengths)}")
    for j, (value, n) in enumerate(zip(values, layout.lengths)):
        if value.shape[0] != n:
            raise ValueError(f"sample {j} has {value.shape[0]} rows, the layout expects {n}")


def _concat_index(layout: PackedLayout) -> torch.Tensor:
    """For each slot, its row in `torch.cat(per_sample_values)` (-1 on padding)."""
    starts = torch.tensor([0, *layout.lengths[:-1]]).cumsum(0)
    index = starts[layout.slot_sample.clamp_min(0)] + layout.slot_position
    return torch.where(layout.valid, index, PAD)


def unpack_per_slot(packed: torch.Tensor, layout: PackedLayout) -> list[torch.Tensor]:
    """Inverse of `pack_per_slot`: per-sample tensors `[n_j, ...]` from slots `[num_slots, ...]`."""
    if packed.shape[0] != layout.num_slots:
        raise ValueError(f"packed tensor has {packed.shape[0]} slots, the layout has {layout.num_slots}")
    order = torch.argsort(_concat_index(layout), stable=True)[layout.num_slots - sum(layout.lengths) :]
    return list(torch.split(packed[order], list(layout.lengths)))


def distinct_fill_ids(num_rows: int, topk: int, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """`[num_rows, topk]` ids with no duplicate in any row, rotating over experts so that padding does not pile
    onto expert 0 (the alltoall dispatcher needs exactly topk distinct ids per row; a zero row crashes it)."""
    return fill_ids_for_slots(torch.arange(num_rows), topk, num_experts, dtype)


def fill_ids_for_slots(slots: torch.Tensor, topk: int, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """`distinct_fill_ids(...)[slots]` without building the rows of the other slots."""
    if topk > num_experts:
        raise ValueError(f"moe_router_topk {topk} exceeds num_moe_experts {num_experts}")
    return ((slots.long().unsqueeze(1) * topk + torch.arange(topk)) % num_experts).to(dtype)


def moe_layer_pattern(num_layers: int, moe_layer_freq) -> tuple[bool, ...]:
    """Which decoder layers (0-based) are MoE layers, with megatron's `moe_layer_freq` semantics: an int N puts an
    MoE layer every N layers starting at layer 0; a list gives 1 (MoE) / 0 (dense) per layer."""
    if isinstance(moe_layer_freq, int):
        if moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {moe_layer_freq}")
        return tuple(i % moe_layer_freq == 0 for i in range(num_layers))
    pattern = list(moe_layer_freq)
    if len(pattern) != num_layers:
        raise ValueError(f"moe_layer_freq has {len(pattern)} entries for {num_layers} layers")
    if any(p not in (0, 1) for p in pattern):
        raise ValueError(f"moe_layer_freq entries must be 0 or 1, got {pattern}")
    return tuple(bool(p) for p in pattern)

