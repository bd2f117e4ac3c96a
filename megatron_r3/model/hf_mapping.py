"""The Megatron <-> HF *checkpoint* mapping machinery: `ParamMapping`, QKV interleave, [gate; up] fusion,
tensor-parallel split dims, expert ids. The name tables are the model family's (`megatron_r3.model.families`);
the functions here dispatch on `arch.model_type`. The table below is the Qwen-MoE family's.

Routed experts are the one exception, written here once for every family: megatron names local expert l's weights
`mlp.experts.local_experts.{l}.linear_fc{1,2}.weight` (`SequentialMLP`) or `mlp.experts.linear_fc{1,2}.weight{l}`
(`TEGroupedMLP`; our `GroupedExperts`, which the trainer uses in bf16 on a GPU, holds one stacked
`linear_fc{1,2}.weight` that `per_expert_named_parameters` presents under these names), whatever the family; so
`map_megatron_name` maps both namings itself (`routed_expert_of`) and asks the family only for the HF names of
global expert e (`ModelFamily.routed_expert_hf_names`). A family's `map_megatron_name` never sees an expert name,
so no family can map one naming and forget the other.

HF names are the on-disk checkpoint names (`save_pretrained` output, hub checkpoints, SGLang `load_weights`), with
one tensor per expert. transformers 5 keeps experts fused *in memory* (`mlp.experts.gate_up_proj` [E, 2I, H] =
[gate; up] per expert, `mlp.experts.down_proj` [E, H, I]) and converts on load/save; `megatron_r3.model.hf_module`
does the same conversion for a live HF module.

Mapping table (`{i}` = global 0-based layer = megatron `layer_number - 1`; `{j}` = the layer's index inside its
model chunk; `{l}` = local expert index; `{e}` = global expert id = ep_rank * num_local_experts + l):

  HF checkpoint name                                   megatron parameter (local spec | TE spec)             split
  model.embed_tokens.weight                            embedding.word_embeddings.weight                      TP dim 0, vocab padded
  model.layers.{i}.input_layernorm.weight              decoder.layers.{j}.input_layernorm.weight             -
                                                       | ...self_attention.linear_qkv.layer_norm_weight
  model.layers.{i}.self_attn.{q,k,v}_proj.weight       ...self_attention.linear_qkv.weight                   TP dim 0, QKV interleaved by query group
  model.layers.{i}.self_attn.{q,k,v}_proj.bias         ...self_attention.linear_qkv.bias  (Qwen2-MoE)        TP dim 0, interleaved
  model.layers.{i}.self_attn.q_norm.weight             ...self_attention.q_layernorm.weight                  -
  model.layers.{i}.self_attn.k_norm.weight             ...self_attention.k_layernorm.weight                  -
  model.layers.{i}.self_attn.o_proj.weight             ...self_attention.linear_proj.weight                  TP dim 1
  model.layers.{i}.post_attention_layernorm.weight     ...pre_mlp_layernorm.weight                           -
                                                       | ...mlp.linear_fc1.layer_norm_weight (TE, dense layer)
  model.layers.{i}.mlp.{gate,up}_proj.weight           ...mlp.linear_fc1.weight  (dense layer)               TP dim 0, [gate; up] per shard
  model.layers.{i}.mlp.down_proj.weight                ...mlp.linear_fc2.weight  (dense layer)               TP dim 1
  model.layers.{i}.mlp.gate.weight                     ...mlp.router.weight                                  -
  model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight
                                                       ...mlp.experts.local_experts.{l}.linear_fc1.weight    ETP dim 0, [gate; up], EP by expert
                                                       | ...mlp.experts.linear_fc1.weight{l}  (TEGroupedMLP)
  model.layers.{i}.mlp.experts.{e}.down_proj.weight    ...mlp.experts.local_experts.{l}.linear_fc2.weight    ETP dim 1, EP by expert
                                                       | ...mlp.experts.linear_fc2.weight{l}
  model.layers.{i}.mlp.shared_expert.{gate,up}_proj.weight   ...mlp.shared_experts.linear_fc1.weight (Qwen2)  TP dim 0, [gate; up]
  model.layers.{i}.mlp.shared_expert.down_proj.weight  ...mlp.shared_experts.linear_fc2.weight               TP dim 1
  model.layers.{i}.mlp.shared_expert_gate.weight       ...mlp.shared_experts.gate_weight                     -
  model.norm.weight                                    decoder.final_layernorm.weight                        -
  lm_head.weight                                       output_layer.weight                                   TP dim 0, vocab padded
                                                       (tied embeddings: no lm_head.weight in the checkpoint; a
                                                       last-stage output_layer.weight is loaded from the embedding)

QKV: megatron's fused weight is [num_query_groups, (heads_per_group + 2) * head_dim, hidden] - per group its query
heads, then its key head, then its value head - so a contiguous TP split gives each rank whole groups. fc1 is
[gate; up] *per TP shard*: rank r holds [gate_r; up_r], not a contiguous slice of [gate; up].

Everything here is pure tensor code: no process group. `megatron_r3.model.weights` adds the collectives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from megatron_r3.model.families.base import ModelArch

COPY, QKV, GATE_UP = "copy", "qkv", "gate_up"


class MappingError(KeyError):
    """A parameter or checkpoint name that the mapping does not know, or a tensor of the wrong shape."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ParamMapping:
    """How one megatron parameter (one rank's shard) relates to HF checkpoint tensors.

    hf_names: the checkpoint tensors it is built from (q/k/v for QKV, gate/up for fc1, else one).
    kind: COPY, QKV or GATE_UP.
    tp_dim: dim split across tensor parallel ranks (the expert-TP group for experts); None = replicated.
    expert_id: global expert id for routed-expert parameters (they are split over EP and ETP), else None.
    layer: global 0-based decoder layer, or None for embedding / final norm / output layer.
    vocab: rows are the (padded) vocabulary.
    tied: the output layer of a tied-embedding model; loaded from the embedding, never exported.
    """

    megatron_name: str
    hf_names: tuple[str, ...]
    kind: str = COPY
    tp_dim: Optional[int] = None
    expert_id: Optional[int] = None
    layer: Optional[int] = None
    vocab: bool = False
    tied: bool = False

    @property
    def is_expert(self) -> bool:
        return self.expert_id is not None


