"""Model families, registered by HF `model_type`. Adding a family = one module here defining `FAMILY` (a
`base.ModelFamily`) + one line in `REGISTRY`.

Everything that depends on the HF model family goes through `family_of(hf_config)` / `family_for(model_type)`; the
module-level helpers below are the entry points the rest of the package uses (conversion, training arguments,
weight load/export, the hf engine).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch

from megatron_r3.model.families.base import ModelArch, ModelFamily, UnsupportedHFConfig, padded_vocab_size

__all__ = [
    "REGISTRY", "ModelArch", "ModelFamily", "UnsupportedHFConfig", "arch_from_hf_config", "build_from_hf_config",
    "architecture_arg_names", "family_for", "family_of", "hf_config_to_json_dict", "load_hf_config",
    "megatron_args_from_hf",
    "padded_vocab_size", "registered_model_types", "transformer_config_from_hf",
]

# HF model_type -> the module of megatron_r3.model.families that defines FAMILY (a dotted path names a module
# elsewhere, e.g. a test's family).
REGISTRY: dict[str, str] = {
    "qwen3_moe": "qwen_moe",
    "qwen2_moe": "qwen_moe",
    "deepseek_v3": "deepseek_v3",
    "glm4_moe": "glm4_moe",
}


def registered_model_types() -> list[str]:
    return sorted(REGISTRY)


def family_for(model_type) -> ModelFamily:
    """The family registered for HF `model_type`; `UnsupportedHFConfig` listing the registered ones otherwise."""
    module = REGISTRY.get(model_type)
    if module is None:
        raise UnsupportedHFConfig(
            f"model_type {model_type!r}: no model family is registered for it; registered: "
            f"{', '.join(registered_model_types())} (a family is one module in megatron_r3/model/families/ plus "
            "one line in its REGISTRY)"
        )
    family = importlib.import_module(module if "." in module else f"{__name__}.{module}").FAMILY
    if model_type not in family.model_types:
        raise RuntimeError(f"REGISTRY maps {model_type!r} to {module}, whose family {family.name} does not list it")
    return family


def family_of(hf_config) -> ModelFamily:
    return family_for(getattr(hf_config, "model_type", None))


def arch_from_hf_config(hf_config) -> ModelArch:
    """Validate `hf_config` with its family and return its `ModelArch`."""
    return family_of(hf_config).arch(hf_config)


def hf_config_to_json_dict(hf_config) -> dict:
    return family_of(hf_config).hf_config_to_json_dict(hf_config)


def load_hf_config(path: str):
    """The HF config of a model directory (its config.json) or of a JSON file of any name, checked against the
    registered families (an unknown model_type is refused here, before anything is built)."""
    from transformers import AutoConfig

    if os.path.isdir(path):
        config = AutoConfig.from_pretrained(path)
        family_of(config)
        return config
    with open(path) as handle:
        values = json.load(handle)
    if not isinstance(values, dict) or values.get("model_type") is None:
        raise ValueError(f"{path}: a Hugging Face config.json needs a model_type")
    model_type = values.pop("model_type")
    family_for(model_type)
    return AutoConfig.for_model(model_type, **values)


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
    """A megatron `TransformerConfig` (the family's class) reproducing `hf_config`, for the parallel layout
    `parallel` (`megatron_r3.platform.parallel_context.ParallelSizes`; default: no model parallelism). The model fields
    are the family's `megatron_fields`; bf16/fp16 follow `params_dtype`; `overrides` are applied last (e.g.
    recompute settings, `use_cpu_initialization=True`)."""
    from megatron_r3.platform.parallel_context import ParallelSizes

    family = family_of(hf_config)
    family.arch(hf_config)
    parallel = parallel or ParallelSizes()
    kwargs: dict[str, Any] = dict(
        hidden_dropout=0.0,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
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
    kwargs.update(family.megatron_fields(hf_config))
    kwargs.update(overrides)
    if kwargs.get("expert_tensor_parallel_size") is None:
        kwargs.pop("expert_tensor_parallel_size")
    return family.transformer_config_class(hf_config)(**kwargs)


# TransformerConfig fields whose megatron argument has another name or form (`core_transformer_config_from_args`).
_ARG_NAMES = {"num_moe_experts": "num_experts", "gated_linear_unit": "swiglu", "activation_func": "swiglu"}


def architecture_arg_names(hf_config) -> tuple[str, ...]:
    """The megatron argument names the family's architecture fields (all but the training-overridable ones) are
    written to: a flag set to another value than the HF config's is a conflict, not silently replaced."""
    family = family_of(hf_config)
    overridable = set(family.training_overridable_fields())
    names = [_ARG_NAMES.get(field, field) for field in family.megatron_fields(hf_config) if field not in overridable]
    return tuple(dict.fromkeys(names))


def _set_arg(args, field: str, value) -> None:
    if field == "num_moe_experts":
        args.num_experts = value
    elif field == "num_query_groups":
        args.group_query_attention = value is not None and value != args.num_attention_heads
        args.num_query_groups = value
    elif field == "activation_func":
        if value is not torch.nn.functional.silu:
            raise UnsupportedHFConfig(f"activation {value} has no megatron argument here (only SwiGLU is mapped)")
    elif field == "gated_linear_unit":
        args.swiglu = bool(value)
    else:
        args.__dict__[field] = value


def megatron_args_from_hf(args, hf_config, explicit: frozenset = frozenset()) -> None:
    """The training path: write the family's `megatron_fields` (and model kwargs) into megatron's argparse
    namespace, so that `core_transformer_config_from_args` builds the same model fields as
    `transformer_config_from_hf`. `explicit`: megatron arguments the user set; they win over the family's
    training-overridable fields (e.g. `moe_aux_loss_coeff`)."""
    family = family_of(hf_config)
    arch = family.arch(hf_config)
    overridable = set(family.training_overridable_fields())
    fields = family.megatron_fields(hf_config)
    for field in ("num_attention_heads",):  # needed before num_query_groups
        if field in fields:
            _set_arg(args, field, fields[field])
    for field, value in fields.items():
        if field in overridable and field in explicit:
            continue
        _set_arg(args, field, value)
    kwargs = family.model_kwargs(hf_config)
    args.hf_model_config = hf_config
    args.position_embedding_type = kwargs["position_embedding_type"]
    args.rotary_base = kwargs["rotary_base"]
    args.untie_embeddings_and_output_weights = not kwargs["share_embeddings_and_output_weights"]
    args.max_position_embeddings = kwargs["max_sequence_length"]
    args.vocab_size = arch.vocab_size
    args.padded_vocab_size = arch.vocab_size if args.make_vocab_size_divisible_by == 1 else None


def build_from_hf_config(hf_config, parallel, *, make_vocab_size_divisible_by: int = 1, **config_kwargs):
    """(TransformerConfig, this rank's model chunks) for `hf_config` in the layout of the `ParallelContext`
    `parallel` (the one `megatron_r3.platform.distributed.initialize_model_parallel` returned). Weights are random
    until `megatron_r3.model.weights.load_hf_weights` fills them."""
    family = family_of(hf_config)
    config = transformer_config_from_hf(hf_config, parallel=parallel.sizes, **config_kwargs)
    chunks = family.build_chunks(
        config,
        parallel,
        **family.model_kwargs(
            hf_config,
            tensor_model_parallel_size=config.tensor_model_parallel_size,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        ),
    )
    return config, chunks
