"""The Qwen-MoE family (Qwen3-MoE and Qwen2-MoE, its shared-expert sibling) in megatron-core: HF config <->
`TransformerConfig`, checkpoint names, hf-engine router finder.

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
                                 (top-1 with norm_topk_prob=True is refused, see below)
    mlp_only_layers,             moe_layer_freq = [1 if layer i is MoE else 0 for i in range(L)]
      decoder_sparse_step          (HF: i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0)
    router_aux_loss_coef,        moe_aux_loss_coeff = router_aux_loss_coef if output_router_logits else 0.0,
      output_router_logits         moe_router_load_balancing_type="aux_loss"  (training: --moe-aux-loss-coeff wins)
    shared_expert_intermediate_size   moe_shared_expert_intermediate_size, moe_shared_expert_gate=True
      (Qwen2-MoE only; its sigmoid gate `shared_expert_gate` is megatron's `shared_experts.gate_weight`)

Why `moe_router_pre_softmax = not norm_topk_prob`: HF computes p = softmax(logits) over all experts, takes the
top-k of p and, with norm_topk_prob, divides by their sum: p_i / sum_topk p_j = exp(l_i) / sum_topk exp(l_j), which is
exactly megatron's pre_softmax=False path (top-k of the logits, then softmax over those k logits); top-k of p and of
the logits pick the same experts because softmax is monotonic. Without norm_topk_prob HF keeps p_i, which is
megatron's pre_softmax=True path. `tests/unit/test_hf_mapping.py` checks both numerically.

Not representable (raise `UnsupportedHFConfig`): rope scaling other than the default RoPE (yarn, dynamic ...),
sliding-window attention, a Qwen3 `attention_bias=True` (it also biases o_proj, which megatron only does together
with the MLP biases), activations other than SiLU, and top-1 routing with norm_topk_prob=True: HF then weights
the single expert by exactly 1.0, which megatron's softmax router cannot express (it refuses softmax-after-top-k for
top-1, and pre-softmax weights the expert by its probability, so the logits differ from HF's).

Load balancing: HF adds `router_aux_loss_coef` x its loss only when `output_router_logits` is set, so the coefficient
both paths use (conversion and training) is that effective one, 0 otherwise; `--moe-aux-loss-coeff` given explicitly
wins in training. HF's loss is computed over all layers at once (`load_balancing_loss_func`); megatron's "aux_loss"
is per layer. The coefficient maps across, the formula does not.

Parallel sizes (TP/PP/VP/CP/EP/ETP, sequence parallel) are the caller's choice and are passed in.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from megatron_r3.model.families.base import (
    ModelArch,
    ModelFamily,
    UnsupportedHFConfig,
    gpt_model_kwargs,
    hf_get,
    mlp_checkpoint_shape,
)
from megatron_r3.model.hf_mapping import COPY, GATE_UP, QKV, MappingError, ParamMapping

TOP1_NORM_TOPK_PROB = (
    "num_experts_per_tok=1 with norm_topk_prob=True (HF weights every token's single expert by exactly 1.0) cannot "
    "be represented in megatron-core: its softmax router either refuses top-1 after the top-k or weights the expert "
    "by its probability; use a model with norm_topk_prob=false or num_experts_per_tok >= 2"
)


def rope_theta(hf_config) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or `rope_theta` (older configs); default RoPE only."""
    params = hf_get(hf_config, "rope_parameters") or {}
    scaling = hf_get(hf_config, "rope_scaling") or {}
    rope_type = (
        params.get("rope_type", params.get("type")) or scaling.get("rope_type", scaling.get("type")) or "default"
    )
    if rope_type != "default":
        raise UnsupportedHFConfig(f"rope_type {rope_type!r}: only the default RoPE is mapped to megatron")
    theta = params.get("rope_theta", hf_get(hf_config, "rope_theta", 10000.0))
    return float(theta)


def aux_loss_coeff(hf_config) -> float:
    """The load-balancing coefficient HF itself trains with: `router_aux_loss_coef` when `output_router_logits`
    (only then does `Qwen*MoeForCausalLM.forward` add the loss), else 0. Conversion and training both use it."""
    if not hf_get(hf_config, "output_router_logits", False):
        return 0.0
    return float(hf_get(hf_config, "router_aux_loss_coef", 0.0) or 0.0)


