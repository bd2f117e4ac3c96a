"""Unit tests for megatron_r3.replay.layout, with hand-computed expectations.

Every expected tensor below is a literal derived by hand in the comment next to it; where megatron-core has the
reference implementation of the same transform (CP zigzag split, SP scatter, PP/VP layer ranges), megatron's own
function is run as well (with a fake process group) and compared to the same literal.
"""

import re
import types

import pytest
import torch

from megatron_r3.replay.layout import (
    PackedLayout,
    cp_local_slots,
    cp_zigzag_positions,
    distinct_fill_ids,
    moe_layer_pattern,
    pack_bshd,
    pack_per_slot,
    pack_thd,
    padded_length,
    router_token_slots,
    sequence_pad_multiple,
    slot_positions,
    sp_local_range,
    unpack_per_slot,
)


def pack_routes(routes, layout: PackedLayout, num_experts: int) -> torch.Tensor:
    """Reference: per-sample routes `[n_j, L, K]` -> slots `[num_slots, L, K]` with distinct ids in padding slots
    (what `replay/microbatch.localize_routes` computes for one rank's slots without building the others)."""
    num_layers, topk = routes[0].shape[1:]
    fill = distinct_fill_ids(layout.num_slots, topk, num_experts, routes[0].dtype)
    return pack_per_slot(routes, layout, fill.unsqueeze(1).expand(-1, num_layers, -1))


def chunk_layer_numbers(config, *, pp_rank: int, vp_stage=None) -> tuple[int, ...]:
    """Global 1-based `layer_number`s of the decoder layers megatron builds on pipeline rank `pp_rank`, virtual
    stage `vp_stage` (megatron's own offset / count functions; the routers carry these numbers, and the replay
    selects route layers by them)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return tuple(range(offset + 1, offset + count + 1))


def chunk_moe_layer_numbers(config, *, pp_rank: int, vp_stage=None) -> tuple[int, ...]:
    """The MoE subset of `chunk_layer_numbers` (dense layers have no router)."""
    pattern = moe_layer_pattern(config.num_layers, config.moe_layer_freq)
    return tuple(n for n in chunk_layer_numbers(config, pp_rank=pp_rank, vp_stage=vp_stage) if pattern[n - 1])


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def t(values, dtype=torch.long):
    return torch.tensor(values, dtype=dtype)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual, expected), (actual, expected)


# ------------------------------------------------------------------------------------------- megatron references
def megatron_cp_split(batch: dict, cp: int, rank: int, monkeypatch) -> dict:
    """Run megatron's real per-sequence zigzag split with torch.distributed answering for a fake CP group."""
    from megatron.core.utils import _get_batch_on_this_cp_rank_per_sequence_balancing

    with monkeypatch.context() as patch:
        patch.setattr(torch.distributed, "get_world_size", lambda group=None: cp)
        patch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
        return _get_batch_on_this_cp_rank_per_sequence_balancing(dict(batch), cp_group=object())


