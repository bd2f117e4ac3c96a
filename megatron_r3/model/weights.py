"""HF checkpoint tensors <-> this rank's Megatron model chunks, with explicit process groups.

Parameters *and persistent buffers* (e.g. a router's `expert_bias`) are walked alike
(`hf_mapping.chunk_param_mappings`); an unmapped buffer is an error, never silently dropped.

(a) `load_hf_weights(chunks, source, arch, parallel)`: every rank reads only the checkpoint tensors its own
    parameters need (its TP / expert-TP slice, its experts, its layers) from a state dict or a safetensors directory
    (single file or sharded with `model.safetensors.index.json`), and copies its shard in.
(b) `export_hf_weights(chunks, arch, parallel)`: an iterator of (HF checkpoint name, full tensor) in the fixed order of
    `hf_mapping.hf_checkpoint_names` (expert order within a layer: gate/up of every expert, then down of every
    expert), gathering across TP, expert-TP, EP and PP. It holds at most one parameter's full tensors at a time
    (routed experts: one layer's experts of one projection), never the model.

    Which ranks do what. Only one copy of the weights is read: dense parameters from the ranks with data-parallel
    (incl. context-parallel) rank 0, routed experts from the ranks with expert-data-parallel rank 0. Each parameter
    is gathered onto its group leader (TP rank 0; for experts expert-TP rank 0, then EP rank 0 of those), and the
    leader sends it to **global rank 0** point to point (nothing moves when the leader is rank 0). With
    `receivers="rank0"` (default) only global rank 0 gets tensors; every other rank yields the same names with
    `None`. With `receivers="all"` rank 0 broadcasts each tensor to the whole world (e.g. one in-process rollout
    engine per data-parallel rank). Every rank of the world must consume the iterator to the end, in lockstep order
    of names (it drives the collectives); ranks with nothing to contribute just walk the names.
    `bucket_bytes` groups consecutive tensors into lists of at most that many bytes (`export_hf_buckets`); bucket
    boundaries come from shapes and dtypes known on every rank, so they agree everywhere.
(c) `save_hf_checkpoint(chunks, arch, hf_config, directory, parallel)`: the export written by global rank 0 as
    safetensors shards (+ `model.safetensors.index.json` when there are several) and `config.json`.

Every function takes this rank's `ParallelContext` (its coordinates, megatron's process groups, the host group, and
which ranks are the export sources); a world of one without model parallelism needs no process group
(`ParallelContext.for_rank(ParallelSizes(), 1, 0)`). Object collectives (the once-per-call plan) go over the gloo
host group.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from megatron_r3.model.hf_mapping import (
    GATE_UP,
    MappingError,
    ParamMapping,
    chunk_param_mappings,
    from_megatron_shards,
    hf_checkpoint_names,
    hf_checkpoint_shape,
    map_megatron_name,
    routed_expert_name,
    to_megatron_shard,
)
from megatron_r3.model.families import ModelArch, family_for
from megatron_r3.model.hf_load_config import HFLoadConfig, check_mtp_checkpoint_tensors
from megatron_r3.model.safetensors_writer import DEFAULT_MAX_SHARD_BYTES, SAFE_INDEX, write_hf_directory
from megatron_r3.platform import collectives
from megatron_r3.platform.buckets import iter_buckets
from megatron_r3.platform.dtypes import torch_dtype
from megatron_r3.platform.parallel_context import ParallelContext


def model_mappings(chunks, arch: ModelArch, parallel: ParallelContext) -> list[tuple[torch.nn.Parameter, ParamMapping]]:
    """[(parameter, mapping)] of every parameter of this rank's chunks."""
    offset = parallel.local_experts(arch.num_experts).start
    out = []
    for chunk in chunks:
        out.extend(chunk_param_mappings(chunk, arch, expert_offset=offset))
    return out


# ================================================================================================ (a) load
class TensorSource:
    """Read-only access to checkpoint tensors by HF name."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def close(self) -> None:
        pass


class StateDictSource(TensorSource):
    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state

    def names(self) -> list[str]:
        return list(self.state)

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


class SafetensorsSource(TensorSource):
    """A HF model directory: `model.safetensors`, or shards listed in `model.safetensors.index.json`, or any set of
    `*.safetensors` files. Files are opened lazily and read one tensor at a time."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.directory = directory
        index = os.path.join(directory, SAFE_INDEX)
        if os.path.exists(index):
            with open(index) as handle:
                self.weight_map = dict(json.load(handle)["weight_map"])
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no safetensors files in {directory}")
            self.weight_map = {}
            for file in files:
                with safe_open(os.path.join(directory, file), framework="pt") as handle:
                    for name in handle.keys():
                        self.weight_map[name] = file
        self._handles: dict[str, Any] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = self._safe_open(os.path.join(self.directory, file), framework="pt")
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def as_tensor_source(source) -> TensorSource:
    if isinstance(source, TensorSource):
        return source
    if isinstance(source, (str, os.PathLike)):
        return SafetensorsSource(os.fspath(source))
    if isinstance(source, torch.nn.Module):
        from megatron_r3.model.hf_module import hf_state_dict_to_checkpoint_names

        return StateDictSource(dict(hf_state_dict_to_checkpoint_names(source)))
    if isinstance(source, Mapping):
        return StateDictSource(source)
    raise TypeError(f"cannot read checkpoint tensors from {type(source).__name__}")


