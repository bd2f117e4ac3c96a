"""Unit tests for the per-router replay state (`RouterReplayState.get_replay_topk`) and `ReplayTopKRouter`.

Scores used throughout (3 tokens, 8 experts); native top-2 by hand:
    row 0: [.10 .90 .30 .00 .20 .50 .40 .60] -> ids [1, 7], values [.90, .60]
    row 1: [.80 .10 .70 .20 .00 .30 .60 .40] -> ids [0, 2], values [.80, .70]
    row 2: [.05 .15 .25 .35 .95 .45 .55 .65] -> ids [4, 7], values [.95, .65]
"""

import re
import types

import pytest
import torch
from megatron.core.transformer.moe.router_replay import RouterReplayAction

from megatron_r3.replay.router import InstalledRoutes, ReplayTopKRouter, RouterReplayState

SCORES = torch.tensor(
    [
        [0.10, 0.90, 0.30, 0.00, 0.20, 0.50, 0.40, 0.60],
        [0.80, 0.10, 0.70, 0.20, 0.00, 0.30, 0.60, 0.40],
        [0.05, 0.15, 0.25, 0.35, 0.95, 0.45, 0.55, 0.65],
    ]
)
NATIVE_IDS = torch.tensor([[1, 7], [0, 2], [4, 7]])
NATIVE_VALUES = torch.tensor([[0.90, 0.60], [0.80, 0.70], [0.95, 0.65]])

FORWARD = RouterReplayAction.REPLAY_FORWARD
BACKWARD = RouterReplayAction.REPLAY_BACKWARD
RECORD = RouterReplayAction.RECORD


def native_topk(scores, topk, num_groups=None, group_topk=None):
    return torch.topk(scores, topk, dim=1)


def call(state, scores=SCORES, topk=2):
    return state.get_replay_topk(scores, topk, None, None, default_compute_topk=native_topk)


def state_for(layer=5, action=None, training_pass=False):
    state = RouterReplayState()
    state.layer_number = layer
    state.action = action
    state.training_pass = training_pass
    return state


def assert_equal(actual, expected):
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert torch.equal(actual, expected), (actual, expected)


def u8(values):
    return torch.tensor(values, dtype=torch.uint8)


# --------------------------------------------------------------------------------------------------- free
def test_no_action_is_native():
    state = state_for()
    values, ids = call(state)
    assert_equal(ids, NATIVE_IDS)
    assert_equal(values, NATIVE_VALUES)
    assert state.pending() == (0, 0)
    assert state.recorded == [] and state.errors == []
    assert state.replayed_rows == 0


# -------------------------------------------------------------------------------------------------- record
def test_record_compact_uint8_for_8_experts():
    state = state_for(action=RECORD)
    values, ids = call(state)
    assert_equal(ids, NATIVE_IDS)
    assert_equal(values, NATIVE_VALUES)
    assert len(state.recorded) == 1
    assert_equal(state.recorded[0], u8([[1, 7], [0, 2], [4, 7]]))
    assert state.pending() == (0, 0)  # grad enabled, not a training pass: nothing for a recompute


def test_record_compact_int16_for_300_experts():
    scores = torch.zeros(2, 300)
    scores[0, 299] = 1.0
    scores[0, 256] = 0.5
    scores[1, 3] = 1.0
    scores[1, 280] = 0.5
    state = state_for(action=RECORD)
    _, ids = call(state, scores)
    assert_equal(ids, torch.tensor([[299, 256], [3, 280]]))
    assert_equal(state.recorded[0], torch.tensor([[299, 256], [3, 280]], dtype=torch.int16))


def test_record_256_experts_still_fits_uint8():
    scores = torch.zeros(1, 256)
    scores[0, 255] = 1.0
    scores[0, 254] = 0.5
    state = state_for(action=RECORD)
    call(state, scores)
    assert_equal(state.recorded[0], u8([[255, 254]]))


