"""DeepSeek-V3 family (DeepSeek-V3, Moonlight-16B-A3B, Kimi-K2) in megatron-core: HF config <-> `MLATransformerConfig`
and the checkpoint name mapping, HF `DeepseekV3ForCausalLM` being the oracle.

Config mapping (HF `DeepseekV3Config` field -> megatron-core 0.19.2):

    num_hidden_layers, hidden_size         num_layers, hidden_size
    intermediate_size                      ffn_hidden_size            (the first_k_dense_replace dense layers)
    moe_intermediate_size                  moe_ffn_hidden_size
    n_shared_experts                       moe_shared_expert_intermediate_size = n_shared_experts * moe_intermediate_size
                                           (no shared-expert gate: HF adds the shared MLP output unscaled)
    n_routed_experts, num_experts_per_tok  num_moe_experts, moe_router_topk
    first_k_dense_replace                  moe_layer_freq = [0] * k + [1] * (L - k)
    (sigmoid router)                       moe_router_score_function="sigmoid"
    e_score_correction_bias (buffer)       moe_router_enable_expert_bias=True; TopKRouter.expert_bias (buffer)
    n_group, topk_group                    moe_router_num_groups, moe_router_group_topk (None when n_group == 1)
    routed_scaling_factor                  moe_router_topk_scaling_factor
    norm_topk_prob                         megatron normalises the k sigmoid scores exactly when top-k > 1; any other
                                           combination raises (see `_check_router`)
    num_attention_heads                    num_attention_heads (MLA: one latent K/V, num_key_value_heads unused)
    q_lora_rank (None = q_proj)            q_lora_rank (linear_q_proj, else linear_q_down/up_proj + q_layernorm)
    kv_lora_rank                           kv_lora_rank
    qk_nope_head_dim, qk_rope_head_dim     qk_head_dim, qk_pos_emb_head_dim
    v_head_dim                             v_head_dim
    rms_norm_eps                           layernorm_epsilon (also the q/kv latent norms: qk_layernorm=True)
    rope_parameters (default | yarn)       rope_type "rope" | "yarn" (+ rotary_scaling_factor=factor,
                                           original_max_position_embeddings, beta_fast, beta_slow, mscale,
                                           mscale_all_dim), rotary_base=rope_theta
    rope_interleave=True                   megatron's MLA always de-interleaves the RoPE dims (mla_rotary_interleaved)
    tie_word_embeddings                    GPTModel(share_embeddings_and_output_weights=...)

Why norm_topk_prob is checked, not mapped: megatron's sigmoid path (`topk_routing_with_score_function`) computes
`probs = s / (sum_k s + 1e-20)` if top-k > 1 and keeps `s` for top-1, then multiplies by the scaling factor; HF
normalises iff `norm_topk_prob`. They agree when norm_topk_prob == (top-k > 1), which holds for every published
checkpoint of the family (DeepSeek-V3, Moonlight, Kimi-K2: norm_topk_prob=True, top-k 6..8).

Why group-limited routing is checked: HF scores a group by the sum of its top-2 biased scores, megatron by the sum
of its top-(topk // group_topk). They agree when topk // topk_group == 2 (DeepSeek-V3: 8 // 4) or n_group == 1
(Moonlight, Kimi-K2). Replayed routes never pass through the group filter; native routing (replay off, R2's record
pass) must match HF, so a config where the two rules differ raises.

Checkpoint names (`{i}` global 0-based layer, `{j}` layer inside the chunk, `{e}` global expert, `{l}` local expert):

  HF checkpoint name                                     megatron (local spec)                               TP split
  model.embed_tokens.weight                              embedding.word_embeddings.weight                    dim 0 (vocab)
  model.layers.{i}.input_layernorm.weight                decoder.layers.{j}.input_layernorm.weight           -
  model.layers.{i}.self_attn.q_proj.weight               ...self_attention.linear_q_proj.weight              dim 0 (heads)
  model.layers.{i}.self_attn.q_a_proj.weight             ...self_attention.linear_q_down_proj.weight         dim 0
  model.layers.{i}.self_attn.q_a_layernorm.weight        ...self_attention.q_layernorm.weight                -
  model.layers.{i}.self_attn.q_b_proj.weight             ...self_attention.linear_q_up_proj.weight           dim 0 (heads)
  model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight   ...self_attention.linear_kv_down_proj.weight        dim 0
  model.layers.{i}.self_attn.kv_a_layernorm.weight       ...self_attention.kv_layernorm.weight               -
  model.layers.{i}.self_attn.kv_b_proj.weight            ...self_attention.linear_kv_up_proj.weight          dim 0 (heads)
  model.layers.{i}.self_attn.o_proj.weight               ...self_attention.linear_proj.weight                dim 1
  model.layers.{i}.post_attention_layernorm.weight       ...pre_mlp_layernorm.weight                         -
  model.layers.{i}.mlp.{gate,up}_proj.weight             ...mlp.linear_fc1.weight (dense layer)              dim 0, [gate; up]
  model.layers.{i}.mlp.down_proj.weight                  ...mlp.linear_fc2.weight (dense layer)              dim 1
  model.layers.{i}.mlp.gate.weight                       ...mlp.router.weight                                -
  model.layers.{i}.mlp.gate.e_score_correction_bias      ...mlp.router.expert_bias (a buffer)                -
  model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight ...mlp.experts.local_experts.{l}.linear_fc1.weight  ETP dim 0, EP
  model.layers.{i}.mlp.experts.{e}.down_proj.weight      ...mlp.experts.local_experts.{l}.linear_fc2.weight  ETP dim 1, EP
  model.layers.{i}.mlp.shared_experts.{gate,up}_proj.weight  ...mlp.shared_experts.linear_fc1.weight         dim 0, [gate; up]
  model.layers.{i}.mlp.shared_experts.down_proj.weight   ...mlp.shared_experts.linear_fc2.weight             dim 1
  model.norm.weight                                      decoder.final_layernorm.weight                      -
  lm_head.weight                                         output_layer.weight                                 dim 0 (vocab)

Replay under this router needs no router code of its own: megatron's `topk_routing_with_score_function` asks the
replay hook (`ReplayTopKRouter`'s state) for the top-k of the *biased* scores, then gathers the *unbiased* sigmoid
scores at the returned ids, normalises them (top-k > 1) and multiplies by the scaling factor; the group filter lives
inside the native top-k only, so replayed ids are used as given (tests/unit/test_deepseek_v3_replay.py).

Expert-bias updates: `moe_router_bias_update_rate` is 0 here (megatron's end-of-step update then adds
`sign(...) * 0`, leaving the checkpoint's bias bit for bit); it is a training choice, so an explicit
`--moe-router-bias-update-rate r` wins. With r > 0 the counts megatron accumulates (`local_tokens_per_expert`, from
the routing map the layer used) are the *replayed* routes' under R2/R3 - the bias then balances the rollout
engine's routing, not the trainer's free routing, and its change moves the engine's next selections once synced.

The MLA projections need no re-layout: megatron's q up-projection output is per head [qk_head_dim; rope] and its kv
up-projection per head [qk_head_dim; v_head_dim], HF's `view(..., heads, dim)` + `split` read the same rows; the kv
down-projection is [kv_lora_rank; rope] in both.

MTP: the checkpoint's MTP layers (`model.layers.{L + i}.*` for i < `num_nextn_predict_layers`) are not built
(`mtp_num_layers` stays None, megatron's --mtp-num-layers is refused). Loading a checkpoint that holds them stops with
a message naming them, unless `--mtp-checkpoint-tensors skip` (`model/hf_load_config.py`) drops them, counted and
logged once; exports then hold the decoder only. Decoder routes address layers 1..L only (no MTP router exists).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from megatron_r3.model.families.base import (
    ModelArch,
    ModelFamily,
    UnsupportedHFConfig,
    gpt_model_kwargs,
    mlp_checkpoint_shape,
)
from megatron_r3.model.hf_mapping import COPY, GATE_UP, MappingError, ParamMapping

MODEL_TYPE = "deepseek_v3"


@dataclass(frozen=True)
class DeepseekV3Arch(ModelArch):
    """`ModelArch` plus the MLA ranks, the dense-first layout and the shared-expert count. The inherited
    `num_query_groups` = heads and `head_dim` = qk_nope + qk_rope (MLA has no grouped K/V projection)."""

    first_k_dense: int = 0
    n_shared_experts: int = 0
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0


def _get(hf_config, name: str, default=None):
    return getattr(hf_config, name, default)


def rope_settings(hf_config) -> dict:
    """megatron MLA rope fields from HF's `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta`."""
    params = dict(_get(hf_config, "rope_parameters") or {})
    scaling = dict(_get(hf_config, "rope_scaling") or {})
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type")) or "default"
    theta = float(merged.get("rope_theta", _get(hf_config, "rope_theta", 10000.0)))
    if rope_type == "default":
        return dict(rope_type="rope", rotary_base=theta)
    if rope_type != "yarn":
        raise UnsupportedHFConfig(f"rope_type {rope_type!r}: DeepSeek-V3 maps the default RoPE and YaRN only")
    for key in ("attention_factor", "truncate"):
        if merged.get(key) not in (None, True if key == "truncate" else None):
            raise UnsupportedHFConfig(f"YaRN {key}={merged[key]!r} has no megatron MLA equivalent")
    return dict(
        rope_type="yarn",
        rotary_base=theta,
        rotary_scaling_factor=float(merged["factor"]),
        original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
        beta_fast=float(merged.get("beta_fast", 32.0)),
        beta_slow=float(merged.get("beta_slow", 1.0)),
        mscale=float(merged.get("mscale", 1.0)),
        mscale_all_dim=float(merged.get("mscale_all_dim", 0.0)),
    )


