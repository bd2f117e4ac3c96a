"""`--trainer-dtype` (train/arguments.apply_trainer_dtype): fp32 on the CPU by default, bf16 with an fp32 router when
asked, and explicit megatron flags win over `auto`."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_r3.train.arguments import apply_trainer_dtype


def args(**overrides):
    base = dict(trainer_dtype="auto", bf16=False, fp16=False, moe_router_dtype=None, moe_grouped_gemm=False)
    return argparse.Namespace(**dict(base, **overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default")
def test_auto_is_fp32_on_the_cpu():
    a = args()
    apply_trainer_dtype(a)
    assert (a.bf16, a.fp16, a.moe_router_dtype, a.moe_grouped_gemm) == (False, False, None, False)


def test_bf16_sets_an_fp32_router_and_keeps_an_explicit_one():
    a = args(trainer_dtype="bf16")
    apply_trainer_dtype(a)
    assert a.bf16 and not a.fp16 and a.moe_router_dtype == "fp32"
    a = args(trainer_dtype="bf16", moe_router_dtype="fp64")
    apply_trainer_dtype(a)
    assert a.moe_router_dtype == "fp64"


def test_fp32_and_explicit_flags():
    a = args(trainer_dtype="fp32", bf16=True)
    apply_trainer_dtype(a)
    assert not a.bf16
    a = args(fp16=True)  # auto with an explicit --fp16: untouched
    apply_trainer_dtype(a)
    assert a.fp16 and not a.bf16 and a.moe_router_dtype is None


def test_bf16_model_has_bf16_norms_so_rms_norm_stays_fused():
    """megatron's local spec norm (WrappedTorchNorm) builds fp32 norm weights; our spec's SequenceParallelNorm builds
    them in params_dtype (what Float16Module would do), so a bf16 trainer has no fp32 parameter left
    (torch.rms_norm's fused kernel needs the weight in the input's dtype). megatron's own spec shows the problem."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_r3.model.gpt import build_gpt_chunks
    from megatron_r3.model.specs import replay_decoder_block_spec
    from megatron_r3.platform.distributed import initialize_model_parallel
    from megatron_r3.platform.parallel_context import ParallelSizes

    parallel = initialize_model_parallel(ParallelSizes())
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16, ffn_hidden_size=64,
                               normalization="RMSNorm", qk_layernorm=True, gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False,
                               params_dtype=torch.bfloat16, bf16=True, pipeline_dtype=torch.bfloat16,
                               moe_router_dtype="fp32", use_cpu_initialization=True, moe_token_dispatcher_type="alltoall")
    megatron_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    raw = GPTModel(config=config, transformer_layer_spec=megatron_spec, vocab_size=64,
                   max_sequence_length=16, position_embedding_type="rope")
    raw_fp32 = sorted(name for name, p in raw.named_parameters() if p.dtype == torch.float32)
    assert raw_fp32 and all("layernorm" in name or "final_layernorm" in name for name in raw_fp32)
    ours = GPTModel(config=config, transformer_layer_spec=replay_decoder_block_spec(config), vocab_size=64,
                    max_sequence_length=16, position_embedding_type="rope")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    chunk = build_gpt_chunks(config, parallel, vocab_size=64, max_sequence_length=16)[0]
    assert {p.dtype for p in chunk.parameters()} == {torch.bfloat16}
