"""ParallelContext: coordinates against megatron's own rank ordering (RankGenerator, no process group needed), the
named rules over whole layouts, and one context built from megatron's real state in a world of one."""

from __future__ import annotations

import itertools

import pytest
from megatron.core.parallel_state import RankGenerator

from megatron_r3.platform.parallel_context import ParallelContext, ParallelSizes

ORDERS = ("tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp")  # megatron's default, and --use-tp-pp-dp-mapping's


def _layouts(max_world: int = 16):
    """Every small layout megatron's initialize_model_parallel accepts, with the world sizes that fit it."""
    for tp, pp, cp, ep, etp, order in itertools.product((1, 2, 4), (1, 2), (1, 2), (1, 2, 4), (None, 1, 2), ORDERS):
        sizes = ParallelSizes(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
                              expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
        for world in (1, 2, 4, 8, 16):
            if world > max_world:
                continue
            try:
                sizes.check_world(world)
            except ValueError:
                continue
            dp, edp = world // (tp * pp * cp), world // ((etp or tp) * ep * pp)
            if not (order.endswith("pp") or pp == 1 or edp == dp):  # megatron asserts this
                continue
            yield sizes, world, order


def _generators(sizes: ParallelSizes, world: int, order: str):
    """The dense and expert rank generators exactly as megatron's initialize_model_parallel builds them."""
    tp, pp, cp = sizes.tensor_model_parallel_size, sizes.pipeline_model_parallel_size, sizes.context_parallel_size
    etp, ep = sizes.expert_tensor_size(), sizes.expert_model_parallel_size
    dense = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp * cp), pp=pp, cp=cp, order=order)
    expert = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1, order=order)
    return dense, expert


def _position(groups: list[list[int]], rank: int) -> tuple[int, int, tuple[int, ...]]:
    """(index of `rank` in its group, group size, the group) among megatron's `groups`."""
    (group,) = [g for g in groups if rank in g]
    return group.index(rank), len(group), tuple(group)


LAYOUTS = list(_layouts())


def test_layouts_cover_the_interesting_cases():
    assert len(LAYOUTS) > 100
    assert any(s.context_parallel_size > 1 and s.expert_model_parallel_size > 1 for s, _, _ in LAYOUTS)
    assert any(s.expert_tensor_size() != s.tensor_model_parallel_size for s, _, _ in LAYOUTS)


def test_coordinates_match_megatron_rank_generator():
    for sizes, world, order in LAYOUTS:
        _check_coordinates(sizes, world, order)


def _check_coordinates(sizes, world, order):
    dense, expert = _generators(sizes, world, order)
    oracle = {
        "tp": dense.get_ranks("tp"), "cp": dense.get_ranks("cp"), "dp": dense.get_ranks("dp"),
        "pp": dense.get_ranks("pp"), "dp_cp": dense.get_ranks("dp-cp"), "ep": expert.get_ranks("ep"),
        "expt_tp": expert.get_ranks("tp"), "expt_dp": expert.get_ranks("dp"),
    }
    assert expert.get_ranks("pp") == oracle["pp"]
    for rank in range(world):
        ctx = ParallelContext.for_rank(sizes, world, rank, order=order)
        ours = {
            "tp": (ctx.tp_rank, ctx.tp_size), "cp": (ctx.cp_rank, ctx.cp_size), "dp": (ctx.dp_rank, ctx.dp_size),
            "pp": (ctx.pp_rank, ctx.pp_size), "dp_cp": (ctx.dp_cp_rank, ctx.dp_size * ctx.cp_size),
            "ep": (ctx.ep_rank, ctx.ep_size), "expt_tp": (ctx.etp_rank, ctx.etp_size),
            "expt_dp": (ctx.expert_dp_rank, ctx.expert_dp_size),
        }
        for name, groups in oracle.items():
            assert ours[name] == _position(groups, rank)[:2], (sizes, world, order, name, rank)


def test_named_rules_over_the_whole_layout():
    for sizes, world, order in LAYOUTS:
        _check_rules(sizes, world, order)


