"""The local spec's norm (`model/norm.py`): sequence parallelism on any device, weights in `params_dtype`, the
HF/torch numerics, and the `sequence_parallel` mark that makes megatron sum its gradients over TP."""

import dataclasses

import pytest
import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_r3.model.norm import SequenceParallelNorm
from megatron_r3.model.specs import replay_decoder_block_spec


def config(**overrides) -> TransformerConfig:
    values = dict(num_layers=2, hidden_size=16, num_attention_heads=4, normalization="RMSNorm", qk_layernorm=True,
                  num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=8, ffn_hidden_size=32,
                  add_bias_linear=False)
    values.update(overrides)
    return TransformerConfig(**values)


def _specs(value, seen=None):
    """Every module class named anywhere in a spec tree."""
    found = []
    if isinstance(value, type):
        found.append(value)
    elif isinstance(value, ModuleSpec):
        found.append(value.module)
        found += _specs(value.submodules)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            found += _specs(getattr(value, field.name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            found += _specs(item)
    return found




def test_local_spec_uses_the_sequence_parallel_norm_everywhere(world_of_one):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    block = replay_decoder_block_spec(config(tensor_model_parallel_size=2, sequence_parallel=True),
                                      use_transformer_engine=False)
    classes = _specs(block)
    assert WrappedTorchNorm not in classes
    # input, pre-MLP, q and k norms of each of 2 layers, plus the final norm
    assert classes.count(SequenceParallelNorm) == 9


def test_norm_builds_under_sequence_parallelism_with_marked_weights_in_params_dtype():
    norm = SequenceParallelNorm(config(tensor_model_parallel_size=2, sequence_parallel=True, bf16=True,
                                       params_dtype=torch.bfloat16), 16, eps=1e-6)
    assert norm.weight.dtype == torch.bfloat16 and norm.bias is None
    assert norm.weight.sequence_parallel is True
    layer = SequenceParallelNorm(config(normalization="LayerNorm"), 16)
    assert [p.sequence_parallel for p in layer.parameters()] == [False, False]  # no SP: megatron must not reduce


def test_rmsnorm_matches_torch_and_the_hf_formula():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16)
    norm = SequenceParallelNorm(config(), 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) + 0.5)
    reference = torch.nn.RMSNorm(16, eps=1e-6)
    reference.load_state_dict(norm.state_dict())  # same key ("weight"): checkpoints and HF mapping unchanged
    torch.testing.assert_close(norm(x), reference(x), rtol=1.3e-6, atol=1e-6)
    hf = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(norm(x), hf)
    xb = x.bfloat16()
    normb = SequenceParallelNorm(config(params_dtype=torch.bfloat16, bf16=True), 16, eps=1e-6)
    normb.load_state_dict(norm.state_dict())
    out = normb(xb)
    assert out.dtype == torch.bfloat16
    x32 = xb.float()
    assert torch.equal(out, normb.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16())


def test_layernorm_matches_torch():
    torch.manual_seed(1)
    x = torch.randn(4, 2, 16)
    norm = SequenceParallelNorm(config(normalization="LayerNorm"), 16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16))
        norm.bias.copy_(torch.rand(16))
    reference = torch.nn.LayerNorm(16, eps=1e-5)
    reference.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x), reference(x), rtol=1.3e-6, atol=1e-6)


def test_unsupported_normalization_is_named():
    with pytest.raises(ValueError, match="normalization 'L2Norm' is not supported"):
        SequenceParallelNorm(config(normalization="L2Norm", qk_layernorm=False), 16)
