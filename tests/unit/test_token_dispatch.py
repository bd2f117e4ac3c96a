"""`GatherPermuteAlltoAllDispatcher` (model/token_dispatch.py) against megatron's `MoEAlltoAllTokenDispatcher` with
the same config, on the CPU in fp32, in a world of one (EP x expert-TP = 1: the sync-free path).

What must be equal, and how exactly:
- permuted rows, permuted probs, tokens_per_expert, the rows' gradients and the probs' gradients: BITWISE. Both
  dispatchers move the same values to the same places (the same argsort orders the rows; each permuted prob is
  read from one (token, expert) entry and its gradient lands on that entry alone, added to 0); nothing is summed.
- the combined output and the input's gradient: each token's value is the sum of its k expert rows (forward:
  megatron's `scatter_add_` vs our gather + `sum(1)`; backward: megatron's `index_add_` vs the same gather + sum).
  Both are recursive fp32 sums of the same k terms (megatron's starts from an exact 0), possibly in different orders.
  Each is within gamma_{k-1} * sum|x_i| of the exact sum (Higham, Accuracy and Stability of Numerical Algorithms,
  (4.4)), gamma_m = m*u / (1 - m*u), u = 2^-24, so they differ by at most 2 * gamma_{k-1} * sum|x_i| per element
  (0 for top-1: a single term is moved, not summed). `within_summation_bound` checks exactly that.
- a full MoE layer (GroupedExperts and SequentialMLP experts) and a GPTModel: the same two sums are the only
  difference, so expert/router weight gradients are bitwise and outputs / input gradients within the same kind of
  bound (stated at the test).
The planted-bug tests show the checks fail when the within-expert token order is reversed or a token's row is
dropped from its sum.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from tests.unit.host_syncs import forbid_host_syncs

U = 2.0**-24  # fp32 unit roundoff

pytestmark = pytest.mark.usefixtures("world_of_one")  # tests/unit/conftest.py


def make_config(num_experts=6, topk=2, hidden=8, **overrides):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=2, hidden_size=hidden, num_attention_heads=2, use_cpu_initialization=True,
                num_moe_experts=num_experts, moe_router_topk=topk, moe_ffn_hidden_size=12, ffn_hidden_size=16,
                moe_token_dispatcher_type="alltoall", gated_linear_unit=True, activation_func=F.silu,
                add_bias_linear=False, bias_activation_fusion=False, params_dtype=torch.float32,
                moe_router_load_balancing_type="none", moe_router_pre_softmax=topk == 1,
                attention_dropout=0.0, hidden_dropout=0.0)
    return TransformerConfig(**dict(base, **overrides))


def pgs():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def dispatchers(config):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from megatron_r3.model.token_dispatch import GatherPermuteAlltoAllDispatcher

    experts = list(range(config.num_moe_experts))
    return (MoEAlltoAllTokenDispatcher(len(experts), experts, config=config, pg_collection=pgs()),
            GatherPermuteAlltoAllDispatcher(len(experts), experts, config=config, pg_collection=pgs()))


def routing(num_tokens, num_experts, topk, seed, zero_probs=False):
    """Random top-k routing: bool map [tokens, experts] with exactly topk experts per token, probs at the routed
    entries (0 elsewhere; with `zero_probs` some routed entries are 0 too)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randn(num_tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, ids, True)
    probs = torch.rand(num_tokens, num_experts, generator=gen) * routing_map
    if zero_probs:
        probs = probs * (torch.rand(num_tokens, num_experts, generator=gen) > 0.4)
    return routing_map, probs


def expert_weights(num_experts, hidden, seed=1):
    return torch.randn(num_experts, hidden, hidden, generator=torch.Generator().manual_seed(seed)) / hidden**0.5


def experts_of_rows(tokens_per_expert):
    return torch.repeat_interleave(torch.arange(tokens_per_expert.numel()), tokens_per_expert)