class _Needed(Mapping):
    """The few checkpoint tensors one parameter needs, read on demand (tied output layer falls back to the embedding
    when the checkpoint has no lm_head.weight)."""

    def __init__(self, source: TensorSource, names):
        self.source, self.names = source, names

    def __getitem__(self, name):
        if name not in self.names:
            raise KeyError(name)
        return self.source.get(name)

    def __iter__(self):
        return iter(n for n in self.names if n in self.source)

    def __len__(self):
        return sum(1 for _ in self)

    def __contains__(self, name):
        return name in self.names and name in self.source


@torch.no_grad()
def load_hf_weights(chunks, source, arch: ModelArch, parallel: ParallelContext,
                    config: Optional[HFLoadConfig] = None) -> int:
    """Copy this rank's shard of every parameter of `chunks` from HF checkpoint tensors.

    source: a `{name: tensor}` mapping in checkpoint names, a live HF model, a safetensors directory, or a
    `TensorSource`. No collectives: each rank reads what it needs. Returns the number of parameters loaded;
    raises `MappingError` naming every missing or misshapen tensor, and for a checkpoint's MTP tensors unless
    `config.mtp_checkpoint_tensors` is "skip" (`hf_load_config.check_mtp_checkpoint_tensors`).
    """
    src = as_tensor_source(source)
    problems, count = [], 0
    try:
        check_mtp_checkpoint_tensors(arch, src.names(), config or HFLoadConfig())
        for param, mapping in model_mappings(chunks, arch, parallel):
            size, rank, _ = parallel.tensor_split(mapping.is_expert)
            try:
                shard = to_megatron_shard(
                    mapping, _Needed(src, mapping.hf_names), arch, tp_size=size, tp_rank=rank, local_shape=param.shape
                )
            except MappingError as exc:
                problems.append(str(exc))
                continue
            param.data.copy_(shard.to(device=param.device, dtype=param.dtype))
            count += 1
    finally:
        if src is not source:
            src.close()
    if problems:
        raise MappingError("loading HF weights failed:\n- " + "\n- ".join(problems))
    return count


# ================================================================================================ (b) export
@dataclass(frozen=True)
class _Item:
    """One unit of export: a dense parameter, or one projection of all routed experts of one layer."""

    key: int  # position of its first name in the global order
    names: tuple[str, ...]
    leader: int  # global rank that ends up with the full tensors
    dtype: str
    expert: Optional[tuple[int, str]] = None  # (layer, "fc1" | "fc2") of a routed-experts item
    buffer: bool = False  # a persistent buffer (e.g. expert_bias): exported in its own dtype, never cast


def _expert_item_names(arch: ModelArch, layer: int, projection: str) -> tuple[str, ...]:
    return family_for(arch.model_type).expert_hf_names(arch, layer, projection)


def export_order(arch: ModelArch) -> list[str]:
    """The HF names in the order `export_hf_weights` yields them: `hf_checkpoint_names` with each MoE layer's
    routed experts (the family's `expert_hf_names`) reordered to gate/up of every expert, then down of every
    expert (one gather per projection), at the place of the layer's first expert name."""
    expert_layer = {
        name: layer
        for layer, moe in enumerate(arch.moe_layers) if moe
        for projection in ("fc1", "fc2")
        for name in _expert_item_names(arch, layer, projection)
    }
    out, emitted = [], set()
    for name in hf_checkpoint_names(arch):
        layer = expert_layer.get(name)
        if layer is None:
            out.append(name)
        elif layer not in emitted:
            emitted.add(layer)
            out += list(_expert_item_names(arch, layer, "fc1")) + list(_expert_item_names(arch, layer, "fc2"))
    return out


