"""GPT layer specs whose MoE layers use `ReplayTopKRouter`, injected through `MoESubmodules.router`.

megatron-core builds an MoE layer from a spec: `submodules.mlp` is a `functools.partial(MoELayer,
submodules=MoESubmodules(...))`. We rebuild that partial with `dataclasses.replace(submodules,
router=ReplayTopKRouter)`; the rest of megatron-core is used as it is. Without TransformerEngine the same
mechanism swaps the local spec's `experts` (`GroupedExperts`, when `config.moe_grouped_gemm`) and core attention
(`ContextParallelDotProductAttention` or its SDPA subclass `FusedDotProductAttention`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_r3.model.cp_attention import ContextParallelDotProductAttention, with_context_parallel_core_attention
from megatron_r3.model.fused_attention import FusedDotProductAttention
from megatron_r3.model.grouped_experts import GroupedExperts
from megatron_r3.model.mla_attention import mla_core_attention, mla_local_layer_spec
from megatron_r3.model.norm import SequenceParallelNorm
from megatron_r3.model.token_dispatch import with_gather_dispatch_layer
from megatron_r3.replay.router import ReplayTopKRouter


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def with_moe_submodules(mlp_spec, **changes):
    """`mlp_spec` with fields of its `MoESubmodules` replaced (e.g. `router=...`, `experts=...`); dense MLP specs are
    returned unchanged. megatron 0.19's GPT layer spec gives the MoE layer as a `functools.partial(MoELayer,
    submodules=...)`, other specs as a `ModuleSpec`: both forms are handled."""
    if isinstance(mlp_spec, functools.partial):
        submodules = mlp_spec.keywords.get("submodules")
        if isinstance(submodules, MoESubmodules):
            keywords = dict(mlp_spec.keywords, submodules=dataclasses.replace(submodules, **changes))
            return functools.partial(mlp_spec.func, *mlp_spec.args, **keywords)
        return mlp_spec
    if isinstance(mlp_spec, ModuleSpec) and isinstance(mlp_spec.submodules, MoESubmodules):
        return dataclasses.replace(mlp_spec, submodules=dataclasses.replace(mlp_spec.submodules, **changes))
    return mlp_spec


def with_replay_router(mlp_spec):
    """Return `mlp_spec` with its router replaced by `ReplayTopKRouter` (dense MLP specs are returned unchanged)."""
    return with_moe_submodules(mlp_spec, router=ReplayTopKRouter)


def _local_norm_classes() -> tuple:
    """The norms megatron's local spec may pick (`WrappedTorchNorm`, or apex's `FusedLayerNorm` when apex exists)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    classes = [WrappedTorchNorm]
    try:
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        classes.append(FusedLayerNorm)
    except ImportError:  # pragma: no cover - the module imports without apex in 0.19.2
        pass
    return tuple(classes)


def with_sequence_parallel_norm(spec):
    """`spec` with every local norm (input/pre-MLP/q/k/final layer norms) replaced by `SequenceParallelNorm`.

    Walks ModuleSpecs and their submodule dataclasses; partials (the MoE layer) and other values are kept."""
    norms = _local_norm_classes()
    if isinstance(spec, type) and spec in norms:
        return SequenceParallelNorm
    if isinstance(spec, ModuleSpec):
        module = SequenceParallelNorm if spec.module in norms else spec.module
        submodules = with_sequence_parallel_norm(spec.submodules) if spec.submodules is not None else None
        return dataclasses.replace(spec, module=module, submodules=submodules)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {}
        for field in dataclasses.fields(spec):
            value = getattr(spec, field.name)
            new = with_sequence_parallel_norm(value)
            if new is not value:
                changes[field.name] = new
        return dataclasses.replace(spec, **changes) if changes else spec
    return spec


def with_grouped_experts(mlp_spec):
    """`mlp_spec` with its routed experts replaced by `GroupedExperts` (dense MLP specs are returned unchanged)."""
    return with_moe_submodules(mlp_spec, experts=GroupedExperts)


def fused_attention_selected(config) -> bool:
    """Local spec core attention: SDPA (`FusedDotProductAttention`) for `attention_backend` flash / fused, megatron's
    math (`ContextParallelDotProductAttention`) for unfused / local; `auto` (the default) = SDPA on a GPU, megatron's
    math on the CPU (where its numerics are the reference the CPU tests compare against)."""
    backend = getattr(config, "attention_backend", AttnBackend.auto)
    if backend in (AttnBackend.flash, AttnBackend.fused):
        return True
    if backend in (AttnBackend.unfused, AttnBackend.local):
        return False
    return torch.cuda.is_available()


def _layer_with_local_fast_modules(layer_spec: ModuleSpec, config, fused_attention: bool | None) -> ModuleSpec:
    """Local spec: core attention per `fused_attention` (None: `fused_attention_selected`); experts
    `GroupedExperts` when `config.moe_grouped_gemm` (megatron's own switch, which its local spec ignores); the MoE
    layer `GatherDispatchMoELayer` (sync-free, atomics-free permutation) for the alltoall dispatcher."""
    if fused_attention is None:
        fused_attention = fused_attention_selected(config)
    core = FusedDotProductAttention if fused_attention else ContextParallelDotProductAttention
    if getattr(config, "multi_latent_attention", False):  # MLA: core attention with k/v widths (model/mla_attention)
        layer_spec, core = mla_local_layer_spec(layer_spec, config), mla_core_attention(core)
    layer_spec = with_context_parallel_core_attention(layer_spec, core)
    if getattr(config, "moe_grouped_gemm", False):
        submodules = dataclasses.replace(layer_spec.submodules, mlp=with_grouped_experts(layer_spec.submodules.mlp))
        layer_spec = dataclasses.replace(layer_spec, submodules=submodules)
    if getattr(config, "moe_token_dispatcher_type", None) == "alltoall":  # model/token_dispatch.py
        mlp = with_gather_dispatch_layer(layer_spec.submodules.mlp)
        layer_spec = dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp))
    return layer_spec


def _layer_with_replay_router(layer_spec: ModuleSpec) -> ModuleSpec:
    submodules = dataclasses.replace(layer_spec.submodules, mlp=with_replay_router(layer_spec.submodules.mlp))
    return dataclasses.replace(layer_spec, submodules=submodules)


def replay_decoder_block_spec(
    config,
    *,
    use_transformer_engine: bool | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    fused_attention: bool | None = None,
) -> TransformerBlockSubmodules:
    """Megatron's GPT decoder block spec for this stage/chunk (dense and MoE layers per `moe_layer_freq`), with every
    MoE layer's router replaced by `ReplayTopKRouter`. TransformerEngine modules when TE is importable (unchanged),
    else local ones with `ContextParallelDotProductAttention` or its SDPA subclass as core attention (CP and THD
    without TE), `SequenceParallelNorm` as every norm (sequence parallelism and `params_dtype` weights without TE
    or apex), `GroupedExperts` when `config.moe_grouped_gemm` and `GatherDispatchMoELayer` for the alltoall
    dispatcher. `fused_attention` forces the SDPA core
    attention on or off (megatron's `attention_backend` also sets TE environment variables when a model is built,
    so processes that build several models pick the attention here rather than through the config)."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    block = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_transformer_engine,
        normalization=config.normalization,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    layer_specs = [_layer_with_replay_router(spec) for spec in block.layer_specs]
    if not use_transformer_engine:
        # Local spec: megatron's DotProductAttention refuses CP and packed (THD) batches (model/cp_attention.py);
        # fused SDPA attention and grouped-GEMM experts make it fast (model/fused_attention.py, grouped_experts.py);
        # SequenceParallelNorm supports SP on any device (model/norm.py).
        layer_specs = [
            with_sequence_parallel_norm(_layer_with_local_fast_modules(spec, config, fused_attention))
            for spec in layer_specs
        ]
        return dataclasses.replace(block, layer_specs=layer_specs, layer_norm=with_sequence_parallel_norm(block.layer_norm))
    return dataclasses.replace(block, layer_specs=layer_specs)