def round_trip(dispatcher, hidden, routing_map, probs, weights, grad_out, experts=None):
    """dispatch -> experts (row @ W[expert] * prob, or `experts(rows, tokens_per_expert, probs)`) -> combine, then
    backward of (output * grad_out).sum(). Returns every intermediate and gradient the tests compare."""
    hidden = hidden.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    tokens, permuted_probs = dispatcher.dispatch_preprocess(hidden, routing_map, probs)
    tokens, permuted_probs = dispatcher.token_dispatch(tokens, permuted_probs)
    rows, tokens_per_expert, rows_probs = dispatcher.dispatch_postprocess(tokens, permuted_probs)
    rows.retain_grad()
    rows_probs.retain_grad()
    if experts is None:
        w = weights[experts_of_rows(tokens_per_expert)]
        expert_out = torch.bmm(rows.unsqueeze(1), w).squeeze(1) * rows_probs.unsqueeze(1)
    else:
        expert_out = experts(rows, tokens_per_expert, rows_probs)
    expert_out.retain_grad()
    combined = dispatcher.token_combine(dispatcher.combine_preprocess(expert_out))
    output = dispatcher.combine_postprocess(combined)
    (output * grad_out).sum().backward()
    return dict(rows=rows.detach(), rows_probs=rows_probs.detach(), tokens_per_expert=tokens_per_expert,
                expert_out=expert_out.detach(), output=output.detach(), rows_grad=rows.grad,
                rows_probs_grad=rows_probs.grad, expert_out_grad=expert_out.grad, hidden_grad=hidden.grad,
                probs_grad=probs.grad, row_token=dispatcher.reversed_local_input_permutation_mapping)


def summation_bound(terms, row_token, num_tokens, topk):
    """2 * gamma_{k-1} * sum_i |x_i| per token and element, for the k rows `terms` [tokens*topk, h] of each token."""
    gamma = (topk - 1) * U / (1 - (topk - 1) * U)
    magnitude = torch.zeros(num_tokens, terms.shape[-1], dtype=torch.float64)
    magnitude.index_add_(0, row_token, terms.abs().double())
    return 2 * gamma * magnitude


def within_summation_bound(got, want, terms, row_token, topk):
    bound = summation_bound(terms, row_token, want.shape[0], topk)
    excess = (got.double() - want.double()).abs() - bound
    assert (excess <= 0).all(), f"differs beyond the fp32 summation-order bound by {excess.max().item():.3g}"


def assert_matches_megatron(ref, got, topk):
    for name in ("rows", "rows_probs", "tokens_per_expert", "expert_out_grad", "rows_grad", "rows_probs_grad",
                 "probs_grad"):
        assert torch.equal(got[name], ref[name]), f"{name} differs from megatron's dispatcher"
    within_summation_bound(got["output"], ref["output"], ref["expert_out"], ref["row_token"], topk)
    within_summation_bound(got["hidden_grad"], ref["hidden_grad"], ref["rows_grad"], ref["row_token"], topk)


CASES = {  # name: (tokens, experts, topk, zero_probs)
    "top2": (13, 6, 2, False),
    "top1": (9, 4, 1, False),
    "topk_all_experts": (7, 4, 4, False),
    "zero_probs": (11, 5, 3, True),
    "one_expert": (5, 1, 1, False),
}


def case_inputs(num_tokens, num_experts, topk, zero_probs, hidden=8, seed=0):
    routing_map, probs = routing(num_tokens, num_experts, topk, seed, zero_probs)
    gen = torch.Generator().manual_seed(seed + 100)
    return (torch.randn(num_tokens, hidden, generator=gen), routing_map, probs, expert_weights(num_experts, hidden),
            torch.randn(num_tokens, hidden, generator=gen))


@pytest.mark.parametrize("case", list(CASES))
def test_equals_megatron_dispatcher(case):
    num_tokens, num_experts, topk, zero_probs = CASES[case]
    config = make_config(num_experts=num_experts, topk=topk)
    megatron, ours = dispatchers(config)
    data = case_inputs(num_tokens, num_experts, topk, zero_probs)
    ref = round_trip(megatron, *data)
    got = round_trip(ours, *data)
    assert got["rows"].shape == (num_tokens * topk, 8)
    assert_matches_megatron(ref, got, topk)
    if zero_probs:
        assert (got["rows_probs"] == 0).any()  # routed entries with probability 0 are still dispatched
    assert got["tokens_per_expert"].device == data[0].device and got["tokens_per_expert"].dtype == torch.long