# ------------------------------------------------------------------------------------------------ the name table
# Per decoder layer: (megatron suffixes - local spec first, then TE spec variants), (HF suffixes), kind, tp_dim.
_ATTN = [
    (("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"), ("input_layernorm.weight",), COPY, None),
    (
        ("self_attention.linear_qkv.weight",),
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        QKV,
        0,
    ),
    (
        ("self_attention.linear_qkv.bias",),
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        QKV,
        0,
    ),
    (("self_attention.q_layernorm.weight",), ("self_attn.q_norm.weight",), COPY, None),
    (("self_attention.k_layernorm.weight",), ("self_attn.k_norm.weight",), COPY, None),
    (("self_attention.linear_proj.weight",), ("self_attn.o_proj.weight",), COPY, 1),
    (("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"), ("post_attention_layernorm.weight",), COPY, None),
]
_DENSE_MLP = [
    (("mlp.linear_fc1.weight",), ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATE_UP, 0),
    (("mlp.linear_fc2.weight",), ("mlp.down_proj.weight",), COPY, 1),
]
_ROUTER = [(("mlp.router.weight",), ("mlp.gate.weight",), COPY, None)]
_SHARED = [
    (
        ("mlp.shared_experts.linear_fc1.weight",),
        ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"),
        GATE_UP,
        0,
    ),
    (("mlp.shared_experts.linear_fc2.weight",), ("mlp.shared_expert.down_proj.weight",), COPY, 1),
    (("mlp.shared_experts.gate_weight",), ("mlp.shared_expert_gate.weight",), COPY, None),
]
# Routed experts (`mlp.experts.local_experts.{l}.linear_fc1.weight` and the grouped `mlp.experts.linear_fc1.weight{l}`)
# are mapped for every family by `hf_mapping.map_megatron_name`, with `ModelFamily.routed_expert_hf_names`.
LAYER_RE = re.compile(r"^decoder\.layers\.(?P<j>\d+)\.(?P<rest>.+)$")
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"