def _check_router(hf_config) -> tuple[Optional[int], Optional[int]]:
    """(moe_router_num_groups, moe_router_group_topk), after checking that megatron's router reproduces HF's."""
    topk = int(hf_config.num_experts_per_tok)
    norm = bool(_get(hf_config, "norm_topk_prob", True))
    if norm != (topk > 1):
        raise UnsupportedHFConfig(
            f"norm_topk_prob={norm} with num_experts_per_tok={topk}: megatron's sigmoid router normalises the top-k "
            f"scores exactly when top-k > 1, so it reproduces norm_topk_prob={topk > 1} only"
        )
    n_group = int(_get(hf_config, "n_group", 1) or 1)
    topk_group = int(_get(hf_config, "topk_group", 1) or 1)
    experts = int(hf_config.n_routed_experts)
    if n_group == 1:
        return None, None
    if experts % n_group or not 0 < topk_group <= n_group:
        raise UnsupportedHFConfig(f"n_group={n_group}, topk_group={topk_group} do not fit {experts} routed experts")
    if topk // topk_group != 2:
        raise UnsupportedHFConfig(
            f"group-limited routing with num_experts_per_tok={topk}, topk_group={topk_group}: HF scores a group by "
            f"its top-2 experts, megatron by its top-(topk // topk_group) = {topk // topk_group}; they agree only "
            f"when topk // topk_group == 2"
        )
    return n_group, topk_group