class _LocalPlan:
    """This rank's part in every export item: which parameter(s) it holds and its role."""

    def __init__(self, chunks, arch: ModelArch, parallel: ParallelContext):
        self.arch, self.parallel = arch, parallel
        self.rank, self.world = parallel.rank, parallel.world_size
        self.dense: dict[str, tuple[torch.nn.Parameter, ParamMapping]] = {}  # first hf name -> (param, mapping)
        self.experts: dict[tuple[int, str], list[tuple[torch.nn.Parameter, ParamMapping]]] = {}
        for param, mapping in model_mappings(chunks, arch, parallel):
            if mapping.tied:
                continue  # the embedding is exported from the first stage
            if mapping.is_expert:
                projection = "fc1" if mapping.kind == GATE_UP else "fc2"
                self.experts.setdefault((mapping.layer, projection), []).append((param, mapping))
            else:
                self.dense[mapping.hf_names[0]] = (param, mapping)
        for entries in self.experts.values():
            entries.sort(key=lambda entry: entry[1].expert_id)

    def led_items(self, order: dict[str, int]) -> list[_Item]:
        """Items this rank leads (ends up holding in full)."""
        p = self.parallel
        items = []
        if p.is_dense_export_source and p.tp_rank == 0:
            for first, (param, mapping) in self.dense.items():
                buffer = not isinstance(param, torch.nn.Parameter)
                items.append(_Item(order[first], mapping.hf_names, self.rank, str(param.dtype), buffer=buffer))
        if p.is_expert_export_source and p.etp_rank == 0 and p.ep_rank == 0:
            for (layer, projection), entries in self.experts.items():
                names = _expert_item_names(self.arch, layer, projection)
                items.append(_Item(order[names[0]], names, self.rank, str(entries[0][0].dtype), (layer, projection)))
        return items


def _gather_to_leader(tensor: torch.Tensor, size: int, group, rank_in_group: int) -> Optional[list[torch.Tensor]]:
    """Gather equal-shaped `tensor`s of a group onto its rank 0 (in group-rank order); None elsewhere."""
    if size == 1:
        return [tensor]
    tensor = tensor.contiguous()
    if rank_in_group == 0:
        out = [torch.empty_like(tensor) for _ in range(size)]
        collectives.gather(tensor, out, dst=dist.get_global_rank(group, 0), group=group)
        return out
    collectives.gather(tensor, None, dst=dist.get_global_rank(group, 0), group=group)
    return None


class _Exporter:
    def __init__(self, chunks, arch: ModelArch, parallel: ParallelContext, receivers: str,
                 dtype: Optional[torch.dtype]):
        if receivers not in ("rank0", "all"):
            raise ValueError(f"receivers must be 'rank0' or 'all', got {receivers!r}")
        self.arch, self.parallel, self.receivers, self.cast = arch, parallel, receivers, dtype
        self.local = _LocalPlan(chunks, arch, parallel)
        self.rank, self.world = self.local.rank, self.local.world
        self.names = export_order(arch)
        order = {name: i for i, name in enumerate(self.names)}
        led = self.local.led_items(order)
        if self.world > 1:
            gathered: list = [None] * dist.get_world_size(parallel.host_group)
            dist.all_gather_object(gathered, led, group=parallel.host_group)
            led = [item for items in gathered for item in items]
        self.items = sorted(led, key=lambda item: item.key)
        covered = [name for item in self.items for name in item.names]
        if covered != self.names:
            missing = sorted(set(self.names) - set(covered))
            extra = sorted({n for n in covered if covered.count(n) > 1})
            raise MappingError(
                f"the model chunks of all ranks do not add up to the HF model: missing {missing[:8]}"
                f"{'...' if len(missing) > 8 else ''}, duplicated {extra[:8]}"
            )
        device = None
        for chunk in chunks:
            for param in chunk.parameters():
                device = param.device
                break
        self.device = device or torch.device("cpu")

    def _cast_of(self, item: _Item) -> Optional[torch.dtype]:
        """The export dtype of `item`: `dtype` for parameters; buffers keep theirs (megatron keeps e.g. the router's
        expert_bias in fp32 on purpose: a bf16 copy would move routing decisions)."""
        return None if item.buffer else self.cast

    def nbytes(self) -> dict[str, int]:
        out = {}
        for item in self.items:
            dtype = self._cast_of(item) or torch_dtype(item.dtype)
            for name in item.names:
                numel = 1
                for dim in hf_checkpoint_shape(self.arch, name):
                    numel *= dim
                out[name] = numel * dtype.itemsize
        return out

    # ---------------------------------------------------------------------------------------------------- items
    def _dense(self, item: _Item) -> Optional[dict[str, torch.Tensor]]:
        """Full tensors on the item's leader, None elsewhere (after this rank's part in the TP gather)."""
        held = self.local.dense.get(item.names[0])
        if held is None or not self.parallel.is_dense_export_source:
            return None
        param, mapping = held
        size, rank, group = self.parallel.tensor_split(mapping.is_expert)
        data = param.detach()
        if mapping.tp_dim is None or size == 1:
            shards = [data] if rank == 0 else None
        else:
            shards = _gather_to_leader(data, size, group, rank)
        if shards is None:
            return None
        return from_megatron_shards(mapping, shards, self.arch)

    def _experts(self, item: _Item) -> Optional[dict[str, torch.Tensor]]:
        p = self.parallel
        layer, projection = item.expert
        entries = self.local.experts.get((layer, projection))
        if not entries or not p.is_expert_export_source:
            return None
        stacked = torch.stack([param.detach() for param, _ in entries])  # [local experts, *shard]
        etp_size, etp_rank, etp_group = p.tensor_split(is_expert=True)
        etp_shards = _gather_to_leader(stacked, etp_size, etp_group, etp_rank)
        if etp_shards is None:
            return None
        by_etp = torch.stack(etp_shards)  # [etp, local experts, *shard]
        by_ep = _gather_to_leader(by_etp, p.ep_size, getattr(p.groups, "ep", None), p.ep_rank)
        if by_ep is None:
            return None
        local_count = len(entries)
        template = entries[0][1]
        out: dict[str, torch.Tensor] = {}
        for ep_rank, block in enumerate(by_ep):
            for local in range(local_count):
                mapping = map_megatron_name(
                    routed_expert_name(template.megatron_name, local),
                    self.arch,
                    layer_number_of=lambda j, n=template.layer: n + 1,
                    expert_offset=ep_rank * local_count,
                )
                out.update(from_megatron_shards(mapping, [block[t, local] for t in range(block.shape[0])], self.arch))
        return out

    def __iter__(self) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
        world_group = None  # the default group: the whole world, megatron's backend (NCCL on GPUs)
        for item in self.items:
            full = self._experts(item) if item.expert is not None else self._dense(item)
            cast = self._cast_of(item)
            if full is not None and cast is not None:
                full = {n: t.to(cast) for n, t in full.items()}
            dtype = cast or torch_dtype(item.dtype)
            for name in item.names:
                tensor = None
                if self.rank == item.leader:
                    tensor = full[name]
                    if item.leader != 0:
                        collectives.send(tensor.contiguous(), dst=0, group=world_group)
                        tensor = None
                elif self.rank == 0:
                    tensor = torch.empty(hf_checkpoint_shape(self.arch, name), dtype=dtype, device=self.device)
                    collectives.recv(tensor, src=item.leader, group=world_group)
                if self.receivers == "all" and self.world > 1:
                    if self.rank != 0:
                        tensor = torch.empty(hf_checkpoint_shape(self.arch, name), dtype=dtype, device=self.device)
                    collectives.broadcast(tensor, src=0, group=world_group)
                yield name, tensor