def test_record_queues_for_recompute_only_in_training_pass_without_grad():
    # training pass + grad enabled: a plain (non-checkpointed) forward -> no queue
    state = state_for(action=RECORD, training_pass=True)
    call(state)
    assert state.pending() == (0, 0)
    # no grad but not a training pass (e.g. old-logprob forward) -> no queue
    state = state_for(action=RECORD, training_pass=False)
    with torch.no_grad():
        call(state)
    assert state.pending() == (0, 0)
    # training pass + no grad: a checkpointed forward -> queued for the recompute, which replays it
    state = state_for(action=RECORD, training_pass=True)
    with torch.no_grad():
        call(state)
    assert state.pending() == (0, 1)
    state.action = BACKWARD
    _, ids = call(state, SCORES.flip(1))  # scores changed, ids must not
    assert_equal(ids, NATIVE_IDS)
    assert state.pending() == (0, 0)
    assert state.recomputed_rows == 3


def test_take_recorded_empties():
    state = state_for(action=RECORD)
    call(state)
    call(state, SCORES[:2])
    taken = state.take_recorded()
    assert [r.shape[0] for r in taken] == [3, 2]
    assert state.recorded == []
    assert state.take_recorded() == []


# ---------------------------------------------------------------------------------------------- replay forward
def test_replay_forward_uses_installed_ids():
    state = state_for(action=FORWARD)
    state.install(InstalledRoutes(u8([[2, 3], [5, 6], [0, 1]])))
    assert state.pending() == (1, 0)
    values, ids = call(state)
    # installed ids differ from native on every row; values = scores at those ids
    assert_equal(ids, torch.tensor([[2, 3], [5, 6], [0, 1]]))
    assert_equal(values, torch.tensor([[0.30, 0.00], [0.30, 0.60], [0.05, 0.15]]))
    assert state.pending() == (0, 0)
    assert state.replayed_rows == 3
    assert state.errors == []


def test_replay_forward_gradient_reaches_scores():
    scores = SCORES.clone().requires_grad_(True)
    state = state_for(action=FORWARD)
    state.install(InstalledRoutes(u8([[2, 3], [5, 6], [0, 1]])))
    values, _ = call(state, scores)
    values.sum().backward()
    expected = torch.zeros(3, 8)
    expected[0, [2, 3]] = 1
    expected[1, [5, 6]] = 1
    expected[2, [0, 1]] = 1
    assert torch.equal(scores.grad, expected)


def test_replay_backward_fifo_across_two_microbatches():
    state = state_for(action=FORWARD, training_pass=True)
    first = u8([[2, 3], [5, 6], [0, 1]])
    second = u8([[7, 6], [4, 3], [1, 0]])
    state.install(InstalledRoutes(first))
    state.install(InstalledRoutes(second))
    with torch.no_grad():  # checkpointed forwards of microbatch 1 then 2
        _, ids1 = call(state)
        _, ids2 = call(state)
    assert_equal(ids1, first.long())
    assert_equal(ids2, second.long())
    assert state.pending() == (0, 2)
    state.action = BACKWARD
    _, back1 = call(state)
    _, back2 = call(state)
    assert_equal(back1, torch.tensor([[2, 3], [5, 6], [0, 1]]))
    assert_equal(back2, torch.tensor([[7, 6], [4, 3], [1, 0]]))
    assert state.pending() == (0, 0)
    assert (state.replayed_rows, state.recomputed_rows) == (6, 6)
    assert state.errors == []


def test_replay_forward_with_grad_is_not_queued():
    state = state_for(action=FORWARD, training_pass=True)
    state.install(InstalledRoutes(u8([[2, 3], [5, 6], [0, 1]])))
    call(state)
    assert state.pending() == (0, 0)


def test_free_rows_take_native_ids():
    state = state_for(action=FORWARD)
    state.install(InstalledRoutes(u8([[2, 3], [5, 6], [0, 1]]), free_rows=torch.tensor([False, True, False])))
    values, ids = call(state)
    # row 1 -> native [0, 2]
    assert_equal(ids, torch.tensor([[2, 3], [0, 2], [0, 1]]))
    assert_equal(values, torch.tensor([[0.30, 0.00], [0.80, 0.70], [0.05, 0.15]]))