def megatron_sp_split(sequence_first: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """megatron's `scatter_to_sequence_parallel_region` forward (`_split_along_first_dim`) on a fake TP group."""
    from megatron.core.tensor_parallel.mappings import _split_along_first_dim

    group = types.SimpleNamespace(size=lambda: tp, rank=lambda: rank)
    return _split_along_first_dim(sequence_first, group)


# ---------------------------------------------------------------------------------------------- pad multiple
def test_sequence_pad_multiple():
    assert sequence_pad_multiple() == 1
    assert sequence_pad_multiple(2, 1, False) == 1  # TP without SP: no split of the sequence
    assert sequence_pad_multiple(2, 1, True) == 2  # SP: tp equal parts
    assert sequence_pad_multiple(1, 2, False) == 4  # CP: 2*cp chunks
    assert sequence_pad_multiple(1, 3, True) == 6  # SP with tp=1 adds nothing
    assert sequence_pad_multiple(2, 2, True) == 8  # 2*cp chunks, each CP rank's half split in tp parts
    assert sequence_pad_multiple(4, 2, True) == 16


# ------------------------------------------------------------------------------------------------- pack_bshd
def test_pack_bshd_lengths_3_1():
    layout = pack_bshd([3, 1])
    # seq_length = longest = 3; row 0 = sample 0 positions 0..2; row 1 = sample 1 position 0 then 2 pads.
    assert layout.qkv_format == "bshd"
    assert (layout.batch_size, layout.seq_length, layout.num_slots) == (2, 3, 6)
    assert layout.lengths == (3, 1)
    assert layout.padded_lengths == (3, 3)
    assert_equal(layout.slot_sample, t([0, 0, 0, 1, -1, -1]))
    assert_equal(layout.slot_position, t([0, 1, 2, 0, -1, -1]))
    assert_equal(layout.valid, t([True, True, True, True, False, False], torch.bool))


def test_pack_bshd_pad_multiple_rounds_up():
    layout = pack_bshd([3, 1], pad_multiple=4)
    # 3 -> 4 slots per row: [s0p0 s0p1 s0p2 pad | s1p0 pad pad pad]
    assert (layout.seq_length, layout.num_slots) == (4, 8)
    assert layout.padded_lengths == (4, 4)
    assert_equal(layout.slot_sample, t([0, 0, 0, -1, 1, -1, -1, -1]))
    assert_equal(layout.slot_position, t([0, 1, 2, -1, 0, -1, -1, -1]))
    # explicit seq_length 5 is rounded up to 8; an exact multiple stays.
    assert pack_bshd([3, 1], seq_length=5, pad_multiple=4).seq_length == 8
    assert pack_bshd([3, 1], seq_length=4, pad_multiple=4).seq_length == 4
    assert pack_bshd([3, 1], seq_length=6).seq_length == 6


def test_pack_bshd_errors():
    with pytest.raises(ValueError, match=exact("seq_length 2 is shorter than the longest sample (3 tokens)")):
        pack_bshd([3, 1], seq_length=2)
    with pytest.raises(ValueError, match=exact("a microbatch needs at least one sample")):
        pack_bshd([])
    with pytest.raises(ValueError, match=exact("every sample needs at least one token, got lengths [3, 0]")):
        pack_bshd([3, 0])
    with pytest.raises(ValueError, match=exact("cu_seqlens only exist for the packed (thd) layout")):
        pack_bshd([3, 1]).cu_seqlens()


# -------------------------------------------------------------------------------------------------- pack_thd
def test_pack_thd_lengths_3_2_pad_4():
    layout = pack_thd([3, 2], pad_multiple=4)
    # one row: sample 0 in slots 0..3 (3 real + 1 pad), sample 1 in slots 4..7 (2 real + 2 pads)
    assert layout.qkv_format == "thd"
    assert (layout.batch_size, layout.seq_length, layout.num_slots) == (1, 8, 8)
    assert layout.padded_lengths == (4, 4)
    assert_equal(layout.slot_sample, t([0, 0, 0, -1, 1, 1, -1, -1]))
    assert_equal(layout.slot_position, t([0, 1, 2, -1, 0, 1, -1, -1]))
    assert_equal(layout.cu_seqlens(), t([0, 3, 5], torch.int32))
    assert_equal(layout.cu_seqlens(padded=True), t([0, 4, 8], torch.int32))


def test_pack_thd_uneven_padded_lengths():
    layout = pack_thd([3, 6, 1], pad_multiple=4)
    # padded 4, 8, 4 -> 16 slots; sample 1 starts at 4, sample 2 at 12
    assert layout.padded_lengths == (4, 8, 4)
    assert_equal(layout.slot_sample, t([0, 0, 0, -1, 1, 1, 1, 1, 1, 1, -1, -1, 2, -1, -1, -1]))
    assert_equal(layout.slot_position, t([0, 1, 2, -1, 0, 1, 2, 3, 4, 5, -1, -1, 0, -1, -1, -1]))
    assert_equal(layout.cu_seqlens(), t([0, 3, 9, 10], torch.int32))
    assert_equal(layout.cu_seqlens(padded=True), t([0, 4, 12, 16], torch.int32))
    # no padding multiple: no pad slots at all
    plain = pack_thd([3, 2])
    assert_equal(plain.slot_sample, t([0, 0, 0, 1, 1]))
    assert_equal(plain.slot_position, t([0, 1, 2, 0, 1]))


def test_pack_thd_seq_length_grows_the_last_samples_padding():
    # [3, 2] padded to 4 -> (4, 4) = 8 slots; a fixed row of 11 tokens rounds up to 12 and the last sample takes the
    # 4 extra slots: padded (4, 8), cu_seqlens_padded 0 4 12, the real tokens stay where they were
    layout = pack_thd([3, 2], pad_multiple=4, seq_length=11)
    assert (layout.seq_length, layout.padded_lengths) == (12, (4, 8))
    assert_equal(layout.slot_sample, t([0, 0, 0, -1, 1, 1, -1, -1, -1, -1, -1, -1]))
    assert_equal(layout.slot_position, t([0, 1, 2, -1, 0, 1, -1, -1, -1, -1, -1, -1]))
    assert_equal(layout.cu_seqlens(padded=True), t([0, 4, 12], torch.int32))
    # position ids continue through the grown padding (RoPE range), restarting per sample
    assert_equal(slot_positions(layout), t([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]))
    # the natural length is accepted unchanged; a shorter one is refused
    same = pack_thd([3, 2], pad_multiple=4, seq_length=8)
    assert same.padded_lengths == (4, 4)
    with pytest.raises(ValueError, match=exact("seq_length 4 is shorter than the 8 packed (padded) tokens")):
        pack_thd([3, 2], pad_multiple=4, seq_length=4)


def test_padded_length():
    assert [padded_length(n, 4) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]
    assert padded_length(7, 1) == 7


# ------------------------------------------------------------------------------------- BSHD <-> THD, round trip
def test_pack_per_slot_literal_bshd_and_thd():
    samples = [t([10, 11, 12]), t([20])]
    # BSHD [3,1]: row0 = 10 11 12, row1 = 20 pad pad
    assert_equal(pack_per_slot(samples, pack_bshd([3, 1]), -1), t([10, 11, 12, 20, -1, -1]))
    # THD [3,1] pad 2: sample0 padded to 4, sample1 padded to 2
    assert_equal(pack_per_slot(samples, pack_thd([3, 1], pad_multiple=2), -1), t([10, 11, 12, -1, 20, -1]))


def test_bshd_and_thd_give_identical_samples():
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7]
    samples = [torch.randn(n, 3, 2, generator=gen) for n in lengths]
    bshd = pack_per_slot(samples, pack_bshd(lengths, pad_multiple=4), float("nan"))
    thd = pack_per_slot(samples, pack_thd(lengths, pad_multiple=4), float("nan"))
    assert bshd.shape == (3 * 8, 3, 2) and thd.shape == (8 + 4 + 8, 3, 2)
    from_bshd = unpack_per_slot(bshd, pack_bshd(lengths, pad_multiple=4))
    from_thd = unpack_per_slot(thd, pack_thd(lengths, pad_multiple=4))
    for a, b, original in zip(from_bshd, from_thd, samples):
        assert torch.equal(a, b)
        assert torch.equal(a, original)


