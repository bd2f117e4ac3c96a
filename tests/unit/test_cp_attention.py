"""Single-process tests of the context-parallel core attention: the position/mask math (against the batch-side
`replay.layout` split, megatron's RoPE slicing and brute force) and CP=1 equivalence with megatron's own
`DotProductAttention` (BSHD causal, GQA, softmax scale, layer scaling, window, dropout, softmax offset) and with
per-document attention for packed THD batches. The multi-rank exchange is tested in tests/distributed/test_cp.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_r3.model import cp_masking
from megatron_r3.replay.layout import cp_local_slots, cp_zigzag_positions, pack_bshd, pack_thd
from tests.unit.attention_pair import make_config, qkv, reference_and, run


pytestmark = pytest.mark.usefixtures("world_of_one")  # tests/unit/conftest.py


class FakeGroup:
    """Enough of a process group for code that only asks for size() and rank()."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


CP_CASES = [(cp, rank) for cp in (1, 2, 4) for rank in range(cp)]
THD_LENGTHS = [(13, 21, 17), (30, 5, 22), (1,), (8, 8, 3)]


# ---------------------------------------------------------------- positions and masks (pure)


@pytest.mark.parametrize("cp,rank", CP_CASES)
@pytest.mark.parametrize("seq_length", [8, 16, 40])
def test_zigzag_matches_batch_side_split(cp, rank, seq_length):
    assert torch.equal(cp_masking.zigzag_positions(seq_length, cp, rank), cp_zigzag_positions(seq_length, cp, rank))


@pytest.mark.parametrize("cp,rank", CP_CASES)
@pytest.mark.parametrize("lengths", THD_LENGTHS)
def test_thd_local_slots_match_batch_side_split(cp, rank, lengths):
    layout = pack_thd(lengths, pad_multiple=2 * cp)
    cu = layout.cu_seqlens(padded=True)
    ours = cp_masking.thd_local_slots(cu, cp, rank, layout.seq_length // cp)
    assert torch.equal(ours, cp_local_slots(layout, cp, rank).reshape(-1))


def test_thd_local_slots_skip_empty_documents():
    cu = torch.tensor([0, 8, 8, 16], dtype=torch.int32)
    assert cp_masking.thd_local_slots(cu, 2, 1, 8).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("thd", [False, True])
def test_gathered_rows_put_back_in_global_order(cp, thd):
    layout = pack_thd((13, 21, 17), pad_multiple=2 * cp) if thd else pack_bshd([40], pad_multiple=2 * cp)
    cu = layout.cu_seqlens(padded=True) if thd else None
    n_local = layout.seq_length // cp
    gathered = torch.cat([cp_masking.local_slots(n_local, cp, r, cu) for r in range(cp)])
    order = cp_masking.gathered_to_global_order(n_local, cp, cu)
    assert torch.equal(gathered[order], torch.arange(layout.seq_length))


def brute_force_mask(q_slots, k_slots, docs, real, causal, window=None):
    """docs: [(start, padded_len)], real: real length per doc."""

    def where(slot):
        for d, (start, length) in enumerate(docs):
            if start <= slot < start + length:
                return d, slot - start
        raise AssertionError(slot)

    out = torch.zeros(len(q_slots), len(k_slots), dtype=torch.bool)
    for i, q in enumerate(q_slots.tolist()):
        qd, qp = where(q)
        for j, k in enumerate(k_slots.tolist()):
            kd, kp = where(k)
            masked = qd != kd or kp >= real[kd]
            if window is not None:
                masked |= not (qp - window[0] <= kp <= qp + window[1])
            elif causal:
                masked |= kp > qp
            out[i, j] = masked
    return out


@pytest.mark.parametrize("window", [None, (3, 0), (2, 1)])
@pytest.mark.parametrize("cp,rank", [(1, 0), (2, 0), (2, 1), (4, 3)])
def test_thd_mask_is_per_document_causal_with_padding(window, cp, rank):
    padded, real = [8, 16, 8], [5, 16, 3]
    cu_padded = torch.tensor([0, 8, 24, 32], dtype=torch.int32)
    cu_real = torch.tensor([0, 5, 21, 24], dtype=torch.int32)
    q = cp_masking.thd_local_slots(cu_padded, cp, rank, 32 // cp)
    k = torch.arange(32)
    ours = cp_masking.attention_mask(q, k, causal=True, window_size=window, cu_seqlens_padded=cu_padded, cu_seqlens=cu_real)
    docs = [(0, 8), (8, 16), (24, 8)]
    assert torch.equal(ours, brute_force_mask(q, k, docs, real, True, window))
    assert padded == [length for _, length in docs]


def test_bshd_mask_is_causal_by_global_position():
    q = cp_masking.zigzag_positions(16, 2, 1)  # positions 4..7 and 8..11
    mask = cp_masking.attention_mask(q, torch.arange(16), causal=True)
    assert torch.equal(mask, torch.arange(16).unsqueeze(0) > q.unsqueeze(1))
    assert not cp_masking.attention_mask(q, torch.arange(16), causal=False).any()


BAD_BSHD = (
    "sequence length 13 is not divisible by 2 * context_parallel_size = 4; pad every sequence to a multiple of "
    "replay.layout.sequence_pad_multiple(...) before the context-parallel split"
)


def test_bad_lengths_have_clear_messages():
    with pytest.raises(ValueError) as err:
        cp_masking.zigzag_positions(13, 2, 0)
    assert str(err.value) == BAD_BSHD
    with pytest.raises(ValueError) as err:
        cp_masking.check_thd_lengths(torch.tensor([0, 8, 14]), 2, 7)
    assert str(err.value) == (
        "packed document 1 padded length 6 is not divisible by 2 * context_parallel_size = 4; pad every sequence "
        "to a multiple of replay.layout.sequence_pad_multiple(...) before the context-parallel split"
    )
    with pytest.raises(ValueError) as err:
        cp_masking.check_thd_lengths(torch.tensor([0, 8, 16]), 2, 6)
    assert str(err.value) == (
        "packed sequence holds 6 tokens on this context-parallel rank, but cu_seqlens_padded ends at 16 "
        "(expected 6 * context_parallel_size 2)"
    )


# ---------------------------------------------------------------- megatron's RoPE under CP uses the same split


@pytest.mark.parametrize("cp,rank", CP_CASES)
def test_bshd_rope_slice_is_the_zigzag(cp, rank):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True, cp_group=FakeGroup(1, 0))
    full = rope(40)  # [S, 1, 1, d], no CP slicing
    local = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True, cp_group=FakeGroup(cp, rank))(40)
    assert torch.equal(local, full[cp_zigzag_positions(40, cp, rank)])


