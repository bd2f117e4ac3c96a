"""Multi-turn rollouts: route stitching with routed_experts_start_len, the T-1 rule over the whole conversation, the
per-token loss mask of inserted (tool/user) tokens, and the embedded engine's start_len capture."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_r3.replay.routes import RouteError, routes_from_array, validate_routes
from megatron_r3.rollout.base import RolloutSample, SamplingParams
from megatron_r3.rollout.base import check_routes_start_len
from megatron_r3.rollout.multiturn import generate_multiturn, stitch_routes
from megatron_r3.rollout.engines.sglang.protocol import generate_payload, plan_samples, split_requests
from megatron_r3.train.microbatching import TrainSample

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYERS, TOPK, EXPERTS = 4, 2, 8


def _ids(rows, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOPK]
                        for _ in range(rows * LAYERS)]).view(rows, LAYERS, TOPK)


def _part(ids, start):
    return routes_from_array(ids, num_experts=EXPERTS, start_row=start, source="sglang")


# ------------------------------------------------------------------------------------------------ stitching
def test_stitched_parts_tile_every_fed_position():
    # turn 1: prompt 4 + 3 generated -> T1 = 7, rows 0..5; turn 2: + 2 inserted + 2 generated -> T2 = 11, rows 6..9
    full = _ids(10)
    routes = stitch_routes([_part(full[:6], 0), _part(full[6:], 6)], [7, 11], sample_id="s")
    assert routes.start_row == 0 and routes.num_rows == 10
    assert torch.equal(routes.expert_ids.long(), full)
    validate_routes(routes, num_tokens=11, moe_layers=(True,) * LAYERS, topk=TOPK, sample_id="s")  # T-1 rule


def test_a_turn_that_asked_for_the_wrong_start_len_is_refused():
    full = _ids(10)
    with pytest.raises(RouteError) as error:  # turn 2 sent start_len 0: its rows overlap turn 1's
        stitch_routes([_part(full[:6], 0), _part(full, 0)], [7, 11], sample_id="s")
    assert str(error.value) == ("routes of sample 's': turn 2 routes start at row 0, expected 6 "
                                "(routed_experts_start_len of turn 2 must be the previous turn's T-1 = 6)")
    with pytest.raises(RouteError, match="turn 2 routes start at row 7, expected 6"):  # the last token's row lost
        stitch_routes([_part(full[:6], 0), _part(full[7:], 7)], [7, 11], sample_id="s")


def test_row_counts_follow_t_minus_1_per_turn():
    full = _ids(10)
    with pytest.raises(RouteError) as error:
        stitch_routes([_part(full[:6], 0), _part(full[6:9], 6)], [7, 11], sample_id="s")
    assert str(error.value) == ("routes of sample 's': turn 2 routes have 3 rows, expected T - 1 - start_len = "
                                "11 - 1 - 6 = 4")
    with pytest.raises(RouteError, match="turn 1 routes have 7 rows, expected T - 1 - start_len = 7 - 1 - 0 = 6"):
        stitch_routes([_part(full[:7], 0), _part(full[7:], 7)], [7, 11], sample_id="s")
    with pytest.raises(RouteError, match="1 route parts for 2 turns"):
        stitch_routes([_part(full, 0)], [7, 11], sample_id="s")


def test_start_len_is_checked_by_sglangs_rule():
    assert check_routes_start_len([[1, 2, 3]], None) == [0]
    assert check_routes_start_len([[1, 2, 3]], [3]) == [3]
    with pytest.raises(ValueError) as error:
        check_routes_start_len([[1, 2, 3]], [4])
    assert str(error.value) == ("routes_start_len[0] = 4 must be an int in [0, 3] (the prompt's length), as SGLang "
                                "requires of routed_experts_start_len")
    with pytest.raises(ValueError, match=r"routes_start_len\[1\] = -1 must be an int in \[0, 2\]"):
        check_routes_start_len([[1], [1, 2]], [0, -1])
    with pytest.raises(ValueError, match="routes_start_len has 1 entries for 2 prompts"):
        check_routes_start_len([[1], [1, 2]], [0])


# ------------------------------------------------------------------------------------------------ wire
def test_one_start_len_per_request_and_single_turn_bodies_unchanged():
    specs = plan_samples(3, 2, None)
    assert [len(r) for r in split_requests(specs, 0)] == [6]
    assert [[s.prompt_index for s in r] for r in split_requests(specs, 0, [5, 5, 7])] == [[0, 0, 1, 1], [2, 2]]
    assert [len(r) for r in split_requests(specs, 3, [5, 5, 5])] == [3, 3]
    plain = generate_payload([[1, 2]], [{}], return_routes=True, batch=False)
    assert "routed_experts_start_len" not in plain
    assert generate_payload([[1, 2]], [{}], return_routes=True, batch=False, routes_start_len=0) == plain
    assert generate_payload([[1, 2]], [{}], return_routes=True, batch=False,
                            routes_start_len=2)["routed_experts_start_len"] == 2


# ------------------------------------------------------------------------------------------------ loss mask
def _train_sample(response_mask=None):
    tokens = torch.tensor([1, 4, 5, 6, 30, 2, 9, 10, 31, 2])  # prompt 4 | answer 2 | inserted 2 | answer 2
    return TrainSample(index=0, tokens=tokens, prompt_length=4, rollout_logprobs=-torch.ones(6), reward=1.0,
                       advantage=0.5, response_mask=response_mask)


def test_inserted_tokens_carry_no_loss_and_single_turn_is_unchanged():
    single = _train_sample()
    assert single.loss_mask().tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]  # the single-turn rule, as before
    multi = _train_sample(torch.tensor([True, True, False, False, True, True]))
    # predicted position p targets token p + 1: targets 9 and 10 (positions 5, 6) are inserted
    assert multi.loss_mask().tolist() == [0, 0, 0, 1, 1, 0, 0, 1, 1]
    assert multi.num_slots == single.num_slots  # inserted tokens are still fed (and replayed)


def test_the_reward_sees_the_last_answer():
    tokens = torch.tensor([1, 4, 30, 2, 9, 10, 31, 2])
    sample = RolloutSample(tokens, 2, torch.zeros(6), None, "stop", 0,
                           response_mask=torch.tensor([True, True, False, False, True, True]))
    assert sample.final_turn_ids().tolist() == [31, 2]
    assert RolloutSample(tokens, 2, torch.zeros(6), None, "stop", 0).final_turn_ids().tolist() == tokens[2:].tolist()


# ------------------------------------------------------------------------------------------------ embedded engine
@pytest.fixture(scope="module")
def engine():
    from transformers import Qwen3MoeConfig

    from megatron_r3.rollout.engines.hf import HFRolloutEngine

    with open(os.path.join(REPO, "configs", "models", "qwen3_moe_tiny.json")) as handle:
        config = Qwen3MoeConfig(**json.load(handle))
    torch.manual_seed(0)
    return HFRolloutEngine(config, dtype="fp32", progress=False, max_batch_size=64)


def test_hf_engine_returns_rows_from_start_len(engine):
    sampling = SamplingParams(max_new_tokens=3, seed=5)
    full = engine.generate([[1, 4, 5, 6, 7]], sampling, return_routes=True).samples[0]
    part = engine.generate([[1, 4, 5, 6, 7]], sampling, return_routes=True, routes_start_len=[3]).samples[0]
    assert torch.equal(part.tokens, full.tokens)
    assert part.routes.start_row == 3 and part.routes.end_row == full.tokens.shape[0] - 1
    assert torch.equal(part.routes.expert_ids, full.routes.expert_ids[3:])
    with pytest.raises(ValueError, match=r"routes_start_len\[0\] = 6 must be an int in \[0, 5\]"):
        engine.generate([[1, 4, 5, 6, 7]], sampling, return_routes=True, routes_start_len=[6])


def test_multiturn_through_the_embedded_engine(engine):
    tool = [9, 10, 11]
    result = generate_multiturn(engine, [[1, 4, 5, 6], [1, 7, 8]], SamplingParams(max_new_tokens=3, seed=3),
                                samples_per_prompt=2, return_routes=True, num_turns=3, tool=lambda i, t, ids: tool)
    assert [s.prompt_index for s in result.samples] == [0, 0, 1, 1] and not result.failures
    for sample in result.samples:
        mask = sample.response_mask
        assert mask.shape[0] == sample.response_length == sample.response_logprobs.shape[0]
        inserted = torch.nonzero(~mask).flatten().tolist()
        assert len(inserted) == 2 * len(tool)  # two tool replies, between three answers
        assert [sample.response_ids[i].item() for i in inserted] == tool * 2
        assert torch.all(sample.response_logprobs[~mask] == 0) and torch.all(sample.response_logprobs[mask] < 0)
        assert sample.routes.start_row == 0 and sample.routes.num_rows == sample.tokens.shape[0] - 1
        validate_routes(sample.routes, num_tokens=sample.tokens.shape[0], moe_layers=tuple(engine.moe_layers),
                        topk=TOPK, sample_id=0)
    # the turns replay exactly: the last turn's context, fed again as one prompt, routes every row from its
    # start_len as the stitched routes say (fp32, the same batch of one)
    sample = result.samples[0]
    last = int(torch.nonzero(~sample.response_mask).flatten()[-1]) + sample.prompt_length + 1
    again = engine.generate([sample.tokens[:last].tolist()], SamplingParams(max_new_tokens=1, temperature=0.0),
                            return_routes=True, routes_start_len=[last - 1 - len(tool)]).samples[0]
    assert torch.equal(again.routes.expert_ids[:-1], sample.routes.expert_ids[last - 1 - len(tool): last - 1])