def counters(state):
    return {name: int(value) for name, value in state.counters.items()}


def test_agreement_counters():
    state = state_for(action=FORWARD)
    state.collect_agreement = True
    # native ids are [[1,7],[0,2],[4,7]].
    # row 0: {7,1} == native {1,7} (order differs) -> agree; row 1: {0,3} != {0,2}; row 2: {7,4} == {4,7} but invalid.
    # Replay uses the installed ids, so every valid row "matches" the installed set.
    state.install(InstalledRoutes(u8([[7, 1], [0, 3], [7, 4]]), valid=torch.tensor([True, True, False])))
    call(state)
    assert counters(state) == {"valid": 2, "compared": 2, "agree": 1, "match": 2}
    # second microbatch without a valid mask: all rows equal to native -> +3 everywhere
    state.install(InstalledRoutes(u8([[1, 7], [0, 2], [4, 7]])))
    call(state)
    assert counters(state) == {"valid": 5, "compared": 5, "agree": 4, "match": 5}
    state.reset_counters()
    assert state.counters == {}
    assert (state.replayed_rows, state.recomputed_rows) == (0, 0)


def test_agreement_excludes_fallback_rows_but_match_counts_them():
    state = state_for(action=FORWARD)
    state.collect_agreement = True
    # row 1 falls back to native {0,2} while the installed set is {0,3}: not compared, and it does not match.
    state.install(InstalledRoutes(u8([[7, 1], [0, 3], [4, 7]]), free_rows=torch.tensor([False, True, False])))
    call(state)
    assert counters(state) == {"valid": 3, "compared": 2, "agree": 2, "match": 2}


def test_observe_only_routes_natively_and_measures():
    state = state_for(action=FORWARD)
    state.collect_agreement = True
    # the engine's ids differ from native in row 1: native routing is used, agreement and match are 2 of 3
    state.install(InstalledRoutes(u8([[7, 1], [0, 3], [4, 7]]), observe_only=True))
    values, ids = call(state)
    assert_equal(ids, NATIVE_IDS)
    assert_equal(values, NATIVE_VALUES)
    assert counters(state) == {"valid": 3, "compared": 3, "agree": 2, "match": 2}
    assert state.replayed_rows == 0


def test_record_with_observed_routes():
    state = state_for(action=RouterReplayAction.RECORD)
    state.collect_agreement = True
    state.install(InstalledRoutes(u8([[7, 1], [0, 3], [4, 7]]), observe_only=True))
    values, ids = call(state)
    assert_equal(ids, NATIVE_IDS)
    assert counters(state) == {"valid": 3, "compared": 3, "agree": 2, "match": 2}
    assert state.pending() == (0, 0)
    assert len(state.take_recorded()) == 1


def test_agreement_off_by_default():
    state = state_for(action=FORWARD)
    state.install(InstalledRoutes(u8([[7, 1], [0, 3], [7, 4]])))
    call(state)
    assert state.counters == {}


# ------------------------------------------------------------------------------------------- deferred errors
def test_missing_route_is_deferred():
    state = state_for(layer=3, action=FORWARD)
    values, ids = call(state)
    assert_equal(ids, NATIVE_IDS)
    assert_equal(values, NATIVE_VALUES)
    assert state.errors == ["layer 3 was run with no routes installed"]
    assert state.replayed_rows == 0


def test_wrong_shape_is_deferred():
    state = state_for(layer=3, action=FORWARD)
    state.install(InstalledRoutes(u8([[2, 3], [5, 6]])))
    values, ids = call(state)
    assert_equal(ids, NATIVE_IDS)
    assert_equal(values, NATIVE_VALUES)
    assert state.errors == ["layer 3: installed routes have shape (2, 2), the router sees 3 tokens with top-2"]
    assert state.pending() == (0, 0)  # the bad route was consumed
    # wrong top-k too
    state.install(InstalledRoutes(u8([[2, 3, 4], [5, 6, 7], [0, 1, 2]])))
    call(state)
    assert state.errors[-1] == "layer 3: installed routes have shape (3, 3), the router sees 3 tokens with top-2"


