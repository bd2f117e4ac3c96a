"""Which pass replays what, as data: per `--router-replay` mode and `--reference-replay`, each pass of a GRPO step
gets a router action and a route source.

The trainer looks its passes up here instead of branching on the mode, and the README's table is rendered from this
data (`policy_table`; a test compares them), so the documentation cannot drift from what runs.

Action (megatron's `RouterReplayAction` vocabulary):
- native: the router chooses its own top-k.
- record: native, and the chosen ids are kept (the rollout engine returns them; R2's old-logprob pass records them
  for its updates).
- replay: the routes of the source are used (REPLAY_FORWARD, and REPLAY_BACKWARD in the recompute).

Source: where a pass's routes come from. Under `replay` they are the routes used; under `native` / `record` they
are only *observed*: compared with the router's native top-k for `replay/routing_agreement`, never used (a
configuration whose router chooses outside the hooked top-k, e.g. sinkhorn under `off`, observes nothing).
- none: no routes.
- rollout: the routes the rollout engine returned with the samples.
- recorded: the routes the policy's routers recorded in this step's old-logprob pass.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Optional

from megatron.core.transformer.moe.router_replay import RouterReplayAction

REPLAY_MODES = ("off", "R2", "R3")
REFERENCE_REPLAY = ("on", "off")


class Action(str, enum.Enum):
    NATIVE = "native"
    RECORD = "record"
    REPLAY = "replay"


class Source(str, enum.Enum):
    NONE = "none"
    ROLLOUT = "rollout"
    RECORDED = "recorded"


@dataclass(frozen=True)
class PassRouting:
    """What the routers of one pass do, and with which routes."""

    action: Action
    source: Source = Source.NONE

    def __post_init__(self) -> None:
        if self.action is Action.REPLAY and self.source is Source.NONE:
            raise ValueError("a replaying pass needs a route source")

    @property
    def replays(self) -> bool:
        return self.action is Action.REPLAY

    @property
    def observes(self) -> bool:
        """Routes are installed only to be compared with the native top-k."""
        return not self.replays and self.source is not Source.NONE

    def router_action(self, have_routes: bool) -> Optional[RouterReplayAction]:
        """The action the routers are driven with; observing takes REPLAY_FORWARD with observe-only routes (the
        router routes natively and counts agreement), and nothing when there is nothing to observe."""
        if self.action is Action.REPLAY:
            return RouterReplayAction.REPLAY_FORWARD
        if self.action is Action.RECORD:
            return RouterReplayAction.RECORD
        return RouterReplayAction.REPLAY_FORWARD if self.observes and have_routes else None

    def describe(self) -> str:
        """The README cell."""
        if self.replays:
            return f"replay {self.source.value} routes"
        text = "native, recorded" if self.action is Action.RECORD else "native"
        return text + (f" ({self.source.value} routes observed)" if self.observes else "")


@dataclass(frozen=True)
class ReplayPolicy:
    """The routing of every pass of one step, in the order they run."""

    rollout: PassRouting
    old_logprob: PassRouting
    reference: PassRouting
    update: PassRouting

    def passes(self) -> dict[str, PassRouting]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @property
    def replays_rollout_routes(self) -> bool:
        """Some pass uses the rollout engine's routes: the engine must return them, and the fallback / agreement
        gates (--max-fallback-fraction, --min-routing-agreement) apply."""
        return any(p.replays and p.source is Source.ROLLOUT for p in self.passes().values())

    @property
    def all_native(self) -> bool:
        """No pass replays or records routes: every router chooses its own top-k (`--router-replay off`)."""
        return all(p.action is Action.NATIVE for p in self.passes().values())

    def engine_returns_routes(self, collect_agreement: bool) -> bool:
        """Whether the rollout engine must send its routes: to replay them, or to observe them for the metrics."""
        observed = any(p.observes and p.source is Source.ROLLOUT for p in self.passes().values())
        return self.replays_rollout_routes or (collect_agreement and observed)


NATIVE = PassRouting(Action.NATIVE)

# mode -> pass -> routing; the reference (KL) pass has one entry per --reference-replay value.
POLICY_TABLE: dict[str, dict[str, PassRouting]] = {
    "off": {
        "rollout": NATIVE,
        "old_logprob": PassRouting(Action.NATIVE, Source.ROLLOUT),
        "reference:on": NATIVE,
        "reference:off": NATIVE,
        "update": NATIVE,
    },
    "R2": {
        "rollout": NATIVE,
        "old_logprob": PassRouting(Action.RECORD, Source.ROLLOUT),
        "reference:on": PassRouting(Action.REPLAY, Source.RECORDED),
        "reference:off": NATIVE,
        "update": PassRouting(Action.REPLAY, Source.RECORDED),
    },
    "R3": {
        "rollout": PassRouting(Action.RECORD),
        "old_logprob": PassRouting(Action.REPLAY, Source.ROLLOUT),
        "reference:on": PassRouting(Action.REPLAY, Source.ROLLOUT),
        "reference:off": NATIVE,
        "update": PassRouting(Action.REPLAY, Source.ROLLOUT),
    },
}

ROW_TITLES = {
    "rollout": "rollout",
    "old_logprob": "old logprobs",
    "reference:on": "reference (KL), `--reference-replay on`",
    "reference:off": "reference (KL), `--reference-replay off`",
    "update": "updates",
}


def replay_policy(router_replay: str, reference_replay: str = "on") -> ReplayPolicy:
    """The routing of every pass for `--router-replay router_replay --reference-replay reference_replay`."""
    if router_replay not in POLICY_TABLE:
        raise ValueError(f"--router-replay must be one of {', '.join(REPLAY_MODES)}, got {router_replay!r}")
    if reference_replay not in REFERENCE_REPLAY:
        raise ValueError(f"--reference-replay must be one of {', '.join(REFERENCE_REPLAY)}, got {reference_replay!r}")
    row = POLICY_TABLE[router_replay]
    return ReplayPolicy(rollout=row["rollout"], old_logprob=row["old_logprob"],
                        reference=row[f"reference:{reference_replay}"], update=row["update"])


def policy_table() -> str:
    """The README's "which pass replays what" table (markdown), rendered from `POLICY_TABLE`."""
    lines = ["| pass | " + " | ".join(REPLAY_MODES) + " |", "|---" * (len(REPLAY_MODES) + 1) + "|"]
    for key, title in ROW_TITLES.items():
        lines.append(f"| {title} | " + " | ".join(POLICY_TABLE[mode][key].describe() for mode in REPLAY_MODES) + " |")
    return "\n".join(lines)
