"""One parallel context: this rank's place in megatron's parallel layout, its process groups, and the named rules
the rest of the package asks about ("owns distinct tokens", "is the dense export source", "data-parallel owner of
sample i").

Why one object: the same facts were read in many places, each from megatron's global `parallel_state` at the time
of the call, and each place re-derived its own rule from raw ranks (`tp_rank == 0`, `dp_rank_with_cp == 0`, ...).
A new parallel layout then meant finding every such place. Here the context is built once, after
`platform.distributed.initialize_model_parallel`, and passed explicitly; every rule is a pure function of the
sizes and this rank's coordinates, so it is unit-tested over whole layouts without a process group.

Coordinates follow megatron's rank ordering (`parallel_state.RankGenerator`): with the default order
`tp-cp-ep-dp-pp` the first axis varies fastest, so on the dense grid
`rank = tp + TP * (cp + CP * (dp + DP * pp))` and on the expert grid (CP folded into the expert data-parallel axis)
`rank = etp + ETP * (ep + EP * (edp + EDP * pp))`. `ParallelContext.for_rank` computes them from the sizes alone
(unit tests, layout math); `ParallelContext.build` takes megatron's `ProcessGroupCollection` and checks that its
groups put this rank where the order says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

DEFAULT_ORDER = "tp-cp-ep-dp-pp"  # megatron's `initialize_model_parallel(order=...)` default
_DENSE_AXES = ("tp", "cp", "dp", "pp")
_EXPERT_AXES = ("tp", "ep", "dp", "pp")  # megatron's expert RankGenerator: tp = expert-TP, dp = expert-DP, cp = 1


@dataclass(frozen=True)
class ParallelSizes:
    """Megatron's model-parallel sizes (flag names without the dashes)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None

    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def check_world(self, world_size: int) -> None:
        """Raise ValueError unless `world_size` ranks split into this layout (dense and expert grids alike)."""
        tp, pp, cp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.context_parallel_size
        if world_size % self.model_parallel_size() != 0:
            raise ValueError(f"world size {world_size} is not divisible by tensor x pipeline x context parallel size "
                             f"{tp} x {pp} x {cp}")
        expert = self.expert_tensor_size() * self.expert_model_parallel_size * pp
        if world_size % expert != 0:
            raise ValueError(f"world size {world_size} is not divisible by expert-tensor x expert x pipeline parallel "
                             f"size {self.expert_tensor_size()} x {self.expert_model_parallel_size} x {pp}")

    def expert_tensor_size(self) -> int:
        """Expert-TP size; megatron's default (None) is the tensor-parallel size."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size


def _coordinates(rank: int, order: str, axes: tuple[str, ...], sizes: dict[str, int]) -> dict[str, int]:
    """This rank's index along each of `axes`, megatron's ordering: the first axis of `order` varies fastest."""
    names = [name for name in order.split("-") if name in axes]
    out, rest = {}, rank
    for name in names:
        out[name] = rest % sizes[name]
        rest //= sizes[name]
    return out


@dataclass(frozen=True)
class ParallelContext:
    """This rank's coordinates and groups in megatron's parallel layout, and the rules derived from them.

    Build it once (`build` from megatron's groups, or `for_rank` from sizes alone) and pass it explicitly. Every
    property and method below is a pure function of the sizes and coordinates; groups are only carried."""

    sizes: ParallelSizes
    world_size: int
    rank: int
    # sequence parallelism (megatron's --sequence-parallel): TP ranks then hold distinct token slices
    sequence_parallel: bool = False
    order: str = DEFAULT_ORDER
    # megatron's ProcessGroupCollection (tp, pp, cp, ep, expt_tp, dp, dp_cp, expt_dp, ...); None without a process group
    groups: Any = field(default=None, compare=False, repr=False)
    # the gloo group over the whole world for host-side agreements (`distributed.host_group()`); None in a world of one
    host_group: Any = field(default=None, compare=False, repr=False)
    # filled from the sizes and rank by __post_init__
    tp_rank: int = field(init=False)
    cp_rank: int = field(init=False)
    dp_rank: int = field(init=False)
    pp_rank: int = field(init=False)
    etp_rank: int = field(init=False)
    ep_rank: int = field(init=False)
    expert_dp_rank: int = field(init=False)

    def __post_init__(self) -> None:
        self.sizes.check_world(self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")
        vp = self.sizes.virtual_pipeline_model_parallel_size
        if vp is not None and self.sizes.pipeline_model_parallel_size < 2:
            raise ValueError(f"virtual pipeline size {vp} needs pipeline parallel size >= 2 (megatron's interleaved "
                             f"schedule); drop --num-layers-per-virtual-pipeline-stage or raise PP")
        if sorted(self.order.split("-")) != sorted(("tp", "cp", "ep", "dp", "pp")):
            raise ValueError(f"order {self.order!r} must name tp, cp, ep, dp and pp once each (megatron's order)")
        dense = _coordinates(self.rank, self.order, _DENSE_AXES, {"tp": self.tp_size, "cp": self.cp_size,
                                                                   "dp": self.dp_size, "pp": self.pp_size})
        expert = _coordinates(self.rank, self.order, _EXPERT_AXES, {"tp": self.etp_size, "ep": self.ep_size,
                                                                     "dp": self.expert_dp_size, "pp": self.pp_size})
        for name, value in (("tp_rank", dense["tp"]), ("cp_rank", dense["cp"]), ("dp_rank", dense["dp"]),
                            ("pp_rank", dense["pp"]), ("etp_rank", expert["tp"]), ("ep_rank", expert["ep"]),
                            ("expert_dp_rank", expert["dp"])):
            object.__setattr__(self, name, value)
        if expert["pp"] != dense["pp"]:  # megatron asserts the same; unreachable with pp last or equal dp sizes
            raise ValueError(f"order {self.order!r} gives rank {self.rank} different pipeline stages on the dense "
                             f"and expert grids; put pp last")

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_rank(cls, sizes: ParallelSizes, world_size: int, rank: int, *, sequence_parallel: bool = False,
                 order: str = DEFAULT_ORDER) -> "ParallelContext":
        """The context of global `rank` in a world of `world_size`, without process groups (layout math, tests)."""
        return cls(sizes=sizes, world_size=world_size, rank=rank, sequence_parallel=sequence_parallel, order=order)

    def peer(self, rank: int) -> "ParallelContext":
        """The context of another global `rank` of the same layout, without groups: e.g. rank 0 works out which
        samples each rank trains (`peer(r).owns_sample(i, G)`) without gathering anything."""
        return ParallelContext.for_rank(self.sizes, self.world_size, rank, sequence_parallel=self.sequence_parallel,
                                        order=self.order)

    @classmethod
    def build(cls, sizes: ParallelSizes, pg_collection, *, host_group=None, sequence_parallel: bool = False,
              order: str = DEFAULT_ORDER) -> "ParallelContext":
        """This rank's context from megatron's `ProcessGroupCollection` (e.g. `use_mpu_process_groups()` after
        `initialize_model_parallel(sizes)`). Raises ValueError when a group disagrees with `sizes` and `order`."""
        import torch.distributed as dist

        if dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
        else:
            world_size, rank = 1, 0
        context = cls(sizes=sizes, world_size=world_size, rank=rank, sequence_parallel=sequence_parallel, order=order,
                      groups=pg_collection, host_group=host_group)
        if pg_collection is not None:
            context.check_groups()
        return context

    def check_groups(self) -> None:
        """Raise ValueError unless each carried group has this rank where the sizes and order put it."""
        expected = {
            "tp": (self.tp_rank, self.tp_size), "cp": (self.cp_rank, self.cp_size),
            "dp": (self.dp_rank, self.dp_size), "pp": (self.pp_rank, self.pp_size),
            "dp_cp": (self.dp_cp_rank, self.dp_size * self.cp_size), "ep": (self.ep_rank, self.ep_size),
            "expt_tp": (self.etp_rank, self.etp_size), "expt_dp": (self.expert_dp_rank, self.expert_dp_size),
        }
        wrong = []
        for name, (rank, size) in expected.items():
            group = getattr(self.groups, name, None)
            if group is None:
                continue
            got = (group.rank(), group.size())
            if got != (rank, size):
                wrong.append(f"{name} group has this rank at {got[0]} of {got[1]}, the layout says {rank} of {size}")
        if wrong:
            raise ValueError(f"rank {self.rank}: the process groups do not match sizes {self.sizes} with order "
                             f"{self.order!r}: " + "; ".join(wrong) + " (build the context from the sizes and order "
                             "the groups were initialised with)")

    # ------------------------------------------------------------------ sizes
    @property
    def tp_size(self) -> int:
        return self.sizes.tensor_model_parallel_size

    @property
    def cp_size(self) -> int:
        return self.sizes.context_parallel_size

    @property
    def pp_size(self) -> int:
        return self.sizes.pipeline_model_parallel_size

    @property
    def vp_size(self) -> Optional[int]:
        """Virtual pipeline chunks per rank; None without interleaving (megatron's convention)."""
        return self.sizes.virtual_pipeline_model_parallel_size

    @property
    def ep_size(self) -> int:
        return self.sizes.expert_model_parallel_size

    @property
    def etp_size(self) -> int:
        return self.sizes.expert_tensor_size()

    @property
    def dp_size(self) -> int:
        """Data-parallel size without CP: the ranks that train distinct samples."""
        return self.world_size // self.sizes.model_parallel_size()

    @property
    def expert_dp_size(self) -> int:
        """Expert data-parallel size: replicas of each expert shard (CP folded in, as megatron does)."""
        return self.world_size // (self.etp_size * self.ep_size * self.pp_size)

    @property
    def dp_cp_rank(self) -> int:
        """Rank in the data-parallel group with CP (megatron's `get_data_parallel_rank(with_context_parallel=True)`):
        the ranks that hold one replica of the dense weights."""
        if self.order.index("cp") < self.order.index("dp"):  # the earlier axis of the order varies fastest
            return self.cp_rank + self.cp_size * self.dp_rank
        return self.dp_rank + self.dp_size * self.cp_rank

    # ------------------------------------------------------------------ pipeline
    def vp_stages(self) -> list[Optional[int]]:
        """The virtual-pipeline stage of each model chunk this rank builds: `[0..vp)`, or `[None]` without VP."""
        return list(range(self.vp_size)) if self.vp_size else [None]

    def is_first_pipeline_stage(self, vp_stage: Optional[int] = None) -> bool:
        """Holds the embedding: first pipeline rank and, for a virtual chunk `vp_stage`, the first chunk. With
        `vp_stage=None` the virtual chunks are ignored (megatron's `ignore_virtual=True`)."""
        return self.pp_rank == 0 and (vp_stage is None or self._vp_stage(vp_stage) == 0)

    def is_last_pipeline_stage(self, vp_stage: Optional[int] = None) -> bool:
        """Holds the output layer (computes logits and the loss); `vp_stage` as in `is_first_pipeline_stage`."""
        last_chunk = (self.vp_size or 1) - 1
        return self.pp_rank == self.pp_size - 1 and (vp_stage is None or self._vp_stage(vp_stage) == last_chunk)

    def _vp_stage(self, vp_stage: int) -> int:
        if not 0 <= vp_stage < (self.vp_size or 1):
            raise ValueError(f"vp_stage {vp_stage} is outside this rank's {self.vp_size or 1} model chunk(s)")
        return vp_stage

    @property
    def is_pipelined(self) -> bool:
        """More than one pipeline stage: megatron's schedule then needs one sequence length for every microbatch."""
        return self.pp_size > 1

    # ------------------------------------------------------------------ named rules
    @property
    def is_global_rank_zero(self) -> bool:
        """Rank 0 of the world: talks to the rollout engine, writes files and logs."""
        return self.rank == 0

    @property
    def owns_distinct_tokens(self) -> bool:
        """Whether this rank's per-token tallies (router agreement counters, replayed tokens) are its own and must
        be summed: CP and DP ranks always see distinct tokens, TP ranks only with sequence parallelism (without
        it every TP rank sees the same tokens, and TP rank 0 counts them). Pipeline stages see the same tokens
        through different layers: count per-layer tallies on every stage, whole-token tallies on the first."""
        return self.sequence_parallel or self.tp_rank == 0

    @property
    def computes_loss(self) -> bool:
        """Whether this rank counts the per-token loss values: last pipeline stage (it has the logits), TP rank 0
        (the vocabulary-parallel reductions leave the same values on every TP rank)."""
        return self.is_last_pipeline_stage() and self.tp_rank == 0

    @property
    def is_dense_export_source(self) -> bool:
        """Whether this rank's dense (non-expert) shards are the copy exported: data-parallel rank 0 with CP."""
        return self.dp_cp_rank == 0

    @property
    def is_expert_export_source(self) -> bool:
        """Whether this rank's routed-expert shards are the copy exported: expert-data-parallel rank 0."""
        return self.expert_dp_rank == 0

    def tensor_split(self, is_expert: bool) -> tuple[int, int, Any]:
        """(size, rank, group) of the tensor-parallel split of a parameter: expert-TP for routed experts, TP
        otherwise. The group is None without process groups."""
        if is_expert:
            return self.etp_size, self.etp_rank, getattr(self.groups, "expt_tp", None)
        return self.tp_size, self.tp_rank, getattr(self.groups, "tp", None)

    def local_experts(self, num_experts: int) -> range:
        """The global indices of the routed experts this expert-parallel rank holds."""
        if num_experts % self.ep_size:
            raise ValueError(f"{num_experts} experts do not split over expert parallel size {self.ep_size}")
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def _per_rank_samples(self, global_batch_size: int) -> int:
        if global_batch_size <= 0 or global_batch_size % self.dp_size:
            raise ValueError(f"--global-batch-size {global_batch_size} is not divisible by data-parallel size "
                             f"{self.dp_size}")
        return global_batch_size // self.dp_size

    def data_parallel_owner(self, sample_index: int, global_batch_size: int) -> int:
        """The data-parallel rank that trains sample `sample_index` of a step: mini-batch m is samples
        `[m*G, (m+1)*G)` (G = `global_batch_size`) and data-parallel rank r trains the r-th of `dp` equal
        contiguous slices of it, so every layout optimises the same global mini-batches."""
        return (sample_index % global_batch_size) // self._per_rank_samples(global_batch_size)

    def owns_sample(self, sample_index: int, global_batch_size: int) -> bool:
        """Whether this rank's data-parallel rank trains sample `sample_index` (`data_parallel_owner`)."""
        return self.data_parallel_owner(sample_index, global_batch_size) == self.dp_rank

    def minibatch_slice(self, minibatch: int, global_batch_size: int) -> slice:
        """The positions of the step's batch that this rank trains in mini-batch `minibatch`."""
        per_rank = self._per_rank_samples(global_batch_size)
        start = minibatch * global_batch_size + self.dp_rank * per_rank
        return slice(start, start + per_rank)