# ------------------------------------------------------------------------------------------------ names (per family)
def _family(arch: ModelArch):
    from megatron_r3.model.families import family_for

    return family_for(arch.model_type)


# Local expert l's weights in megatron's two namings: SequentialMLP `...mlp.experts.local_experts.{l}.linear_fc1.weight`
# and TEGroupedMLP `...mlp.experts.linear_fc1.weight{l}` (also GroupedExperts' per-expert views).
_ROUTED_EXPERT_RE = re.compile(
    r"^decoder\.layers\.(?P<j>\d+)\.mlp\.experts\."
    r"(?:local_experts\.(?P<seq_l>\d+)\.linear_fc(?P<seq_fc>[12])\.weight"
    r"|linear_fc(?P<grp_fc>[12])\.weight(?P<grp_l>\d+))$"
)


def routed_expert_of(name: str) -> Optional[tuple[int, str, int]]:
    """(j: the layer's index in its chunk, projection "fc1" | "fc2", l: the local expert) of a routed-expert weight
    of one chunk in either megatron naming (see `_ROUTED_EXPERT_RE`), None for any other name."""
    match = _ROUTED_EXPERT_RE.match(name)
    if match is None:
        return None
    if match["seq_l"] is not None:
        return int(match["j"]), f"fc{match['seq_fc']}", int(match["seq_l"])
    return int(match["j"]), f"fc{match['grp_fc']}", int(match["grp_l"])


def routed_expert_name(name: str, local: int) -> str:
    """The name of local expert `local` in the same layer, projection and naming as the routed-expert weight
    `name` (ValueError for any other name)."""
    match = _ROUTED_EXPERT_RE.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a routed-expert weight")
    prefix = f"decoder.layers.{match['j']}.mlp.experts."
    if match["seq_l"] is not None:
        return f"{prefix}local_experts.{local}.linear_fc{match['seq_fc']}.weight"
    return f"{prefix}linear_fc{match['grp_fc']}.weight{local}"


