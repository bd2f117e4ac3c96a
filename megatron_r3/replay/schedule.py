"""Drive router replay through megatron's pipeline schedules.

`run_schedule` wraps `get_forward_backward_func()` (no pipelining, 1F1B, interleaved). For each model chunk it
counts the chunk's forward steps, so the n-th forward of a chunk is microbatch n (all of megatron's schedules run
a chunk's microbatches in order). Before that forward it installs microbatch n's ids into the chunk's routers and
sets REPLAY_FORWARD (or RECORD); after it, REPLAY_BACKWARD, so an activation recompute during that microbatch's
backward pops the same ids. Routers are found by walking each chunk: no global registry.

After the schedule every installed route must have been consumed exactly once (forward, and recompute where the
layer was checkpointed). Problems are agreed across all ranks and raised on every rank alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from megatron.core.transformer.moe.router_replay import RouterReplayAction

from megatron_r3.replay.router import ReplayTopKRouter, RouterReplayState
from megatron_r3.platform.collectives import agree_on_failures
from megatron_r3.replay.microbatch import MicrobatchRoutes


class RouteReplayError(RuntimeError):
    """Routes were missing, extra, malformed or not consumed; raised on every rank alike."""


@dataclass
class ReplayStatistics:
    """Per-router counters of one or more schedules: host ints come from shapes (rows include padding); the
    per-layer device counters (see `router.COUNTERS`) stay on device until the step's metrics are logged."""

    replayed_rows: int = 0
    recomputed_rows: int = 0
    layer_counters: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


class ReplayRouters:
    """The replay routers of the model chunks this rank runs, by chunk and global `layer_number`.

    MTP routers are kept apart: their layer numbers restart at 1 and alias decoder layers, and rollout engines send
    no MTP rows, so they route natively unless routes for them are given explicitly.
    """

    def __init__(self, model_chunks: Sequence[torch.nn.Module]) -> None:
        self.chunks = list(model_chunks)
        self.by_chunk: list[dict[int, ReplayTopKRouter]] = []
        seen: dict[int, int] = {}
        for index, chunk in enumerate(self.chunks):
            routers: dict[int, ReplayTopKRouter] = {}
            for module in chunk.modules():
                if not isinstance(module, ReplayTopKRouter) or module.is_mtp_layer:
                    continue
                number = module.layer_number
                if number is None:
                    raise ValueError(f"a replay router in model chunk {index} has no layer_number")
                if number in seen:
                    raise ValueError(f"layer {number} has routers in model chunks {seen[number]} and {index}")
                seen[number] = index
                routers[number] = module
            self.by_chunk.append(routers)

    @property
    def layer_numbers(self) -> tuple[int, ...]:
        return tuple(sorted(n for routers in self.by_chunk for n in routers))

    def states(self) -> list[RouterReplayState]:
        return [router.replay for routers in self.by_chunk for router in routers.values()]

    def reset(self) -> None:
        for state in self.states():
            state.reset()

    def statistics(self, reset: bool = True) -> ReplayStatistics:
        stats = ReplayStatistics()
        for routers in self.by_chunk:
            for number, router in routers.items():
                state = router.replay
                stats.replayed_rows += state.replayed_rows
                stats.recomputed_rows += state.recomputed_rows
                if state.counters:
                    stats.layer_counters[number] = dict(state.counters)
                if reset:
                    state.reset_counters()
        return stats


@dataclass
class ScheduleResult:
    losses: list
    # RECORD only: per microbatch, {layer_number: ids [num_tokens, topk]} in router order.
    recorded: Optional[list[dict[int, torch.Tensor]]] = None
    # REPLAY only: real tokens replayed, and tokens routed natively by the counted fallback (this rank).
    replayed_tokens: int = 0
    fallback_tokens: int = 0


