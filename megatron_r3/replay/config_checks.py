"""Reject, before anything is built, configurations under which megatron-core would silently skip router replay.

Each rule names the megatron-core behaviour it guards against. A replay that is silently bypassed is the main
failure mode of router replay in the field, so these are errors, never warnings.
"""

from __future__ import annotations

from megatron_r3.replay.policy import REPLAY_MODES


class ReplayConfigError(ValueError):
    """A configuration that would bypass router replay."""


def replay_bypass_reasons(config) -> list[str]:
    """Every reason `config` (a TransformerConfig or an args namespace with the same field names) defeats replay."""
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    reasons = []
    if get("moe_router_fusion", False):
        reasons.append(
            "moe_router_fusion=True uses TransformerEngine's fused top-k, which never calls the replay hook"
        )
    balancing = get("moe_router_load_balancing_type", "aux_loss")
    if balancing in ("sinkhorn", "quantile_balancing"):
        reasons.append(
            f"moe_router_load_balancing_type={balancing!r} chooses experts outside the top-k path that replay hooks"
        )
    if get("moe_expert_capacity_factor") is not None:
        reasons.append(
            "moe_expert_capacity_factor drops tokens *after* the replayed top-k, so replayed routes would not be "
            "the routes used; set it to None (dropless)"
        )
    if get("moe_enable_routing_replay", False):
        reasons.append(
            "moe_enable_routing_replay=True enables megatron-core's process-global RouterReplay; megatron_r3 uses "
            "per-router state driven by --router-replay instead"
        )
    if get("transformer_impl") == "inference_optimized":
        reasons.append("transformer_impl='inference_optimized' builds InferenceTopKRouter, which has no replay hook")
    if get("enable_cuda_graph", False) or get("external_cuda_graph", False):
        reasons.append(
            "enable_cuda_graph / external_cuda_graph capture the router into a CUDA graph, freezing the ids that "
            "replay must change every microbatch"
        )
    if get("cuda_graph_impl", "none") not in (None, "none"):
        reasons.append(
            f"cuda_graph_impl={get('cuda_graph_impl')!r} captures the router into a CUDA graph, freezing the ids "
            "that replay must change every microbatch"
        )
    return reasons


def check_replay_config(config, router_replay: str) -> None:
    """Raise `ReplayConfigError` listing every bypass when replay is on; accept anything when it is off."""
    if router_replay not in REPLAY_MODES:
        raise ReplayConfigError(f"--router-replay must be one of {', '.join(REPLAY_MODES)}, got {router_replay!r}")
    if router_replay == "off":
        return
    reasons = replay_bypass_reasons(config)
    if reasons:
        raise ReplayConfigError(
            f"--router-replay {router_replay} cannot work with this configuration:\n- " + "\n- ".join(reasons)
        )


class LayoutConfigError(ValueError):
    """A configuration megatron-core cannot run here, refused at parse time instead of at the first forward."""


def layout_problems(args, transformer_engine: bool) -> list[str]:
    """Why `args` cannot run (in any replay mode), with `transformer_engine` telling whether TE is installed.

    Without TE, megatron_r3 builds megatron's local layers; megatron's `disable_fusions_without_transformer_engine`
    would turn the TE-only switches below off silently, so the run would go on without what was asked for."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    problems = []
    if not transformer_engine and get("transformer_impl") == "inference_optimized":
        problems.append("--transformer-impl inference_optimized needs TransformerEngine, which is not installed; "
                        "use --transformer-impl local")
    if not transformer_engine and get("moe_router_fusion", False):
        problems.append("--moe-router-fusion needs TransformerEngine, which is not installed; drop the flag")
    tp = get("tensor_model_parallel_size", 1) or 1
    if tp > 1 and get("num_experts") and not get("sequence_parallel", False):
        # megatron-core's MoELayer.forward raises "performance may degrade if MoE and tensor parallelism are
        # enabled without also enabling sequence parallelism" at the first training forward
        problems.append(f"--tensor-model-parallel-size {tp} with MoE layers needs --sequence-parallel "
                        f"(megatron-core's MoE layer refuses tensor parallelism without it)")
    return problems


def check_layout(args, transformer_engine: bool) -> None:
    problems = layout_problems(args, transformer_engine)
    if problems:
        raise LayoutConfigError("; ".join(problems))