@pytest.mark.parametrize(
    "layout",
    [
        pack_bshd([1]),
        pack_bshd([4, 1, 3]),
        pack_bshd([4, 1, 3], seq_length=9, pad_multiple=4),
        pack_thd([1]),
        pack_thd([4, 1, 3]),
        pack_thd([4, 1, 3], pad_multiple=8),
    ],
    ids=["bshd1", "bshd", "bshd_pad", "thd1", "thd", "thd_pad"],
)
def test_pack_unpack_round_trip_is_identity(layout):
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 1000, (n, 2, 3), generator=gen) for n in layout.lengths]
    packed = pack_per_slot(samples, layout, -7)
    assert packed.shape == (layout.num_slots, 2, 3)
    assert bool((packed[~layout.valid] == -7).all())
    unpacked = unpack_per_slot(packed, layout)
    assert len(unpacked) == len(samples)
    for got, want in zip(unpacked, samples):
        assert_equal(got, want)
    # inverse direction on the real slots: pack(unpack(x)) reproduces x wherever a token sits
    slots = torch.randint(0, 1000, (layout.num_slots, 2, 3), generator=gen)
    again = pack_per_slot(unpack_per_slot(slots, layout), layout, -7)
    assert torch.equal(again[layout.valid], slots[layout.valid])


def test_pack_per_slot_tensor_fill_and_errors():
    layout = pack_bshd([1, 2])  # slots: s0p0 pad | s1p0 s1p1
    fill = t([[90, 91], [92, 93], [94, 95], [96, 97]])
    packed = pack_per_slot([t([[1, 2]]), t([[3, 4], [5, 6]])], layout, fill)
    assert_equal(packed, t([[1, 2], [92, 93], [3, 4], [5, 6]]))
    assert_equal(fill, t([[90, 91], [92, 93], [94, 95], [96, 97]]))  # fill is not modified in place
    with pytest.raises(ValueError, match=exact("got 1 samples for a layout of 2")):
        pack_per_slot([t([1])], layout, 0)
    with pytest.raises(ValueError, match=exact("sample 1 has 3 rows, the layout expects 2")):
        pack_per_slot([t([1]), t([1, 2, 3])], layout, 0)
    with pytest.raises(ValueError, match=exact("packed tensor has 3 slots, the layout has 4")):
        unpack_per_slot(torch.zeros(3), layout)