def arch_from_hf_config(hf_config) -> DeepseekV3Arch:
    """Validate a `DeepseekV3Config` and return its `DeepseekV3Arch`."""
    if _get(hf_config, "model_type") != MODEL_TYPE:
        raise UnsupportedHFConfig(f"model_type {_get(hf_config, 'model_type')!r}; this family maps {MODEL_TYPE!r}")
    if _get(hf_config, "hidden_act", "silu") != "silu":
        raise UnsupportedHFConfig(f"hidden_act {hf_config.hidden_act!r}: only SiLU (SwiGLU) is mapped")
    if _get(hf_config, "attention_bias", False):
        raise UnsupportedHFConfig("attention_bias=True (biased MLA projections) is not mapped")
    if not _get(hf_config, "rope_interleave", True):
        raise UnsupportedHFConfig(
            "rope_interleave=False: megatron's MLA always applies RoPE to interleaved pairs (as HF with "
            "rope_interleave=True, the value of every published DeepSeek-V3 checkpoint)"
        )
    rope_settings(hf_config)
    _check_router(hf_config)
    layers = int(hf_config.num_hidden_layers)
    first_k = int(_get(hf_config, "first_k_dense_replace", 0) or 0)
    if not 0 <= first_k <= layers:
        raise UnsupportedHFConfig(f"first_k_dense_replace={first_k} outside [0, {layers}]")
    shared = int(_get(hf_config, "n_shared_experts", 0) or 0)
    return DeepseekV3Arch(
        model_type=MODEL_TYPE,
        num_layers=layers,
        hidden_size=int(hf_config.hidden_size),
        num_attention_heads=int(hf_config.num_attention_heads),
        num_query_groups=int(hf_config.num_attention_heads),
        head_dim=int(hf_config.qk_nope_head_dim) + int(hf_config.qk_rope_head_dim),
        intermediate_size=int(hf_config.intermediate_size),
        moe_intermediate_size=int(hf_config.moe_intermediate_size),
        num_experts=int(hf_config.n_routed_experts),
        topk=int(hf_config.num_experts_per_tok),
        moe_layers=tuple(i >= first_k for i in range(layers)),
        vocab_size=int(hf_config.vocab_size),
        tie_word_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        qk_norm=True,
        shared_expert_intermediate_size=shared * int(hf_config.moe_intermediate_size) or None,
        first_k_dense=first_k,
        n_shared_experts=shared,
        q_lora_rank=None if _get(hf_config, "q_lora_rank") is None else int(hf_config.q_lora_rank),
        kv_lora_rank=int(hf_config.kv_lora_rank),
        qk_nope_head_dim=int(hf_config.qk_nope_head_dim),
        qk_rope_head_dim=int(hf_config.qk_rope_head_dim),
        v_head_dim=int(hf_config.v_head_dim),
        num_mtp_layers=int(_get(hf_config, "num_nextn_predict_layers", 0) or 0),
    )


