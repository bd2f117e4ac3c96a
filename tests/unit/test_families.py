"""Model families (megatron_r3.model.families): one source for the HF config -> megatron config mapping in the
training and the conversion path, buffers through weight load/export, and the configs a family refuses (with the
exact message, before megatron sees them)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from megatron_r3.model.families import (
    REGISTRY,
    UnsupportedHFConfig,
    arch_from_hf_config,
    family_of,
    load_hf_config,
    transformer_config_from_hf,
)
from megatron_r3.model.families.qwen_moe import TOP1_NORM_TOPK_PROB, QwenMoeFamily
from megatron_r3.model.hf_mapping import COPY, MappingError, ParamMapping

transformers = pytest.importorskip("transformers")
from transformers import Qwen2MoeConfig, Qwen3MoeConfig  # noqa: E402

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
    mlp_only_layers=[0], max_position_embeddings=32, norm_topk_prob=True,
)


def write_config(path, **values):
    with open(path, "w") as handle:
        json.dump(values, handle)
    return str(path)


# ---------------------------------------------------------------------------------------------------- registry
def test_unknown_model_type_is_refused_with_the_registered_families(tmp_path):
    path = write_config(tmp_path / "llama.json", model_type="llama", hidden_size=32)
    with pytest.raises(UnsupportedHFConfig) as error:
        load_hf_config(path)
    assert str(error.value) == (
        "model_type 'llama': no model family is registered for it; registered: deepseek_v3, glm4_moe, qwen2_moe, qwen3_moe "
        "(a family is one module in megatron_r3/model/families/ plus one line in its REGISTRY)"
    )


@pytest.mark.parametrize("name", ["my model v2.cfg", "tiny", "config.yaml.json"])
def test_hf_config_accepts_any_file_name(tmp_path, name):
    from megatron_r3.train.arguments import load_hf_config_arg

    path = write_config(tmp_path / name, model_type="qwen3_moe", **{**TINY, "hidden_size": 48})
    args = argparse.Namespace(hf_checkpoint=None, hf_config=path, rollout_engine="hf")
    config = load_hf_config_arg(args)
    assert config.model_type == "qwen3_moe" and config.hidden_size == 48  # this file's values, not a config.json's


def test_convert_tool_reads_the_hf_config_file_it_is_given(tmp_path):
    """tools/convert_mcore_to_hf.py --hf-config FILE: the file itself (it used to read config.json beside it)."""
    write_config(tmp_path / "config.json", model_type="qwen3_moe", **{**TINY, "hidden_size": 96})
    path = write_config(tmp_path / "other.json", model_type="qwen3_moe", **TINY)
    assert load_hf_config(path).hidden_size == 32


# ---------------------------------------------------------------------------------------------------- refusals
def test_top1_with_norm_topk_prob_is_refused_by_the_family():
    config = Qwen3MoeConfig(**{**TINY, "num_experts_per_tok": 1})
    with pytest.raises(UnsupportedHFConfig) as error:
        arch_from_hf_config(config)
    assert str(error.value) == TOP1_NORM_TOPK_PROB == (
        "num_experts_per_tok=1 with norm_topk_prob=True (HF weights every token's single expert by exactly 1.0) "
        "cannot be represented in megatron-core: its softmax router either refuses top-1 after the top-k or weights "
        "the expert by its probability; use a model with norm_topk_prob=false or num_experts_per_tok >= 2"
    )
    with pytest.raises(UnsupportedHFConfig, match="^num_experts_per_tok=1 with norm_topk_prob=True"):
        transformer_config_from_hf(config)  # ours, not megatron's "Please use --moe-router-pre-softmax"


def test_top1_without_norm_topk_prob_maps_to_pre_softmax():
    """The representable top-1 case: HF keeps the softmax probability, megatron's pre-softmax path gives the same
    weights (the refusal above is the only top-1 case turned away)."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = Qwen3MoeConfig(**{**TINY, "num_experts_per_tok": 1, "norm_topk_prob": False})
    assert transformer_config_from_hf(config).moe_router_pre_softmax is True
    torch.manual_seed(0)
    router = Qwen3MoeTopKRouter(config)
    with torch.no_grad():
        router.weight.normal_()
        logits, weights, ids = router(torch.randn(50, config.hidden_size))
        probs, _ = topk_routing_with_score_function(logits, 1, use_pre_softmax=True, score_function="softmax")
    torch.testing.assert_close(probs, torch.zeros(50, 4).scatter(1, ids, weights), rtol=1e-6, atol=1e-6)