# ------------------------------------------------------------------------------------------------ CP zigzag
def test_cp_zigzag_positions_seq8_cp2():
    # 4 chunks of 2: rank 0 keeps chunks 0 and 3, rank 1 keeps chunks 1 and 2
    assert_equal(cp_zigzag_positions(8, 2, 0), t([0, 1, 6, 7]))
    assert_equal(cp_zigzag_positions(8, 2, 1), t([2, 3, 4, 5]))


def test_cp_zigzag_positions_seq16_cp4():
    # 8 chunks of 2: rank r keeps chunks r and 7 - r
    assert_equal(cp_zigzag_positions(16, 4, 0), t([0, 1, 14, 15]))
    assert_equal(cp_zigzag_positions(16, 4, 1), t([2, 3, 12, 13]))
    assert_equal(cp_zigzag_positions(16, 4, 2), t([4, 5, 10, 11]))
    assert_equal(cp_zigzag_positions(16, 4, 3), t([6, 7, 8, 9]))
    union = torch.cat([cp_zigzag_positions(16, 4, r) for r in range(4)]).sort().values
    assert_equal(union, torch.arange(16))


def test_cp_zigzag_positions_cp1_and_errors():
    assert_equal(cp_zigzag_positions(5, 1, 0), t([0, 1, 2, 3, 4]))
    with pytest.raises(
        ValueError,
        match=exact(
            "sequence length 6 is not divisible by 2 * context_parallel_size = 4; pad it "
            "(sequence_pad_multiple) before the context-parallel split"
        ),
    ):
        cp_zigzag_positions(6, 2, 0)
    with pytest.raises(ValueError, match=exact("cp_rank 2 is outside context_parallel_size 2")):
        cp_zigzag_positions(8, 2, 2)


def test_cp_local_slots_bshd_b2():
    layout = pack_bshd([3, 4], pad_multiple=4)  # 2 rows of 4 slots: row0 = 0..3, row1 = 4..7
    # cp2: chunks of 1; rank 0 keeps positions 0,3 of each row; rank 1 keeps 1,2
    assert_equal(cp_local_slots(layout, 2, 0), t([[0, 3], [4, 7]]))
    assert_equal(cp_local_slots(layout, 2, 1), t([[1, 2], [5, 6]]))
    assert_equal(cp_local_slots(layout, 1, 0), t([[0, 1, 2, 3], [4, 5, 6, 7]]))


@pytest.mark.parametrize("cp,seq", [(2, 4), (2, 8), (4, 16)])
def test_cp_local_slots_bshd_matches_megatron(cp, seq, monkeypatch):
    layout = pack_bshd([seq, seq - 1, 1], seq_length=seq)
    slots = torch.arange(layout.num_slots).view(layout.batch_size, seq)  # a tensor whose values are its slots
    for rank in range(cp):
        out = megatron_cp_split({"tokens": slots, "position_ids": slots.clone(), "cu_seqlens": None}, cp, rank,
                                monkeypatch)
        assert_equal(cp_local_slots(layout, cp, rank), out["tokens"])
        assert_equal(cp_local_slots(layout, cp, rank), out["position_ids"])


def test_cp_local_slots_bshd_megatron_literal_cp2(monkeypatch):
    # megatron on the [2, 4] slot grid, rank 0: chunks (0, 3) -> [[0, 3], [4, 7]] (same literal as above)
    out = megatron_cp_split({"tokens": torch.arange(8).view(2, 4)}, 2, 0, monkeypatch)
    assert_equal(out["tokens"], t([[0, 3], [4, 7]]))


def test_cp_local_slots_thd_per_document():
    layout = pack_thd([3, 5], pad_multiple=4)  # doc0 slots 0..3 (padded 4), doc1 slots 4..11 (padded 8)
    # cp2 rank 0: doc0 chunks of 1 -> 0, 3; doc1 chunks of 2 -> 4+[0,1,6,7] = 4,5,10,11
    assert_equal(cp_local_slots(layout, 2, 0), t([[0, 3, 4, 5, 10, 11]]))
    # cp2 rank 1: doc0 -> 1, 2; doc1 -> 4+[2,3,4,5] = 6,7,8,9
    assert_equal(cp_local_slots(layout, 2, 1), t([[1, 2, 6, 7, 8, 9]]))