def _check_rules(sizes, world, order):
    dense, expert = _generators(sizes, world, order)
    contexts = [ParallelContext.for_rank(sizes, world, rank, order=order) for rank in range(world)]
    # one dense replica: exactly one source per (tp, pp) cell, and it is data-parallel-with-CP rank 0
    dense_sources = [c for c in contexts if c.is_dense_export_source]
    assert sorted((c.tp_rank, c.pp_rank) for c in dense_sources) == sorted(
        itertools.product(range(sizes.tensor_model_parallel_size), range(sizes.pipeline_model_parallel_size)))
    for group in dense.get_ranks("dp-cp"):
        assert [contexts[r].is_dense_export_source for r in group] == [True] + [False] * (len(group) - 1)
    # one expert replica: one source per (etp, ep, pp) cell, the first rank of each expert-data-parallel group
    expert_sources = [c for c in contexts if c.is_expert_export_source]
    assert len({(c.etp_rank, c.ep_rank, c.pp_rank) for c in expert_sources}) == len(expert_sources) == (
        sizes.expert_tensor_size() * sizes.expert_model_parallel_size * sizes.pipeline_model_parallel_size)
    for group in expert.get_ranks("dp"):
        assert [contexts[r].is_expert_export_source for r in group] == [True] + [False] * (len(group) - 1)
    # distinct tokens: one rank per TP group without SP, every rank with SP
    for group in dense.get_ranks("tp"):
        assert sum(contexts[r].owns_distinct_tokens for r in group) == 1
        sp = [ParallelContext.for_rank(sizes, world, r, order=order, sequence_parallel=True) for r in group]
        assert all(c.owns_distinct_tokens for c in sp)
    # the loss: one rank per (cp, dp) position, on the last pipeline stage
    losses = [c for c in contexts if c.computes_loss]
    assert sorted((c.cp_rank, c.dp_rank) for c in losses) == sorted(
        itertools.product(range(sizes.context_parallel_size), range(contexts[0].dp_size)))
    assert all(c.pp_rank == sizes.pipeline_model_parallel_size - 1 for c in losses)
    # the same rank of the pipeline group holds the first stage in megatron's groups and in ours
    for group in dense.get_ranks("pp"):
        assert [contexts[r].is_first_pipeline_stage() for r in group] == [i == 0 for i in range(len(group))]
        assert [contexts[r].is_last_pipeline_stage() for r in group] == [i == len(group) - 1 for i in range(len(group))]


@pytest.mark.parametrize("dp,global_batch_size", [(1, 4), (2, 4), (4, 4), (2, 6), (4, 8)])
def test_data_parallel_owner_partitions_each_minibatch_into_contiguous_slices(dp, global_batch_size):
    sizes = ParallelSizes()
    contexts = [ParallelContext.for_rank(sizes, dp, 0).peer(rank) for rank in range(dp)]
    steps = 3 * global_batch_size
    owners = [contexts[0].data_parallel_owner(i, global_batch_size) for i in range(steps)]
    assert all(c.data_parallel_owner(i, global_batch_size) == owners[i] for c in contexts for i in range(steps))
    per_rank = global_batch_size // dp
    for ctx in contexts:
        mine = [i for i in range(steps) if ctx.owns_sample(i, global_batch_size)]
        from_slices = [i for m in range(3) for i in range(steps)[ctx.minibatch_slice(m, global_batch_size)]]
        assert mine == from_slices and len(mine) == 3 * per_rank
        for m in range(3):
            start = m * global_batch_size + ctx.dp_rank * per_rank
            assert list(range(steps)[ctx.minibatch_slice(m, global_batch_size)]) == list(range(start, start + per_rank))


def test_data_parallel_owner_refuses_a_batch_that_does_not_split():
    ctx = ParallelContext.for_rank(ParallelSizes(), 4, 1)
    with pytest.raises(ValueError, match=r"^--global-batch-size 6 is not divisible by data-parallel size 4$"):
        ctx.data_parallel_owner(0, 6)


def test_virtual_pipeline_stages():
    sizes = ParallelSizes(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3)
    first, last = (ParallelContext.for_rank(sizes, 2, rank) for rank in (0, 1))
    assert first.vp_stages() == [0, 1, 2] and ParallelContext.for_rank(ParallelSizes(), 1, 0).vp_stages() == [None]
    assert [first.is_first_pipeline_stage(v) for v in range(3)] == [True, False, False]
    assert [last.is_first_pipeline_stage(v) for v in range(3)] == [False, False, False]
    assert [last.is_last_pipeline_stage(v) for v in range(3)] == [False, False, True]
    assert first.is_first_pipeline_stage() and last.is_last_pipeline_stage() and not first.is_last_pipeline_stage()
    with pytest.raises(ValueError, match=r"^vp_stage 3 is outside this rank's 3 model chunk\(s\)$"):
        first.is_first_pipeline_stage(3)


def test_local_experts_and_tensor_split():
    sizes = ParallelSizes(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1)
    ctx = ParallelContext.for_rank(sizes, 4, 3)
    assert (ctx.tp_rank, ctx.ep_rank, ctx.etp_rank) == (1, 1, 0)
    assert ctx.local_experts(8) == range(4, 8)
    assert ctx.tensor_split(is_expert=True) == (1, 0, None) and ctx.tensor_split(is_expert=False) == (2, 1, None)
    with pytest.raises(ValueError, match=r"^6 experts do not split over expert parallel size 4$"):
        ParallelContext.for_rank(ParallelSizes(expert_model_parallel_size=4), 4, 0).local_experts(6)


@pytest.mark.parametrize("kwargs,world,message", [
    (dict(tensor_model_parallel_size=2, context_parallel_size=2), 6,
     r"^world size 6 is not divisible by tensor x pipeline x context parallel size 2 x 1 x 2$"),
    (dict(expert_model_parallel_size=4), 2,
     r"^world size 2 is not divisible by expert-tensor x expert x pipeline parallel size 1 x 4 x 1$"),
    (dict(virtual_pipeline_model_parallel_size=2), 1, r"^virtual pipeline size 2 needs pipeline parallel size >= 2"),
])
def test_impossible_layouts_are_refused(kwargs, world, message):
    with pytest.raises(ValueError, match=message):
        ParallelContext.for_rank(ParallelSizes(**kwargs), world, 0)