@pytest.mark.parametrize("cp,rank", CP_CASES)
@pytest.mark.parametrize("lengths", THD_LENGTHS[:2])
def test_thd_rope_is_per_document_and_zigzag(cp, rank, lengths):
    """megatron applies THD RoPE to this rank's tokens with positions restarting in every document; equal to
    rotating the whole packed row by per-document positions and taking this rank's slots."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd, _apply_rotary_pos_emb_thd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron_r3.replay.layout import slot_positions

    layout = pack_thd(lengths, pad_multiple=2 * cp)
    freqs = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True, cp_group=FakeGroup(1, 0))(
        max(layout.padded_lengths), packed_seq=True
    )
    tokens = torch.randn(layout.seq_length, 2, 16, generator=torch.Generator().manual_seed(0))
    full = _apply_rotary_pos_emb_bshd(tokens.unsqueeze(1), freqs[slot_positions(layout)]).squeeze(1)
    slots = cp_local_slots(layout, cp, rank).reshape(-1)
    local = _apply_rotary_pos_emb_thd(tokens[slots], layout.cu_seqlens(padded=True), freqs, cp_group=FakeGroup(cp, rank))
    torch.testing.assert_close(local, full[slots], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- CP=1 equivalence with megatron


def build_pair(config, layer_number=1, seed=7):
    from megatron_r3.model.cp_attention import ContextParallelDotProductAttention

    return reference_and(ContextParallelDotProductAttention, config, layer_number, seed)


CP1_CASES = {
    "mha": (dict(), 1),
    "gqa": (dict(num_query_groups=2), 1),
    "softmax_scale": (dict(num_query_groups=2, softmax_scale=0.3), 1),
    "layer_scaling": (dict(apply_query_key_layer_scaling=True), 3),
    "window": (dict(window_size=(3, 0)), 1),
    "learnable_offset": (dict(softmax_type="learnable"), 1),
    "off_by_one": (dict(softmax_type="off-by-one"), 1),
}


@pytest.mark.parametrize("case", sorted(CP1_CASES))
def test_cp1_bshd_equals_megatron_dot_product_attention(case):
    overrides, layer_number = CP1_CASES[case]
    config = make_config(**overrides)
    reference, ours = build_pair(config, layer_number)
    assert list(ours.state_dict()) == list(reference.state_dict())  # checkpoints stay interchangeable
    for name, param in reference.named_parameters():
        assert torch.equal(param, dict(ours.named_parameters())[name])
    groups = config.num_query_groups or config.num_attention_heads
    tensors = qkv(12, 3, config.num_attention_heads, groups)
    expected, expected_grads = run(reference, tensors)
    delegated, delegated_grads = run(ours, tensors)  # CP1 BSHD: megatron's own forward
    assert torch.equal(delegated, expected)
    ours.delegate_cp1_bshd = False  # our global-position path
    out, grads = run(ours, tensors)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    for got, want in zip(grads + delegated_grads, expected_grads * 2):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_cp1_dropout_uses_megatrons_rng_fork():
    config = make_config(num_query_groups=2, attention_dropout=0.25)
    reference, ours = build_pair(config)
    ours.delegate_cp1_bshd = False
    tensors = qkv(10, 2, 4, 2)
    expected, _ = run(reference, tensors, rng_seed=11)
    out, _ = run(ours, tensors, rng_seed=11)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    without, _ = run(ours.eval(), tensors, rng_seed=11)
    assert (without - out).abs().max() > 1e-3  # dropout really happened in training mode


def test_cp1_explicit_mask_replaces_causal_like_megatron():
    config = make_config(num_query_groups=2)
    reference, ours = build_pair(config)
    ours.delegate_cp1_bshd = False
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(2, 1, 9, 9, generator=gen) > 0.6) & ~torch.eye(9, dtype=torch.bool)
    tensors = qkv(9, 2, 4, 2)
    expected, _ = run(reference, tensors, mask)
    out, _ = run(ours, tensors, mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("real_lengths", [None, (11, 16, 2)])
def test_cp1_thd_equals_megatron_per_document(real_lengths):
    """Packed THD at CP1 (which megatron's DotProductAttention rejects) equals megatron's causal attention run on
    every document alone, on every real token."""
    from megatron.core.packed_seq_params import PackedSeqParams

    config = make_config(num_query_groups=2)
    reference, ours = build_pair(config)
    padded = (16, 16, 8)
    cu_padded = torch.tensor([0, 16, 32, 40], dtype=torch.int32)
    real = padded if real_lengths is None else real_lengths
    cu_real = torch.tensor([0, *torch.tensor(real).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real,
                             cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                             max_seqlen_q=16, max_seqlen_kv=16)
    tensors = [t.squeeze(1) for t in qkv(40, 1, 4, 2)]
    out = ours(*tensors, None, packed_seq_params=params)
    assert out.shape == (40, 64)
    for start, length, n_real in zip(cu_padded[:-1].tolist(), padded, real):
        piece = [t[start : start + n_real].unsqueeze(1) for t in tensors]
        expected = reference(*piece, None).squeeze(1)
        torch.testing.assert_close(out[start : start + n_real], expected, rtol=0, atol=1e-6)


def cp_module(cp: int, rank: int):
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_r3.model.cp_attention import ContextParallelDotProductAttention

    pgs = ProcessGroupCollection()
    pgs.tp = parallel_state.get_tensor_model_parallel_group()
    pgs.cp = FakeGroup(cp, rank)
    return ContextParallelDotProductAttention(
        make_config(num_query_groups=2, context_parallel_size=cp), 1, AttnMaskType.causal, "self", pg_collection=pgs
    )


def test_module_rejects_lengths_the_split_cannot_handle():
    from megatron.core.packed_seq_params import PackedSeqParams

    module = cp_module(2, 0)
    q, k, v = qkv(7, 1, 4, 2, requires_grad=False)  # local 7 -> global 14, not a multiple of 4
    with pytest.raises(ValueError) as err:
        module(q, k, v, None)
    assert str(err.value) == (
        "sequence length 14 is not divisible by 2 * context_parallel_size = 4; pad every sequence to a multiple "
        "of replay.layout.sequence_pad_multiple(...) before the context-parallel split"
    )
    cu = torch.tensor([0, 8, 14], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=8, max_seqlen_kv=8)
    with pytest.raises(ValueError, match="packed document 1 padded length 6 is not divisible"):
        module(q.squeeze(1), k.squeeze(1), v.squeeze(1), None, packed_seq_params=params)


def test_module_checks_its_process_group():
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_r3.model.cp_attention import ContextParallelDotProductAttention

    pgs = ProcessGroupCollection()
    pgs.tp = FakeGroup(1, 0)
    pgs.cp = FakeGroup(4, 0)
    with pytest.raises(ValueError, match="the cp process group has 4 ranks, config.context_parallel_size is 2"):
        ContextParallelDotProductAttention(
            make_config(context_parallel_size=2), 1, AttnMaskType.causal, "self", pg_collection=pgs
        )


def test_local_spec_selects_it_and_leaves_other_attention_alone():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_r3.model.cp_attention import ContextParallelDotProductAttention, with_context_parallel_core_attention
    from megatron_r3.model.specs import replay_decoder_block_spec

    config = make_config(num_moe_experts=4, moe_router_topk=2, moe_layer_freq=[0, 1, 1, 1], normalization="RMSNorm")
    block = replay_decoder_block_spec(config, use_transformer_engine=False)
    cores = [spec.submodules.self_attention.submodules.core_attention for spec in block.layer_specs]
    assert cores == [ContextParallelDotProductAttention] * 4
    layer = block.layer_specs[0]
    other = dataclasses.replace(
        layer,
        submodules=dataclasses.replace(
            layer.submodules,
            self_attention=dataclasses.replace(
                layer.submodules.self_attention,
                submodules=dataclasses.replace(layer.submodules.self_attention.submodules, core_attention=object),
            ),
        ),
    )
    assert with_context_parallel_core_attention(other) is other
    assert issubclass(ContextParallelDotProductAttention, DotProductAttention)