def test_cp_local_slots_thd_equals_per_sequence_split_of_each_document(monkeypatch):
    layout = pack_thd([3, 5, 12], pad_multiple=4)
    starts = [0, *torch.tensor(layout.padded_lengths).cumsum(0).tolist()]
    for rank in range(2):
        pieces = []
        for start, padded in zip(starts, layout.padded_lengths):
            document = torch.arange(start, start + padded).view(1, padded)
            pieces.append(megatron_cp_split({"tokens": document}, 2, rank, monkeypatch)["tokens"])
        assert_equal(cp_local_slots(layout, 2, rank), torch.cat(pieces, dim=1))


# ------------------------------------------------------------------------------------------------ SP scatter
def test_sp_local_range():
    assert sp_local_range(8, 2, 0) == (0, 4)
    assert sp_local_range(8, 2, 1) == (4, 8)
    assert sp_local_range(6, 3, 2) == (4, 6)
    assert sp_local_range(5, 1, 0) == (0, 5)
    for tp, rank in [(2, 0), (2, 1), (4, 3)]:
        start, end = sp_local_range(8, tp, rank)
        assert_equal(torch.arange(8)[start:end], megatron_sp_split(torch.arange(8), tp, rank))


def test_sp_scatter_with_uneven_padding():
    lengths = [3, 2]
    tp, cp = 4, 2
    # padding only for CP (multiple 4): rows of 4, each CP rank holds 2 positions, which 4 TP ranks cannot split
    too_short = pack_bshd(lengths, pad_multiple=4)
    assert too_short.seq_length == 4
    message = (
        "sequence length 2 on this context-parallel rank is not divisible by tensor_model_parallel_size 4 "
        "(sequence parallelism needs equal splits)"
    )
    with pytest.raises(ValueError, match=exact(message)):
        router_token_slots(too_short, context_parallel_size=cp, cp_rank=0, tensor_model_parallel_size=tp,
                           tp_rank=0, sequence_parallel=True)
    with pytest.raises(ValueError, match=exact(message)):
        sp_local_range(2, 4, 0)
    # megatron refuses the same split (assertion in _split_along_first_dim)
    with pytest.raises(AssertionError, match="divisible by tensor parallel size"):
        megatron_sp_split(torch.arange(2), 4, 0)
    # sequence_pad_multiple(4, 2, True) = 16 makes it even: 16 -> 8 per CP rank -> 2 per TP rank
    even = pack_bshd(lengths, pad_multiple=sequence_pad_multiple(tp, cp, True))
    assert even.seq_length == 16
    seen = []
    for cp_rank in range(cp):
        for tp_rank in range(tp):
            slots = router_token_slots(even, context_parallel_size=cp, cp_rank=cp_rank,
                                       tensor_model_parallel_size=tp, tp_rank=tp_rank, sequence_parallel=True)
            assert slots.shape == (2 * 2,)  # 2 positions x b=2
            seen.append(slots)
    assert_equal(torch.cat(seen).sort().values, torch.arange(32))


# ---------------------------------------------------------------------------------------------- router order
def test_router_token_slots_b2_tp2_sp_cp2():
    layout = pack_bshd([5, 8], pad_multiple=8)  # 2 rows of 8 slots: row0 = 0..7, row1 = 8..15
    # cp rank 0 keeps positions 0,1,6,7 -> model order [[0,1,6,7],[8,9,14,15]]
    #   sequence-major [s, b]: [[0,8],[1,9],[6,14],[7,15]]; tp0 rows 0..1, tp1 rows 2..3
    # cp rank 1 keeps positions 2,3,4,5 -> model order [[2,3,4,5],[10,11,12,13]]
    #   sequence-major: [[2,10],[3,11],[4,12],[5,13]]
    expected = {
        (0, 0): [0, 8, 1, 9],
        (0, 1): [6, 14, 7, 15],
        (1, 0): [2, 10, 3, 11],
        (1, 1): [4, 12, 5, 13],
    }
    for (cp_rank, tp_rank), want in expected.items():
        got = router_token_slots(layout, context_parallel_size=2, cp_rank=cp_rank, tensor_model_parallel_size=2,
                                 tp_rank=tp_rank, sequence_parallel=True)
        assert_equal(got, t(want))
    # without SP every TP rank sees the whole CP-local sequence
    assert_equal(
        router_token_slots(layout, context_parallel_size=2, cp_rank=1, tensor_model_parallel_size=2, tp_rank=1),
        t([2, 10, 3, 11, 4, 12, 5, 13]),
    )
    # no parallelism at all: plain sequence-major order of a [2, 8] batch
    assert_equal(router_token_slots(layout), t([0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]))