def test_qwen2_moe_is_refused_for_the_hf_engine_at_parse_time(tmp_path):
    from megatron_r3.train.arguments import load_hf_config_arg

    path = write_config(tmp_path / "q2.json", model_type="qwen2_moe", shared_expert_intermediate_size=24, **TINY)
    with pytest.raises(ValueError) as error:
        load_hf_config_arg(argparse.Namespace(hf_checkpoint=None, hf_config=path, rollout_engine="hf"))
    assert str(error.value) == ("--rollout-engine hf: the embedded hf rollout engine runs Qwen3-MoE only; train a "
                                "qwen2_moe model with --rollout-engine sglang")
    config = load_hf_config_arg(argparse.Namespace(hf_checkpoint=None, hf_config=path, rollout_engine="sglang"))
    assert config.model_type == "qwen2_moe"


# ---------------------------------------------------------------------------------------------------- one mapping
def training_config(tmp_path, hf_path, *flags):
    """The TransformerConfig the trainer builds (its own argument parsing, then megatron's
    core_transformer_config_from_args)."""
    from megatron_r3.train.arguments import parse_grpo_args

    args = parse_grpo_args(["--hf-config", hf_path, "--task", "copy_last", "--run-dir", str(tmp_path / "run"),
                            "--trainer-dtype", "fp32", *flags])
    from megatron.training.arguments import core_transformer_config_from_args  # after the parser's python_compat

    return core_transformer_config_from_args(args)


@pytest.mark.parametrize("model_type, extra, flags, coeff", [
    ("qwen3_moe", {"router_aux_loss_coef": 0.01, "output_router_logits": True}, [], 0.01),
    ("qwen3_moe", {"router_aux_loss_coef": 0.01, "output_router_logits": False}, [], 0.0),  # HF trains without it
    ("qwen3_moe", {"router_aux_loss_coef": 0.01, "output_router_logits": True}, ["--moe-aux-loss-coeff", "0.05"],
     0.05),  # an explicit megatron flag is a training choice and wins
    ("qwen2_moe", {"shared_expert_intermediate_size": 24, "router_aux_loss_coef": 0.02,
                   "output_router_logits": True}, ["--rollout-engine", "sglang", "--sglang-url", "http://127.0.0.1:9"],
     0.02),
], ids=["aux_on", "aux_off", "flag_wins", "qwen2"])
def test_training_and_conversion_build_the_same_model_fields(tmp_path, model_type, extra, flags, coeff):
    hf_path = write_config(tmp_path / "model.json", model_type=model_type, **TINY, **extra)
    hf_config = load_hf_config(hf_path)
    trained = training_config(tmp_path, hf_path, *flags)
    converted = transformer_config_from_hf(hf_config)
    fields = family_of(hf_config).megatron_fields(hf_config)
    assert trained.moe_aux_loss_coeff == coeff
    assert converted.moe_aux_loss_coeff == fields["moe_aux_loss_coeff"] == extra["router_aux_loss_coef"] * bool(
        extra["output_router_logits"])
    differ = {name: (getattr(trained, name), getattr(converted, name)) for name in fields
              if getattr(trained, name) != getattr(converted, name)}
    assert differ == ({"moe_aux_loss_coeff": (0.05, 0.01)} if coeff == 0.05 else {})
    assert len(fields) >= 25  # the architecture and routing fields, not a handful


