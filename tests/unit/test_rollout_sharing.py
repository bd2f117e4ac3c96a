"""What rank 0 ships each rank after a rollout: every sample's tokens, but routes only for the rank's own
data-parallel share, chosen exactly as `shard_minibatches` chooses the samples a rank trains."""

from __future__ import annotations

import torch

from megatron_r3.replay.routes import Routes
from megatron_r3.train.microbatching import RankLayout, TrainSample, data_parallel_owner, shard_minibatches
from megatron_r3.train.rollout_phase import RolloutPayload, routes_for_data_parallel_rank


def _payload(num_samples: int) -> RolloutPayload:
    samples = []
    for index in range(num_samples):
        tokens = torch.arange(6) + index
        routes = Routes(expert_ids=torch.full((5, 2, 2), index % 7, dtype=torch.uint8), num_experts=8)
        samples.append(TrainSample(index=index, tokens=tokens, prompt_length=2, rollout_logprobs=torch.zeros(4),
                                   reward=1.0, advantage=0.5, routes=routes, free_rows=torch.zeros(5, dtype=torch.bool)))
    return RolloutPayload(samples=samples, metrics={"reward/mean": 1.0})


def test_owner_matches_the_samples_each_rank_trains():
    samples = list(range(24))
    for dp, gbs in ((1, 8), (2, 8), (4, 8), (2, 12), (3, 12)):
        for dp_rank in range(dp):
            trained = [s for minibatch in shard_minibatches(samples, gbs, RankLayout(data_parallel_size=dp,
                                                                                     dp_rank=dp_rank))
                       for s in minibatch]
            owned = [p for p in samples if data_parallel_owner(p, gbs, dp) == dp_rank]
            assert trained == owned


def test_each_rank_gets_routes_for_its_share_only():
    payload = _payload(16)
    dp, gbs = 2, 8
    for dp_rank in range(dp):
        share = routes_for_data_parallel_rank(payload, dp_rank, dp, gbs)
        assert len(share.samples) == 16 and share.metrics == payload.metrics
        for position, (sent, original) in enumerate(zip(share.samples, payload.samples)):
            assert torch.equal(sent.tokens, original.tokens) and sent.advantage == original.advantage
            if data_parallel_owner(position, gbs, dp) == dp_rank:
                assert sent.routes is original.routes and sent.free_rows is original.free_rows
            else:
                assert sent.routes is None and sent.free_rows is None
        route_bytes = sum(s.routes.expert_ids.numel() for s in share.samples if s.routes is not None)
        assert route_bytes == 8 * 5 * 2 * 2  # half of the 16 samples
    assert payload.samples[0].routes is not None  # the original is untouched


def test_an_error_payload_travels_unchanged():
    failed = RolloutPayload(error="the rollout engine failed: boom")
    assert routes_for_data_parallel_rank(failed, 1, 2, 8) is failed