def test_bound_is_tight_enough_to_see_a_dropped_row(monkeypatch):
    """The output bound fails when one of a token's k rows is left out of its sum (a planted bug)."""
    from megatron_r3.model import token_dispatch

    original = token_dispatch.sum_token_rows
    monkeypatch.setattr(token_dispatch, "sum_token_rows", lambda rows, token_rows: original(rows, token_rows[:, 1:]))
    config = make_config(num_experts=6, topk=2)
    megatron, ours = dispatchers(config)
    data = case_inputs(13, 6, 2, False)
    ref = round_trip(megatron, *data)
    got = round_trip(ours, *data)
    with pytest.raises(AssertionError, match="summation-order bound"):
        within_summation_bound(got["output"], ref["output"], ref["expert_out"], ref["row_token"], 2)


def test_planted_bug_reversed_token_order_within_experts_is_caught(monkeypatch):
    """Rows of each expert in descending token order (consistently inverted, so the combined output stays right):
    the bitwise row check fails."""
    from megatron_r3.model import token_dispatch

    original = token_dispatch.GatherPermutation.of.__func__

    def reversed_within_experts(cls, routing_map, topk):
        right = original(cls, routing_map, topk)
        num_tokens = routing_map.shape[0]
        order = torch.argsort(right.row_expert * num_tokens + (num_tokens - 1 - right.row_token))  # token desc
        row_token, row_expert = right.row_token[order], right.row_expert[order]
        return cls(row_token, row_expert, row_token.argsort(stable=True).view(num_tokens, topk))

    monkeypatch.setattr(token_dispatch.GatherPermutation, "of", classmethod(reversed_within_experts))
    config = make_config(num_experts=6, topk=2)
    megatron, ours = dispatchers(config)
    data = case_inputs(13, 6, 2, False)
    ref = round_trip(megatron, *data)
    got = round_trip(ours, *data)
    with pytest.raises(AssertionError, match="rows differs from megatron"):
        assert_matches_megatron(ref, got, 2)
    torch.testing.assert_close(got["output"], ref["output"])  # the consistently inverted sum is still right


def test_gradients_are_deterministic():
    config = make_config(num_experts=6, topk=3)
    _, ours = dispatchers(config)
    data = case_inputs(17, 6, 3, False)
    first, second = round_trip(ours, *data), round_trip(ours, *data)
    for name in ("output", "hidden_grad", "probs_grad"):
        assert torch.equal(first[name], second[name])


class _CountingMoveToCpu:
    def __init__(self, original):
        self.original, self.copies = original, 0

    def __call__(self, tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            self.copies += 1
        return self.original(tensor, as_numpy=as_numpy, record_stream=record_stream)


def test_no_dtoh_copy_and_no_sync_point_with_ep_tp_1(monkeypatch):
    """EP x expert-TP = 1: megatron's dispatcher copies tokens_per_expert (and the per-expert counts) to the host
    and waits for them before permutation 2; ours copies nothing, registers no sync point, and its whole
    forward and backward run with every tensor -> Python conversion forbidden."""
    from megatron.core.transformer.moe import token_dispatcher

    counter = _CountingMoveToCpu(token_dispatcher.maybe_move_tensor_to_cpu)
    monkeypatch.setattr(token_dispatcher, "maybe_move_tensor_to_cpu", counter)
    config = make_config(num_experts=6, topk=2)
    megatron, ours = dispatchers(config)
    assert ours.skip_permutation_2 and ours.gather_permute
    routing_map, probs = routing(13, 6, 2, seed=0)
    hidden = torch.randn(13, 8)

    def scaled(rows, tokens_per_expert, rows_probs):  # an expert that reads no count on the host
        return rows * rows_probs.unsqueeze(1) * 3.0

    round_trip(megatron, hidden, routing_map, probs, None, torch.ones_like(hidden), experts=scaled)
    assert counter.copies >= 2 and megatron.cuda_sync_point == "before_permutation_2"  # the check can fail
    counter.copies = 0
    with monkeypatch.context() as guard:
        forbid_host_syncs(guard)
        got = round_trip(ours, hidden, routing_map, probs, None, torch.ones_like(hidden), experts=scaled)
    assert counter.copies == 0 and ours.cuda_sync_point == "no_sync"
    assert not hasattr(ours, "d2h_event")  # no DtoH event was ever recorded
    assert torch.equal(got["tokens_per_expert"], routing_map.sum(0))


@pytest.mark.parametrize("override", [dict(moe_expert_capacity_factor=1.0),
                                      dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True),
                                      dict(moe_router_padding_for_quantization=True)])