# ---------------------------------------------------------------------------------------------------- buffers
class BiasedQwen(QwenMoeFamily):
    """Qwen3-MoE plus a router expert bias (a persistent megatron buffer) stored as DeepSeek-V3 names it."""

    name = "biased_qwen"
    model_types = ("qwen3_moe", "biased_qwen")

    def arch(self, hf_config):
        return dataclasses.replace(super().arch(hf_config), model_type="biased_qwen")

    def map_megatron_name(self, name, arch, *, layer_number_of, expert_offset):
        if name.endswith(".mlp.router.expert_bias"):
            layer = layer_number_of(int(name.split(".")[2])) - 1
            return ParamMapping(name, (f"model.layers.{layer}.mlp.gate.e_score_correction_bias",), COPY, None,
                                layer=layer)
        return super().map_megatron_name(name, arch, layer_number_of=layer_number_of, expert_offset=expert_offset)

    def hf_layer_names(self, arch, layer):
        names = super().hf_layer_names(arch, layer)
        if arch.moe_layers[layer]:
            names.insert(names.index(f"model.layers.{layer}.mlp.gate.weight") + 1,
                         f"model.layers.{layer}.mlp.gate.e_score_correction_bias")
        return names

    def hf_checkpoint_shape(self, arch, name):
        if name.endswith("mlp.gate.e_score_correction_bias"):
            return (arch.num_experts,)
        return super().hf_checkpoint_shape(arch, name)


FAMILY = BiasedQwen()


def test_persistent_buffers_round_trip_through_load_and_export(world_of_one, monkeypatch):
    from megatron_r3.model.weights import export_hf_weights, load_hf_weights

    hf_config = Qwen3MoeConfig(**TINY)
    config = transformer_config_from_hf(hf_config, use_cpu_initialization=True, moe_router_enable_expert_bias=True,
                                        moe_router_score_function="sigmoid", moe_router_load_balancing_type="none")
    parallel = world_of_one
    chunks = QwenMoeFamily().build_chunks(config, parallel, **family_of(hf_config).model_kwargs(hf_config))
    assert {name for name, _ in chunks[0].named_buffers() if name.endswith("expert_bias")} == {
        "decoder.layers.1.mlp.router.expert_bias", "decoder.layers.2.mlp.router.expert_bias"}

    # a family that does not map the buffer refuses it instead of dropping it
    for walk in (lambda arch: list(export_hf_weights(chunks, arch, parallel)),
                 lambda arch: load_hf_weights(chunks, {}, arch, parallel)):
        with pytest.raises(MappingError) as error:
            walk(arch_from_hf_config(hf_config))
        assert error.value.args[0] == (
            "no HF mapping for megatron parameter or persistent buffer 'decoder.layers.1.mlp.router.expert_bias' in "
            "the qwen_moe family (a buffer such as a router expert_bias or qb_beta has no Qwen-MoE checkpoint tensor)")

    monkeypatch.setitem(REGISTRY, "biased_qwen", "tests.unit.test_families")
    arch = FAMILY.arch(hf_config)
    torch.manual_seed(1)
    checkpoint = {name: torch.randn(FAMILY.hf_checkpoint_shape(arch, name))
                  for name in FAMILY.hf_checkpoint_names(arch)}
    load_hf_weights(chunks, checkpoint, arch, parallel)
    router = chunks[0].decoder.layers[2].mlp.router
    assert torch.equal(router.expert_bias, checkpoint["model.layers.2.mlp.gate.e_score_correction_bias"])
    exported = dict(export_hf_weights(chunks, arch, parallel))
    assert list(exported) != [] and set(exported) == set(checkpoint)
    assert all(torch.equal(exported[name], checkpoint[name]) for name in checkpoint)
    # a bf16 export (weight sync to a bf16 engine) casts the weights, not the fp32 bias buffer
    bf16 = dict(export_hf_weights(chunks, arch, parallel, dtype=torch.bfloat16))
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert bf16[bias].dtype == torch.float32 and torch.equal(bf16[bias], checkpoint[bias])
    assert bf16["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16


def test_training_choices_are_honoured_and_architecture_flags_conflict(tmp_path):
    hf_path = write_config(tmp_path / "model.json", model_type="qwen3_moe", **TINY)
    assert training_config(tmp_path, hf_path).moe_router_load_balancing_type == "aux_loss"
    sinkhorn = training_config(tmp_path, hf_path, "--moe-router-load-balancing-type", "sinkhorn")
    assert sinkhorn.moe_router_load_balancing_type == "sinkhorn"  # a training choice: the flag is kept
    with pytest.raises(ValueError) as error:
        training_config(tmp_path, hf_path, "--moe-router-pre-softmax", "--norm-epsilon", "1e-4")
    assert str(error.value) == (
        "the model architecture comes from the HF config; conflicting flags: --norm-epsilon 0.0001 (the HF "
        "config says 1e-06), --moe-router-pre-softmax True (the HF config says False)"
    )