def megatron_fields(hf_config) -> dict[str, Any]:
    """The `MLATransformerConfig` fields `hf_config` decides. The expert bias is never updated
    (`moe_router_bias_update_rate=0`): RL keeps the checkpoint's selection bias unless a flag asks otherwise."""
    arch = arch_from_hf_config(hf_config)
    num_groups, group_topk = _check_router(hf_config)
    fields: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_attention_heads,  # MLA expands its latent K/V to every head (no GQA)
        multi_latent_attention=True,
        q_lora_rank=arch.q_lora_rank,
        kv_lora_rank=arch.kv_lora_rank,
        qk_head_dim=arch.qk_nope_head_dim,
        qk_pos_emb_head_dim=arch.qk_rope_head_dim,
        v_head_dim=arch.v_head_dim,
        qk_layernorm=True,
        **rope_settings(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        attention_dropout=float(_get(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=float(_get(hf_config, "initializer_range", 0.02)),
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.topk,
        moe_ffn_hidden_size=arch.moe_intermediate_size,
        moe_layer_freq=arch.moe_layer_freq,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,
        moe_router_num_groups=num_groups,
        moe_router_group_topk=group_topk,
        moe_router_topk_scaling_factor=float(_get(hf_config, "routed_scaling_factor", 1.0) or 1.0),
        moe_router_pre_softmax=False,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
    )
    if arch.n_shared_experts:
        fields.update(
            moe_shared_expert_intermediate_size=arch.shared_expert_intermediate_size,
            moe_shared_expert_gate=False,
            moe_shared_expert_overlap=False,
        )
    return fields


def model_kwargs(hf_config, *, tensor_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 1) -> dict:
    """Keyword arguments of `build_chunks` (GPTModel). GPTModel builds no rotary embedding for MLA (the attention
    makes its own from the config's rope fields), so `rotary_base` here only mirrors the config."""
    return gpt_model_kwargs(arch_from_hf_config(hf_config), hf_config,
                            rotary_base=rope_settings(hf_config)["rotary_base"],
                            tensor_model_parallel_size=tensor_model_parallel_size,
                            make_vocab_size_divisible_by=make_vocab_size_divisible_by)


def hf_config_from_megatron(config, *, vocab_size: int, max_position_embeddings: int, rotary_base=None,
                            tie_word_embeddings=False, extra: Optional[dict] = None):
    """The `DeepseekV3Config` of a megatron model built from `config` (an MLATransformerConfig); `vocab_size` is the
    unpadded vocabulary; the RoPE base is the config's own (`rotary_base`, GPTModel's argument, is not used by
    MLA). Inverse of `megatron_fields` (checked by a round trip in the tests)."""
    from transformers import DeepseekV3Config

    from megatron_r3.replay.layout import moe_layer_pattern

    if not getattr(config, "multi_latent_attention", False) or config.moe_router_score_function != "sigmoid":
        raise UnsupportedHFConfig("DeepSeek-V3 needs multi_latent_attention=True and a sigmoid router")
    pattern = moe_layer_pattern(config.num_layers, config.moe_layer_freq)
    first_k = next((i for i, moe in enumerate(pattern) if moe), config.num_layers)
    if any(not moe for moe in pattern[first_k:]):
        raise UnsupportedHFConfig(f"moe_layer_freq {config.moe_layer_freq}: DeepSeek-V3 has dense layers first only")
    shared = int(config.moe_shared_expert_intermediate_size or 0)
    if shared % config.moe_ffn_hidden_size:
        raise UnsupportedHFConfig("moe_shared_expert_intermediate_size is not a multiple of moe_ffn_hidden_size")
    if config.rope_type == "yarn":
        rope = dict(rope_type="yarn", rope_theta=float(config.rotary_base), factor=float(config.rotary_scaling_factor),
                    original_max_position_embeddings=int(config.original_max_position_embeddings),
                    beta_fast=float(config.beta_fast), beta_slow=float(config.beta_slow),
                    mscale=float(config.mscale), mscale_all_dim=float(config.mscale_all_dim))
    else:
        rope = dict(rope_type="default", rope_theta=float(config.rotary_base))
    hf = DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        moe_intermediate_size=config.moe_ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        n_shared_experts=shared // config.moe_ffn_hidden_size,
        n_routed_experts=config.num_moe_experts,
        num_experts_per_tok=config.moe_router_topk,
        routed_scaling_factor=float(config.moe_router_topk_scaling_factor or 1.0),
        n_group=config.moe_router_num_groups or 1,
        topk_group=config.moe_router_group_topk or 1,
        first_k_dense_replace=first_k,
        norm_topk_prob=config.moe_router_topk > 1,
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_head_dim,
        qk_rope_head_dim=config.qk_pos_emb_head_dim,
        v_head_dim=config.v_head_dim,
        rms_norm_eps=config.layernorm_epsilon,
        max_position_embeddings=max_position_embeddings,
        initializer_range=config.init_method_std,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters=rope,
        rope_interleave=True,
        attention_dropout=config.attention_dropout,
        num_nextn_predict_layers=0,
    )
    hf.architectures = ["DeepseekV3ForCausalLM"]
    for key, value in (extra or {}).items():
        setattr(hf, key, value)
    return hf


# ------------------------------------------------------------------------------------------------ checkpoint names
_EXPERT_BIAS = "mlp.router.expert_bias"
# (megatron suffix, HF suffixes, kind, tp_dim)
_ATTN = [
    ("input_layernorm.weight", ("input_layernorm.weight",), COPY, None),
    ("self_attention.linear_q_proj.weight", ("self_attn.q_proj.weight",), COPY, 0),
    ("self_attention.linear_q_down_proj.weight", ("self_attn.q_a_proj.weight",), COPY, 0),
    ("self_attention.q_layernorm.weight", ("self_attn.q_a_layernorm.weight",), COPY, None),
    ("self_attention.linear_q_up_proj.weight", ("self_attn.q_b_proj.weight",), COPY, 0),
    ("self_attention.linear_kv_down_proj.weight", ("self_attn.kv_a_proj_with_mqa.weight",), COPY, 0),
    ("self_attention.kv_layernorm.weight", ("self_attn.kv_a_layernorm.weight",), COPY, None),
    ("self_attention.linear_kv_up_proj.weight", ("self_attn.kv_b_proj.weight",), COPY, 0),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), COPY, 1),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), COPY, None),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATE_UP, 0),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), COPY, 1),
    ("mlp.router.weight", ("mlp.gate.weight",), COPY, None),
    (_EXPERT_BIAS, ("mlp.gate.e_score_correction_bias",), COPY, None),
    (
        "mlp.shared_experts.linear_fc1.weight",
        ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
        GATE_UP,
        0,
    ),
    ("mlp.shared_experts.linear_fc2.weight", ("mlp.shared_experts.down_proj.weight",), COPY, 1),
]
# Routed experts (`mlp.experts.local_experts.{l}.*` and the grouped `mlp.experts.linear_fc1.weight{l}`) are mapped by
# `hf_mapping.map_megatron_name` for every family, with the default `ModelFamily.routed_expert_hf_names`.
_LAYER_RE = re.compile(r"^decoder\.layers\.(?P<j>\d+)\.(?P<rest>.+)$")


