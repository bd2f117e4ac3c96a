"""`GroupedExperts` (model/grouped_experts.py) against megatron's `SequentialMLP` with the same weights, on the CPU:
outputs and gradients (tokens, gate weights, every expert weight) for both backends (`torch._grouped_mm`'s CPU
kernel and the per-expert loop), one stacked parameter per projection inside megatron's DDP, the per-expert names the
HF mapping reads, and dist-checkpoint round trips SequentialMLP -> GroupedExperts -> SequentialMLP (weights, and an
optimizer state through the same factory) and from the per-expert torch state dict earlier versions wrote.

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
            grouped.linear_fc1.weight[e].copy_(expert.linear_fc1.weight)
            grouped.linear_fc2.weight[e].copy_(expert.linear_fc2.weight)
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
    return out.detach(), tokens.grad, probs.grad, expert_gradients(module)


def expert_gradients(module):
    """Per-expert weight gradients, fc1 of every expert then fc2, for both modules (SequentialMLP's
    `local_experts.{l}.linear_fc{1,2}.weight`, GroupedExperts' stacked `linear_fc{1,2}.weight`)."""
    if hasattr(module, "local_experts"):
        return [getattr(expert, f"linear_fc{p}").weight.grad for p in (1, 2) for expert in module.local_experts]
    return [getattr(module, f"linear_fc{p}").weight.grad[e] for p in (1, 2) for e in range(module.num_local_experts)]


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
        grouped.linear_fc2.weight[2].copy_(sequential.local_experts[3].linear_fc2.weight)
    wrong, *_ = run(grouped, *data)
    assert (wrong - expected).abs().max() > 100 * ATOL
    _, grouped = build_pair(config)
    tokens, counts, probs = data
    unweighted, *_ = run(grouped, tokens, counts, torch.ones_like(probs))
    assert (unweighted - expected).abs().max() > 100 * ATOL


def test_one_parameter_per_projection_with_expert_parallel_attributes():
    config = make_config()
    _, grouped = build_pair(config)
    shapes = {name: tuple(p.shape) for name, p in grouped.named_parameters()}
    assert shapes == {"linear_fc1.weight": (5, 48, 32), "linear_fc2.weight": (5, 32, 24)}
    fc1, fc2 = grouped.linear_fc1.weight, grouped.linear_fc2.weight
    assert (fc1.partition_dim, fc2.partition_dim) == (1, 2) and fc1.tensor_model_parallel and fc2.tensor_model_parallel


def test_inside_megatron_ddp_param_buffer_the_forward_reads_the_live_weights():
    """With the distributed optimizer megatron's DDP moves every parameter into its contiguous param buffer; the
    forward must read the re-homed parameter and its gradient must reach DDP's main grad (one hook per projection)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = make_config()
    _, grouped = build_pair(config)
    tokens, counts, probs = inputs(config)
    before = grouped(tokens, counts, probs)[0].detach()
    old_ptr = grouped.linear_fc1.weight.data_ptr()
    ddp = DistributedDataParallel(config=config, module=grouped, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True))
    assert grouped.linear_fc1.weight.data_ptr() != old_ptr  # really re-homed
    assert torch.equal(grouped(tokens, counts, probs)[0].detach(), before)
    ddp.zero_grad_buffer()
    grouped(tokens, counts, probs)[0].sum().backward()
    ddp.finish_grad_sync()
    assert grouped.linear_fc1.weight.main_grad.abs().sum() > 0 and grouped.linear_fc2.weight.main_grad.abs().sum() > 0
    with torch.no_grad():
        grouped.linear_fc2.weight.zero_()
    assert not grouped(tokens, counts, probs)[0].any()


def test_hf_mapping_sees_per_expert_views_under_grouped_linear_names():
    from megatron_r3.model.families import ModelArch
    from megatron_r3.model.hf_mapping import map_megatron_name, per_expert_named_parameters

    config = make_config()
    _, grouped = build_pair(config)
    holder = torch.nn.Module()  # named like a GPTModel's MoE layer
    holder.decoder = torch.nn.Module()
    holder.decoder.layers = torch.nn.ModuleList([torch.nn.Module()])
    holder.decoder.layers[0].mlp = torch.nn.Module()
    holder.decoder.layers[0].mlp.experts = grouped
    views = dict(per_expert_named_parameters(holder))
    prefix = "decoder.layers.0.mlp.experts."
    assert list(views) == [f"{prefix}linear_fc{p}.weight{e}" for p in (1, 2) for e in range(config.num_moe_experts)]
    with torch.no_grad():  # loading writes through the views
        views[f"{prefix}linear_fc2.weight3"].copy_(torch.full_like(views[f"{prefix}linear_fc2.weight3"], 7.0))
    assert torch.equal(grouped.linear_fc2.weight[3], torch.full((32, 24), 7.0))
    arch = ModelArch.__new__(ModelArch)
    object.__setattr__(arch, "num_experts", 10)
    object.__setattr__(arch, "model_type", "qwen3_moe")
    mapping = map_megatron_name("decoder.layers.1.mlp.experts.linear_fc1.weight3", arch, expert_offset=5)
    assert mapping.expert_id == 8 and mapping.hf_names == (
        "model.layers.1.mlp.experts.8.gate_proj.weight", "model.layers.1.mlp.experts.8.up_proj.weight")
    mapping = map_megatron_name("decoder.layers.0.mlp.experts.linear_fc2.weight4", arch)
    assert mapping.expert_id == 4 and mapping.hf_names == ("model.layers.0.mlp.experts.4.down_proj.weight",)


def test_per_expert_torch_state_dict_of_earlier_versions_loads():
    config = make_config()
    sequential, grouped = build_pair(config)
    old = {f"linear_fc{p}.weight{e}": getattr(expert, f"linear_fc{p}").weight.detach().clone()
           for p in (1, 2) for e, expert in enumerate(sequential.local_experts)}
    old.update({"linear_fc1._extra_state": None, "linear_fc2._extra_state": None})
    _, fresh = build_pair(config)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh.linear_fc1.weight, grouped.linear_fc1.weight)
    assert torch.equal(fresh.linear_fc2.weight, grouped.linear_fc2.weight)


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
        assert torch.equal(grouped.linear_fc1.weight[e], expert.linear_fc1.weight)
        assert torch.equal(grouped.linear_fc2.weight[e], expert.linear_fc2.weight)
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
        assert torch.equal(grouped.linear_fc1.weight[e], expert.linear_fc1.weight)
        assert torch.equal(grouped.linear_fc2.weight[e], expert.linear_fc2.weight)


def test_dist_checkpoint_optimizer_state_goes_through_the_expert_factory(tmp_path):
    """An optimizer state of a stacked weight is saved per expert under `optimizer.state.*` keys (as megatron's
    `make_sharded_optimizer_tensor` wraps the model's factory) and loads back stacked, bitwise."""
    from dataclasses import replace

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    config = make_config()
    _, grouped = build_pair(config)
    sharded = grouped.sharded_state_dict(prefix="experts.")
    factory = sharded["experts.linear_fc1.weight"]
    assert isinstance(factory, ShardedTensorFactory) and factory.key == "experts.experts.linear_fc1.weight"
    built = factory.build()
    assert len(built) == config.num_moe_experts and all(len(glu) == 2 for glu in built)  # [gate; up] per expert
    assert [glu[0].global_offset[0] for glu in built] == list(range(config.num_moe_experts))  # global expert axis
    state = torch.randn(grouped.linear_fc1.weight.shape)
    wrapped = make_sharded_optimizer_tensor(factory, state, "optimizer.state.exp_avg")
    dist_checkpointing.save({"exp_avg": wrapped}, str(tmp_path))
    target = replace(wrapped, data=torch.zeros_like(state))
    loaded = dist_checkpointing.load({"exp_avg": target}, str(tmp_path))
    assert torch.equal(loaded["exp_avg"], state)