def test_dropping_and_padding_defer_to_megatron(override):
    from megatron_r3.model.token_dispatch import gather_permute_applies

    config = make_config()
    assert gather_permute_applies(config)
    for name, value in override.items():  # set after validation (quantization padding also needs fp8 settings)
        setattr(config, name, value)
    assert not gather_permute_applies(config)


def test_fewer_than_topk_experts_per_token_already_breaks_megatron():
    """The invariant the gather path relies on (exactly topk experts per token) is megatron's too: a row with one
    expert fewer (a replayed route naming one expert twice collapses so) makes megatron permute tokens*topk rows of
    which the last were never routed, while tokens_per_expert counts one row fewer."""
    num_tokens, topk = 5, 2
    config = make_config(num_experts=4, topk=topk)
    megatron, _ = dispatchers(config)
    routing_map, probs = routing(num_tokens, 4, topk, seed=3)
    routing_map[2] = False
    routing_map[2, 1] = True  # token 2 routed to expert 1 only
    hidden = torch.randn(num_tokens, 8)
    megatron.dispatch_preprocess(hidden, routing_map, probs)
    rows_to_tokens = megatron.reversed_local_input_permutation_mapping
    assert rows_to_tokens.numel() == num_tokens * topk
    assert int(megatron.tokens_per_expert.sum()) == num_tokens * topk - 1
    # the extra row is token 0's at expert 0 or the next unrouted pair in expert-major order: never routed
    flat = routing_map.T.reshape(-1).argsort(descending=True, stable=True)[num_tokens * topk - 1]
    assert not routing_map.T.reshape(-1)[flat]
    assert rows_to_tokens[-1] == flat % num_tokens


# ---------------------------------------------------------------------------------------------- whole MoE layer


def layer_specs(config):
    """(megatron's MoELayer spec, ours) from the local replay spec: same router, experts and everything else."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_r3.model.specs import replay_decoder_block_spec
    from megatron_r3.model.token_dispatch import GatherDispatchMoELayer

    block = replay_decoder_block_spec(config, use_transformer_engine=False, fused_attention=False)
    ours = block.layer_specs[0].submodules.mlp
    assert isinstance(ours, functools.partial) and ours.func is GatherDispatchMoELayer
    return functools.partial(MoELayer, *ours.args, **ours.keywords), ours


@pytest.mark.parametrize("grouped", [True, False])
def test_moe_layer_equals_megatron_layer(grouped):
    """Forward + backward of a whole MoE layer (replay router, GroupedExperts or SequentialMLP experts) with the
    same weights. The experts see the same rows and row gradients, so every weight gradient is bitwise. The output
    is the k-term sum of the expert rows (the dispatcher bound); the input gradient is the router's contribution
    plus the k-term sum of the rows' gradients, so it may differ by that sum's bound plus the rounding of the final
    add, u * |a + b| on each side (2u * |gradient| up to second order)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_r3.model.grouped_experts import GroupedExperts
    from megatron_r3.model.token_dispatch import GatherPermuteAlltoAllDispatcher

    topk = 3
    config = make_config(num_experts=6, topk=topk, moe_grouped_gemm=grouped)
    theirs_spec, ours_spec = layer_specs(config)
    megatron, ours = theirs_spec(config=config, pg_collection=pgs()), ours_spec(config=config, pg_collection=pgs())
    assert isinstance(ours.experts, GroupedExperts if grouped else SequentialMLP)
    assert type(ours.token_dispatcher) is GatherPermuteAlltoAllDispatcher
    with torch.no_grad():
        for p in megatron.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) / p.shape[-1] ** 0.5)
    ours.load_state_dict(megatron.state_dict())
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(5, 3, 8, generator=gen)  # [s, b, h]
    grad_out = torch.randn(5, 3, 8, generator=gen)
    results = []
    for layer in (megatron, ours):
        seen = {}

        def keep_rows(module, args):
            args[0].retain_grad()
            seen["rows"] = args[0]

        def keep_output(module, args, output):
            seen["out"] = output[0].detach()

        hooks = [layer.experts.register_forward_pre_hook(keep_rows), layer.experts.register_forward_hook(keep_output)]
        x = hidden.clone().requires_grad_(True)
        out, _ = layer(x)
        (out * grad_out).sum().backward()
        for hook in hooks:
            hook.remove()
        row_token = layer.token_dispatcher.reversed_local_input_permutation_mapping
        results.append(dict(out=out.detach().view(-1, 8), grad=x.grad.view(-1, 8), rows_grad=seen["rows"].grad,
                            expert_out=seen["out"], row_token=row_token,
                            params={n: p.grad for n, p in layer.named_parameters()}))
    ref, got = results
    for name, grad in ref["params"].items():
        assert torch.equal(got["params"][name], grad), name
    assert torch.equal(got["rows_grad"], ref["rows_grad"]) and torch.equal(got["expert_out"], ref["expert_out"])
    within_summation_bound(got["out"], ref["out"], ref["expert_out"], ref["row_token"], topk)
    grad_bound = summation_bound(ref["rows_grad"], ref["row_token"], 15, topk) + 2 * U * ref["grad"].abs().double()
    assert ((got["grad"].double() - ref["grad"].double()).abs() <= grad_bound * (1 + 4 * U)).all()