def export_hf_weights(
    chunks,
    arch: ModelArch,
    parallel: ParallelContext,
    *,
    receivers: str = "rank0",
    dtype: Optional[torch.dtype] = None,
) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """(HF checkpoint name, full tensor) for the whole model, in `export_order(arch)`; see the module docstring for
    which ranks receive tensors. `dtype` casts parameters on the leaders before anything moves (e.g. bf16 for a
    bf16 engine); persistent buffers keep their dtype.
    Every rank must run the iterator to the end."""
    exporter = _Exporter(chunks, arch, parallel, receivers, dtype)
    with torch.no_grad():
        yield from exporter


def export_hf_buckets(
    chunks,
    arch: ModelArch,
    parallel: ParallelContext,
    *,
    bucket_bytes: int,
    receivers: str = "rank0",
    dtype: Optional[torch.dtype] = None,
) -> Iterator[list[tuple[str, Optional[torch.Tensor]]]]:
    """`export_hf_weights` grouped into lists of consecutive tensors of at most `bucket_bytes` bytes each (a larger
    tensor forms a bucket of its own); identical bucket boundaries on every rank."""
    exporter = _Exporter(chunks, arch, parallel, receivers, dtype)
    sizes = exporter.nbytes()
    with torch.no_grad():
        yield from iter_buckets(exporter, bucket_bytes, lambda name, _tensor: sizes[name])


# ================================================================================================ (c) save
def save_hf_checkpoint(
    chunks,
    arch: ModelArch,
    hf_config,
    directory: str,
    parallel: ParallelContext,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: Optional[torch.dtype] = None,
) -> Optional[list[str]]:
    """Write the model as a HF directory (`safetensors_writer.write_hf_directory`) from global rank 0; every rank
    must call it (the export's gathers run on all of them). Returns the written file names on rank 0, None elsewhere."""
    rank, world = parallel.rank, parallel.world_size
    exported = export_hf_weights(chunks, arch, parallel, dtype=dtype)
    written = None
    if rank == 0:
        written = write_hf_directory(exported, directory, hf_config=hf_config, dtype=dtype,
                                     max_shard_bytes=max_shard_bytes)
    else:
        for _ in exported:  # this rank's part in the gathers
            pass
    if world > 1:
        dist.barrier(group=parallel.host_group)
    return written
