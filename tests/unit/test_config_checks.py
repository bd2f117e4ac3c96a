"""Unit tests for megatron_r3.replay.config_checks: every replay bypass is an error under R2/R3, fine when off."""

import re
import types

import pytest

from megatron_r3.replay.config_checks import (
    REPLAY_MODES,
    ReplayConfigError,
    check_replay_config,
    replay_bypass_reasons,
)

FUSION = "moe_router_fusion=True uses TransformerEngine's fused top-k, which never calls the replay hook"
SINKHORN = "moe_router_load_balancing_type='sinkhorn' chooses experts outside the top-k path that replay hooks"
QUANTILE = (
    "moe_router_load_balancing_type='quantile_balancing' chooses experts outside the top-k path that replay hooks"
)
CAPACITY = (
    "moe_expert_capacity_factor drops tokens *after* the replayed top-k, so replayed routes would not be "
    "the routes used; set it to None (dropless)"
)
GLOBAL_REPLAY = (
    "moe_enable_routing_replay=True enables megatron-core's process-global RouterReplay; megatron_r3 uses "
    "per-router state driven by --router-replay instead"
)
INFERENCE = "transformer_impl='inference_optimized' builds InferenceTopKRouter, which has no replay hook"
CUDA_GRAPH = (
    "cuda_graph_impl='local' captures the router into a CUDA graph, freezing the ids that replay must change "
    "every microbatch"
)

BYPASSES = {
    "moe_router_fusion": (dict(moe_router_fusion=True), FUSION),
    "sinkhorn": (dict(moe_router_load_balancing_type="sinkhorn"), SINKHORN),
    "quantile_balancing": (dict(moe_router_load_balancing_type="quantile_balancing"), QUANTILE),
    "capacity_factor": (dict(moe_expert_capacity_factor=1.0), CAPACITY),
    "moe_enable_routing_replay": (dict(moe_enable_routing_replay=True), GLOBAL_REPLAY),
    "inference_optimized": (dict(transformer_impl="inference_optimized"), INFERENCE),
    "cuda_graph_impl": (dict(cuda_graph_impl="local"), CUDA_GRAPH),
}

# a config that replays fine: megatron's defaults for every field the checks read
GOOD = dict(
    moe_router_fusion=False,
    moe_router_load_balancing_type="aux_loss",
    moe_expert_capacity_factor=None,
    moe_enable_routing_replay=False,
    transformer_impl="local",
    cuda_graph_impl="none",
)


def config(**fields):
    return types.SimpleNamespace(**{**GOOD, **fields})


def message(mode, reasons):
    return f"--router-replay {mode} cannot work with this configuration:\n- " + "\n- ".join(reasons)


def test_modes():
    assert REPLAY_MODES == ("off", "R2", "R3")


@pytest.mark.parametrize("mode", ["R2", "R3", "off"])
def test_good_config_accepted(mode):
    assert replay_bypass_reasons(config()) == []
    check_replay_config(config(), mode)
    # missing fields take megatron's defaults (an args namespace may lack some)
    check_replay_config(types.SimpleNamespace(), mode)
    check_replay_config(config(cuda_graph_impl=None, moe_router_load_balancing_type="seq_aux_loss"), mode)


@pytest.mark.parametrize("name", sorted(BYPASSES))
@pytest.mark.parametrize("mode", ["R2", "R3"])
def test_each_bypass_rejected_with_replay(name, mode):
    fields, reason = BYPASSES[name]
    assert replay_bypass_reasons(config(**fields)) == [reason]
    with pytest.raises(ReplayConfigError) as info:
        check_replay_config(config(**fields), mode)
    assert str(info.value) == message(mode, [reason])
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", sorted(BYPASSES))
def test_each_bypass_accepted_when_off(name):
    fields, _ = BYPASSES[name]
    check_replay_config(config(**fields), "off")


def test_capacity_factor_zero_is_still_dropping():
    # any non-None capacity factor enables token dropping after the top-k
    assert replay_bypass_reasons(config(moe_expert_capacity_factor=0.0)) == [CAPACITY]


def test_other_cuda_graph_impls():
    reasons = replay_bypass_reasons(config(cuda_graph_impl="transformer_engine"))
    assert reasons == [
        "cuda_graph_impl='transformer_engine' captures the router into a CUDA graph, freezing the ids that replay "
        "must change every microbatch"
    ]


def test_several_at_once_lists_all():
    bad = config(
        moe_router_fusion=True,
        moe_router_load_balancing_type="sinkhorn",
        moe_expert_capacity_factor=1.25,
        moe_enable_routing_replay=True,
        transformer_impl="inference_optimized",
        cuda_graph_impl="local",
    )
    expected = [FUSION, SINKHORN, CAPACITY, GLOBAL_REPLAY, INFERENCE, CUDA_GRAPH]
    assert replay_bypass_reasons(bad) == expected
    with pytest.raises(ReplayConfigError, match="^" + re.escape(message("R3", expected)) + "$"):
        check_replay_config(bad, "R3")
    check_replay_config(bad, "off")


@pytest.mark.parametrize("mode", ["r3", "on", "", None, "R1"])
def test_unknown_mode(mode):
    with pytest.raises(ReplayConfigError) as info:
        check_replay_config(config(), mode)
    assert str(info.value) == f"--router-replay must be one of off, R2, R3, got {mode!r}"


def test_unknown_mode_reported_before_config():
    with pytest.raises(ReplayConfigError, match=re.escape("--router-replay must be one of off, R2, R3, got 'x'")):
        check_replay_config(config(moe_router_fusion=True), "x")


def test_real_transformer_config():
    import torch
    from megatron.core.transformer import TransformerConfig

    good = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, num_moe_experts=8,
                             moe_router_topk=2, use_cpu_initialization=True, pipeline_dtype=torch.float32)
    assert replay_bypass_reasons(good) == []
    check_replay_config(good, "R3")
    dropping = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, num_moe_experts=8,
                                 moe_router_topk=2, use_cpu_initialization=True, moe_expert_capacity_factor=1.0,
                                 moe_token_dispatcher_type="alltoall")
    assert replay_bypass_reasons(dropping) == [CAPACITY]
