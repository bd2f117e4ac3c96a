"""`GroupedExperts` (model/grouped_experts.py) against megatron's `SequentialMLP` with the same weights, on the CPU:
outputs and gradients (tokens, gate weights, every expert weight) for both backends (`torch._grouped_mm`'s CPU
kernel and the per-expert loop), the no-copy stacked view of the weights, the checkpoint names the HF mapping reads,
and a dist-checkpoint round trip SequentialMLP -> GroupedExperts -> SequentialMLP.

Tolerance: fp32, each output element is a dot product of <= max(h, 2·ffn) = 64 terms of O(1) inputs; a different
summation order changes it by a few ulp of the partial sums (~64 · 2^-24 · |terms| ~ 1e-5 at most). The tests use
atol 2e-5, and show that a planted bug (one expert's weights swapped, or the gate weight dropped) moves the result by
orders of magnitude more.
"""

from __future__ import annotations

import pytest
import torch


ATOL = 2e-5


pytestmark = pytest.mark.usefixtures("world_of_one")  # tests/unit/conftest.py


def make_config(**overrides):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                num_moe_experts=5, moe_router_topk=2, moe_ffn_hidden_size=24, ffn_hidden_size=64,
                gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, moe_grouped_gemm=True,
                bias_activation_fusion=False, params_dtype=torch.float32)
    return TransformerConfig(**dict(base, **overrides))


def pgs():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def build_pair(config):
    from megatron.core.models.backends import LocalSpecProvider

    from megatron_r3.model.grouped_experts import GroupedExperts

    sequential = LocalSpecProvider().grouped_mlp_modules(False)(config.num_moe_experts, config, pg_collection=pgs())
    grouped = GroupedExperts(config.num_moe_experts, config, pg_collection=pgs())
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # O(1) outputs (megatron's init std 0.02 would make every difference tiny)
        for p in sequential.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        for e, expert in enumerate(sequential.local_experts):
            grouped.linear_fc1.weights()[e].copy_(expert.linear_fc1.weight)
            grouped.linear_fc2.weights()[e].copy_(expert.linear_fc2.weight)
    return sequential, grouped


