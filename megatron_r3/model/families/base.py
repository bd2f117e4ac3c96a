"""The model-family interface: what one HF model family must say so that the rest of the package can train it.

A family (one module in `megatron_r3/model/families/`, registered by HF `model_type` in `families/__init__.py`) is the
single source of:

- HF config -> `ModelArch` (the architecture facts the weight code needs), with every config the family cannot
  reproduce refused by `UnsupportedHFConfig` naming the field and the fix (`arch`);
- HF config -> megatron `TransformerConfig` fields (`megatron_fields`), used by *both* the conversion path
  (`transformer_config_from_hf`) and the training path (`megatron_args_from_hf` writes them into megatron's
  argparse namespace for `core_transformer_config_from_args`), and the config class (`transformer_config_class`,
  e.g. `MLATransformerConfig`);
- which decoder layers are MoE layers (`moe_layers`, HF's own rule);
- the model class and layer spec (`decoder_block_spec`, `build_chunks`: GPTModel for the Qwen families, room for `HybridModel`);
- the checkpoint name mapping in both directions, buffers included (`map_megatron_name`, `hf_checkpoint_names`,
  `hf_checkpoint_shape`, `routed_expert_hf_names`, and `mtp_checkpoint_names`: the checkpoint's MTP tensors, which
  no family builds, refused or skipped on load); routed-expert *megatron* names (SequentialMLP's and the
  grouped experts') are mapped once for every family by `hf_mapping.map_megatron_name`, which asks the family
  only for the HF names of one expert;
- the megatron -> HF config direction (`hf_config_from_megatron`, `hf_config_to_json_dict`);
- the in-process hf-engine hooks (`hf_engine_refusal`, `find_routers`, `weight_loader`).

Families are stateless singletons; methods take the HF config or the `ModelArch` they need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


class UnsupportedHFConfig(ValueError):
    """An HF configuration that this Megatron model family cannot reproduce exactly."""


@dataclass(frozen=True)
class ModelArch:
    """The architecture facts the weight mapping needs, independent of HF and Megatron objects. A family with more
    facts (e.g. MLA ranks, expert bias) subclasses it with defaulted fields."""

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
    num_mtp_layers: int = 0  # HF `num_nextn_predict_layers`: checkpoint layers model.layers.{num_layers + i}, not built

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


def padded_vocab_size(
    vocab_size: int, tensor_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 1
) -> int:
    """Megatron's vocabulary padding: up to a multiple of make_vocab_size_divisible_by * TP (pad rows are zeros on
    import and dropped on export)."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def hf_get(hf_config, name: str, default=None):
    """`hf_config.name`, or `default` when the field is absent (older or partial configs)."""
    return getattr(hf_config, name, default)


def gpt_model_kwargs(arch: ModelArch, hf_config, *, rotary_base: float, tensor_model_parallel_size: int = 1,
                     make_vocab_size_divisible_by: int = 1, **extra: Any) -> dict[str, Any]:
    """`build_chunks` keyword arguments of a GPTModel family with RoPE: the padded vocabulary, HF's
    `max_position_embeddings`, `rotary_base` and the tied output layer; `extra` adds family-specific ones (e.g.
    `rotary_percent`)."""
    return dict(
        vocab_size=padded_vocab_size(arch.vocab_size, tensor_model_parallel_size, make_vocab_size_divisible_by),
        max_sequence_length=int(hf_get(hf_config, "max_position_embeddings", 4096)),
        position_embedding_type="rope",
        rotary_base=rotary_base,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        **extra,
    )


def mlp_checkpoint_shape(arch: ModelArch, rest: str, shared_prefix: str) -> Optional[tuple[int, ...]]:
    """The shape of a layer's MLP checkpoint tensor `rest` (its name after `model.layers.{i}.`) in HF's SwiGLU
    naming: the dense `mlp.{gate,up,down}_proj.weight`, the router `mlp.gate.weight`, the shared experts under
    `shared_prefix` (`mlp.shared_expert.` for Qwen2-MoE, `mlp.shared_experts.` for DeepSeek-V3 / GLM-4.5) and the
    routed `mlp.experts.{e}.*`; None for any other name (the family's own tables answer those)."""
    h = arch.hidden_size

    def projection(ffn: Optional[int]) -> tuple[int, ...]:
        return (h, ffn) if rest.endswith("down_proj.weight") else (ffn, h)

    if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
        return projection(arch.intermediate_size)
    if rest == "mlp.gate.weight":
        return (arch.num_experts, h)
    if rest.startswith(shared_prefix):
        return projection(arch.shared_expert_intermediate_size)
    if rest.startswith("mlp.experts."):
        return projection(arch.moe_intermediate_size)
    return None


