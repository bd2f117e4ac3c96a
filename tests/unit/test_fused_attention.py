"""`FusedDotProductAttention` (SDPA) against megatron's `DotProductAttention` on the CPU: padded causal batches
(MHA, GQA, softmax scale, query-key layer scaling), an explicit mask, packed THD documents with padding, the
fallbacks to megatron's math (dropout, window, softmax offset: bitwise megatron), and the local spec's selection.

Tolerance: fp32 inputs of unit scale, head dim 16, <= 40 keys: SDPA and megatron's baddbmm + softmax + bmm sum in
different orders, a few ulp of O(10) partial sums (~1e-6); atol 1e-5. A planted bug (no causal mask, wrong scale)
moves outputs by > 1e-2.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.attention_pair import make_config, reference_and, run
from tests.unit.attention_pair import qkv as attention_qkv

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("world_of_one")  # tests/unit/conftest.py


def build_pair(config, layer_number=1, seed=7):
    from megatron_r3.model.fused_attention import FusedDotProductAttention

    return reference_and(FusedDotProductAttention, config, layer_number, seed)


def qkv(*args, **kwargs):
    return attention_qkv(*args, requires_grad=False, **kwargs)


def assert_all_close(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=ATOL)
    for have, expected in zip(got[1], want[1]):
        torch.testing.assert_close(have, expected, rtol=0, atol=ATOL)


SDPA_CASES = {
    "mha": (dict(), 1),
    "gqa": (dict(num_query_groups=2), 1),
    "gqa_4to1": (dict(num_query_groups=1), 1),
    "softmax_scale": (dict(num_query_groups=2, softmax_scale=0.3), 1),
    "layer_scaling": (dict(apply_query_key_layer_scaling=True), 3),
}


@pytest.mark.parametrize("case", sorted(SDPA_CASES))
def test_padded_causal_equals_megatron(case):
    overrides, layer_number = SDPA_CASES[case]
    config = make_config(**overrides)
    reference, fused = build_pair(config, layer_number)
    assert list(fused.state_dict()) == list(reference.state_dict())
    assert not fused.delegate_cp1_bshd  # the SDPA path really runs
    groups = config.num_query_groups or config.num_attention_heads
    tensors = qkv(12, 3, config.num_attention_heads, groups)
    assert_all_close(run(fused, tensors), run(reference, tensors))


def test_tolerance_catches_planted_bugs():
    import torch.nn.functional as F

    config = make_config(num_query_groups=2)
    reference, fused = build_pair(config)
    tensors = qkv(12, 3, 4, 2)
    expected, _ = run(reference, tensors)
    q, k, v = (t.permute(1, 2, 0, 3) for t in tensors)
    not_causal = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=fused._net_scale())
    assert (not_causal.permute(2, 0, 1, 3).reshape(12, 3, -1) - expected).abs().max() > 1e-2
    fused.softmax_scale *= 1.1
    wrong_scale, _ = run(fused, tensors)
    assert (wrong_scale - expected).abs().max() > 1e-2


@pytest.mark.parametrize("overrides", [dict(window_size=(3, 0)), dict(softmax_type="learnable"),
                                       dict(softmax_type="off-by-one")], ids=["window", "learnable", "off_by_one"])
def test_what_sdpa_cannot_do_is_megatron_bitwise(overrides):
    config = make_config(num_query_groups=2, **overrides)
    reference, fused = build_pair(config)
    assert fused.delegate_cp1_bshd
    tensors = qkv(10, 2, 4, 2)
    expected, fused_out = run(reference, tensors), run(fused, tensors)
    assert torch.equal(fused_out[0], expected[0])


def test_dropout_in_training_is_megatron_bitwise_and_sdpa_in_eval():
    config = make_config(num_query_groups=2, attention_dropout=0.25)
    reference, fused = build_pair(config)
    tensors = qkv(10, 2, 4, 2)
    expected, _ = run(reference, tensors, rng_seed=11)
    out, _ = run(fused, tensors, rng_seed=11)
    assert torch.equal(out, expected)
    reference.eval(), fused.eval()
    assert not fused.delegate_cp1_bshd
    assert_all_close(run(fused, tensors), run(reference, tensors))


def test_explicit_mask_equals_megatron():
    config = make_config(num_query_groups=2)
    reference, fused = build_pair(config)
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(2, 1, 9, 9, generator=gen) > 0.6) & ~torch.eye(9, dtype=torch.bool)
    mask[0, 0, 4] = True  # a query row with every key masked: megatron attends uniformly, SDPA alone would give NaN
    tensors = qkv(9, 2, 4, 2)
    got, want = run(fused, tensors, mask), run(reference, tensors, mask)
    assert torch.isfinite(got[0]).all()
    assert_all_close(got, want)


@pytest.mark.parametrize("real_lengths", [None, (11, 16, 2)])
def test_thd_documents_equal_megatron_per_document(real_lengths):
    from megatron.core.packed_seq_params import PackedSeqParams

    config = make_config(num_query_groups=2)
    reference, fused = build_pair(config)
    padded = (16, 16, 8)
    cu_padded = torch.tensor([0, 16, 32, 40], dtype=torch.int32)
    real = padded if real_lengths is None else real_lengths
    cu_real = torch.tensor([0, *torch.tensor(real).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real,
                             cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                             max_seqlen_q=16, max_seqlen_kv=16)
    tensors = [t.squeeze(1).requires_grad_(True) for t in qkv(40, 1, 4, 2)]
    out = fused(*tensors, None, packed_seq_params=params)
    assert out.shape == (40, 64) and torch.isfinite(out).all()
    out[torch.cat([torch.arange(s, s + n) for s, n in zip(cu_padded[:-1].tolist(), real)])].sum().backward()
    for start, n_real in zip(cu_padded[:-1].tolist(), real):
        piece = [t.detach()[start : start + n_real].unsqueeze(1).requires_grad_(True) for t in tensors]
        expected = reference(*piece, None).squeeze(1)
        torch.testing.assert_close(out[start : start + n_real].detach(), expected.detach(), rtol=0, atol=ATOL)
        expected.sum().backward()
        for whole, part in zip(tensors, piece):
            torch.testing.assert_close(whole.grad[start : start + n_real], part.grad.squeeze(1), rtol=0, atol=ATOL)


def test_local_spec_selection():
    from megatron.core.transformer.enums import AttnBackend

    from megatron_r3.model.cp_attention import ContextParallelDotProductAttention
    from megatron_r3.model.fused_attention import FusedDotProductAttention
    from megatron_r3.model.grouped_experts import GroupedExperts
    from megatron_r3.replay.router import ReplayTopKRouter
    from megatron_r3.model.specs import replay_decoder_block_spec

    def cores_and_experts(**overrides):
        config = make_config(num_moe_experts=4, moe_router_topk=2, moe_layer_freq=[0, 1, 1, 1],
                             normalization="RMSNorm", **overrides)
        block = replay_decoder_block_spec(config, use_transformer_engine=False)
        cores = {spec.submodules.self_attention.submodules.core_attention for spec in block.layer_specs}
        moe = [spec.submodules.mlp.keywords["submodules"] for spec in block.layer_specs[1:]]
        assert all(m.router is ReplayTopKRouter for m in moe)
        return cores, {m.experts if isinstance(m.experts, type) else m.experts.func for m in moe}

    cores, experts = cores_and_experts(attention_backend=AttnBackend.flash, moe_grouped_gemm=True)
    assert cores == {FusedDotProductAttention} and experts == {GroupedExperts}
    cores, experts = cores_and_experts(attention_backend=AttnBackend.unfused)
    assert cores == {ContextParallelDotProductAttention} and GroupedExperts not in experts
    cores, _ = cores_and_experts()  # auto: SDPA on a GPU, megatron's math on the CPU
    assert cores == {FusedDotProductAttention if torch.cuda.is_available() else ContextParallelDotProductAttention}