def map_megatron_name(
    name: str,
    arch: DeepseekV3Arch,
    *,
    layer_number_of: Callable[[int], int] = lambda j: j + 1,
    expert_offset: int = 0,
) -> ParamMapping:
    """The mapping of megatron parameter or buffer `name` (`expert_bias` is the router's buffer); routed experts
    are mapped by `hf_mapping.map_megatron_name` before this is asked."""
    if name == "embedding.word_embeddings.weight":
        return ParamMapping(name, ("model.embed_tokens.weight",), COPY, 0, vocab=True)
    if name == "decoder.final_layernorm.weight":
        return ParamMapping(name, ("model.norm.weight",), COPY, None)
    if name == "output_layer.weight":
        if arch.tie_word_embeddings:
            return ParamMapping(name, ("model.embed_tokens.weight",), COPY, 0, vocab=True, tied=True)
        return ParamMapping(name, ("lm_head.weight",), COPY, 0, vocab=True)
    match = _LAYER_RE.match(name)
    if not match:
        raise MappingError(f"no HF mapping for megatron parameter {name!r} (MTP layers are not built or mapped)")
    layer = layer_number_of(int(match["j"])) - 1
    rest, prefix = match["rest"], f"model.layers.{layer}."
    for suffix, hf_suffixes, kind, tp_dim in _ATTN:
        if rest == suffix:
            return ParamMapping(name, tuple(prefix + s for s in hf_suffixes), kind, tp_dim, layer=layer)
    raise MappingError(f"no HF mapping for megatron parameter {name!r} in the deepseek_v3 family")