def test_groups_that_disagree_with_the_layout_are_refused():
    class Group:
        def __init__(self, rank, size):
            self._rank, self._size = rank, size

        def rank(self):
            return self._rank

        def size(self):
            return self._size

    class Groups:
        tp = Group(0, 2)  # the layout says rank 1 of 2
        pp = Group(0, 1)

    ctx = ParallelContext(ParallelSizes(tensor_model_parallel_size=2), 2, 1, groups=Groups())
    with pytest.raises(ValueError, match=r"tp group has this rank at 0 of 2, the layout says 1 of 2"):
        ctx.check_groups()


def test_build_from_megatron_state_in_a_world_of_one(world_of_one):
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_r3.platform.distributed import host_group

    groups = ProcessGroupCollection.use_mpu_process_groups(
        required_pgs=["tp", "cp", "dp", "pp", "dp_cp", "ep", "expt_tp", "expt_dp"])
    ctx = ParallelContext.build(ParallelSizes(), groups, host_group=host_group())
    assert (ctx.rank, ctx.world_size) == (0, 1)
    assert ctx.groups is groups and ctx.tensor_split(is_expert=False)[2] is ps.get_tensor_model_parallel_group()
    assert (ctx.tp_rank, ctx.dp_rank, ctx.dp_cp_rank, ctx.expert_dp_rank) == (
        ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
        ps.get_data_parallel_rank(with_context_parallel=True), ps.get_expert_data_parallel_rank())
    assert ctx.is_dense_export_source and ctx.is_expert_export_source and ctx.computes_loss
    assert ctx.is_first_pipeline_stage() == ps.is_pipeline_first_stage()


def test_initialize_model_parallel_returns_the_context(world_of_one):
    from megatron_r3.platform.distributed import host_group, initialize_model_parallel, parallel_context

    ctx = initialize_model_parallel(ParallelSizes(), sequence_parallel=True)
    assert ctx == ParallelContext.for_rank(ParallelSizes(), 1, 0, sequence_parallel=True)
    assert ctx.host_group is host_group() and ctx.groups.tp is not None and ctx.groups.expt_dp is not None
    other = ParallelSizes(tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match=r"^megatron's parallel state is another layout than ParallelSizes\("):
        parallel_context(other)


# ---------------------------------------------------------------- no module reads megatron's global parallel state
# Only these modules may: distributed.py initialises megatron's groups and builds the context from them;
# parallel_context.py names megatron's rank ordering. Every other module gets its groups and coordinates from the
# ParallelContext it is passed.
PARALLEL_STATE_READERS = {"megatron_r3/platform/distributed.py", "megatron_r3/platform/parallel_context.py"}
_GLOBAL_STATE_MODULES = ("parallel_state", "mpu")


def parallel_state_references(source: str) -> list[str]:
    """`line: what` for every import of megatron's `parallel_state` / `mpu` and every use of those names, by line."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [alias.name for alias in node.names]
            if module.split(".")[-1] in _GLOBAL_STATE_MODULES or (
                    module.startswith("megatron") and set(names) & set(_GLOBAL_STATE_MODULES)):
                found.append(f"{node.lineno}: from {module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {alias.name}" for alias in node.names
                      if alias.name.split(".")[-1] in _GLOBAL_STATE_MODULES]
        elif isinstance(node, ast.Attribute) and node.attr in _GLOBAL_STATE_MODULES:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in _GLOBAL_STATE_MODULES:
            found.append(f"{node.lineno}: {node.id}")
    return sorted(found, key=lambda entry: int(entry.split(":")[0]))


def test_parallel_state_references_finds_every_form():
    planted = ("from megatron.core import parallel_state as ps\n"
               "import megatron.core.parallel_state\n"
               "from megatron.core.parallel_state import get_tensor_model_parallel_rank\n"
               "from megatron.core import mpu\n"
               "def f():\n"
               "    return parallel_state.get_data_parallel_rank()\n"
               "x = megatron.core.parallel_state\n")
    assert parallel_state_references(planted) == [
        "1: from megatron.core import parallel_state", "2: import megatron.core.parallel_state",
        "3: from megatron.core.parallel_state import get_tensor_model_parallel_rank",
        "4: from megatron.core import mpu",
        "6: parallel_state", "7: .parallel_state"]
    assert parallel_state_references("from megatron.core.process_groups_config import ProcessGroupCollection\n"
                                     "ctx.tp_rank\n") == []


def test_no_package_module_reads_megatrons_global_parallel_state():
    from pathlib import Path

    import megatron_r3

    root = Path(megatron_r3.__file__).parent.parent
    offenders = {}
    for path in sorted((root / "megatron_r3").rglob("*.py")):
        name = path.relative_to(root).as_posix()
        if name not in PARALLEL_STATE_READERS:
            found = parallel_state_references(path.read_text())
            if found:
                offenders[name] = found
    assert offenders == {}, ("these modules read megatron's global parallel state; take the ParallelContext "
                             "(megatron_r3/platform/parallel_context.py) as an argument instead")
