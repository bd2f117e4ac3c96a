"""Shared by the core-attention unit tests: a small config, megatron's `DotProductAttention` beside one of ours built
with the same seed, q/k/v in megatron's `[s, b, heads, dim]` layout, and one forward+backward."""

import torch


def make_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                attention_dropout=0.0, params_dtype=torch.float32)
    return TransformerConfig(**dict(base, **overrides))


def reference_and(attention_class, config, layer_number=1, seed=7):
    """(megatron's DotProductAttention, `attention_class`), both causal self-attention built after the same seed."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    torch.manual_seed(seed)
    reference = DotProductAttention(config, layer_number, AttnMaskType.causal, "self")
    torch.manual_seed(seed)
    ours = attention_class(config, layer_number, AttnMaskType.causal, "self")
    return reference, ours


def qkv(seq, batch, heads, groups, dim=16, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(seq, batch, heads, dim), (seq, batch, groups, dim), (seq, batch, groups, dim)]
    return [torch.randn(*s, generator=gen).requires_grad_(requires_grad) for s in shapes]


def run(module, tensors, mask=None, packed_seq_params=None, rng_seed=None):
    """Forward and backward (a fixed non-uniform output gradient) on fresh leaf copies of `tensors`: (output, input
    grads)."""
    from megatron.core import tensor_parallel

    if rng_seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(rng_seed, force_reset_rng=True)
    inputs = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = module(*inputs, mask, packed_seq_params=packed_seq_params)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    return out.detach(), [t.grad for t in inputs]