def test_router_token_slots_matches_megatron_chain(monkeypatch):
    """model order [b, s] -> megatron CP split -> [s, b] -> megatron SP scatter -> flatten."""
    layout = pack_bshd([7, 16, 2], pad_multiple=16)
    grid = torch.arange(layout.num_slots).view(layout.batch_size, layout.seq_length)
    for cp_rank in range(2):
        local = megatron_cp_split({"tokens": grid}, 2, cp_rank, monkeypatch)["tokens"]  # [b, s_local]
        for tp_rank in range(2):
            router_view = megatron_sp_split(local.t().contiguous(), 2, tp_rank).reshape(-1)
            got = router_token_slots(layout, context_parallel_size=2, cp_rank=cp_rank,
                                     tensor_model_parallel_size=2, tp_rank=tp_rank, sequence_parallel=True)
            assert_equal(got, router_view)


def test_router_token_slots_thd_cp2_sp():
    layout = pack_thd([3, 5], pad_multiple=4)  # b = 1; doc0 slots 0..3, doc1 slots 4..11
    # cp0 model order [0,3,4,5,10,11] (see test_cp_local_slots_thd_per_document); tp2 SP halves it
    got = [router_token_slots(layout, context_parallel_size=2, cp_rank=0, tensor_model_parallel_size=2,
                              tp_rank=r, sequence_parallel=True) for r in range(2)]
    assert_equal(got[0], t([0, 3, 4]))
    assert_equal(got[1], t([5, 10, 11]))


# -------------------------------------------------------------------------------------------- fill and routes
def test_distinct_fill_ids():
    ids = distinct_fill_ids(4, 3, 5, torch.int64)
    # row r holds (3r + [0,1,2]) mod 5: [0,1,2] [3,4,0] [1,2,3] [4,0,1]
    assert_equal(ids, t([[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1]]))
    # every expert is used as often as possible (rotation, no pile-up on expert 0)
    assert_equal(torch.bincount(ids.reshape(-1), minlength=5), t([3, 3, 2, 2, 2]))
    compact = distinct_fill_ids(3, 2, 8, torch.uint8)
    assert_equal(compact, t([[0, 1], [2, 3], [4, 5]], torch.uint8))
    # topk == experts: every row a full permutation
    assert_equal(distinct_fill_ids(2, 2, 2, torch.int64), t([[0, 1], [0, 1]]))
    many = distinct_fill_ids(97, 6, 300, torch.int16)
    assert many.dtype == torch.int16
    for row in many:
        assert len(set(row.tolist())) == 6
    with pytest.raises(ValueError, match=exact("moe_router_topk 3 exceeds num_moe_experts 2")):
        distinct_fill_ids(1, 3, 2, torch.int64)


def test_pack_routes_padding_rows_distinct():
    layout = pack_bshd([1, 2])  # slots: s0r0 | pad | s1r0 | s1r1
    sample0 = t([[[3, 1], [2, 0]]], torch.uint8)  # [1 row, 2 layers, K=2]
    sample1 = t([[[1, 2], [0, 3]], [[3, 0], [1, 2]]], torch.uint8)
    packed = pack_routes([sample0, sample1], layout, num_experts=4)
    # fill row for slot s = (2s + [0,1]) mod 4 -> slot 1 gets [2,3] in every layer
    expected = t(
        [
            [[3, 1], [2, 0]],
            [[2, 3], [2, 3]],
            [[1, 2], [0, 3]],
            [[3, 0], [1, 2]],
        ],
        torch.uint8,
    )
    assert_equal(packed, expected)

    layout = pack_thd([1, 1], pad_multiple=4)  # 6 pad slots out of 8
    packed = pack_routes([t([[[0, 1]]]), t([[[0, 1]]])], layout, num_experts=3)
    for slot in range(layout.num_slots):
        assert len(set(packed[slot, 0].tolist())) == 2
    # pad slots 1,2,3 hold (2s+[0,1]) mod 3: [2,0] [1,2] [0,1]
    assert_equal(packed[1:4, 0], t([[2, 0], [1, 2], [0, 1]]))


