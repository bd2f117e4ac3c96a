"""What rank 0 ships each rank after a rollout: every sample's tokens, but routes only for the samples of the rank's
data-parallel share (chosen exactly as `shard_minibatches` chooses the samples a rank trains) and only for its
routers' layers; laying them out on the rank gives the same ids as laying out the full routes."""

from __future__ import annotations

import pytest
import torch

from megatron_r3.platform.parallel_context import ParallelContext, ParallelSizes
from megatron_r3.replay.layout import pack_thd, router_token_slots
from megatron_r3.replay.microbatch import localize_routes
from megatron_r3.replay.routes import Routes
from megatron_r3.train.microbatching import TrainSample, shard_minibatches
from megatron_r3.train.rollout_phase import RolloutPayload, RouteShare, routes_for_share

NUM_LAYERS, TOPK, EXPERTS = 6, 2, 8


def data_parallel_rank(dp: int, dp_rank: int) -> ParallelContext:
    """Data-parallel rank `dp_rank` of `dp` (no model parallelism: the global rank is the data-parallel rank)."""
    return ParallelContext.for_rank(ParallelSizes(), dp, dp_rank)


def _payload(num_samples: int) -> RolloutPayload:
    gen = torch.Generator().manual_seed(0)
    samples = []
    for index in range(num_samples):
        tokens = torch.arange(6) + index
        ids = torch.argsort(torch.rand(5, NUM_LAYERS, EXPERTS, generator=gen), -1)[..., :TOPK].to(torch.uint8)
        samples.append(TrainSample(index=index, tokens=tokens, prompt_length=2, rollout_logprobs=torch.zeros(4),
                                   reward=1.0, advantage=0.5, routes=Routes(expert_ids=ids, num_experts=EXPERTS),
                                   free_rows=torch.zeros(5, dtype=torch.bool)))
    return RolloutPayload(samples=samples, metrics={"reward/mean": 1.0})


def test_owner_matches_the_samples_each_rank_trains():
    samples = list(range(24))
    for dp, gbs in ((1, 8), (2, 8), (4, 8), (2, 12), (3, 12)):
        for dp_rank in range(dp):
            owner = data_parallel_rank(dp, dp_rank)
            trained = [s for minibatch in shard_minibatches(samples, gbs, owner) for s in minibatch]
            owned = [p for p in samples if owner.owns_sample(p, gbs)]
            assert trained == owned


@pytest.mark.parametrize("layers", [(1, 2, 3, 4, 5, 6), (4, 5, 6), (2, 5), (6, 3)])
def test_each_rank_gets_its_samples_and_layers_only(layers):
    payload = _payload(16)
    dp, gbs = 2, 8
    for dp_rank in range(dp):
        owner = data_parallel_rank(dp, dp_rank)
        share = routes_for_share(payload, owner, RouteShare(layers), gbs)
        assert len(share.samples) == 16 and share.metrics == payload.metrics
        kept = sorted(layers)
        for position, (sent, original) in enumerate(zip(share.samples, payload.samples)):
            assert torch.equal(sent.tokens, original.tokens) and sent.advantage == original.advantage
            if owner.owns_sample(position, gbs):
                assert sent.route_layer_numbers == tuple(kept)
                want = original.routes.expert_ids[:, [n - 1 for n in kept]]
                assert torch.equal(sent.routes.expert_ids, want)
                assert sent.free_rows is original.free_rows
            else:
                assert sent.routes is None and sent.free_rows is None
        route_bytes = sum(s.routes.nbytes() for s in share.samples if s.routes is not None)
        assert route_bytes == 8 * 5 * len(kept) * TOPK  # half the samples, this rank's layers
    assert payload.samples[0].routes.num_layers == NUM_LAYERS  # the original is untouched


@pytest.mark.parametrize("layers", [(4, 5, 6), (2, 5), (6, 3)])
def test_narrowed_routes_lay_out_like_the_full_ones(layers):
    samples = _payload(4).samples
    share = routes_for_share(RolloutPayload(samples=samples), data_parallel_rank(1, 0), RouteShare(layers), 4)
    layout = pack_thd([s.num_slots for s in samples], pad_multiple=4)
    slots = router_token_slots(layout, tensor_model_parallel_size=2, tp_rank=1, sequence_parallel=True)
    full = localize_routes([s.routes.expert_ids for s in samples], layout, slots, layers, EXPERTS)
    narrowed = localize_routes([s.routes.expert_ids for s in share.samples], layout, slots, layers, EXPERTS,
                               source_layer_numbers=share.samples[0].route_layer_numbers)
    assert narrowed.layer_numbers == full.layer_numbers == layers
    assert torch.equal(narrowed.expert_ids, full.expert_ids)
    with pytest.raises(ValueError, match=r"this rank's routers need layers \[1\], but the routes carry only layers"):
        localize_routes([s.routes.expert_ids for s in share.samples], layout, slots, (1, *layers), EXPERTS,
                        source_layer_numbers=share.samples[0].route_layer_numbers)


def test_an_error_payload_travels_unchanged():
    failed = RolloutPayload(error="the rollout engine failed: boom")
    assert routes_for_share(failed, data_parallel_rank(2, 1), RouteShare((1, 2)), 8) is failed
