"""Qwen3-MoE (and Qwen2-MoE, its shared-expert sibling) in megatron-core: HF config <-> `TransformerConfig`.

What maps to what (HF `Qwen3MoeConfig` field -> megatron-core 0.19.2):

    num_hidden_layers            num_layers
    hidden_size                  hidden_size
    intermediate_size            ffn_hidden_size            (the dense layers' SwiGLU width)
    moe_intermediate_size        moe_ffn_hidden_size
    num_attention_heads          num_attention_heads
    num_key_value_heads          num_query_groups           (GQA)
    head_dim                     kv_channels
    rms_norm_eps                 normalization="RMSNorm", layernorm_epsilon (also the q/k norms)
    hidden_act="silu"            gated_linear_unit=True, activation_func=F.silu  (SwiGLU, fc1 = [gate; up])
    (Qwen3: always)              qk_layernorm=True          (RMSNorm over head_dim on q and k, before RoPE)
    rope_parameters.rope_theta   GPTModel(rotary_base=..., position_embedding_type="rope"), rotary_interleaved=False
    max_position_embeddings      GPTModel(max_sequence_length=...)
    tie_word_embeddings          GPTModel(share_embeddings_and_output_weights=...)
    attention_bias=False         add_bias_linear=False, add_qkv_bias=False   (Qwen2-MoE: add_qkv_bias=qkv_bias)
    num_experts                  num_moe_experts
    num_experts_per_tok          moe_router_topk
    norm_topk_prob               moe_router_pre_softmax = not norm_topk_prob, moe_router_score_function="softmax"
    mlp_only_layers,             moe_layer_freq = [1 if layer i is MoE else 0 for i in range(L)]
      decoder_sparse_step          (HF: i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0)
    router_aux_loss_coef         moe_aux_loss_coeff, moe_router_load_balancing_type="aux_loss"
    shared_expert_intermediate_size   moe_shared_expert_intermediate_size, moe_shared_expert_gate=True
      (Qwen2-MoE only; its sigmoid gate `shared_expert_gate` is megatron's `shared_experts.gate_weight`)

Why `moe_router_pre_softmax = not norm_topk_prob`: HF computes p = softmax(logits) over all experts, takes the
top-k of p and, with norm_topk_prob, divides by their sum: p_i / sum_topk p_j = exp(l_i) / sum_topk exp(l_j), which is
exactly megatron's pre_softmax=False path (top-k of the logits, then softmax over those k logits); top-k of p and of
the logits pick the same experts because softmax is monotonic. Without norm_topk_prob HF keeps p_i, which is
megatron's pre_softmax=True path. `tests/unit/test_hf_mapping.py` checks both numerically.

Not representable (raise `UnsupportedHFConfig`): rope scaling other than the default RoPE (yarn, dynamic ...),
sliding-window attention, a Qwen3 `attention_bias=True` (it also biases o_proj, which megatron only does together
with the MLP biases), activations other than SiLU. HF's load-balancing loss is computed over all layers at once
(`load_balancing_loss_func`); megatron's "aux_loss" is per layer. The coefficient maps across, the formula does not.

Parallel sizes (TP/PP/VP/CP/EP/ETP, sequence parallel) are the caller's choice and are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen2_moe")


class UnsupportedHFConfig(ValueError):
    """An HF configuration that this Megatron model family cannot reproduce exactly."""


@dataclass(frozen=True)
class ModelArch:
    """The architecture facts the weight mapping needs, independent of HF and Megatron objects."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    topk: int
    moe_layers: tuple[bool, ...]
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = True
    shared_expert_intermediate_size: Optional[int] = None
    shared_expert_gate: bool = False

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_query_groups:
            raise UnsupportedHFConfig(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of the key/value heads "
                f"{self.num_query_groups}"
            )
        if len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def moe_layer_freq(self) -> list[int]:
        return [1 if moe else 0 for moe in self.moe_layers]


# ---------------------------------------------------------------------------------------------------- HF -> ours
def _get(hf_config, name: str, default=None):
    return getattr(hf_config, name, default)


def rope_theta(hf_config) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or `rope_theta` (older configs); default RoPE only."""
    params = _get(hf_config, "rope_parameters") or {}
    scaling = _get(hf_config, "rope_scaling") or {}
    rope_type = (
        params.get("rope_type", params.get("type")) or scaling.get("rope_type", scaling.get("type")) or "default"
    )
    if rope_type != "default":
        raise UnsupportedHFConfig(f"rope_type {rope_type!r}: only the default RoPE is mapped to megatron")
    theta = params.get("rope_theta", _get(hf_config, "rope_theta", 10000.0))
    return float(theta)


def hf_moe_layers(hf_config) -> tuple[bool, ...]:
    """Which decoder layers are MoE layers, with HF's rule (Qwen3MoeDecoderLayer / Qwen2MoeDecoderLayer)."""
    mlp_only = set(_get(hf_config, "mlp_only_layers") or [])
    step = int(_get(hf_config, "decoder_sparse_step", 1) or 1)
    experts = int(_get(hf_config, "num_experts", 0) or 0)
    return tuple(
        (i not in mlp_only) and experts > 0 and (i + 1) % step == 0 for i in range(hf_config.num_hidden_layers)
    )