def test_empty_recompute_queue_is_deferred():
    state = state_for(layer=3, action=BACKWARD, training_pass=True)
    values, ids = call(state)
    assert_equal(ids, NATIVE_IDS)
    assert_equal(values, NATIVE_VALUES)
    assert state.errors == ["recompute of layer 3 found no replayed ids to reuse"]
    assert state.recomputed_rows == 0


def test_unknown_action_raises():
    state = state_for(action="bogus")
    with pytest.raises(ValueError, match=re.escape("unknown router replay action 'bogus'")):
        call(state)


# ---------------------------------------------------------------------------------------------------- reset
def test_reset_and_pending():
    state = state_for(action=FORWARD, training_pass=True)
    state.install(InstalledRoutes(u8([[2, 3], [5, 6], [0, 1]])))
    state.install(InstalledRoutes(u8([[2, 3], [5, 6], [0, 1]])))
    with torch.no_grad():
        call(state)
    state.action = RECORD
    call(state)  # records, and consumes the second installed route as an observation
    state.action = BACKWARD
    call(state)
    call(state)  # queue now empty -> deferred error
    assert state.pending() == (0, 0)
    assert len(state.recorded) == 1 and len(state.errors) == 1
    state.reset()
    assert state.pending() == (0, 0)
    assert state.recorded == [] and state.errors == []
    assert state.action is None and state.training_pass is False
    assert state.layer_number == 5  # layer identity survives a reset
    assert state.replayed_rows == 3  # counters are reset separately (reset_counters)


# ------------------------------------------------------------------------------------------------ the router
REFUSAL = (
    "moe_enable_routing_replay=True turns on megatron-core's process-global RouterReplay; megatron_r3 "
    "replays through its own per-router state, so leave it False and use --router-replay"
)


def test_replay_topk_router_refuses_megatron_global_replay():
    config = types.SimpleNamespace(moe_enable_routing_replay=True)
    with pytest.raises(ValueError, match="^" + re.escape(REFUSAL) + "$"):
        ReplayTopKRouter(config, pg_collection=None)


def _router(**overrides):
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(num_layers=2, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                  num_moe_experts=8, moe_router_topk=2, add_bias_linear=False, moe_router_load_balancing_type="none")
    kwargs.update(overrides)
    config = TransformerConfig(**kwargs)
    # the router only stores these groups; nothing here runs a collective
    groups = types.SimpleNamespace(tp=None, cp=None, tp_cp=None, tp_dp_cp=None)
    return ReplayTopKRouter(config, pg_collection=groups)


def test_replay_topk_router_refuses_real_config():
    with pytest.raises(ValueError, match="^" + re.escape(REFUSAL) + "$"):
        _router(moe_enable_routing_replay=True)


def test_replay_topk_router_replays_through_megatron_routing():
    """megatron's own TopKRouter.routing -> topk_routing_with_score_function -> our hook (no silent bypass)."""
    torch.manual_seed(0)
    router = _router()
    assert isinstance(router.router_replay, RouterReplayState)
    assert router.replay is router.router_replay
    router.set_layer_number(3)
    assert router.replay.layer_number == 3
    router.replay.install(InstalledRoutes(u8([[2, 3], [5, 6], [0, 1]])))
    router.replay.action = FORWARD
    probs, routing_map = router.routing(torch.randn(3, 1, 8))
    assert routing_map.nonzero().tolist() == [[0, 2], [0, 3], [1, 5], [1, 6], [2, 0], [2, 1]]
    assert bool((probs[~routing_map] == 0).all())
    assert router.replay.pending() == (0, 0) and router.replay.errors == []
    assert router.replay.replayed_rows == 3