def test_gpt_model_with_replay_installs_exactly_the_replayed_ids_and_equals_megatron():
    """A 2-layer GPTModel (local spec, MoE layers) run with router replay: every MoE layer's dispatcher received
    the routing map of the installed ids, and the loss and every gradient equal the same model with megatron's
    MoELayer BITWISE. The only numeric difference is the order of each token's k-term sums (bounded in the tests
    above); on the CPU both run in the same order -- megatron's scatter_add_/index_add_ walk the rows in order
    (a token's experts ascending) from an exact 0, and `sum(1)` over the non-innermost dim accumulates the same
    terms sequentially -- so the tolerance here is 0 (on a GPU the atomics' order varies and only the bound holds)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_r3.model.specs import replay_decoder_block_spec
    from megatron_r3.model.token_dispatch import GatherPermuteAlltoAllDispatcher
    from megatron_r3.replay.router import InstalledRoutes

    num_experts, topk, seq, vocab = 6, 2, 7, 32
    config = make_config(num_experts=num_experts, topk=topk, hidden=16, num_attention_heads=4, moe_grouped_gemm=True)
    ours_block = replay_decoder_block_spec(config, use_transformer_engine=False, fused_attention=False)

    def megatron_layer(spec):
        mlp = spec.submodules.mlp
        return dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, mlp=functools.partial(MoELayer, *mlp.args, **mlp.keywords)))

    theirs_block = dataclasses.replace(ours_block, layer_specs=[megatron_layer(s) for s in ours_block.layer_specs])
    models = [GPTModel(config=config, transformer_layer_spec=block, vocab_size=vocab, max_sequence_length=seq,
                       pg_collection=pgs()) for block in (theirs_block, ours_block)]
    models[1].load_state_dict(models[0].state_dict())
    assert all(type(layer.mlp.token_dispatcher) is GatherPermuteAlltoAllDispatcher
               for layer in models[1].decoder.layers)
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vocab, (1, seq), generator=gen)
    position_ids = torch.arange(seq).unsqueeze(0)
    routes = [torch.stack([torch.randperm(num_experts, generator=gen)[:topk] for _ in range(seq)])
              for _ in models[0].decoder.layers]
    results = []
    for model in models:
        for layer, ids in zip(model.decoder.layers, routes):
            state = layer.mlp.router.router_replay
            state.reset()
            state.install(InstalledRoutes(expert_ids=ids.to(torch.uint8)))
            state.action = RouterReplayAction.REPLAY_FORWARD
        logits = model(tokens, position_ids, attention_mask=None)
        loss = (logits * torch.linspace(-1, 1, vocab)).sum()
        loss.backward()
        for layer, ids in zip(model.decoder.layers, routes):
            dispatcher = layer.mlp.token_dispatcher
            expected_map = torch.zeros(seq, num_experts, dtype=torch.bool).scatter(1, ids, True)
            assert torch.equal(dispatcher.routing_map, expected_map)
            assert layer.mlp.router.router_replay.replayed_rows == seq
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_ref, grads_ref), (loss_got, grads_got) = results
    assert torch.equal(loss_got, loss_ref)
    assert grads_ref.keys() == grads_got.keys()
    for name, grad in grads_ref.items():
        assert torch.equal(grads_got[name], grad), name