def arch_from_hf_config(hf_config) -> ModelArch:
    """Validate `hf_config` (Qwen3MoeConfig or Qwen2MoeConfig) and return its `ModelArch`."""
    model_type = _get(hf_config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedHFConfig(f"model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if _get(hf_config, "hidden_act", "silu") != "silu":
        raise UnsupportedHFConfig(f"hidden_act {hf_config.hidden_act!r}: only SiLU (SwiGLU experts) is mapped")
    if _get(hf_config, "use_sliding_window", False):
        raise UnsupportedHFConfig("use_sliding_window=True: sliding-window attention is not mapped")
    layer_types = _get(hf_config, "layer_types")
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        raise UnsupportedHFConfig(f"layer_types {layer_types}: only full attention is mapped")
    rope_theta(hf_config)  # raises on rope scaling
    heads = hf_config.num_attention_heads
    head_dim = _get(hf_config, "head_dim") or hf_config.hidden_size // heads
    kv_heads = _get(hf_config, "num_key_value_heads") or heads
    if model_type == "qwen3_moe":
        if _get(hf_config, "attention_bias", False):
            raise UnsupportedHFConfig(
                "attention_bias=True biases q/k/v *and* o_proj; megatron has add_qkv_bias (q/k/v only) or "
                "add_bias_linear (every linear, MLPs included), neither of which matches"
            )
        qkv_bias, qk_norm, shared, gate = False, True, None, False
    else:  # qwen2_moe
        qkv_bias, qk_norm = bool(_get(hf_config, "qkv_bias", True)), False
        shared = int(_get(hf_config, "shared_expert_intermediate_size", 0) or 0) or None
        gate = shared is not None
    return ModelArch(
        model_type=model_type,
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=head_dim,
        intermediate_size=hf_config.intermediate_size,
        moe_intermediate_size=hf_config.moe_intermediate_size,
        num_experts=hf_config.num_experts,
        topk=hf_config.num_experts_per_tok,
        moe_layers=hf_moe_layers(hf_config),
        vocab_size=hf_config.vocab_size,
        tie_word_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        shared_expert_intermediate_size=shared,
        shared_expert_gate=gate,
    )


def padded_vocab_size(
    vocab_size: int, tensor_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 1
) -> int:
    """Megatron's vocabulary padding: up to a multiple of make_vocab_size_divisible_by * TP (pad rows are zeros on
    import and dropped on export)."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def transformer_config_from_hf(
    hf_config,
    *,
    parallel=None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    moe_token_dispatcher_type: str = "alltoall",
    moe_grouped_gemm: bool = False,
    **overrides: Any,
):
    """A megatron `TransformerConfig` reproducing `hf_config`, for the parallel layout `parallel`
    (`megatron_r3.platform.distributed.ParallelSizes`; default: no model parallelism).

    bf16/fp16 follow `params_dtype`; `overrides` are passed to `TransformerConfig` last (e.g. recompute settings,
    `moe_aux_loss_coeff=0.0`, `moe_router_load_balancing_type="none"`, `use_cpu_initialization=True`).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_r3.platform.distributed import ParallelSizes

    arch = arch_from_hf_config(hf_config)
    parallel = parallel or ParallelSizes()
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        rotary_interleaved=False,
        apply_rope_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=float(_get(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=float(_get(hf_config, "initializer_range", 0.02)),
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.topk,
        moe_ffn_hidden_size=arch.moe_intermediate_size,
        moe_layer_freq=arch.moe_layer_freq,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not bool(_get(hf_config, "norm_topk_prob", False)),
        moe_router_topk_scaling_factor=None,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=float(_get(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
        moe_token_dispatcher_type=moe_token_dispatcher_type,
        moe_grouped_gemm=moe_grouped_gemm,
        moe_router_fusion=False,
        moe_permute_fusion=False,
        moe_expert_capacity_factor=None,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        sequence_parallel=sequence_parallel,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )
    if arch.shared_expert_intermediate_size:
        kwargs.update(
            moe_shared_expert_intermediate_size=arch.shared_expert_intermediate_size,
            moe_shared_expert_gate=arch.shared_expert_gate,
            moe_shared_expert_overlap=False,
        )
    kwargs.update(overrides)
    if kwargs.get("expert_tensor_parallel_size") is None:
        kwargs.pop("expert_tensor_parallel_size")
    return TransformerConfig(**kwargs)


def gpt_model_kwargs_from_hf(
    hf_config, *, tensor_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 1
) -> dict:
    """Keyword arguments of `megatron_r3.model.gpt.build_gpt_chunks` (GPTModel) for `hf_config`."""
    arch = arch_from_hf_config(hf_config)
    return dict(
        vocab_size=padded_vocab_size(arch.vocab_size, tensor_model_parallel_size, make_vocab_size_divisible_by),
        max_sequence_length=int(_get(hf_config, "max_position_embeddings", 4096)),
        position_embedding_type="rope",
        rotary_base=rope_theta(hf_config),
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
    )


def build_from_hf_config(hf_config, *, parallel=None, make_vocab_size_divisible_by: int = 1, **config_kwargs):
    """(TransformerConfig, this rank's GPTModel chunks) for `hf_config` in the already initialised layout
    (`megatron_r3.platform.distributed.initialize_model_parallel(parallel)` first). Weights are random until
    `megatron_r3.model.weights.load_hf_weights` fills them."""
    from megatron_r3.model.gpt import build_gpt_chunks

    config = transformer_config_from_hf(hf_config, parallel=parallel, **config_kwargs)
    chunks = build_gpt_chunks(
        config,
        **gpt_model_kwargs_from_hf(
            hf_config,
            tensor_model_parallel_size=config.tensor_model_parallel_size,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        ),
    )
    return config, chunks


# ---------------------------------------------------------------------------------------------------- ours -> HF
def hf_config_from_megatron(
    config,
    *,
    vocab_size: int,
    max_position_embeddings: int,
    rotary_base: float,
    tie_word_embeddings: bool = False,
    extra: Optional[dict] = None,
):
    """The HF config (Qwen3MoeConfig, or Qwen2MoeConfig when the model has shared experts) of a megatron model
    built from `config` (a TransformerConfig) and GPTModel settings; `vocab_size` is the *unpadded* vocabulary.
    `extra` adds HF-only fields (bos/eos ids, ...)."""
    from megatron_r3.replay.layout import moe_layer_pattern

    if config.normalization != "RMSNorm" or not config.gated_linear_unit or config.activation_func is not F.silu:
        raise UnsupportedHFConfig("only RMSNorm + SwiGLU (gated SiLU) models map to Qwen-MoE")
    if config.add_bias_linear:
        raise UnsupportedHFConfig("add_bias_linear=True (biased MLPs / output projection) has no Qwen-MoE equivalent")
    if config.moe_router_score_function != "softmax" or config.moe_router_topk_scaling_factor:
        raise UnsupportedHFConfig("only softmax routing without top-k scaling maps to Qwen-MoE")
    if config.moe_router_num_groups or config.moe_router_group_topk:
        raise UnsupportedHFConfig("group-limited routing has no Qwen-MoE equivalent")
    pattern = moe_layer_pattern(config.num_layers, config.moe_layer_freq)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        initializer_range=config.init_method_std,
        rms_norm_eps=config.layernorm_epsilon,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(rotary_base)},
        attention_dropout=config.attention_dropout,
        decoder_sparse_step=1,
        moe_intermediate_size=config.moe_ffn_hidden_size,
        num_experts_per_tok=config.moe_router_topk,
        num_experts=config.num_moe_experts,
        norm_topk_prob=not config.moe_router_pre_softmax,
        router_aux_loss_coef=float(config.moe_aux_loss_coeff or 0.0)
        if not isinstance(config.moe_aux_loss_coeff, (list, tuple))
        else float(config.moe_aux_loss_coeff[0]),
        mlp_only_layers=[i for i, moe in enumerate(pattern) if not moe],
        use_sliding_window=False,
        architectures=None,
    )
    if config.moe_shared_expert_intermediate_size:
        from transformers import Qwen2MoeConfig

        if config.qk_layernorm or not config.moe_shared_expert_gate:
            raise UnsupportedHFConfig(
                "shared experts map to Qwen2-MoE, which has a gated shared expert and no q/k norm"
            )
        hf = Qwen2MoeConfig(
            **common,
            shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
            qkv_bias=bool(config.add_qkv_bias),
        )
        hf.architectures = ["Qwen2MoeForCausalLM"]
    else:
        from transformers import Qwen3MoeConfig

        if not config.qk_layernorm or config.add_qkv_bias:
            raise UnsupportedHFConfig("Qwen3-MoE has q/k RMSNorm and no q/k/v bias")
        hf = Qwen3MoeConfig(**common)
        hf.architectures = ["Qwen3MoeForCausalLM"]
    for key, value in (extra or {}).items():
        setattr(hf, key, value)
    return hf


def hf_config_to_json_dict(hf_config) -> dict:
    """`config.json` content; also writes `num_experts` and `rope_theta` so that older transformers releases (and
    engines that read them directly) see the same values as transformers 5, which writes `num_local_experts` and
    `rope_parameters`."""
    data = hf_config.to_dict()
    data["num_experts"] = hf_config.num_experts
    data.setdefault("rope_theta", rope_theta(hf_config))
    return data


def load_hf_config(directory: str):
    """The HF config of a model directory (config.json), via transformers' AutoConfig."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory)
