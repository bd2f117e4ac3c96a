"""Context-parallel core attention for megatron-core's local (TransformerEngine-free) layer spec.

megatron-core 0.19.2 has context parallelism only inside `TEDotProductAttention`; its local `DotProductAttention`
asserts "Context parallelism is only supported by TEDotProductAttention!" and rejects packed (THD) batches
("Packed sequence is not supported by DotProductAttention"). `ContextParallelDotProductAttention` is a drop-in
`SelfAttentionSubmodules.core_attention` (same constructor and forward signature) that does both.

How it works
  Megatron's `Attention.forward` computes q/k/v of this rank's tokens and applies RoPE before core attention,
  already at the right positions: BSHD slices the rotary table with `get_pos_emb_on_this_cp_rank` (chunks r and
  2·cp-1-r), THD applies it per document with `_apply_rotary_pos_emb_thd(cu_seqlens_padded, cp_group)`, positions
  restarting at 0 in each document. Both are the zigzag split that `train.batch` / `replay.layout.cp_local_slots`
  use for tokens and routes. Here, K and V (concatenated, one collective) are all-gathered over the CP group with
  an autograd function whose backward reduce-scatters the K/V gradients back to the ranks that own those tokens,
  re-ordered to global slot order, and every local query attends to the global keys with a mask built from
  global positions (`cp_masking`): causal within the sequence (BSHD) or within its document (THD: keys of other
  documents and padding beyond the real length are masked, like TE). Scale, softmax (`FusedScaleMaskSoftmax`,
  megatron's -10000 mask fill, fp32 softmax, `softmax_offset` for off-by-one / learnable softmax), GQA
  (`repeat_interleave` of K/V groups after the exchange, so only `num_query_groups` heads travel) and dropout
  (under `get_cuda_rng_tracker().fork()` unless sequence parallel, like megatron) are megatron's own code paths.
  The constructor *is* megatron's: the class subclasses `DotProductAttention` (built from a config copy with
  context_parallel_size=1, the only thing its constructor refuses), so `softmax_scale` and
  `apply_query_key_layer_scaling` (scale / layer_number, multiplied back in the fp32 softmax), window attention,
  the softmax offset parameter and `sharded_state_dict` are exactly megatron's.

Which runs use it
  Every run without TransformerEngine (`specs.replay_decoder_block_spec` swaps it in for `DotProductAttention`);
  with TE, the TE spec is used unchanged. Whether a batch is packed is only known per forward call, and a CP1 THD
  batch would be rejected by megatron's module, so selecting it only for CP>1 would leave THD without TE broken.
  For CP=1 BSHD batches it calls `DotProductAttention.forward` itself, so plain TE-less runs are bit-for-bit
  megatron (and the CP1 reference in `tests/distributed/cp_checks.py` is independent of this code for BSHD).

All-gather, not ring
  K/V of the whole sequence are gathered on every CP rank: O(S·kv_heads·head_dim) memory per rank and scores of
  [b, heads, S/cp, S], i.e. the activation memory of attention shrinks by cp but K/V do not. A ring (p2p, as TE's
  default `cp_comm_type="p2p"`) would hold two K/V chunks at a time and overlap communication with compute, at the
  price of an online-softmax merge and per-step masks. The all-gather is one collective per layer (forward) and
  one reduce-scatter (backward), easy to verify exactly against CP1, and fine on CPU/gloo and for the sequence
  lengths where this path is used (no TE: tests, CPU, small models). `cp_comm_type` is accepted and ignored.

Limits
  Self-attention only (cross-attention under CP is refused); no `attention_bias`. An explicit `attention_mask` under
  CP must use megatron's CP convention `[b|1, 1, s_local, S]` (queries local, keys in global order, as
  `get_batch_on_this_cp_rank` slices it) and replaces the causal rule, as in megatron's local softmax. Dropout
  forks the same model-parallel RNG state on every CP rank (megatron seeds it by TP rank only), so CP ranks draw
  the same dropout pattern for their different query rows. Window attention treats a negative bound as unbounded
  (the TransformerConfig docstring's meaning).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import attention_mask_func

from megatron_r3.model import cp_masking
from megatron_r3.platform import collectives

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal, AttnMaskType.causal_bottom_right)


class _AllGatherFirstDim(torch.autograd.Function):
    """All-gather along dim 0 (rank-major); backward reduce-scatters (sums) the gradient back to each owner."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.contiguous()
        out = tensor.new_empty((group.size() * tensor.shape[0],) + tuple(tensor.shape[1:]))
        collectives.all_gather_into_tensor(out, tensor, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // ctx.group.size(),) + tuple(grad.shape[1:]))
        collectives.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def all_gather_first_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """Autograd-correct all-gather of `tensor` along dim 0 over `group` (identity for a group of one)."""
    if group is None or group.size() == 1:
        return tensor
    return _AllGatherFirstDim.apply(tensor, group)


def _without_context_parallel(config):
    """A shallow copy of `config` with context_parallel_size=1, for `DotProductAttention.__init__`'s CP assert
    (its constructor uses nothing else CP-related)."""
    if config.context_parallel_size == 1:
        return config
    clone = copy.copy(config)
    clone.context_parallel_size = 1
    return clone


class ContextParallelDotProductAttention(DotProductAttention):
    """`DotProductAttention` with context parallelism (all-gathered K/V) and packed THD batches; see module doc."""

    # CP=1 BSHD calls go to megatron's own forward (bitwise megatron); tests switch this off to check our path.
    delegate_cp1_bshd: bool = True

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        cp_group = getattr(pg_collection, "cp", None)
        if cp_group is None and config.context_parallel_size > 1:
            raise ValueError(
                f"context_parallel_size is {config.context_parallel_size} but the pg_collection given to "
                f"{type(self).__name__} has no `cp` process group"
            )
        if cp_group is not None and cp_group.size() != config.context_parallel_size:
            raise ValueError(
                f"the cp process group has {cp_group.size()} ranks, config.context_parallel_size is "
                f"{config.context_parallel_size}"
            )
        if config.context_parallel_size > 1 and attention_type != "self":
            raise ValueError(f"{type(self).__name__} supports context parallelism for self-attention only")
        super().__init__(
            _without_context_parallel(config),
            layer_number,
            attn_mask_type,
            attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        self.config = config
        self.cp_group = cp_group
        self.cp_comm_type = cp_comm_type  # accepted for signature compatibility; always all-gather
        megatron_softmax = self.scale_mask_softmax
        # The causal / window rule comes from global positions, so the softmax must take the mask as given:
        # megatron's instance would build a local-shaped causal or window mask itself.
        self.explicit_mask_softmax = FusedScaleMaskSoftmax(
            input_in_fp16=megatron_softmax.input_in_fp16,
            input_in_bf16=megatron_softmax.input_in_bf16,
            attn_mask_type=AttnMaskType.padding,
            scaled_masked_softmax_fusion=megatron_softmax.scaled_masked_softmax_fusion,
            mask_func=attention_mask_func,
            softmax_in_fp32=megatron_softmax.softmax_in_fp32,
            scale=megatron_softmax.scale,
            window_size=None,
        )
        self.window_size = megatron_softmax.window_size

    @property
    def context_parallel_size(self) -> int:
        return 1 if self.cp_group is None else self.cp_group.size()

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
        """query `[sq, b, np, hn]`, key/value `[sq, b, ng, hn]` (THD: `[t, heads, hn]`, this rank's tokens);
        returns `[sq, b, np·hn]` (THD: `[t, np·hn]`)."""
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by ContextParallelDotProductAttention")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed_seq_params is not None and not thd:
            raise ValueError(
                f"packed_seq_params with qkv_format={packed_seq_params.qkv_format!r} is not supported; pass None "
                f"for padded (sbhd) batches or qkv_format='thd' for packed ones"
            )
        cp = self.context_parallel_size
        if cp == 1 and not thd and self.delegate_cp1_bshd:
            return super().forward(query, key, value, attention_mask, attn_mask_type, None, None)
        if thd:
            if attention_mask is not None:
                raise ValueError("packed (thd) batches take their mask from cu_seqlens; attention_mask must be None")
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)

        num_local = query.shape[0]
        device = query.device
        cu_padded = cu_real = None
        if thd:
            cu_padded = packed_seq_params.cu_seqlens_q_padded
            if cu_padded is None:
                cu_padded = packed_seq_params.cu_seqlens_q
            else:
                cu_real = packed_seq_params.cu_seqlens_q
            cp_masking.check_thd_lengths(cu_padded, cp, num_local)
            cu_padded = cu_padded.to(device)
        elif cp > 1 and num_local % 2:
            raise ValueError(cp_masking.cp_split_error(num_local * cp, cp))

        rank = 0 if self.cp_group is None else self.cp_group.rank()
        query_slots = cp_masking.local_slots(num_local, cp, rank, cu_padded, device)
        if cp > 1:
            key_width = key.shape[-1]
            gathered = all_gather_first_dim(torch.cat([key, value], dim=-1), self.cp_group)
            order = cp_masking.gathered_to_global_order(num_local, cp, cu_padded, device)
            gathered = gathered.index_select(0, order)
            key, value = gathered[..., :key_width], gathered[..., key_width:]
        key_slots = torch.arange(key.shape[0], device=device)

        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask = cp_masking.attention_mask(
            query_slots,
            key_slots,
            causal=attention_mask is None and mask_type in _CAUSAL_TYPES,
            window_size=self.window_size,
            cu_seqlens_padded=cu_padded,
            cu_seqlens=None if cu_real is None else cu_real.to(device),
        ).view(1, 1, num_local, key.shape[0])
        if attention_mask is not None:
            expected = (num_local, key.shape[0])
            if tuple(attention_mask.shape[-2:]) != expected:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; under context parallelism it must "
                    f"be [b|1, 1, s_local={expected[0]}, s_global={expected[1]}] (keys in global order)"
                )
            mask = mask | attention_mask.bool()

        context = self._masked_attention(query, key, value, mask)
        return context.squeeze(1) if thd else context

    def _masked_attention(self, query, key, value, mask) -> torch.Tensor:
        """megatron's DotProductAttention math with an explicit bool mask `[b|1, 1, sq, sk]` (True = masked)."""
        heads, groups = self.num_attention_heads_per_partition, self.num_query_groups_per_partition
        if heads // groups > 1:
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
        sq, batch, sk = query.size(0), query.size(1), key.size(0)
        q = query.reshape(sq, batch * heads, -1).transpose(0, 1)  # [b·np, sq, hn]
        k = key.reshape(sk, batch * heads, -1).transpose(0, 1).transpose(1, 2)  # [b·np, hn, sk]
        scores = torch.baddbmm(
            q.new_empty((batch * heads, sq, sk)), q, k, beta=0.0, alpha=self.softmax_scale
        ).view(batch, heads, sq, sk)
        probs = self.explicit_mask_softmax(scores, mask, self.softmax_offset)
        if not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.attention_dropout(probs)
        else:
            probs = self.attention_dropout(probs)
        v = value.reshape(sk, batch * heads, -1).transpose(0, 1)  # [b·np, sk, hv]
        context = torch.bmm(probs.view(batch * heads, sq, sk), v)
        context = context.view(batch, heads, sq, -1).permute(2, 0, 1, 3).contiguous()
        return context.view(sq, batch, -1)


def with_context_parallel_core_attention(layer_spec: ModuleSpec, core_attention=None) -> ModuleSpec:
    """`layer_spec` with megatron's local `DotProductAttention` replaced by `core_attention` (default
    `ContextParallelDotProductAttention`; `fused_attention.FusedDotProductAttention` is the SDPA subclass). Anything
    else, e.g. TE's attention or a layer without self-attention, is returned unchanged."""
    core_attention = core_attention or ContextParallelDotProductAttention
    attention = getattr(layer_spec.submodules, "self_attention", None)
    submodules = getattr(attention, "submodules", None)
    if submodules is None or getattr(submodules, "core_attention", None) is not DotProductAttention:
        return layer_spec
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(submodules, core_attention=core_attention)
    )
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, self_attention=attention))
