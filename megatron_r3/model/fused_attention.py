"""Fused core attention without TransformerEngine: `FusedDotProductAttention`, PyTorch's
`F.scaled_dot_product_attention` (flash / cuDNN / memory-efficient kernels) behind megatron's core-attention
interface, with the context parallelism and packed (THD) batches of `ContextParallelDotProductAttention`.

Why
  megatron's local `DotProductAttention` materialises the `[b·heads, s, s]` scores in the activation dtype, masks
  and softmaxes them in separate kernels and repeats K/V for GQA: at 4096 tokens, 32 heads / 4 KV heads it takes
  ~16.5 ms forward+backward on an H200, vs ~1.1 ms for SDPA's flash kernel with `is_causal=True, enable_gqa=True`.

What runs where
  - Padded (sbhd) batch, CP=1, causal, no explicit mask: SDPA with `is_causal=True`, `enable_gqa=True`
    (flash / cuDNN on the GPU; no S×S tensor).
  - Packed THD batch and every CP>1 batch: the same global-position mask as `ContextParallelDotProductAttention`
    (per-document causal, padding masked, keys all-gathered over CP with a reduce-scatter backward), handed to SDPA
    as a boolean `attn_mask` (memory-efficient kernel on the GPU: the mask is `[s_local, S]` bool, not float
    scores). A query row whose keys are all masked (megatron fills masked scores with -10000, so such a row
    attends uniformly to all keys) keeps megatron's uniform result instead of SDPA's NaN.
  - Everything SDPA cannot express exactly - attention dropout in training, a softmax offset (off-by-one /
    learnable softmax), window attention, attention_bias - takes the parent class's megatron math, unchanged; so
    does a GPU run under `torch.use_deterministic_algorithms(True)` (SDPA's GPU backward is not deterministic).
  Scale: megatron's net softmax scale (`softmax_scale`, times `layer_number` when
  `apply_query_key_layer_scaling` multiplies it back in its fp32 softmax). SDPA computes the softmax in fp32
  inside its kernels for bf16 inputs, like megatron's `attention_softmax_in_fp32`.

Parameters and state dict are the parent's (megatron's `DotProductAttention`'s), so checkpoints do not change.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from megatron_r3.model.cp_attention import _CAUSAL_TYPES, ContextParallelDotProductAttention


def query_on_gpu(module) -> bool:
    """Whether the module runs on a GPU (its softmax-offset parameter or, without one, the current device)."""
    param = next(module.parameters(), None)
    return param.is_cuda if param is not None else torch.cuda.is_available()


class FusedDotProductAttention(ContextParallelDotProductAttention):
    """`ContextParallelDotProductAttention` with its attention math done by `F.scaled_dot_product_attention`."""

    def _sdpa_exact(self) -> bool:
        """Whether SDPA computes exactly megatron's attention for this module (else the parent's math runs)."""
        dropout = self.training and self.attention_dropout.p > 0
        if torch.are_deterministic_algorithms_enabled() and query_on_gpu(self):
            return False  # SDPA's GPU backward kernels are not deterministic; megatron's math is
        return not dropout and self.softmax_offset is None and self.window_size is None

    def _net_scale(self) -> float:
        coeff = self.layer_number if self.config.apply_query_key_layer_scaling else 1
        return self.softmax_scale * coeff

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        plain_causal = (
            packed_seq_params is None
            and attention_mask is None
            and attention_bias is None
            and self.context_parallel_size == 1
            and mask_type in _CAUSAL_TYPES
            and mask_type != AttnMaskType.causal_bottom_right
        )
        if plain_causal and self._sdpa_exact():
            return self._sdpa(query, key, value, mask=None, causal=True)
        # THD / CP / explicit masks: the parent builds the global-position mask, then calls _masked_attention.
        return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)

    @property
    def delegate_cp1_bshd(self) -> bool:
        """CP1 sbhd calls that SDPA cannot do exactly (dropout, softmax offset, window) go to megatron's own forward
        (bitwise megatron); the others take the masked SDPA path."""
        return not self._sdpa_exact()

    def _masked_attention(self, query, key, value, mask) -> torch.Tensor:
        if not self._sdpa_exact():
            return super()._masked_attention(query, key, value, mask)
        # mask: True = masked, [b|1, 1, sq, sk]. A row with every key masked gets megatron's result: its -10000 fill
        # makes the softmax uniform, i.e. the mean of V (no gradient to q/k); SDPA alone would return NaN there.
        fully_masked = mask.all(dim=-1, keepdim=True)  # [b|1, 1, sq, 1]
        context = self._sdpa_bhsd(query, key, value, mask=~(mask & ~fully_masked), causal=False)
        heads, groups = self.num_attention_heads_per_partition, self.num_query_groups_per_partition
        mean_value = value.mean(dim=0).repeat_interleave(heads // groups, dim=1)  # [b, np, hv]
        context = torch.where(fully_masked, mean_value.unsqueeze(2).to(context.dtype), context)
        return self._to_sbh(context)

    def _sdpa(self, query, key, value, *, mask, causal: bool) -> torch.Tensor:
        """query `[sq, b, np, hn]`, key/value `[sk, b, ng, hn]` -> `[sq, b, np·hv]`; mask True = attend."""
        return self._to_sbh(self._sdpa_bhsd(query, key, value, mask=mask, causal=causal))

    @staticmethod
    def _to_sbh(context: torch.Tensor) -> torch.Tensor:
        batch, _, sq, _ = context.shape
        return context.permute(2, 0, 1, 3).reshape(sq, batch, -1)

    def _sdpa_bhsd(self, query, key, value, *, mask, causal: bool) -> torch.Tensor:
        """SDPA on megatron's `[s, b, heads, dim]` tensors; returns `[b, np, sq, hv]`."""
        heads, groups = self.num_attention_heads_per_partition, self.num_query_groups_per_partition
        gqa = heads != groups
        if gqa and mask is not None:
            # SDPA's memory-efficient kernel (the one that takes a mask) has no GQA: repeat K/V heads as megatron does
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
            gqa = False
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=causal, scale=self._net_scale(), enable_gqa=gqa,
        )