# -------------------------------------------------------------------------------------------- layer slicing
def test_moe_layer_pattern():
    assert moe_layer_pattern(4, 1) == (True, True, True, True)
    assert moe_layer_pattern(4, 2) == (True, False, True, False)
    assert moe_layer_pattern(5, 3) == (True, False, False, True, False)
    assert moe_layer_pattern(4, [0, 1, 1, 1]) == (False, True, True, True)
    assert moe_layer_pattern(3, (1, 0, 1)) == (True, False, True)
    with pytest.raises(ValueError, match=exact("moe_layer_freq must be >= 1, got 0")):
        moe_layer_pattern(4, 0)
    with pytest.raises(ValueError, match=exact("moe_layer_freq has 2 entries for 4 layers")):
        moe_layer_pattern(4, [1, 1])
    with pytest.raises(ValueError, match=exact("moe_layer_freq entries must be 0 or 1, got [0, 2, 1, 1]")):
        moe_layer_pattern(4, [0, 2, 1, 1])


def transformer_config(**overrides):
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=4,
        hidden_size=16,
        num_attention_heads=2,
        num_moe_experts=8,
        moe_router_topk=2,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def test_chunk_layer_numbers_no_pipeline():
    config = transformer_config()
    assert chunk_layer_numbers(config, pp_rank=0) == (1, 2, 3, 4)
    assert chunk_moe_layer_numbers(config, pp_rank=0) == (1, 2, 3, 4)


def test_chunk_layer_numbers_pp2():
    config = transformer_config(pipeline_model_parallel_size=2)
    assert chunk_layer_numbers(config, pp_rank=0) == (1, 2)
    assert chunk_layer_numbers(config, pp_rank=1) == (3, 4)


def test_chunk_layer_numbers_pp2_vp2():
    config = transformer_config(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    # interleaved: chunk (pp, vp) holds layer 1 + vp * pp_size + pp
    expected = {(0, 0): (1,), (1, 0): (2,), (0, 1): (3,), (1, 1): (4,)}
    for (pp_rank, vp_stage), want in expected.items():
        assert chunk_layer_numbers(config, pp_rank=pp_rank, vp_stage=vp_stage) == want
        assert chunk_moe_layer_numbers(config, pp_rank=pp_rank, vp_stage=vp_stage) == want


def test_chunk_layer_numbers_pp2_uneven_first_stage():
    config = transformer_config(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=1)
    assert chunk_layer_numbers(config, pp_rank=0) == (1,)
    assert chunk_layer_numbers(config, pp_rank=1) == (2, 3, 4)
    config = transformer_config(num_layers=6, pipeline_model_parallel_size=2, num_layers_in_last_pipeline_stage=2)
    assert chunk_layer_numbers(config, pp_rank=0) == (1, 2, 3, 4)
    assert chunk_layer_numbers(config, pp_rank=1) == (5, 6)


def test_chunk_moe_layer_numbers_skip_dense_layer():
    config = transformer_config(pipeline_model_parallel_size=2, moe_layer_freq=[0, 1, 1, 1])
    assert chunk_layer_numbers(config, pp_rank=0) == (1, 2)
    assert chunk_moe_layer_numbers(config, pp_rank=0) == (2,)  # layer 1 is dense: no router
    assert chunk_moe_layer_numbers(config, pp_rank=1) == (3, 4)
    config = transformer_config(
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2, moe_layer_freq=[0, 1, 1, 1]
    )
    assert chunk_moe_layer_numbers(config, pp_rank=0, vp_stage=0) == ()
    assert chunk_moe_layer_numbers(config, pp_rank=1, vp_stage=0) == (2,)
    assert chunk_moe_layer_numbers(config, pp_rank=0, vp_stage=1) == (3,)
    assert chunk_moe_layer_numbers(config, pp_rank=1, vp_stage=1) == (4,)
    config = transformer_config(moe_layer_freq=2)
    assert chunk_moe_layer_numbers(config, pp_rank=0) == (1, 3)


def test_packed_layout_is_frozen():
    layout = pack_bshd([2])
    assert isinstance(layout, PackedLayout)
    with pytest.raises(Exception):
        layout.seq_length = 3