def run_schedule(
    forward_backward_func: Callable,
    routers: ReplayRouters,
    *,
    action: Optional[RouterReplayAction],
    forward_step_func: Callable,
    data_iterator,
    model,
    num_microbatches: int,
    forward_only: bool,
    host_group,
    routes: Optional[Sequence[MicrobatchRoutes]] = None,
    collect_agreement: bool = False,
    **schedule_kwargs,
) -> ScheduleResult:
    """Run megatron's `forward_backward_func` with router replay.

    action: None (native routing), RECORD (R2's old-logprob pass), or REPLAY_FORWARD (R3, and R2's updates);
        `routes[n]` holds microbatch n's ids for REPLAY_FORWARD. With RECORD, or with REPLAY_FORWARD and
        observe-only routes, given routes are only compared with the native ones (agreement statistics).
    collect_agreement: accumulate the per-layer agreement counters (read them with `routers.statistics()`).
    host_group: the gloo group over the world (`ParallelContext.host_group`; None in a world of one) on which every
        rank's replay problems are agreed, so all ranks raise the same `RouteReplayError` or none does.
    Everything else is passed to `forward_backward_func` unchanged.
    """
    replaying = action == RouterReplayAction.REPLAY_FORWARD
    if action not in (None, RouterReplayAction.RECORD, RouterReplayAction.REPLAY_FORWARD):
        raise ValueError(f"run_schedule drives RECORD or REPLAY_FORWARD, not {action}")
    if replaying and routes is None:
        raise ValueError("REPLAY_FORWARD needs routes, one MicrobatchRoutes per microbatch")
    if action is None and routes is not None:
        raise ValueError("routes were given for native routing; pass action=REPLAY_FORWARD (observe-only routes "
                         "to measure agreement without replaying)")
    chunk_of = {id(chunk): index for index, chunk in enumerate(routers.chunks)}
    forward_counts = [0] * len(routers.chunks)
    recorded: list[dict[int, torch.Tensor]] = [{} for _ in range(num_microbatches)]
    problems: list[str] = []
    if routes is not None and len(routes) != num_microbatches:
        problems.append(f"{len(routes)} microbatches of routes for a schedule of {num_microbatches} microbatches")

    def replay_forward_step(data_iterator, model, *args, **kwargs):
        index = chunk_of.get(id(model))
        if index is None:
            raise ValueError("forward_step was called with a model chunk that run_schedule was not given")
        microbatch = forward_counts[index]
        forward_counts[index] += 1
        chunk_routers = routers.by_chunk[index]
        if routes is not None and microbatch < len(routes):
            _install(chunk_routers, routes[microbatch], microbatch, index, problems)
        for router in chunk_routers.values():
            router.replay.action = action
            router.replay.training_pass = not forward_only
            router.replay.collect_agreement = collect_agreement and routes is not None
        try:
            return forward_step_func(data_iterator, model, *args, **kwargs)
        finally:
            for number, router in chunk_routers.items():
                router.replay.action = RouterReplayAction.REPLAY_BACKWARD
                if action == RouterReplayAction.RECORD and microbatch < num_microbatches:
                    taken = router.replay.take_recorded()
                    if len(taken) != 1:
                        problems.append(f"layer {number} recorded {len(taken)} times in microbatch {microbatch}")
                    elif taken:
                        recorded[microbatch][number] = taken[0]

    if action is None:
        losses = forward_backward_func(
            forward_step_func=forward_step_func,
            data_iterator=data_iterator,
            model=model,
            num_microbatches=num_microbatches,
            forward_only=forward_only,
            **schedule_kwargs,
        )
        return ScheduleResult(losses=losses)

    try:
        losses = forward_backward_func(
            forward_step_func=replay_forward_step,
            data_iterator=data_iterator,
            model=model,
            num_microbatches=num_microbatches,
            forward_only=forward_only,
            **schedule_kwargs,
        )
        problems.extend(_unconsumed(routers, forward_counts, num_microbatches))
    except BaseException:
        routers.reset()
        raise
    for state in routers.states():
        state.action = None
        state.training_pass = False
    agreed = agree_on_failures(problems, host_group)
    if agreed:
        routers.reset()
        raise RouteReplayError("router replay failed:\n- " + "\n- ".join(
            f"rank {failure.rank}: {failure.message}" for failure in agreed))
    result = ScheduleResult(losses=losses, recorded=recorded if action == RouterReplayAction.RECORD else None)
    if replaying and not any(r.observe_only for r in routes):
        result.replayed_tokens = sum(r.num_valid - r.num_free for r in routes)
        result.fallback_tokens = sum(r.num_free for r in routes)
    return result


def _install(chunk_routers, microbatch_routes: MicrobatchRoutes, microbatch: int, chunk: int, problems) -> None:
    for number, router in chunk_routers.items():
        try:
            installed = microbatch_routes.for_layer(number)
        except KeyError:
            problems.append(f"microbatch {microbatch} has no routes for layer {number} (model chunk {chunk})")
            continue
        router.replay.install(installed)


def _unconsumed(routers: ReplayRouters, forward_counts: list[int], num_microbatches: int) -> list[str]:
    problems = []
    for index, chunk_routers in enumerate(routers.by_chunk):
        if forward_counts[index] != num_microbatches:
            problems.append(
                f"model chunk {index} ran {forward_counts[index]} forward steps for {num_microbatches} microbatches"
            )
        for number, router in chunk_routers.items():
            state = router.replay
            forward, backward = state.pending()
            if forward:
                problems.append(f"layer {number}: {forward} installed route(s) were never used by a forward")
            if backward:
                problems.append(f"layer {number}: {backward} route(s) were never reused by the recompute")
            problems.extend(state.errors)
            state.errors = []
    return problems
