"""Token coordinates and attention masks for context-parallel core attention: pure tensor code, no process group.

Megatron splits every sequence (BSHD: every row; THD: every packed document, by its *padded* length) into
2·cp equal chunks and gives CP rank r chunks r and 2·cp-1-r, in that order (the load-balanced "zigzag" split
for causal attention; `megatron.core.utils.get_batch_on_this_cp_rank`, `get_pos_emb_on_this_cp_rank`,
`_apply_rotary_pos_emb_thd`). A token is named here by its *slot*: its index in the global (un-split) sequence
(BSHD: position in the row; THD: index in the packed row, documents at `cu_seqlens_padded`).

Everything is computed with device tensor ops from sizes and `cu_seqlens`, without host syncs; the only host
reads are the optional length checks, done when `cu_seqlens` lives on the CPU (as `train.batch` builds it).
`replay.layout.cp_local_slots` is the same split for the batch/routes side; unit tests check they agree.
"""

from __future__ import annotations

from typing import Optional

import torch


def cp_split_error(length: int, context_parallel_size: int, what: str = "sequence") -> str:
    """The message for a length that the 2·cp zigzag split cannot handle."""
    return (
        f"{what} length {length} is not divisible by 2 * context_parallel_size = {2 * context_parallel_size}; "
        f"pad every sequence to a multiple of replay.layout.sequence_pad_multiple(...) before the "
        f"context-parallel split"
    )


def zigzag_positions(
    seq_length: int, context_parallel_size: int, cp_rank: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Positions (int64) of one sequence of global length `seq_length` kept by `cp_rank`: chunk `cp_rank`, then
    chunk `2·cp-1-cp_rank`, of 2·cp equal chunks."""
    if context_parallel_size == 1:
        return torch.arange(seq_length, device=device)
    if seq_length % (2 * context_parallel_size):
        raise ValueError(cp_split_error(seq_length, context_parallel_size))
    chunk = seq_length // (2 * context_parallel_size)
    local = torch.arange(2 * chunk, device=device)
    second = 2 * context_parallel_size - 1 - cp_rank
    return torch.where(local < chunk, cp_rank * chunk + local, second * chunk + local - chunk)


def check_thd_lengths(cu_seqlens_padded: torch.Tensor, context_parallel_size: int, num_local_tokens: int) -> None:
    """Every padded document length must split into 2·cp chunks, and this rank must hold total/cp tokens.

    Host-side, so only done for CPU tensors (no device sync on the training path)."""
    if cu_seqlens_padded.device.type != "cpu":
        return
    bounds = [int(x) for x in cu_seqlens_padded.tolist()]
    multiple = 2 * context_parallel_size if context_parallel_size > 1 else 1
    for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end < start:
            raise ValueError(f"cu_seqlens_padded must be non-decreasing, got {bounds}")
        if (end - start) % multiple:
            raise ValueError(cp_split_error(end - start, context_parallel_size, f"packed document {doc} padded"))
    if bounds[-1] != num_local_tokens * context_parallel_size:
        raise ValueError(
            f"packed sequence holds {num_local_tokens} tokens on this context-parallel rank, but cu_seqlens_padded "
            f"ends at {bounds[-1]} (expected {num_local_tokens} * context_parallel_size {context_parallel_size})"
        )


def thd_local_slots(
    cu_seqlens_padded: torch.Tensor, context_parallel_size: int, cp_rank: int, num_local_tokens: int
) -> torch.Tensor:
    """Global slots (int64) of the `num_local_tokens` packed tokens `cp_rank` holds, in its local order: every
    document split on its own (zigzag over its padded length), pieces concatenated in document order."""
    cu = cu_seqlens_padded.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    if context_parallel_size == 1:
        return torch.arange(num_local_tokens, device=cu.device)
    cu_local = torch.cat([cu.new_zeros(1), torch.cumsum(lengths // context_parallel_size, 0)])
    index = torch.arange(num_local_tokens, device=cu.device)
    doc = torch.searchsorted(cu_local[1:], index, right=True)
    offset = index - cu_local[doc]
    chunk = lengths[doc] // (2 * context_parallel_size)
    second = 2 * context_parallel_size - 1 - cp_rank
    position = torch.where(offset < chunk, cp_rank * chunk + offset, second * chunk + offset - chunk)
    return cu[doc] + position


def local_slots(
    num_local_tokens: int,
    context_parallel_size: int,
    cp_rank: int,
    cu_seqlens_padded: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Slots of this rank's tokens: BSHD (`cu_seqlens_padded` None) or THD."""
    if cu_seqlens_padded is None:
        return zigzag_positions(num_local_tokens * context_parallel_size, context_parallel_size, cp_rank, device)
    return thd_local_slots(cu_seqlens_padded.to(device), context_parallel_size, cp_rank, num_local_tokens)


def gathered_to_global_order(
    num_local_tokens: int,
    context_parallel_size: int,
    cu_seqlens_padded: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Index into the rank-major all-gathered rows (`[cp · n_local]`, rank r's tokens at `r·n_local ..`) that puts
    them in global slot order: `gathered.index_select(0, order)[s]` is the token of slot s."""
    slots = torch.cat(
        [
            local_slots(num_local_tokens, context_parallel_size, rank, cu_seqlens_padded, device)
            for rank in range(context_parallel_size)
        ]
    )
    return torch.argsort(slots)


def slot_coordinates(
    slots: torch.Tensor, cu_seqlens_padded: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(document, position in document, is-real-token) of every slot. BSHD: one document per row, all real.
    THD: documents at `cu_seqlens_padded`; a document's tokens beyond its real length (`cu_seqlens`, when given)
    are padding, as TransformerEngine treats them."""
    if cu_seqlens_padded is None:
        return torch.zeros_like(slots), slots, torch.ones_like(slots, dtype=torch.bool)
    cu = cu_seqlens_padded.to(device=slots.device, dtype=torch.int64)
    doc = torch.searchsorted(cu[1:], slots, right=True)
    position = slots - cu[doc]
    if cu_seqlens is None:
        return doc, position, torch.ones_like(slots, dtype=torch.bool)
    real = cu_seqlens.to(device=slots.device, dtype=torch.int64)
    real_lengths = real[1:] - real[:-1]
    return doc, position, position < real_lengths[doc]


def attention_mask(
    query_slots: torch.Tensor,
    key_slots: torch.Tensor,
    *,
    causal: bool,
    window_size: Optional[tuple[int, int]] = None,
    cu_seqlens_padded: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """bool `[sq, sk]`, True where a query may NOT attend a key (megatron's convention).

    Keys of another document and padding keys (THD) are masked; then, by global position within the document,
    a sliding window `(left, right)` (as megatron's `get_sliding_window_causal_mask`: key in
    [q - left, q + right]; a negative bound is unbounded) if given, else the causal rule (key after query) if
    `causal`.
    """
    q_doc, q_pos, _ = slot_coordinates(query_slots, cu_seqlens_padded, cu_seqlens)
    k_doc, k_pos, k_real = slot_coordinates(key_slots, cu_seqlens_padded, cu_seqlens)
    masked = (q_doc.unsqueeze(1) != k_doc.unsqueeze(0)) | ~k_real.unsqueeze(0)
    keys, queries = k_pos.unsqueeze(0), q_pos.unsqueeze(1)  # only bool [sq, sk] tensors are materialised
    if window_size is not None:
        left, right = window_size
        if left >= 0:
            masked |= keys < queries - left
        if right >= 0:
            masked |= keys > queries + right
    elif causal:
        masked |= keys > queries
    return masked