class QwenMoeFamily(ModelFamily):
    """Qwen3-MoE and Qwen2-MoE (shared expert with a sigmoid gate, q/k/v bias, no q/k norm)."""

    name = "qwen_moe"
    model_types = ("qwen3_moe", "qwen2_moe")

    def hf_engine_refusal(self, hf_config) -> Optional[str]:
        # Qwen2-MoE's transformers router (Qwen2MoeTopKRouter) has the capture interface too, but the embedded
        # engine builds Qwen3MoeForCausalLM only: refused at parse time rather than at engine start.
        if hf_get(hf_config, "model_type") == "qwen2_moe":
            return ("the embedded hf rollout engine runs Qwen3-MoE only; train a qwen2_moe model with "
                    "--rollout-engine sglang")
        return None

    # ------------------------------------------------------------------------------------------------ HF -> ours
    def moe_layers(self, hf_config) -> tuple[bool, ...]:
        """HF's rule (Qwen3MoeDecoderLayer / Qwen2MoeDecoderLayer): layer i is MoE when i is not in mlp_only_layers,
        the model has experts and (i + 1) % decoder_sparse_step == 0."""
        mlp_only = set(hf_get(hf_config, "mlp_only_layers") or [])
        step = int(hf_get(hf_config, "decoder_sparse_step", 1) or 1)
        experts = int(hf_get(hf_config, "num_experts", 0) or 0)
        return tuple(
            (i not in mlp_only) and experts > 0 and (i + 1) % step == 0 for i in range(hf_config.num_hidden_layers)
        )

    def arch(self, hf_config) -> ModelArch:
        model_type = hf_get(hf_config, "model_type")
        if model_type not in self.model_types:
            raise UnsupportedHFConfig(f"model_type {model_type!r} is not a {self.name} model ({self.model_types})")
        if hf_get(hf_config, "hidden_act", "silu") != "silu":
            raise UnsupportedHFConfig(f"hidden_act {hf_config.hidden_act!r}: only SiLU (SwiGLU experts) is mapped")
        if hf_get(hf_config, "use_sliding_window", False):
            raise UnsupportedHFConfig("use_sliding_window=True: sliding-window attention is not mapped")
        layer_types = hf_get(hf_config, "layer_types")
        if layer_types and any(kind != "full_attention" for kind in layer_types):
            raise UnsupportedHFConfig(f"layer_types {layer_types}: only full attention is mapped")
        rope_theta(hf_config)  # raises on rope scaling
        if hf_config.num_experts_per_tok == 1 and hf_get(hf_config, "norm_topk_prob", False):
            raise UnsupportedHFConfig(TOP1_NORM_TOPK_PROB)
        heads = hf_config.num_attention_heads
        head_dim = hf_get(hf_config, "head_dim") or hf_config.hidden_size // heads
        kv_heads = hf_get(hf_config, "num_key_value_heads") or heads
        if model_type == "qwen3_moe":
            if hf_get(hf_config, "attention_bias", False):
                raise UnsupportedHFConfig(
                    "attention_bias=True biases q/k/v *and* o_proj; megatron has add_qkv_bias (q/k/v only) or "
                    "add_bias_linear (every linear, MLPs included), neither of which matches"
                )
            qkv_bias, qk_norm, shared, gate = False, True, None, False
        else:  # qwen2_moe
            qkv_bias, qk_norm = bool(hf_get(hf_config, "qkv_bias", True)), False
            shared = int(hf_get(hf_config, "shared_expert_intermediate_size", 0) or 0) or None
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
            moe_layers=self.moe_layers(hf_config),
            vocab_size=hf_config.vocab_size,
            tie_word_embeddings=bool(hf_get(hf_config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            shared_expert_intermediate_size=shared,
            shared_expert_gate=gate,
        )

    def megatron_fields(self, hf_config) -> dict[str, Any]:
        arch = self.arch(hf_config)
        fields: dict[str, Any] = dict(
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
            add_bias_linear=False,
            add_qkv_bias=arch.qkv_bias,
            qk_layernorm=arch.qk_norm,
            rotary_interleaved=False,
            attention_dropout=float(hf_get(hf_config, "attention_dropout", 0.0) or 0.0),
            init_method_std=float(hf_get(hf_config, "initializer_range", 0.02)),
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.topk,
            moe_ffn_hidden_size=arch.moe_intermediate_size,
            moe_layer_freq=arch.moe_layer_freq,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not bool(hf_get(hf_config, "norm_topk_prob", False)),
            moe_router_topk_scaling_factor=None,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=aux_loss_coeff(hf_config),
        )
        if arch.shared_expert_intermediate_size:
            fields.update(
                moe_shared_expert_intermediate_size=arch.shared_expert_intermediate_size,
                moe_shared_expert_gate=arch.shared_expert_gate,
                moe_shared_expert_overlap=False,
            )
        return fields

    def training_overridable_fields(self) -> tuple[str, ...]:
        return ("moe_aux_loss_coeff", "moe_router_load_balancing_type", "attention_dropout", "init_method_std",
                "moe_shared_expert_overlap")

    def model_kwargs(self, hf_config, *, tensor_model_parallel_size: int = 1,
                     make_vocab_size_divisible_by: int = 1) -> dict[str, Any]:
        return gpt_model_kwargs(self.arch(hf_config), hf_config, rotary_base=rope_theta(hf_config),
                                tensor_model_parallel_size=tensor_model_parallel_size,
                                make_vocab_size_divisible_by=make_vocab_size_divisible_by)

    # ------------------------------------------------------------------------------------------------ names
    def map_megatron_name(self, name: str, arch: ModelArch, *, layer_number_of: Callable[[int], int],
                          expert_offset: int) -> ParamMapping:
        if name == EMBEDDING:
            return ParamMapping(name, ("model.embed_tokens.weight",), COPY, 0, vocab=True)
        if name == FINAL_NORM:
            return ParamMapping(name, ("model.norm.weight",), COPY, None)
        if name == OUTPUT:
            if arch.tie_word_embeddings:
                return ParamMapping(name, ("model.embed_tokens.weight",), COPY, 0, vocab=True, tied=True)
            return ParamMapping(name, ("lm_head.weight",), COPY, 0, vocab=True)
        match = LAYER_RE.match(name)
        if not match:
            raise MappingError(
                f"no HF mapping for megatron parameter {name!r} (MTP and other extra modules are not mapped)"
            )
        layer = layer_number_of(int(match["j"])) - 1
        rest = match["rest"]
        prefix = f"model.layers.{layer}."
        for megatron_suffixes, hf_suffixes, kind, tp_dim in _ATTN + _DENSE_MLP + _ROUTER + _SHARED:
            if rest in megatron_suffixes:
                return ParamMapping(name, tuple(prefix + s for s in hf_suffixes), kind, tp_dim, layer=layer)
        raise MappingError(
            f"no HF mapping for megatron parameter or persistent buffer {name!r} in the {self.name} family (a "
            "buffer such as a router expert_bias or qb_beta has no Qwen-MoE checkpoint tensor)"
        )

    def hf_layer_names(self, arch: ModelArch, layer: int) -> list[str]:
        """Checkpoint names of decoder layer `layer`, in export order."""
        p = f"model.layers.{layer}."
        names = [p + "input_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if arch.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if arch.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += [p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight"]
        if arch.moe_layers[layer]:
            names.append(p + "mlp.gate.weight")
            for e in range(arch.num_experts):
                names += [p + f"mlp.experts.{e}.{x}_proj.weight" for x in ("gate", "up", "down")]
            if arch.shared_expert_intermediate_size:
                names += [p + f"mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")]
                if arch.shared_expert_gate:
                    names.append(p + "mlp.shared_expert_gate.weight")
        else:
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        return names

    def hf_checkpoint_names(self, arch: ModelArch) -> list[str]:
        names = ["model.embed_tokens.weight"]
        for layer in range(arch.num_layers):
            names += self.hf_layer_names(arch, layer)
        names.append("model.norm.weight")
        if not arch.tie_word_embeddings:
            names.append("lm_head.weight")
        return names

    def hf_checkpoint_shape(self, arch: ModelArch, name: str) -> tuple[int, ...]:
        h, d = arch.hidden_size, arch.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (arch.vocab_size, h)
        if name == "model.norm.weight" or name.endswith("layernorm.weight"):
            return (h,)
        rest = name.split(".", 3)[3] if name.startswith("model.layers.") else name
        q_out, kv_out = arch.num_attention_heads * d, arch.num_query_groups * d
        shapes = {
            "self_attn.q_proj.weight": (q_out, h),
            "self_attn.k_proj.weight": (kv_out, h),
            "self_attn.v_proj.weight": (kv_out, h),
            "self_attn.q_proj.bias": (q_out,),
            "self_attn.k_proj.bias": (kv_out,),
            "self_attn.v_proj.bias": (kv_out,),
            "self_attn.q_norm.weight": (d,),
            "self_attn.k_norm.weight": (d,),
            "self_attn.o_proj.weight": (h, q_out),
            "mlp.shared_expert_gate.weight": (1, h),
        }
        if rest in shapes:
            return shapes[rest]
        shape = mlp_checkpoint_shape(arch, rest, shared_prefix="mlp.shared_expert.")
        if shape is not None:
            return shape
        raise MappingError(f"unknown checkpoint name {name!r}")

    # ------------------------------------------------------------------------------------------------ ours -> HF
    def hf_config_from_megatron(self, config, *, vocab_size: int, max_position_embeddings: int, rotary_base: float,
                                tie_word_embeddings: bool = False, extra: Optional[dict] = None):
        """Qwen3MoeConfig, or Qwen2MoeConfig when the model has shared experts."""
        from megatron_r3.replay.layout import moe_layer_pattern

        if config.normalization != "RMSNorm" or not config.gated_linear_unit or config.activation_func is not F.silu:
            raise UnsupportedHFConfig("only RMSNorm + SwiGLU (gated SiLU) models map to Qwen-MoE")
        if config.add_bias_linear:
            raise UnsupportedHFConfig(
                "add_bias_linear=True (biased MLPs / output projection) has no Qwen-MoE equivalent"
            )
        if config.moe_router_score_function != "softmax" or config.moe_router_topk_scaling_factor:
            raise UnsupportedHFConfig("only softmax routing without top-k scaling maps to Qwen-MoE")
        if config.moe_router_num_groups or config.moe_router_group_topk:
            raise UnsupportedHFConfig("group-limited routing has no Qwen-MoE equivalent")
        if getattr(config, "moe_router_enable_expert_bias", False):
            raise UnsupportedHFConfig("a router expert bias has no Qwen-MoE equivalent")
        pattern = moe_layer_pattern(config.num_layers, config.moe_layer_freq)
        coeff = config.moe_aux_loss_coeff
        coeff = float(coeff[0] if isinstance(coeff, (list, tuple)) else (coeff or 0.0))
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
            router_aux_loss_coef=coeff,
            output_router_logits=coeff > 0,
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

    def hf_config_to_json_dict(self, hf_config) -> dict:
        """Also writes `num_experts` and `rope_theta` so that older transformers releases (and engines that read
        them directly) see the same values as transformers 5, which writes `num_local_experts` and
        `rope_parameters`."""
        data = hf_config.to_dict()
        data["num_experts"] = hf_config.num_experts
        data.setdefault("rope_theta", rope_theta(hf_config))
        return data

    # ------------------------------------------------------------------------------------------------ hf engine
    def find_routers(self, hf_model) -> dict[int, torch.nn.Module]:
        """Global decoder layer index -> `mlp.gate` (Qwen3MoeTopKRouter / Qwen2MoeTopKRouter) of each MoE block,
        checked against `moe_layers` of the model's config: if they disagree, the layer axis of captured routes
        would not mean what the trainer thinks, so refuse rather than emit misplaced ids."""
        routers: dict[int, torch.nn.Module] = {}
        for index, layer in enumerate(hf_model.model.layers):
            mlp = layer.mlp
            gate = getattr(mlp, "gate", None)
            if hasattr(mlp, "experts") and gate is not None:
                if not hasattr(gate, "top_k"):
                    raise RuntimeError(
                        f"layer {index}: the MoE router {type(gate).__name__} does not select experts itself "
                        "(transformers 4.x routes inside the block); route capture needs transformers >= 5 "
                        "(Qwen3MoeTopKRouter)"
                    )
                routers[index] = gate
        expected = [i for i, moe in enumerate(self.moe_layers(hf_model.config)) if moe]
        if sorted(routers) != expected:
            raise RuntimeError(
                f"MoE layers found in the model {sorted(routers)} differ from the config's mlp_only_layers / "
                f"decoder_sparse_step map {expected}; cannot place routes on the layer axis"
            )
        return routers


FAMILY = QwenMoeFamily()
