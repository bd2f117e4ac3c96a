"""Every registered model family (iterating `families.REGISTRY`), built with each experts module the trainer can
pick - megatron's `SequentialMLP` (`local_experts.{l}.linear_fc1.weight`) and the grouped-GEMM `GroupedExperts`
(stacked weights seen per expert as `linear_fc1.weight{l}`, what `--trainer-dtype auto` switches to in bf16 on a
Hopper GPU) - maps every parameter and persistent buffer of its megatron model to checkpoint tensors, covering the checkpoint exactly once; loading random
checkpoint tensors and exporting them gives them back bit-identically (same dtype), and each routed expert's weights
hold its own HF expert's tensors.

This is the class of bug where a family maps only one of megatron's expert namings: the DeepSeek-V3 family did, and
every bf16 GPU run failed at its first weight load with `MappingError: no HF mapping for megatron parameter
'decoder.layers.1.mlp.experts.linear_fc1.weight7'`. A new family needs a tiny config in `TINY` (checked below).
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")

from megatron_r3.model import families  # noqa: E402
from megatron_r3.model.grouped_experts import GroupedExperts  # noqa: E402
from megatron_r3.model.hf_mapping import (  # noqa: E402
    chunk_param_mappings,
    hf_checkpoint_names,
    per_expert_named_parameters,
    persistent_buffers,
)
from megatron_r3.model.weights import export_hf_weights, export_order, load_hf_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("world_of_one")  # tests/unit/conftest.py

# One tiny config per registered HF model_type, each with every optional part its family maps (dense first layer,
# shared experts, biases, q/k norms, MLA with q LoRA, router expert bias).
_QWEN = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
             mlp_only_layers=[0], max_position_embeddings=32)
_ROUTER = dict(n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
               first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=0)
TINY = {
    "qwen3_moe": dict(_QWEN, norm_topk_prob=True),
    "qwen2_moe": dict(_QWEN, shared_expert_intermediate_size=24, qkv_bias=True),
    "deepseek_v3": dict(_ROUTER, vocab_size=48, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                        max_position_embeddings=32),
    "glm4_moe": dict(_ROUTER, vocab_size=48, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     attention_bias=True, use_qk_norm=True, max_position_embeddings=32,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5}),
}
# the test's own reading of megatron's two expert namings (independent of hf_mapping's)
SEQUENTIAL = re.compile(r"decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight")
GROUPED = re.compile(r"decoder\.layers\.(\d+)\.mlp\.experts\.linear_fc([12])\.weight(\d+)")  # per-expert views
EXPERTS = {"sequential_fp32": (False, torch.float32), "grouped_fp32": (True, torch.float32),
           "grouped_bf16": (True, torch.bfloat16)}


def test_every_registered_family_has_a_tiny_config_here():
    assert sorted(TINY) == families.registered_model_types()


def build(model_type: str, grouped: bool, dtype: torch.dtype, parallel):
    from transformers import AutoConfig

    hf_config = AutoConfig.for_model(model_type, **TINY[model_type])
    _, chunks = families.build_from_hf_config(hf_config, parallel, use_cpu_initialization=True, moe_grouped_gemm=grouped,
                                              params_dtype=dtype)
    return families.arch_from_hf_config(hf_config), chunks


def expert_of(name: str):
    """(layer j, projection 1 | 2, local expert) of a routed-expert weight in either naming, else None."""
    if m := SEQUENTIAL.fullmatch(name):
        return int(m[1]), int(m[3]), int(m[2])
    if m := GROUPED.fullmatch(name):
        return int(m[1]), int(m[2]), int(m[3])
    return None


@pytest.mark.parametrize("experts", list(EXPERTS))
@pytest.mark.parametrize("model_type", sorted(TINY))
def test_load_export_round_trip_with_either_experts_module(model_type, experts, world_of_one):
    grouped, dtype = EXPERTS[experts]
    arch, chunks = build(model_type, grouped, dtype, world_of_one)
    (chunk,) = chunks
    moe_layers = [layer for layer in chunk.decoder.layers if hasattr(layer.mlp, "experts")]
    assert moe_layers and all(isinstance(layer.mlp.experts, GroupedExperts) == grouped for layer in moe_layers)
    # GroupedExperts holds one stacked `linear_fc{1,2}.weight` per layer; the mapping sees its experts' views
    names = [name for name, _ in per_expert_named_parameters(chunk)]
    assert any((GROUPED if grouped else SEQUENTIAL).fullmatch(n) for n in names)
    assert not any((SEQUENTIAL if grouped else GROUPED).fullmatch(n) for n in names)

    # every parameter and persistent buffer maps (MappingError otherwise), the checkpoint is covered exactly once
    mappings = chunk_param_mappings(chunk, arch)
    assert len(mappings) == len(names) + len(list(persistent_buffers(chunk)))
    covered = [n for _, mapping in mappings if not mapping.tied for n in mapping.hf_names]
    assert sorted(covered) == sorted(hf_checkpoint_names(arch))

    # random checkpoint tensors in the dtype of the megatron tensor they load into (expert_bias stays fp32)
    gen = torch.Generator().manual_seed(7)
    hf = {n: torch.randn(families.family_for(arch.model_type).hf_checkpoint_shape(arch, n), generator=gen).to(t.dtype)
          for t, mapping in mappings if not mapping.tied for n in mapping.hf_names}
    assert load_hf_weights(chunks, hf, arch, world_of_one) == len(mappings)

    # each routed expert's weights are its own HF expert's tensors ([gate; up] for fc1)
    experts_seen = 0
    for name, param in per_expert_named_parameters(chunk):  # views of the stacked weights' storage when grouped
        parsed = expert_of(name)
        if parsed is None:
            continue
        j, fc, e = parsed
        p = f"model.layers.{int(chunk.decoder.layers[j].layer_number) - 1}.mlp.experts.{e}."
        if fc == 1:
            want = torch.cat([hf[p + "gate_proj.weight"], hf[p + "up_proj.weight"]])
        else:
            want = hf[p + "down_proj.weight"]
        assert torch.equal(param.detach(), want), name
        experts_seen += 1
    assert experts_seen == 2 * arch.num_experts * sum(arch.moe_layers)

    exported = dict(export_hf_weights(chunks, arch, world_of_one, receivers="all"))
    assert list(exported) == export_order(arch)
    assert sorted(exported) == sorted(hf)
    for name, tensor in hf.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name



def test_a_family_naming_a_fused_expert_tensor_is_refused(monkeypatch):
    """fc1 is [gate; up] per expert-TP shard: a family that names one HF tensor for it fails loudly, naming both."""
    from megatron_r3.model.families.qwen_moe import QwenMoeFamily
    from megatron_r3.model.hf_mapping import MappingError, map_megatron_name

    from transformers import AutoConfig

    arch = families.arch_from_hf_config(AutoConfig.for_model("qwen3_moe", **TINY["qwen3_moe"]))
    monkeypatch.setattr(QwenMoeFamily, "routed_expert_hf_names",
                        lambda self, arch, layer, e, projection: (f"model.layers.{layer}.mlp.experts.{e}.w",))
    with pytest.raises(MappingError) as error:
        map_megatron_name("decoder.layers.1.mlp.experts.linear_fc1.weight2", arch)
    assert str(error.value) == (
        "'decoder.layers.1.mlp.experts.linear_fc1.weight2': the qwen_moe family names "
        "('model.layers.1.mlp.experts.2.w',) for fc1; the mapping needs (gate, up) for fc1 (SwiGLU experts) and "
        "(down,) for fc2")
