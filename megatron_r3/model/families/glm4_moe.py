"""The GLM-4.5 / GLM-4.6 family (`model_type: glm4_moe`) in megatron-core: Qwen-style GQA attention with DeepSeek-V3's
router - sigmoid scores, a selection-only expert bias, group-limited top-k, a routed scaling factor, ungated shared
experts and dense-first layers - and partial RoPE.

It is the Qwen-MoE family's attention (`qwen_moe.QwenMoeFamily`: fused QKV interleaved by query group, q/k/v biases
when `attention_bias`, q/k RMSNorm when `use_qk_norm`) plus the DeepSeek-V3 family's MoE block
(`deepseek_v3`: router checks, `e_score_correction_bias` <-> `router.expert_bias`, `mlp.shared_experts.*`):

    attention_bias                 add_qkv_bias (HF biases q/k/v only; o_proj never has a bias)
    use_qk_norm                    qk_layernorm
    partial_rotary_factor          GPTModel(rotary_percent=...) (RoPE on the first head_dim * factor dims, rotate-half
                                   layout, as megatron's rotary_interleaved=False)
    n_routed_experts, n_group, ... as in the DeepSeek-V3 family (same checks: norm_topk_prob == (top-k > 1), HF's
                                   top-2 group score == megatron's top-(topk // topk_group))
    first_k_dense_replace          moe_layer_freq = [0] * k + [1] * (L - k)

MTP layers (`num_nextn_predict_layers`) are not built; a checkpoint holding them is refused or skipped on load
(`--mtp-checkpoint-tensors`), as in the DeepSeek-V3 family.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_r3.model.families import deepseek_v3 as ds
from megatron_r3.model.families.base import (
    ModelArch,
    UnsupportedHFConfig,
    gpt_model_kwargs,
    hf_get,
    mlp_checkpoint_shape,
)
from megatron_r3.model.families.qwen_moe import LAYER_RE, QwenMoeFamily
from megatron_r3.model.hf_mapping import COPY, GATE_UP, MappingError, ParamMapping

_SHARED = {
    "mlp.shared_experts.linear_fc1.weight": (
        ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"), GATE_UP, 0),
    "mlp.shared_experts.linear_fc2.weight": (("mlp.shared_experts.down_proj.weight",), COPY, 1),
    "mlp.router.expert_bias": (("mlp.gate.e_score_correction_bias",), COPY, None),
}


def partial_rotary_factor(hf_config) -> float:
    params = hf_get(hf_config, "rope_parameters") or {}
    return float(params.get("partial_rotary_factor", hf_get(hf_config, "partial_rotary_factor", 1.0)) or 1.0)


class Glm4MoeFamily(QwenMoeFamily):
    """GLM-4.5 / GLM-4.6: Qwen-MoE attention + the DeepSeek-V3 router and shared experts + partial RoPE."""

    name = "glm4_moe"
    model_types = ("glm4_moe",)

    def hf_engine_refusal(self, hf_config) -> Optional[str]:
        return ("the embedded hf rollout engine runs Qwen3-MoE and DeepSeek-V3; train glm4_moe with "
                "--rollout-engine sglang")

    def moe_layers(self, hf_config) -> tuple[bool, ...]:
        first_k = int(hf_get(hf_config, "first_k_dense_replace", 0) or 0)
        return tuple(i >= first_k for i in range(hf_config.num_hidden_layers))

    def arch(self, hf_config) -> ModelArch:
        if hf_get(hf_config, "model_type") not in self.model_types:
            raise UnsupportedHFConfig(f"model_type {hf_get(hf_config, 'model_type')!r} is not a glm4_moe model")
        if hf_get(hf_config, "hidden_act", "silu") != "silu":
            raise UnsupportedHFConfig(f"hidden_act {hf_config.hidden_act!r}: only SiLU (SwiGLU experts) is mapped")
        self._rope_theta(hf_config)
        ds._check_router(hf_config)
        heads = hf_config.num_attention_heads
        shared = int(hf_get(hf_config, "n_shared_experts", 0) or 0)
        return ModelArch(
            model_type="glm4_moe",
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            num_attention_heads=heads,
            num_query_groups=hf_get(hf_config, "num_key_value_heads") or heads,
            head_dim=hf_get(hf_config, "head_dim") or hf_config.hidden_size // heads,
            intermediate_size=hf_config.intermediate_size,
            moe_intermediate_size=hf_config.moe_intermediate_size,
            num_experts=hf_config.n_routed_experts,
            topk=hf_config.num_experts_per_tok,
            moe_layers=self.moe_layers(hf_config),
            vocab_size=hf_config.vocab_size,
            tie_word_embeddings=bool(hf_get(hf_config, "tie_word_embeddings", False)),
            qkv_bias=bool(hf_get(hf_config, "attention_bias", False)),
            qk_norm=bool(hf_get(hf_config, "use_qk_norm", False)),
            shared_expert_intermediate_size=shared * hf_config.moe_intermediate_size or None,
            shared_expert_gate=False,
            num_mtp_layers=int(hf_get(hf_config, "num_nextn_predict_layers", 0) or 0),
        )

    @staticmethod
    def _rope_theta(hf_config) -> float:
        params = dict(hf_get(hf_config, "rope_parameters") or {})
        if (params.get("rope_type") or "default") != "default":
            raise UnsupportedHFConfig(f"rope_type {params.get('rope_type')!r}: glm4_moe maps the default RoPE only")
        return float(params.get("rope_theta", hf_get(hf_config, "rope_theta", 10000.0)))

    def megatron_fields(self, hf_config) -> dict[str, Any]:
        arch = self.arch(hf_config)
        num_groups, group_topk = ds._check_router(hf_config)
        fields = super().megatron_fields(hf_config)
        fields.update(
            moe_router_score_function="sigmoid",
            moe_router_pre_softmax=False,
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=0.0,
            moe_router_num_groups=num_groups,
            moe_router_group_topk=group_topk,
            moe_router_topk_scaling_factor=float(hf_get(hf_config, "routed_scaling_factor", 1.0) or 1.0),
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
        )
        if arch.shared_expert_intermediate_size:
            fields.update(moe_shared_expert_gate=False)
        return fields

    def training_overridable_fields(self) -> tuple[str, ...]:
        return super().training_overridable_fields() + ("moe_router_bias_update_rate",)

    def model_kwargs(self, hf_config, *, tensor_model_parallel_size: int = 1,
                     make_vocab_size_divisible_by: int = 1) -> dict[str, Any]:
        return gpt_model_kwargs(self.arch(hf_config), hf_config, rotary_base=self._rope_theta(hf_config),
                                tensor_model_parallel_size=tensor_model_parallel_size,
                                make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                rotary_percent=partial_rotary_factor(hf_config))

    def map_megatron_name(self, name: str, arch: ModelArch, *, layer_number_of, expert_offset: int) -> ParamMapping:
        match = LAYER_RE.match(name)
        if match and match["rest"] in _SHARED:
            layer = layer_number_of(int(match["j"])) - 1
            hf_suffixes, kind, tp_dim = _SHARED[match["rest"]]
            return ParamMapping(name, tuple(f"model.layers.{layer}.{s}" for s in hf_suffixes), kind, tp_dim,
                                layer=layer)
        return super().map_megatron_name(name, arch, layer_number_of=layer_number_of, expert_offset=expert_offset)

    def hf_layer_names(self, arch: ModelArch, layer: int) -> list[str]:
        names = super().hf_layer_names(arch, layer)
        if not arch.moe_layers[layer]:
            return names
        p = f"model.layers.{layer}."
        names = [n for n in names if not n.startswith(p + "mlp.shared_expert.")]
        names.insert(names.index(p + "mlp.gate.weight") + 1, p + "mlp.gate.e_score_correction_bias")
        if arch.shared_expert_intermediate_size:
            names += [p + f"mlp.shared_experts.{x}_proj.weight" for x in ("gate", "up", "down")]
        return names

    def hf_checkpoint_shape(self, arch: ModelArch, name: str) -> tuple[int, ...]:
        rest = name.split(".", 3)[3] if name.startswith("model.layers.") else name
        if rest == "mlp.gate.e_score_correction_bias":
            return (arch.num_experts,)
        if rest.startswith("mlp.shared_experts."):
            return mlp_checkpoint_shape(arch, rest, shared_prefix="mlp.shared_experts.")
        return super().hf_checkpoint_shape(arch, name)

    def hf_config_from_megatron(self, config, *, vocab_size: int, max_position_embeddings: int, rotary_base: float,
                                tie_word_embeddings: bool = False, extra: Optional[dict] = None):
        raise MappingError("megatron -> HF config for glm4_moe is not written yet: keep the original config.json")

    def hf_config_to_json_dict(self, hf_config) -> dict:
        return hf_config.to_dict()

    def find_routers(self, hf_model) -> dict[int, torch.nn.Module]:
        """Layer index -> `mlp.gate` (`Glm4MoeTopkRouter`: returns (logits, weights, ids)) of each MoE layer."""
        layers = hf_model.model.layers[: hf_model.config.num_hidden_layers]
        routers = {i: layer.mlp.gate for i, layer in enumerate(layers) if hasattr(layer.mlp, "experts")}
        expected = [i for i, moe in enumerate(self.moe_layers(hf_model.config)) if moe]
        if sorted(routers) != expected:
            raise RuntimeError(
                f"HF model has routers in layers {sorted(routers)}, its config says MoE layers {expected}"
            )
        return routers

    def weight_loader(self, hf_model):
        return ds.weight_loader(hf_model)


FAMILY = Glm4MoeFamily()
