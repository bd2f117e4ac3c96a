"""The replay-aware router: a `TopKRouter` whose top-k can be recorded or replayed, with state owned by the router.

megatron-core's `topk_routing_with_score_function` asks `router.router_replay.get_replay_topk(...)` for the top-k
whenever `router_replay` is not None. Megatron's own `RouterReplay` keeps a process-global list of instances and
needs one tensor per instance in construction order, which breaks as soon as a second model (reference model,
rebuilt chunk) exists. Here every router owns a `RouterReplayState`; the schedule wrapper finds routers by walking
the model chunk it is about to run and installs each router's ids by its global `layer_number`.

Modes (megatron's `RouterReplayAction` vocabulary):
- free (action None): native routing.
- RECORD: native routing; the chosen ids are kept (compact dtype, on device) for R2.
- REPLAY_FORWARD: the next installed ids are used; gate probabilities are still computed from this model's scores
  at those ids, so gradients reach the router.
- REPLAY_BACKWARD: activation recompute re-runs the router during backward; it must see the same ids as the
  forward did, in the same (FIFO) order.

A forward call made with grad disabled during a training pass is a checkpointed forward (full or selective `moe`
recompute run the forward under `no_grad` and re-run it in backward), so its ids are queued for the recompute.

Problems found inside the forward (no route installed, wrong row count) are *deferred*: the router falls back to
native routing for that call, records the error, and the schedule wrapper raises on every rank after the schedule
has finished. Raising here would leave the other ranks blocked in the next collective.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplayAction


@dataclass
class InstalledRoutes:
    """One microbatch's ids for one router, in the router's sequence-major token order.

    expert_ids: [num_tokens, topk] compact integer dtype (uint8 / int16), on the router's device.
    valid: optional bool [num_tokens]; False for padding rows (excluded from the statistics).
    free_rows: optional bool [num_tokens]; True for rows that take native routing (counted fallback).
    observe_only: route natively and only *measure* agreement with these ids (replay off, or R2's record pass,
        with the rollout engine's routes at hand).
    """

    expert_ids: torch.Tensor
    valid: Optional[torch.Tensor] = None
    free_rows: Optional[torch.Tensor] = None
    observe_only: bool = False


# Device-side counters a router accumulates over valid tokens (no host sync until the step's metrics are logged):
#   valid:    real (non-padding) tokens that saw installed routes
#   compared: valid tokens that were not in the counted fallback
#   agree:    compared tokens whose *native* top-k set equals the installed set (engine/trainer agreement)
#   match:    valid tokens whose *used* top-k set equals the installed set (1.0 under replay; = agree when off)
COUNTERS = ("valid", "compared", "agree", "match")


class RouterReplayState:
    """Per-router replay state: what to replay next, what to replay in recompute, what was recorded.

    Lives on the router (an attribute of the module), so it is created, moved and destroyed with the model.
    """

    def __init__(self) -> None:
        self.layer_number: Optional[int] = None
        self.action: Optional[RouterReplayAction] = None
        self.training_pass = False
        self.collect_agreement = False
        self._forward: deque[InstalledRoutes] = deque()
        self._backward: deque[torch.Tensor] = deque()
        self.recorded: list[torch.Tensor] = []
        self.errors: list[str] = []
        # Host-side counters (known from shapes, no device sync).
        self.replayed_rows = 0
        self.recomputed_rows = 0
        self.counters: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ driven by the schedule wrapper
    def install(self, routes: InstalledRoutes) -> None:
        """Queue one microbatch's ids for the next forward call (REPLAY_FORWARD, or RECORD when observing)."""
        self._forward.append(routes)

    def pending(self) -> tuple[int, int]:
        """(forward routes not yet consumed, recompute routes not yet consumed)."""
        return len(self._forward), len(self._backward)

    def take_recorded(self) -> list[torch.Tensor]:
        recorded, self.recorded = self.recorded, []
        return recorded

    def reset(self) -> None:
        """Drop every queued route and deferred error (after a failed or finished schedule)."""
        self._forward.clear()
        self._backward.clear()
        self.recorded = []
        self.errors = []
        self.action = None
        self.training_pass = False

    def reset_counters(self) -> None:
        self.replayed_rows = self.recomputed_rows = 0
        self.counters = {}

    # ------------------------------------------------------------------ megatron-core's hook
    def get_replay_topk(
        self,
        scores: torch.Tensor,
        topk: int,
        num_groups: Optional[int] = None,
        group_topk: Optional[int] = None,
        default_compute_topk: Callable = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (scores at the chosen ids, chosen ids [num_tokens, topk] int64), as megatron expects."""

        def native():
            return default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)

        action = self.action
        if action is None:
            return native()
        queue_for_recompute = self.training_pass and not torch.is_grad_enabled()
        if action == RouterReplayAction.REPLAY_BACKWARD:
            return self._recompute(scores, native)
        if action == RouterReplayAction.RECORD:
            values, ids = native()
            compact = _compact(ids, scores.shape[1])
            self.recorded.append(compact)
            if self._forward:  # routes installed alongside a recording are observed, never used
                routes = self._take(scores, topk)
                if routes is not None and self.collect_agreement:
                    self._count(routes, native_ids=ids, used_ids=ids)
            if queue_for_recompute:
                self._backward.append(compact)
            return values, ids
        if action != RouterReplayAction.REPLAY_FORWARD:
            raise ValueError(f"unknown router replay action {action!r}")

        routes = self._take(scores, topk)
        if routes is None:
            return native()
        if routes.observe_only:
            values, ids = native()
            native_ids = ids
        else:
            ids = routes.expert_ids.long()
            native_ids = None
            if routes.free_rows is not None or self.collect_agreement:
                native_ids = native()[1]
            if routes.free_rows is not None:
                ids = torch.where(routes.free_rows.unsqueeze(1), native_ids, ids)
            values = scores.gather(1, ids)
            self.replayed_rows += ids.shape[0]
        if self.collect_agreement:
            self._count(routes, native_ids=native_ids, used_ids=ids)
        if queue_for_recompute:
            # queued in the compact dtype (1 byte per id up to 256 experts, not int64's 8) until the recompute pops
            # it; replayed ids without fallback rows are the installed tensor itself (no new memory at all)
            replayed_as_installed = not routes.observe_only and routes.free_rows is None
            self._backward.append(routes.expert_ids if replayed_as_installed else _compact(ids, scores.shape[1]))
        return values, ids

    # ------------------------------------------------------------------ helpers
    def _take(self, scores: torch.Tensor, topk: int) -> Optional[InstalledRoutes]:
        """Pop the next installed routes, or defer an error (and return None) when they are missing or malformed."""
        if not self._forward:
            self.errors.append(f"layer {self.layer_number} was run with no routes installed")
            return None
        routes = self._forward.popleft()
        if tuple(routes.expert_ids.shape) != (scores.shape[0], topk):
            self.errors.append(
                f"layer {self.layer_number}: installed routes have shape {tuple(routes.expert_ids.shape)}, the router "
                f"sees {scores.shape[0]} tokens with top-{topk}"
            )
            return None
        return routes

    def _recompute(self, scores: torch.Tensor, native) -> tuple[torch.Tensor, torch.Tensor]:
        """Activation recompute in backward: reuse the ids of the matching forward, in FIFO order."""
        if not self._backward:
            self.errors.append(f"recompute of layer {self.layer_number} found no replayed ids to reuse")
            return native()
        ids = self._backward.popleft()
        if ids.shape[0] != scores.shape[0]:
            self.errors.append(
                f"recompute of layer {self.layer_number} sees {scores.shape[0]} tokens, the forward replayed "
                f"{ids.shape[0]}"
            )
            return native()
        ids = ids.long()  # widened only now, at the moment of use
        self.recomputed_rows += ids.shape[0]
        return scores.gather(1, ids), ids

    def _count(self, routes: InstalledRoutes, *, native_ids: torch.Tensor, used_ids: torch.Tensor) -> None:
        """Accumulate the COUNTERS on device: top-k *sets* are compared (the order within a row is irrelevant)."""
        installed = routes.expert_ids.long().sort(dim=1).values
        native_same = (native_ids.sort(dim=1).values == installed).all(dim=1)
        used_same = (used_ids.sort(dim=1).values == installed).all(dim=1)
        valid = routes.valid if routes.valid is not None else torch.ones_like(native_same)
        compared = valid if routes.free_rows is None else valid & ~routes.free_rows
        counts = {
            "valid": valid.sum(),
            "compared": compared.sum(),
            "agree": (native_same & compared).sum(),
            "match": (used_same & valid).sum(),
        }
        for name, value in counts.items():
            self.counters[name] = value if name not in self.counters else self.counters[name] + value


def _compact(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Ids in the smallest index dtype that holds `num_experts` (uint8 up to 256 experts, else int16)."""
    return ids.detach().to(torch.int16 if num_experts > 256 else torch.uint8)


class ReplayTopKRouter(TopKRouter):
    """`TopKRouter` that owns a `RouterReplayState` and answers megatron's replay hook through it.

    Injected via `MoESubmodules.router` (see `megatron_r3.model.specs`); nothing in megatron-core is patched.
    `config.moe_enable_routing_replay` must stay False so megatron does not also register its global instance.
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False) -> None:
        if config.moe_enable_routing_replay:
            raise ValueError(
                "moe_enable_routing_replay=True turns on megatron-core's process-global RouterReplay; megatron_r3 "
                "replays through its own per-router state, so leave it False and use --router-replay"
            )
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.router_replay = RouterReplayState()

    @property
    def replay(self) -> RouterReplayState:
        return self.router_replay
