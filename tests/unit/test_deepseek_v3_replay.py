"""Replay under the DeepSeek-V3 router (sigmoid scores, selection-only expert bias, group-limited top-k, routed
scaling factor), through megatron's own routing function and the project's `ReplayTopKRouter` state - no router code
of this family: these tests pin down that megatron already does what R3 needs here.

- replayed ids are used as given, even ids the group limit would have filtered out;
- gate weights are the *unbiased* sigmoid scores at those ids, normalised (top-k > 1) and scaled;
- gradients reach the router weights under replay, equal to HF's when HF's routes are replayed;
- with `moe_router_bias_update_rate = 0` (the family's default) megatron's end-of-step bias update leaves the bias
  unchanged; with another rate the counts it uses are the replayed routing map's (the rollout's routes).
"""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias, topk_routing_with_score_function
from megatron.core.transformer.moe.router_replay import RouterReplayAction

from megatron_r3.replay.router import InstalledRoutes, RouterReplayState

from tests.unit.test_deepseek_v3 import BASE, BATCH, SEQ, convert, hf_forward, make_hf, megatron_forward

transformers = pytest.importorskip("transformers")

E, K, GROUPS, GROUP_TOPK, SCALE = 8, 4, 4, 2, 2.5


def replay_state(ids):
    state = RouterReplayState()
    state.install(InstalledRoutes(expert_ids=ids.to(torch.uint8)))
    state.action = RouterReplayAction.REPLAY_FORWARD
    return state


def route(logits, bias, state=None):
    return topk_routing_with_score_function(
        logits, K, num_groups=GROUPS, group_topk=GROUP_TOPK, scaling_factor=SCALE, score_function="sigmoid",
        expert_bias=bias, router_replay=state, dense_output=True)


def test_replayed_ids_used_as_given_with_unbiased_normalised_scaled_weights():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, E, generator=gen)
    bias = 0.5 * torch.randn(E, generator=gen)
    free_probs, free_ids = route(logits, bias)
    # ids that break the group limit: one expert from each of the 4 groups (only 2 groups may be chosen natively)
    ids = torch.tensor([[0, 2, 4, 6], [1, 3, 5, 7], [7, 5, 3, 1], [0, 3, 4, 7], [6, 4, 2, 0], [1, 2, 5, 6]])
    groups_used = torch.tensor([len(set((row // (E // GROUPS)).tolist())) for row in ids])
    assert (groups_used > GROUP_TOPK).all()  # natively impossible selections
    state = replay_state(ids)
    probs, used = route(logits, bias, state)
    assert torch.equal(used, ids)
    assert state.errors == [] and state.replayed_rows == 6
    scores = torch.sigmoid(logits).gather(1, ids)
    expected = scores / (scores.sum(-1, keepdim=True) + 1e-20) * SCALE
    assert torch.allclose(probs, expected, rtol=0, atol=1e-6)
    # the bias changes selection only: replaying the free ids under another bias gives the free weights
    probs_other_bias, _ = route(logits, -bias, replay_state(free_ids))
    assert torch.allclose(probs_other_bias, free_probs, rtol=0, atol=1e-7)


def test_router_gradients_under_replay_equal_hf(world_of_one):
    model = make_hf("q_lora_groups")
    arch, config, chunk, hf, _ = convert(world_of_one, model)
    tokens = torch.randint(0, BASE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    _, routes, _ = hf_forward(model, tokens)
    weights = torch.randn(BATCH, SEQ, BASE["vocab_size"], generator=torch.Generator().manual_seed(4))

    model.zero_grad()
    (model(tokens).logits * weights).sum().backward()  # HF routes natively (its routes == the replayed ones)
    chunk.zero_grad()
    chunk.train()
    try:
        logits = megatron_forward(chunk, tokens, routes, grad=True)
    finally:
        chunk.eval()
    (logits * weights).sum().backward()
    for i in (1, 2):
        ours = chunk.decoder.layers[i].mlp.router.weight.grad
        theirs = model.model.layers[i].mlp.gate.weight.grad
        assert ours is not None and ours.abs().max() > 1e-3  # gradients reach the router under replay
        scale = theirs.abs().max().item()
        assert (ours - theirs).abs().max().item() <= 1e-4 * max(scale, 1.0)
        assert chunk.decoder.layers[i].mlp.router.expert_bias.grad is None  # a buffer, never trained


def test_bias_update_rate_zero_keeps_the_bias(world_of_one):
    bias = 0.5 * torch.randn(2, E, generator=torch.Generator().manual_seed(0))
    counts = torch.tensor([[9.0, 0, 3, 1, 0, 0, 2, 1], [1.0, 1, 1, 1, 1, 1, 1, 9]])
    assert torch.equal(get_updated_expert_bias(counts.clone(), bias, 0.0), bias)
    moved = get_updated_expert_bias(counts.clone(), bias, 1e-3)
    assert not torch.equal(moved, bias)  # a non-zero rate does move it (the check above can fail)
