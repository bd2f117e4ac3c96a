"""Unit tests for megatron_r3.replay.policy: the "which pass replays what" data, its README rendering, and the
trainer driving its passes from it (no branch on the mode)."""

import ast
import itertools
import re
from pathlib import Path

import pytest
from megatron.core.transformer.moe.router_replay import RouterReplayAction

import megatron_r3
from megatron_r3.replay.policy import (
    POLICY_TABLE,
    REFERENCE_REPLAY,
    REPLAY_MODES,
    Action,
    PassRouting,
    Source,
    policy_table,
    replay_policy,
)

ROOT = Path(megatron_r3.__file__).parent.parent


def test_readme_table_is_the_policy_data():
    readme = (ROOT / "README.md").read_text()
    dedented = "\n".join(line[2:] if line.startswith("  |") else line for line in readme.splitlines())
    assert policy_table() in dedented, "README's 'which pass replays what' table differs from replay/policy.py; " \
                                       "paste this:\n" + policy_table()


def test_router_actions():
    replay, record = RouterReplayAction.REPLAY_FORWARD, RouterReplayAction.RECORD
    observe = PassRouting(Action.NATIVE, Source.ROLLOUT)
    # observing drives the router with observe-only routes under REPLAY_FORWARD; with no routes, natively
    assert (observe.router_action(have_routes=True), observe.router_action(have_routes=False)) == (replay, None)
    assert PassRouting(Action.NATIVE).router_action(have_routes=True) is None
    assert PassRouting(Action.RECORD, Source.ROLLOUT).router_action(have_routes=False) == record
    assert PassRouting(Action.REPLAY, Source.RECORDED).router_action(have_routes=True) == replay
    assert (observe.observes, observe.replays) == (True, False)
    with pytest.raises(ValueError, match="^a replaying pass needs a route source$"):
        PassRouting(Action.REPLAY)


@pytest.mark.parametrize("mode,reference,collect", itertools.product(REPLAY_MODES, REFERENCE_REPLAY, (True, False)))
def test_derived_rules(mode, reference, collect):
    policy = replay_policy(mode, reference)
    # the rollout engine's routes: required under R3, for the agreement metrics otherwise (train/components.py)
    assert policy.engine_returns_routes(collect) == (mode == "R3" or collect)
    assert policy.replays_rollout_routes == (mode == "R3")
    # every pass native (what the supervised warm-up requires): off only
    assert policy.all_native == (mode == "off")
    # the reference pass routes as the updates do, unless --reference-replay off makes it native
    assert policy.reference == (policy.update if reference == "on" else PassRouting(Action.NATIVE))
    # routes recorded in the old-logprob pass exist only where that pass records
    recorded_used = any(p.source is Source.RECORDED for p in policy.passes().values())
    assert recorded_used == (policy.old_logprob.action is Action.RECORD) == (mode == "R2")
    # the old-logprob pass always sees the engine's routes (used under R3, observed otherwise)
    assert policy.old_logprob.source is Source.ROLLOUT


def test_every_mode_has_every_pass():
    assert tuple(POLICY_TABLE) == REPLAY_MODES
    assert {frozenset(row) for row in POLICY_TABLE.values()} == {
        frozenset({"rollout", "old_logprob", "reference:on", "reference:off", "update"})}


def test_unknown_values():
    with pytest.raises(ValueError, match=re.escape("--router-replay must be one of off, R2, R3, got 'R4'")):
        replay_policy("R4")
    with pytest.raises(ValueError, match=re.escape("--reference-replay must be one of on, off, got False")):
        replay_policy("R3", False)


def test_trainer_does_not_branch_on_the_replay_mode():
    """The trainer reads the policy; a comparison with args.router_replay / reference_replay would bypass it."""
    tree = ast.parse((ROOT / "megatron_r3" / "train" / "trainer.py").read_text())
    names = {"router_replay", "reference_replay", "mode"}
    branches = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Compare)
                and any(isinstance(n, (ast.Attribute, ast.Name)) and getattr(n, "attr", getattr(n, "id", None))
                        in names for n in ast.walk(node))]
    assert branches == []


@pytest.mark.parametrize("mode", ["R2", "R3"])
def test_sft_warmup_refuses_a_replaying_mode(mode):
    """The supervised warm-up routes natively: it asks the policy, not the mode's name."""
    from types import SimpleNamespace

    from megatron_r3.train.sft_warmup import SFTWarmup

    args = SimpleNamespace(grpo_group_size=1, grpo_iterations=1, router_replay=mode, reference_replay="off")
    with pytest.raises(ValueError, match=r"^sft_warmup: --router-replay must be off \(the warm-up routes natively\)$"):
        SFTWarmup(args)