def map_megatron_name(
    name: str,
    arch: ModelArch,
    *,
    layer_number_of: Callable[[int], int] = lambda j: j + 1,
    expert_offset: int = 0,
) -> ParamMapping:
    """The mapping of megatron parameter or persistent buffer `name` (as in `GPTModel.named_parameters()` /
    `persistent_buffers` of one chunk), by the family of `arch`. Routed-expert weights (both megatron namings) are
    mapped here for every family: fc1 = [gate; up] per expert-TP shard (GATE_UP, split dim 0), fc2 = down (split
    dim 1), with the HF names of global expert `expert_offset + l` from the family's `routed_expert_hf_names`.

    layer_number_of(j): the global 1-based `layer_number` of `decoder.layers.{j}` in this chunk (PP/VP offset).
    expert_offset: global id of this rank's first local expert (ep_rank * num_local_experts).
    """
    family = _family(arch)
    expert = routed_expert_of(name)
    if expert is None:
        return family.map_megatron_name(name, arch, layer_number_of=layer_number_of, expert_offset=expert_offset)
    j, projection, local = expert
    layer, e = layer_number_of(j) - 1, expert_offset + local
    if not 0 <= e < arch.num_experts:
        raise MappingError(f"{name!r}: global expert id {e} outside [0, {arch.num_experts})")
    hf_names = tuple(family.routed_expert_hf_names(arch, layer, e, projection))
    if len(hf_names) != (2 if projection == "fc1" else 1):
        raise MappingError(f"{name!r}: the {family.name} family names {hf_names} for {projection}; the mapping needs "
                           "(gate, up) for fc1 (SwiGLU experts) and (down,) for fc2")
    if projection == "fc1":
        return ParamMapping(name, hf_names, GATE_UP, 0, expert_id=e, layer=layer)
    return ParamMapping(name, hf_names, COPY, 1, expert_id=e, layer=layer)


def persistent_buffers(module: torch.nn.Module):
    """(name, tensor) of every persistent buffer of `module` (what `state_dict` saves besides parameters: e.g. the
    router's `expert_bias`); non-persistent ones (token counters, caches) are model state, not weights."""
    for module_name, sub in module.named_modules():
        for buffer_name, tensor in sub._buffers.items():
            if tensor is not None and buffer_name not in sub._non_persistent_buffers_set:
                yield (f"{module_name}.{buffer_name}" if module_name else buffer_name), tensor


_STACKED_EXPERTS_RE = re.compile(r"^decoder\.layers\.\d+\.mlp\.experts\.linear_fc[12]\.weight$")


def per_expert_named_parameters(module: torch.nn.Module):
    """`module.named_parameters()` with each stacked routed-expert weight (`GroupedExperts`'
    `...mlp.experts.linear_fc{1,2}.weight` `[E_local, out, in]`) replaced by its experts' views, named as TE's
    `GroupedLinear` names them (`...linear_fc{1,2}.weight{l}`): loading writes through the views, export reads them."""
    for name, tensor in module.named_parameters():
        if _STACKED_EXPERTS_RE.match(name) and tensor.dim() == 3:
            for local, view in enumerate(tensor.detach().unbind(0)):
                yield f"{name}{local}", view
        else:
            yield name, tensor


def chunk_param_mappings(chunk: torch.nn.Module, arch: ModelArch, *, expert_offset: int = 0):
    """[(tensor, ParamMapping)] for every parameter *and persistent buffer* of one megatron model chunk, with global
    layer numbers read from each layer's `layer_number` (so PP and VP offsets come from megatron itself). A buffer
    the family does not map raises `MappingError` rather than being dropped."""
    module = getattr(chunk, "module", chunk)  # DDP / Float16Module wrappers
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    layers = module.decoder.layers if getattr(module, "decoder", None) is not None else []

    def layer_number_of(j: int) -> int:
        return int(layers[j].layer_number)

    tensors = list(per_expert_named_parameters(module)) + list(persistent_buffers(module))
    return [
        (tensor, map_megatron_name(name, arch, layer_number_of=layer_number_of, expert_offset=expert_offset))
        for name, tensor in tensors
    ]


def hf_checkpoint_names(arch: ModelArch) -> list[str]:
    """Every checkpoint tensor name of the model, in the deterministic export order (the family's; for Qwen:
    embedding, layers 0..L-1, final norm, lm_head, which is absent with tied embeddings as `save_pretrained`
    writes it)."""
    return _family(arch).hf_checkpoint_names(arch)


def hf_checkpoint_shape(arch: ModelArch, name: str) -> tuple[int, ...]:
    """The shape of checkpoint tensor `name`."""
    return _family(arch).hf_checkpoint_shape(arch, name)