class ModelFamily:
    """One HF model family in megatron-core. Subclasses set `name` and `model_types` and implement the abstract
    methods; the defaults below fit a GPT-style decoder (GPTModel, megatron's GPT layer spec with the replay router,
    HF's `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` expert names)."""

    name: str = ""
    model_types: tuple[str, ...] = ()

    # ------------------------------------------------------------------------------------------------ HF -> ours
    def arch(self, hf_config) -> ModelArch:
        """Validate `hf_config` (raise `UnsupportedHFConfig` with one clear message) and return its `ModelArch`."""
        raise NotImplementedError

    def moe_layers(self, hf_config) -> tuple[bool, ...]:
        """Which decoder layers are MoE layers, with HF's rule for this family."""
        raise NotImplementedError

    def megatron_fields(self, hf_config) -> dict[str, Any]:
        """The `TransformerConfig` fields the HF config decides (architecture, routing, aux-loss coefficient), in
        megatron's field names. The conversion and training paths both take exactly these."""
        raise NotImplementedError

    def training_overridable_fields(self) -> tuple[str, ...]:
        """Fields of `megatron_fields` that are training choices with an HF default: an explicit megatron flag wins
        over them (every other field is architecture: a conflicting flag is an error)."""
        return ("moe_aux_loss_coeff",)

    def transformer_config_class(self, hf_config) -> type:
        """megatron's config class for the conversion path (`TransformerConfig`; `MLATransformerConfig` for MLA). The
        training path builds its config with megatron's `core_transformer_config_from_args`, which picks the class
        from the arguments: an MLA family puts `multi_latent_attention=True` (and the MLA fields) in
        `megatron_fields`, so both paths agree."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        return TransformerConfig

    def model_kwargs(self, hf_config, *, tensor_model_parallel_size: int = 1,
                     make_vocab_size_divisible_by: int = 1) -> dict[str, Any]:
        """Keyword arguments of `build_chunks` besides the config: vocabulary (padded), positions, tied output."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ model class
    def decoder_block_spec(self, config, *, vp_stage: Optional[int] = None, use_transformer_engine=None,
                           fused_attention=None):
        """The decoder block spec of one model chunk: megatron's GPT spec with the replay router."""
        from megatron_r3.model.specs import replay_decoder_block_spec

        return replay_decoder_block_spec(config, use_transformer_engine=use_transformer_engine, vp_stage=vp_stage,
                                         fused_attention=fused_attention)

    def build_chunks(self, config, parallel, **model_kwargs) -> list:
        """This rank's model chunks (one per virtual pipeline stage of the `ParallelContext` `parallel`, built with its
        process groups); the family chooses the model class (GPTModel here; a family on megatron's `HybridModel`
        overrides this and `decoder_block_spec`). `model_kwargs` are `model_kwargs(...)`'s, the trainer passing its
        padded vocabulary."""
        from megatron_r3.model.gpt import build_gpt_chunks

        return build_gpt_chunks(config, parallel, block_spec_of=self.decoder_block_spec, **model_kwargs)

    # ------------------------------------------------------------------------------------------------ names
    def map_megatron_name(self, name: str, arch: ModelArch, *, layer_number_of: Callable[[int], int],
                          expert_offset: int):
        """The `hf_mapping.ParamMapping` of megatron parameter or persistent buffer `name` of one chunk, routed
        experts excepted: `hf_mapping.map_megatron_name` maps those (both megatron namings) before asking here."""
        raise NotImplementedError

    def hf_checkpoint_names(self, arch: ModelArch) -> list[str]:
        """Every checkpoint tensor name of the model (buffers included), in the deterministic export order."""
        raise NotImplementedError

    def hf_checkpoint_shape(self, arch: ModelArch, name: str) -> tuple[int, ...]:
        """The shape of checkpoint tensor `name`."""
        raise NotImplementedError

    def mtp_checkpoint_names(self, arch: ModelArch, names) -> list[str]:
        """The names among checkpoint tensor `names` that belong to MTP layers, which no family builds: HF's
        DeepSeek-V3 / GLM-4.5 store MTP layer i as `model.layers.{num_layers + i}.*` (i < `arch.num_mtp_layers`).
        Loading refuses or skips them (`model/hf_load_config.HFLoadConfig.mtp_checkpoint_tensors`)."""
        if not arch.num_mtp_layers:
            return []
        mtp = tuple(f"model.layers.{arch.num_layers + i}." for i in range(arch.num_mtp_layers))
        return [name for name in names if name.startswith(mtp)]

    def routed_expert_hf_names(self, arch: ModelArch, layer: int, expert: int, projection: str) -> tuple[str, ...]:
        """HF names of megatron's "fc1" (gate, up: fused [gate; up]) or "fc2" (down) of global routed expert
        `expert` of decoder layer `layer` (0-based)."""
        p = f"model.layers.{layer}.mlp.experts.{expert}."
        if projection == "fc1":
            return (p + "gate_proj.weight", p + "up_proj.weight")
        return (p + "down_proj.weight",)

    def expert_hf_names(self, arch: ModelArch, layer: int, projection: str) -> tuple[str, ...]:
        """HF names of one projection ("fc1": gate/up of every expert, "fc2": down of every expert) of the routed
        experts of `layer`, in export order (`routed_expert_hf_names` of expert 0, 1, ...)."""
        return tuple(name for e in range(arch.num_experts)
                     for name in self.routed_expert_hf_names(arch, layer, e, projection))

    # ------------------------------------------------------------------------------------------------ ours -> HF
    def hf_config_from_megatron(self, config, *, vocab_size: int, max_position_embeddings: int, rotary_base: float,
                                tie_word_embeddings: bool = False, extra: Optional[dict] = None):
        """The HF config of a megatron model built from `config`; `vocab_size` is the unpadded vocabulary."""
        raise NotImplementedError

    def hf_config_to_json_dict(self, hf_config) -> dict:
        """`config.json` content."""
        return hf_config.to_dict()

    # ------------------------------------------------------------------------------------------------ hf engine
    def hf_engine_refusal(self, hf_config) -> Optional[str]:
        """Why the embedded hf rollout engine cannot run `hf_config` (checked when the arguments are parsed), or
        None when it can."""
        return None

    def find_routers(self, hf_model) -> dict[int, torch.nn.Module]:
        """Global decoder layer index -> the router module of that MoE layer in a live transformers model (route
        capture hooks it: its forward returns (router_logits, routing_weights, selected_experts))."""
        raise NotImplementedError

    def weight_loader(self, hf_model):
        """Copies checkpoint-named tensors into a live transformers model (fused experts handled)."""
        from megatron_r3.model.hf_module import WeightLoader

        return WeightLoader(hf_model)