def inputs(config, sizes=(3, 0, 7, 1, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(sum(sizes), config.hidden_size, generator=gen)
    probs = torch.rand(sum(sizes), generator=gen)
    return tokens, torch.tensor(sizes), probs


def run(module, tokens, tokens_per_expert, probs):
    tokens = tokens.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    out, bias = module(tokens, tokens_per_expert, probs)
    assert bias is None
    out.sum().backward()  # an expanded (stride-0) incoming gradient: the case torch._grouped_mm's backward rejects
    weights = [p.grad for _, p in sorted(module.named_parameters(), key=lambda item: _expert_key(item[0]))]
    return out.detach(), tokens.grad, probs.grad, weights


def _expert_key(name):
    """(projection, expert) for both modules' names, so their gradients line up."""
    import re

    match = re.search(r"local_experts\.(\d+)\.(linear_fc\d)\.weight|(linear_fc\d)\.weight(\d+)", name)
    return (match[2], int(match[1])) if match[1] is not None else (match[3], int(match[4]))


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("gated", [True, False])
def test_outputs_and_gradients_equal_sequential_mlp(backend, gated):
    if backend == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    import torch.nn.functional as F

    config = make_config(gated_linear_unit=gated, activation_func=F.silu if gated else F.gelu)
    sequential, grouped = build_pair(config)
    grouped.backend = backend
    data = inputs(config)
    expected = run(sequential, *data)
    got = run(grouped, *data)
    for want, have in zip(expected[:3], got[:3]):
        torch.testing.assert_close(have, want, rtol=0, atol=ATOL)
    assert len(got[3]) == len(expected[3]) == 2 * config.num_moe_experts
    for want, have in zip(expected[3], got[3]):
        torch.testing.assert_close(have, want, rtol=0, atol=ATOL)


def test_tolerance_catches_planted_bugs():
    config = make_config()
    sequential, grouped = build_pair(config)
    data = inputs(config)
    expected, *_ = run(sequential, *data)
    with torch.no_grad():  # expert 2's fc2 replaced by expert 3's
        grouped.linear_fc2.weights()[2].copy_(sequential.local_experts[3].linear_fc2.weight)
    wrong, *_ = run(grouped, *data)
    assert (wrong - expected).abs().max() > 100 * ATOL
    _, grouped = build_pair(config)
    tokens, counts, probs = data
    unweighted, *_ = run(grouped, tokens, counts, torch.ones_like(probs))
    assert (unweighted - expected).abs().max() > 100 * ATOL


def test_weights_are_views_of_one_tensor_and_read_without_copy():
    from megatron_r3.model.grouped_experts import stacked

    config = make_config()
    _, grouped = build_pair(config)
    weights = grouped.linear_fc1.weights()
    view = stacked(weights)
    assert view.shape == (config.num_moe_experts, 2 * config.moe_ffn_hidden_size, config.hidden_size)
    assert view.data_ptr() == weights[0].data_ptr()  # no copy
    moved = [torch.nn.Parameter(w.detach().clone()) for w in weights]  # re-homed parameters: stacked copy
    copy = stacked(moved)
    assert copy.data_ptr() != moved[0].data_ptr() and torch.equal(copy, view)
    copy.sum().backward()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in moved)


def test_weights_stay_one_view_inside_megatron_ddp_param_buffer():
    """With the distributed optimizer megatron's DDP moves every parameter into its contiguous param buffer (in
    reverse registration order); the experts' weights must land there back to back in expert order, so the forward
    reads them as one view instead of copying all experts' weights every step."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_r3.model.grouped_experts import stacked

    config = make_config()
    _, grouped = build_pair(config)
    tokens, counts, probs = inputs(config)
    before = grouped(tokens, counts, probs)[0].detach()
    old_ptrs = [w.data_ptr() for w in grouped.linear_fc1.weights()]
    DistributedDataParallel(config=config, module=grouped, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True))
    for projection in (grouped.linear_fc1, grouped.linear_fc2):
        weights = projection.weights()
        assert weights[0].data_ptr() != old_ptrs[0] or projection is grouped.linear_fc2  # really re-homed
        view = stacked(weights)
        assert view.data_ptr() == weights[0].data_ptr()  # a view of the buffer, no copy
        assert all(torch.equal(view[e], w) for e, w in enumerate(weights))
    assert torch.equal(grouped(tokens, counts, probs)[0].detach(), before)
    # the forward before DDP cached the old layout; the one after must read the live (re-homed) weights
    fc2 = grouped.linear_fc2.weights()
    assert grouped.linear_fc2.layout_cache["key"][1:3] == (fc2[0].data_ptr(), fc2[-1].data_ptr())
    with torch.no_grad():
        for weight in grouped.linear_fc2.weights():
            weight.zero_()
    assert not grouped(tokens, counts, probs)[0].any()


def test_parameter_names_are_the_ones_the_hf_mapping_reads():
    from megatron_r3.model.hf_mapping import map_megatron_name
    from megatron_r3.model.families import ModelArch

    config = make_config()
    _, grouped = build_pair(config)
    names = [name for name, _ in grouped.named_parameters()]  # last expert first: see the DDP test below
    assert names == [f"linear_fc{p}.weight{e}" for p in (1, 2) for e in reversed(range(config.num_moe_experts))]
    arch = ModelArch.__new__(ModelArch)
    object.__setattr__(arch, "num_experts", 10)
    object.__setattr__(arch, "model_type", "qwen3_moe")
    mapping = map_megatron_name("decoder.layers.1.mlp.experts.linear_fc1.weight3", arch, expert_offset=5)
    assert mapping.expert_id == 8 and mapping.hf_names == (
        "model.layers.1.mlp.experts.8.gate_proj.weight", "model.layers.1.mlp.experts.8.up_proj.weight")
    mapping = map_megatron_name("decoder.layers.0.mlp.experts.linear_fc2.weight4", arch)
    assert mapping.expert_id == 4 and mapping.hf_names == ("model.layers.0.mlp.experts.4.down_proj.weight",)


def test_unsupported_config_fails_at_construction():
    from megatron_r3.model.grouped_experts import GroupedExperts

    with pytest.raises(ValueError, match="GroupedExperts has no expert biases: set add_bias_linear=False"):
        GroupedExperts(4, make_config(add_bias_linear=True), pg_collection=pgs())


def test_dist_checkpoint_round_trip_with_sequential_mlp(tmp_path):
    """SequentialMLP saves, GroupedExperts loads the same numbers; GroupedExperts saves, SequentialMLP loads them."""
    from megatron.core import dist_checkpointing

    config = make_config()
    sequential, grouped = build_pair(config)
    with torch.no_grad():
        for p in grouped.parameters():
            p.zero_()
    first = tmp_path / "from_sequential"
    first.mkdir()
    dist_checkpointing.save(sequential.sharded_state_dict(prefix="experts."), str(first))
    loaded = dist_checkpointing.load(grouped.sharded_state_dict(prefix="experts."), str(first))
    missing, unexpected = grouped.load_state_dict({k[len("experts."):]: v for k, v in loaded.items()}, strict=True)
    data = inputs(config)
    torch.testing.assert_close(run(grouped, *data)[0], run(sequential, *data)[0], rtol=0, atol=ATOL)
    for e, expert in enumerate(sequential.local_experts):
        assert torch.equal(grouped.linear_fc1.weights()[e], expert.linear_fc1.weight)
        assert torch.equal(grouped.linear_fc2.weights()[e], expert.linear_fc2.weight)
    # the other way, with distinct numbers
    with torch.no_grad():
        for p in grouped.parameters():
            p.mul_(-2.0)
    second = tmp_path / "from_grouped"
    second.mkdir()
    dist_checkpointing.save(grouped.sharded_state_dict(prefix="experts."), str(second))
    loaded = dist_checkpointing.load(sequential.sharded_state_dict(prefix="experts."), str(second))
    sequential.load_state_dict({k[len("experts."):]: v for k, v in loaded.items()}, strict=True)
    for e, expert in enumerate(sequential.local_experts):
        assert torch.equal(grouped.linear_fc1.weights()[e], expert.linear_fc1.weight)
        assert torch.equal(grouped.linear_fc2.weights()[e], expert.linear_fc2.weight)