def hf_layer_names(arch: DeepseekV3Arch, layer: int) -> list[str]:
    """Checkpoint names of decoder layer `layer`, in export order."""
    p = f"model.layers.{layer}."
    names = [p + "input_layernorm.weight"]
    if arch.q_lora_rank is None:
        names.append(p + "self_attn.q_proj.weight")
    else:
        names += [p + f"self_attn.{x}.weight" for x in ("q_a_proj", "q_a_layernorm", "q_b_proj")]
    names += [p + f"self_attn.{x}" for x in ("kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight",
                                             "kv_b_proj.weight", "o_proj.weight")]
    names.append(p + "post_attention_layernorm.weight")
    if arch.moe_layers[layer]:
        names += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
        for e in range(arch.num_experts):
            names += [p + f"mlp.experts.{e}.{x}_proj.weight" for x in ("gate", "up", "down")]
        if arch.n_shared_experts:
            names += [p + f"mlp.shared_experts.{x}_proj.weight" for x in ("gate", "up", "down")]
    else:
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def hf_checkpoint_names(arch: DeepseekV3Arch) -> list[str]:
    """Every checkpoint tensor of the decoder model in export order. MTP layers (`model.layers.{i}` with
    i >= num_hidden_layers) are not among them: loading refuses or skips a checkpoint's MTP tensors
    (`ModelFamily.mtp_checkpoint_names`)."""
    names = ["model.embed_tokens.weight"]
    for layer in range(arch.num_layers):
        names += hf_layer_names(arch, layer)
    names.append("model.norm.weight")
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def hf_checkpoint_shape(arch: DeepseekV3Arch, name: str) -> tuple[int, ...]:
    """The shape of checkpoint tensor `name`."""
    h, n = arch.hidden_size, arch.num_attention_heads
    qk = arch.qk_nope_head_dim + arch.qk_rope_head_dim
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (arch.vocab_size, h)
    if name == "model.norm.weight":
        return (h,)
    rest = name.split(".", 3)[3]
    shapes = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (n * qk, h),
        "self_attn.q_a_proj.weight": (arch.q_lora_rank, h),
        "self_attn.q_a_layernorm.weight": (arch.q_lora_rank,),
        "self_attn.q_b_proj.weight": (n * qk, arch.q_lora_rank),
        "self_attn.kv_a_proj_with_mqa.weight": (arch.kv_lora_rank + arch.qk_rope_head_dim, h),
        "self_attn.kv_a_layernorm.weight": (arch.kv_lora_rank,),
        "self_attn.kv_b_proj.weight": (n * (arch.qk_nope_head_dim + arch.v_head_dim), arch.kv_lora_rank),
        "self_attn.o_proj.weight": (h, n * arch.v_head_dim),
        "mlp.gate.e_score_correction_bias": (arch.num_experts,),
    }
    if rest in shapes:
        return shapes[rest]
    shape = mlp_checkpoint_shape(arch, rest, shared_prefix="mlp.shared_experts.")
    if shape is not None:
        return shape
    raise MappingError(f"unknown checkpoint name {name!r}")