# ------------------------------------------------------------------------------------------------ tensor transforms
def qkv_interleave(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """HF q [heads*d, ...], k/v [groups*d, ...] -> megatron linear_qkv [groups * (heads_per_group + 2) * d, ...]."""
    g, hpg, d = arch.num_query_groups, arch.heads_per_group, arch.head_dim
    rest = tuple(q.shape[1:])
    fused = torch.cat([q.reshape(g, hpg * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
    return fused.reshape(g * (hpg + 2) * d, *rest)


def qkv_split(qkv: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `qkv_interleave` for the full (TP-gathered) tensor."""
    g, hpg, d = arch.num_query_groups, arch.heads_per_group, arch.head_dim
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(g, (hpg + 2) * d, *rest)
    q, k, v = torch.split(grouped, [hpg * d, d, d], dim=1)
    return (
        q.reshape(g * hpg * d, *rest).contiguous(),
        k.reshape(g * d, *rest).contiguous(),
        v.reshape(g * d, *rest).contiguous(),
    )


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        raise MappingError(f"vocabulary of {tensor.shape[0]} rows does not fit a padded vocabulary of {rows}")
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0],) + tuple(tensor.shape[1:]))], dim=0)


def to_megatron_shard(
    mapping: ParamMapping,
    hf: Mapping[str, torch.Tensor],
    arch: ModelArch,
    *,
    tp_size: int = 1,
    tp_rank: int = 0,
    local_shape: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """This rank's megatron shard of `mapping`'s parameter from the HF tensors in `hf` (needs `mapping.hf_names`).

    tp_size/tp_rank: the tensor-parallel group of the parameter (expert-TP group for routed experts).
    local_shape: the megatron parameter's shape; needed for a padded vocabulary, checked otherwise.
    """
    missing = [n for n in mapping.hf_names if n not in hf]
    if missing:
        raise MappingError(f"{mapping.megatron_name}: missing checkpoint tensors {missing}")
    tensors = [hf[n] for n in mapping.hf_names]
    for name, tensor in zip(mapping.hf_names, tensors):
        expected = hf_checkpoint_shape(arch, name)
        if tuple(tensor.shape) != expected:
            raise MappingError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
    dim = mapping.tp_dim
    if mapping.kind == QKV:
        full = qkv_interleave(*tensors, arch)
        shard = full.chunk(tp_size, dim=0)[tp_rank] if dim is not None else full
    elif mapping.kind == GATE_UP:
        gate, up = tensors
        shard = torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    else:
        full = tensors[0]
        if mapping.vocab and local_shape is not None:
            full = _pad_rows(full, int(local_shape[0]) * tp_size)
        shard = full.chunk(tp_size, dim=dim)[tp_rank] if dim is not None and tp_size > 1 else full
    if local_shape is not None and tuple(shard.shape) != tuple(local_shape):
        raise MappingError(
            f"{mapping.megatron_name}: built a shard of shape {tuple(shard.shape)} from {mapping.hf_names}, the "
            f"parameter has shape {tuple(local_shape)} (tp_size={tp_size})"
        )
    return shard.contiguous()


def from_megatron_shards(
    mapping: ParamMapping, shards: Sequence[torch.Tensor], arch: ModelArch
) -> dict[str, torch.Tensor]:
    """Full HF checkpoint tensors from the TP shards of `mapping`'s parameter (in TP rank order; a single tensor
    for replicated parameters or TP = 1). Vocabulary padding is dropped."""
    dim = mapping.tp_dim
    if mapping.kind == GATE_UP:
        halves = [shard.chunk(2, dim=0) for shard in shards]
        gate = torch.cat([h[0] for h in halves], dim=0)
        up = torch.cat([h[1] for h in halves], dim=0)
        out = dict(zip(mapping.hf_names, (gate, up)))
    else:
        full = shards[0] if dim is None or len(shards) == 1 else torch.cat(list(shards), dim=dim)
        if mapping.kind == QKV:
            out = dict(zip(mapping.hf_names, qkv_split(full, arch)))
        else:
            if mapping.vocab:
                full = full[: arch.vocab_size]
            out = {mapping.hf_names[0]: full}
    result = {}
    for name, tensor in out.items():
        expected = hf_checkpoint_shape(arch, name)
        if tuple(tensor.shape) != expected:
            raise MappingError(f"{mapping.megatron_name} -> {name!r}: shape {tuple(tensor.shape)}, expected {expected}")
        result[name] = tensor.contiguous()
    return result
