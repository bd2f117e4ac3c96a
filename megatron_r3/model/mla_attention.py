"""Core attention for multi-latent attention (MLA, DeepSeek-V2/V3, Kimi-K2, Moonlight) without TransformerEngine.

megatron-core 0.19.2's `MultiLatentAttention` builds its core attention with two extra keyword arguments,
`k_channels` (qk_head_dim + qk_pos_emb_head_dim) and `v_channels` (v_head_dim): queries/keys and values have
different head widths. Only `TEDotProductAttention` accepts them; megatron's local `DotProductAttention` (and the
project's `ContextParallelDotProductAttention` / `FusedDotProductAttention`, which keep its signature) fail with
"__init__() got an unexpected keyword argument 'k_channels'", so the TE-free local spec cannot build MLA at all.

`mla_core_attention(base)` returns a subclass of `base` (one of the two local core attentions) that takes those
arguments and sets the two per-head sizes the parent's forward uses: `hidden_size_per_attention_head` (q/k width)
and `hidden_size_per_partition` (heads_per_partition · v width, the output reshape). Everything else - the
all-gather context parallelism over K/V (K and V are concatenated along the last dim and split again by the key
width, so different widths travel together), THD documents, masks, softmax, SDPA - is the parent's code, whose
score/context matmuls take the head width from the tensors.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer.multi_latent_attention import MLASelfAttention

from megatron_r3.model.cp_attention import ContextParallelDotProductAttention
from megatron_r3.model.fused_attention import FusedDotProductAttention


class _MLAChannels:
    """Mixin: accept `k_channels` / `v_channels` and size the parent's per-head bookkeeping from them."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(
            config,
            layer_number,
            attn_mask_type,
            attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        # megatron's `Attention.__init__` first builds a core attention without the two widths (the parent's
        # defaults apply) and `MultiLatentAttention.__init__` then replaces it with one built with them.
        if k_channels is not None:
            self.hidden_size_per_attention_head = int(k_channels)
            # MLA's keys and values carry every head (the latent is expanded per head by linear_kv_up_proj), so the
            # parent's GQA expansion (heads // num_query_groups repeats) must be 1 whatever num_query_groups says.
            self.num_query_groups_per_partition = self.num_attention_heads_per_partition
        if v_channels is not None:
            self.hidden_size_per_partition = int(v_channels) * self.num_attention_heads_per_partition


class MLAContextParallelAttention(_MLAChannels, ContextParallelDotProductAttention):
    """`ContextParallelDotProductAttention` for MLA (megatron's math; CP by all-gathered K/V; THD)."""


class MLAFusedAttention(_MLAChannels, FusedDotProductAttention):
    """`FusedDotProductAttention` (SDPA) for MLA."""


_MLA_VARIANT = {
    ContextParallelDotProductAttention: MLAContextParallelAttention,
    FusedDotProductAttention: MLAFusedAttention,
}


def mla_core_attention(core_attention: type) -> type:
    """The MLA variant of a local core attention class (`ContextParallelDotProductAttention` or
    `FusedDotProductAttention`)."""
    try:
        return _MLA_VARIANT[core_attention]
    except KeyError:
        raise ValueError(
            f"no MLA variant of core attention {core_attention.__name__}; known: "
            f"{', '.join(c.__name__ for c in _MLA_VARIANT)}"
        ) from None



class LocalMLASelfAttention(MLASelfAttention):
    """`MLASelfAttention` for the local spec of a model without q LoRA but with the kv-latent norm (Moonlight).

    megatron-core 0.19.2's `QKNormConfigResolver` asks, for `qk_layernorm=True` and `q_lora_rank=None`, for a fused
    norm+linear `linear_q_proj` - which the local backend does not have (it returns a placeholder and the build
    fails with "Mock object has no attribute 'module'"). There is no latent q to normalise without q LoRA, so the
    q path is the plain `linear_q_proj` with no norm, and only the kv latent gets `kv_layernorm` (HF's
    `kv_a_layernorm`), with a non-fused `linear_kv_up_proj`. Models with q LoRA use megatron's resolution unchanged.
    """

    def _resolve_qk_norm_config(self, submodules):
        if self.config.q_lora_rank is not None or not self.config.qk_layernorm:
            return super()._resolve_qk_norm_config(submodules)
        from megatron.core.transformer.identity_op import IdentityOp
        from megatron.core.transformer.mla_qk_norm_config import QKNormConfigResolver

        resolver = QKNormConfigResolver(self.config, submodules)
        return resolver._result(
            linear_q_proj=submodules.linear_q_proj or resolver.linear_impl,
            linear_q_up_proj=IdentityOp,
            linear_kv_up_proj=resolver._non_fused_or_default(submodules.linear_kv_up_proj, "linear_kv_up_proj"),
            q_layernorm=IdentityOp,
            kv_layernorm=submodules.kv_layernorm,
        )


def mla_local_layer_spec(layer_spec, config):
    """megatron's local MLA layer spec, fixed for models without q LoRA.

    The local spec gives MLA a q_layernorm whenever `qk_layernorm` is on, but without q LoRA there is no latent q to
    normalise and megatron's `QKNormConfigResolver` refuses it ("`q_layernorm=...` is non-trivial, but
    `q_lora_rank is None`, meaning it will not be used"). DeepSeek-V3 without q LoRA (Moonlight) normalises only the
    kv latent, so the q norm becomes `IdentityOp` and the attention `LocalMLASelfAttention`; the rest is kept."""
    import dataclasses

    from megatron.core.transformer.identity_op import IdentityOp

    if getattr(config, "q_lora_rank", None) is not None:
        return layer_spec
    attention = getattr(layer_spec.submodules, "self_attention", None)
    submodules = getattr(attention, "submodules", None)
    if submodules is None or not hasattr(submodules, "q_layernorm"):
        return layer_spec
    if attention.module is not MLASelfAttention:
        return layer_spec
    attention = dataclasses.replace(
        attention, module=LocalMLASelfAttention, submodules=dataclasses.replace(submodules, q_layernorm=IdentityOp)
    )
    submodules = dataclasses.replace(layer_spec.submodules, self_attention=attention)
    return dataclasses.replace(layer_spec, submodules=submodules)