def find_routers(hf_model) -> dict[int, torch.nn.Module]:
    """Global decoder layer index -> `mlp.gate` (`DeepseekV3TopkRouter`, whose forward returns (router_logits,
    topk_weights, topk_indices), the capture contract) of each MoE layer; refuses a model whose MoE layers are not
    the config's first_k_dense_replace rule (the captured layer axis would be misplaced)."""
    arch = arch_from_hf_config(hf_model.config)
    routers = {}
    for index, layer in enumerate(hf_model.model.layers[: arch.num_layers]):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(layer.mlp, "experts"):
            routers[index] = gate
    expected = [i for i, moe in enumerate(arch.moe_layers) if moe]
    if sorted(routers) != expected:
        raise RuntimeError(f"HF model has routers in layers {sorted(routers)}, its config says MoE layers {expected}")
    return routers


def weight_loader(hf_model):
    """transformers' `WeightLoader` that also resolves each router's `e_score_correction_bias` (a persistent buffer,
    part of every checkpoint and weight sync of this family) to the live buffer."""
    from megatron_r3.model.hf_module import WeightLoader

    loader = WeightLoader(hf_model)
    for name, buffer in hf_model.named_buffers():
        if name.endswith(".e_score_correction_bias"):
            loader._params[name] = buffer
            loader._alias[name] = name
    return loader


class DeepseekV3Family(ModelFamily):
    """DeepSeek-V3 / Moonlight / Kimi-K2 (`model_type: deepseek_v3`): MLA + sigmoid router with expert bias."""

    name = "deepseek_v3"
    model_types = (MODEL_TYPE,)

    def arch(self, hf_config) -> DeepseekV3Arch:
        return arch_from_hf_config(hf_config)

    def moe_layers(self, hf_config) -> tuple[bool, ...]:
        return arch_from_hf_config(hf_config).moe_layers

    def megatron_fields(self, hf_config) -> dict[str, Any]:
        return megatron_fields(hf_config)

    def training_overridable_fields(self) -> tuple[str, ...]:
        return ("moe_aux_loss_coeff", "moe_router_bias_update_rate")

    def transformer_config_class(self, hf_config) -> type:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        return MLATransformerConfig

    def model_kwargs(self, hf_config, *, tensor_model_parallel_size: int = 1,
                     make_vocab_size_divisible_by: int = 1) -> dict[str, Any]:
        return model_kwargs(hf_config, tensor_model_parallel_size=tensor_model_parallel_size,
                            make_vocab_size_divisible_by=make_vocab_size_divisible_by)

    def map_megatron_name(self, name: str, arch, *, layer_number_of, expert_offset: int):
        return map_megatron_name(name, arch, layer_number_of=layer_number_of, expert_offset=expert_offset)

    def hf_checkpoint_names(self, arch) -> list[str]:
        return hf_checkpoint_names(arch)

    def hf_checkpoint_shape(self, arch, name: str) -> tuple[int, ...]:
        return hf_checkpoint_shape(arch, name)

    def hf_config_from_megatron(self, config, *, vocab_size: int, max_position_embeddings: int, rotary_base=None,
                                tie_word_embeddings: bool = False, extra: Optional[dict] = None):
        return hf_config_from_megatron(config, vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                                       tie_word_embeddings=tie_word_embeddings, extra=extra)

    def find_routers(self, hf_model) -> dict[int, torch.nn.Module]:
        return find_routers(hf_model)

    def weight_loader(self, hf_model):
        return weight_loader(hf_model)


FAMILY = DeepseekV3Family()
