"""Unit tests for the Megatron <-> HF mapping (megatron_r3.model.hf_mapping, megatron_r3.model.qwen3_moe): names,
shapes, QKV interleave and TP split round trips, expert ids, live-HF-module helpers, config mapping, and the
norm_topk_prob <-> moe_router_pre_softmax equivalence. No process group."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from megatron_r3.model.hf_mapping import (
    GATE_UP,
    QKV,
    MappingError,
    from_megatron_shards,
    hf_checkpoint_names,
    hf_checkpoint_shape,
    map_megatron_name,
    qkv_interleave,
    qkv_split,
    to_megatron_shard,
)
from megatron_r3.model.hf_module import WeightLoader, hf_state_dict_to_checkpoint_names
from megatron_r3.model.families import (
    UnsupportedHFConfig,
    arch_from_hf_config,
    family_of,
    hf_config_to_json_dict,
    padded_vocab_size,
    transformer_config_from_hf,
)

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoConfig,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
    mlp_only_layers=[0], max_position_embeddings=64,
)


def qwen3_config(**kwargs):
    return Qwen3MoeConfig(**{**COMMON, "norm_topk_prob": True, **kwargs})


def qwen2_config(**kwargs):
    return Qwen2MoeConfig(**{**COMMON, "shared_expert_intermediate_size": 48, "qkv_bias": True, **kwargs})


def random_model(config, seed=0):
    torch.manual_seed(seed)
    cls = Qwen3MoeForCausalLM if config.model_type == "qwen3_moe" else Qwen2MoeForCausalLM
    model = cls(config)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape))
    return model


# ---------------------------------------------------------------------------------------------------- names
LOCAL_LAYER = {  # megatron local-spec name (layer 0 of the chunk) -> HF names (global layer 5, EP offset 4)
    "input_layernorm.weight": ["input_layernorm.weight"],
    "self_attention.linear_qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "self_attention.linear_qkv.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "self_attention.q_layernorm.weight": ["self_attn.q_norm.weight"],
    "self_attention.k_layernorm.weight": ["self_attn.k_norm.weight"],
    "self_attention.linear_proj.weight": ["self_attn.o_proj.weight"],
    "pre_mlp_layernorm.weight": ["post_attention_layernorm.weight"],
    "mlp.linear_fc1.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.linear_fc2.weight": ["mlp.down_proj.weight"],
    "mlp.router.weight": ["mlp.gate.weight"],
    "mlp.experts.local_experts.1.linear_fc1.weight": ["mlp.experts.5.gate_proj.weight", "mlp.experts.5.up_proj.weight"],
    "mlp.experts.local_experts.3.linear_fc2.weight": ["mlp.experts.7.down_proj.weight"],
    "mlp.shared_experts.linear_fc1.weight": ["mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"],
    "mlp.shared_experts.linear_fc2.weight": ["mlp.shared_expert.down_proj.weight"],
    "mlp.shared_experts.gate_weight": ["mlp.shared_expert_gate.weight"],
}
TE_LAYER = {  # TransformerEngine spec names
    "self_attention.linear_qkv.layer_norm_weight": ["input_layernorm.weight"],
    "mlp.linear_fc1.layer_norm_weight": ["post_attention_layernorm.weight"],
    "mlp.experts.linear_fc1.weight1": ["mlp.experts.5.gate_proj.weight", "mlp.experts.5.up_proj.weight"],
    "mlp.experts.linear_fc2.weight3": ["mlp.experts.7.down_proj.weight"],
}


@pytest.mark.parametrize("table", [LOCAL_LAYER, TE_LAYER], ids=["local", "te"])
def test_layer_names_local_and_te_specs(table):
    arch = arch_from_hf_config(qwen2_config(num_hidden_layers=8, mlp_only_layers=[]))
    for suffix, hf_suffixes in table.items():
        mapping = map_megatron_name(
            f"decoder.layers.0.{suffix}", arch, layer_number_of=lambda j: j + 6, expert_offset=4
        )
        assert list(mapping.hf_names) == [f"model.layers.5.{s}" for s in hf_suffixes], suffix
        assert mapping.layer == 5


def test_global_names_split_dims_and_tied_output():
    arch = arch_from_hf_config(qwen3_config())
    emb = map_megatron_name("embedding.word_embeddings.weight", arch)
    assert emb.hf_names == ("model.embed_tokens.weight",) and emb.tp_dim == 0 and emb.vocab
    assert map_megatron_name("decoder.final_layernorm.weight", arch).hf_names == ("model.norm.weight",)
    out = map_megatron_name("output_layer.weight", arch)
    assert out.hf_names == ("lm_head.weight",) and not out.tied
    tied = map_megatron_name("output_layer.weight", arch_from_hf_config(qwen3_config(tie_word_embeddings=True)))
    assert tied.hf_names == ("model.embed_tokens.weight",) and tied.tied
    splits = {
        "self_attention.linear_qkv.weight": (QKV, 0),
        "self_attention.linear_proj.weight": ("copy", 1),
        "mlp.linear_fc1.weight": (GATE_UP, 0),
        "mlp.linear_fc2.weight": ("copy", 1),
        "mlp.router.weight": ("copy", None),
        "self_attention.q_layernorm.weight": ("copy", None),
    }
    for suffix, (kind, dim) in splits.items():
        mapping = map_megatron_name(f"decoder.layers.1.{suffix}", arch)
        assert (mapping.kind, mapping.tp_dim) == (kind, dim), suffix
        assert not mapping.is_expert
    expert = map_megatron_name("decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight", arch, expert_offset=4)
    assert expert.is_expert and expert.expert_id == 6 and expert.tp_dim == 1
    with pytest.raises(MappingError):
        map_megatron_name("mtp.layers.0.enorm.weight", arch)
    with pytest.raises(MappingError):
        map_megatron_name("decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight", arch, expert_offset=8)


@pytest.mark.parametrize("make", [qwen3_config, lambda: qwen3_config(tie_word_embeddings=True), qwen2_config],
                         ids=["qwen3", "qwen3_tied", "qwen2_shared"])
def test_checkpoint_names_and_shapes_match_save_pretrained(tmp_path, make):
    config = make()
    model = random_model(config)
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), framework="pt") as handle:
        on_disk = {name: handle.get_tensor(name) for name in handle.keys()}
    arch = arch_from_hf_config(config)
    names = hf_checkpoint_names(arch)
    assert sorted(names) == sorted(on_disk)
    assert len(names) == len(set(names))
    for name in names:
        assert hf_checkpoint_shape(arch, name) == tuple(on_disk[name].shape), name
    # the live model's fused experts, split into checkpoint names, equal what save_pretrained wrote
    live = dict(hf_state_dict_to_checkpoint_names(model))
    assert sorted(live) == sorted(on_disk)
    assert all(torch.equal(live[name], on_disk[name]) for name in on_disk)


def test_local_spec_parameter_list_covers_the_checkpoint_once():
    """A full local-spec parameter list (as GPTModel names it, EP=1) maps onto every checkpoint name exactly once."""
    arch = arch_from_hf_config(qwen3_config())
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
    for j in range(arch.num_layers):
        p = f"decoder.layers.{j}."
        names += [p + s for s in ("input_layernorm.weight", "self_attention.linear_qkv.weight",
                                  "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
                                  "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight")]
        if arch.moe_layers[j]:
            names.append(p + "mlp.router.weight")
            for l in range(arch.num_experts):
                names += [p + f"mlp.experts.local_experts.{l}.linear_fc{k}.weight" for k in (1, 2)]
        else:
            names += [p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    covered = [n for name in names for n in map_megatron_name(name, arch).hf_names]
    assert sorted(covered) == sorted(hf_checkpoint_names(arch))


# ---------------------------------------------------------------------------------------------------- tensors
def test_qkv_interleave_is_grouped_and_round_trips():
    arch = arch_from_hf_config(qwen3_config(num_attention_heads=8, num_key_value_heads=2))
    d, hpg = arch.head_dim, arch.heads_per_group
    q = torch.randn(8 * d, 64)
    k, v = torch.randn(2 * d, 64), torch.randn(2 * d, 64)
    fused = qkv_interleave(q, k, v, arch)
    block = (hpg + 2) * d
    for g in range(2):
        rows = fused[g * block:(g + 1) * block]
        assert torch.equal(rows[: hpg * d], q[g * hpg * d:(g + 1) * hpg * d])
        assert torch.equal(rows[hpg * d: (hpg + 1) * d], k[g * d:(g + 1) * d])
        assert torch.equal(rows[(hpg + 1) * d:], v[g * d:(g + 1) * d])
    assert all(torch.equal(a, b) for a, b in zip(qkv_split(fused, arch), (q, k, v)))
    bias = [torch.randn(8 * d), torch.randn(2 * d), torch.randn(2 * d)]  # 1-D (q/k/v bias) too
    assert all(torch.equal(a, b) for a, b in zip(qkv_split(qkv_interleave(*bias, arch), arch), bias))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shards_round_trip_every_kind(tp):
    config = qwen2_config(num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=2, mlp_only_layers=[0],
                          intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48)
    arch = arch_from_hf_config(config)
    ckpt = {n: torch.randn(hf_checkpoint_shape(arch, n)) for n in hf_checkpoint_names(arch)}
    megatron_names = [
        "embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight",
        "decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.self_attention.linear_qkv.bias",
        "decoder.layers.0.self_attention.linear_proj.weight", "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.layers.0.mlp.linear_fc2.weight", "decoder.layers.1.mlp.router.weight",
        "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight",
        "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight",
        "decoder.layers.1.mlp.shared_experts.linear_fc1.weight", "decoder.layers.1.mlp.shared_experts.gate_weight",
    ]
    for name in megatron_names:
        mapping = map_megatron_name(name, arch)
        shards = [to_megatron_shard(mapping, ckpt, arch, tp_size=tp, tp_rank=r) for r in range(tp)]
        back = from_megatron_shards(mapping, shards if mapping.tp_dim is not None else shards[:1], arch)
        assert sorted(back) == sorted(mapping.hf_names), name
        assert all(torch.equal(back[n], ckpt[n]) for n in back), name
        if mapping.kind == GATE_UP:  # rank r holds [gate_r; up_r]
            gate, up = (ckpt[n] for n in mapping.hf_names)
            for r, shard in enumerate(shards):
                assert torch.equal(shard, torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]))
        if mapping.kind == QKV and name.endswith("weight"):  # rank r holds whole query groups
            groups = arch.num_query_groups // tp
            d, hpg = arch.head_dim, arch.heads_per_group
            q, k, v = (ckpt[n] for n in mapping.hf_names)
            for r, shard in enumerate(shards):
                g0 = r * groups
                assert torch.equal(shard[: hpg * d], q[g0 * hpg * d:(g0 + 1) * hpg * d])
                assert torch.equal(shard[hpg * d:(hpg + 1) * d], k[g0 * d:(g0 + 1) * d])


def test_vocab_padding_and_shape_checks():
    arch = arch_from_hf_config(qwen3_config(vocab_size=100))
    assert padded_vocab_size(100, 2, 128) == 256 and padded_vocab_size(100, 4, 1) == 100
    assert padded_vocab_size(101, 2, 1) == 102
    emb = torch.randn(100, 64)
    mapping = map_megatron_name("embedding.word_embeddings.weight", arch)
    shards = [to_megatron_shard(mapping, {"model.embed_tokens.weight": emb}, arch, tp_size=2, tp_rank=r,
                                local_shape=(64, 64)) for r in range(2)]
    assert torch.equal(shards[1][36:], torch.zeros(28, 64))  # pad rows are zeros
    assert torch.equal(from_megatron_shards(mapping, shards, arch)["model.embed_tokens.weight"], emb)
    with pytest.raises(MappingError, match="shape"):
        to_megatron_shard(mapping, {"model.embed_tokens.weight": torch.randn(99, 64)}, arch)
    with pytest.raises(MappingError, match="missing"):
        to_megatron_shard(map_megatron_name("output_layer.weight", arch), {}, arch)
    fc2 = map_megatron_name("decoder.layers.0.mlp.linear_fc2.weight", arch)
    with pytest.raises(MappingError, match="parameter has shape"):
        to_megatron_shard(fc2, {"model.layers.0.mlp.down_proj.weight": torch.randn(64, 96)}, arch, tp_size=2,
                          tp_rank=0, local_shape=(64, 96))


# ---------------------------------------------------------------------------------------------------- live modules
@pytest.mark.parametrize("make", [qwen3_config, lambda: qwen3_config(tie_word_embeddings=True), qwen2_config],
                         ids=["qwen3", "qwen3_tied", "qwen2_shared"])
def test_checkpoint_tensors_load_into_live_hf_module(make):
    config = make()
    source, target = random_model(config, seed=0), random_model(config, seed=1)
    named = [(n, t.clone()) for n, t in hf_state_dict_to_checkpoint_names(source)]
    # in two buckets, second one first: any subset, any order
    half = len(named) // 2
    loader, loaded = WeightLoader(target), []
    loader.load(named[half:], on_loaded=loaded.append)
    loader.load(named[:half], on_loaded=loaded.append)
    assert sorted(loaded) == sorted(n for n, _ in named) == sorted(loader.expected_names())
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    with pytest.raises(MappingError, match="'model.layers.0.mlp.experts.0.gate_proj.weight' names experts of a "
                                           "layer that has no MoE block"):
        loader.load([("model.layers.0.mlp.experts.0.gate_proj.weight", named[0][1])])


# ---------------------------------------------------------------------------------------------------- configs
def test_transformer_config_from_hf():
    from megatron_r3.platform.parallel_context import ParallelSizes

    config = qwen3_config(rms_norm_eps=1e-5, decoder_sparse_step=1, router_aux_loss_coef=0.01, output_router_logits=True)
    tc = transformer_config_from_hf(config, parallel=ParallelSizes(tensor_model_parallel_size=2,
                                                                   expert_model_parallel_size=2))
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size, tc.moe_ffn_hidden_size) == (4, 64, 96, 32)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (4, 2, 16)
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-5 and tc.qk_layernorm
    assert tc.gated_linear_unit and tc.activation_func is torch.nn.functional.silu
    assert not tc.add_bias_linear and not tc.add_qkv_bias
    assert tc.moe_layer_freq == [0, 1, 1, 1] and tc.num_moe_experts == 8 and tc.moe_router_topk == 2
    assert tc.moe_router_pre_softmax is False and tc.moe_router_score_function == "softmax"
    assert tc.moe_aux_loss_coeff == 0.01 and tc.moe_router_load_balancing_type == "aux_loss"
    assert tc.tensor_model_parallel_size == 2 and tc.expert_model_parallel_size == 2
    kwargs = family_of(config).model_kwargs(config)
    assert kwargs["rotary_base"] == 10000.0 and kwargs["share_embeddings_and_output_weights"] is False
    assert transformer_config_from_hf(qwen3_config(norm_topk_prob=False)).moe_router_pre_softmax is True
    sparse = transformer_config_from_hf(qwen3_config(decoder_sparse_step=2, mlp_only_layers=[]))
    assert sparse.moe_layer_freq == [0, 1, 0, 1]
    shared = transformer_config_from_hf(qwen2_config())
    assert shared.moe_shared_expert_intermediate_size == 48 and shared.moe_shared_expert_gate
    assert shared.add_qkv_bias and not shared.qk_layernorm


@pytest.mark.parametrize("make", [qwen3_config, lambda **k: qwen3_config(tie_word_embeddings=True, norm_topk_prob=False, **k),
                                  qwen2_config], ids=["qwen3", "qwen3_tied", "qwen2_shared"])
def test_hf_config_round_trip(make, tmp_path):
    config = make(rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    tc = transformer_config_from_hf(config)
    kwargs = family_of(config).model_kwargs(config)
    back = family_of(config).hf_config_from_megatron(tc, vocab_size=config.vocab_size, max_position_embeddings=kwargs["max_sequence_length"],
                                   rotary_base=kwargs["rotary_base"],
                                   tie_word_embeddings=kwargs["share_embeddings_and_output_weights"])
    assert type(back) is type(config)
    assert arch_from_hf_config(back) == arch_from_hf_config(config)
    for key in ("norm_topk_prob", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(back, key) == getattr(config, key), key
    assert back.rope_parameters["rope_theta"] == 5e5
    # config.json written for export loads back with AutoConfig (both num_experts spellings present)
    data = hf_config_to_json_dict(back)
    assert data["num_experts"] == 8
    with open(tmp_path / "config.json", "w") as handle:
        json.dump(data, handle)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert arch_from_hf_config(loaded) == arch_from_hf_config(config)


def test_unsupported_configs_raise():
    with pytest.raises(UnsupportedHFConfig, match="rope"):
        arch_from_hf_config(qwen3_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                          "original_max_position_embeddings": 32}))
    with pytest.raises(UnsupportedHFConfig, match="sliding"):
        arch_from_hf_config(qwen3_config(use_sliding_window=True, sliding_window=16))
    with pytest.raises(UnsupportedHFConfig, match="attention_bias"):
        arch_from_hf_config(qwen3_config(attention_bias=True))
    with pytest.raises(UnsupportedHFConfig, match="hidden_act"):
        arch_from_hf_config(qwen3_config(hidden_act="gelu"))


# ---------------------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_norm_topk_prob_equals_megatron_pre_softmax_setting(norm_topk_prob):
    """HF's router (softmax over all experts, top-k, optional renormalisation) gives the same experts and the same
    gate weights as megatron's topk_routing_with_score_function with use_pre_softmax = not norm_topk_prob."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = qwen3_config(num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm_topk_prob)
    torch.manual_seed(0)
    router = Qwen3MoeTopKRouter(config)
    with torch.no_grad():
        router.weight.normal_()
    hidden = torch.randn(200, config.hidden_size, dtype=torch.float64).float()
    with torch.no_grad():
        logits, weights, ids = router(hidden)
        hf_dense = torch.zeros(200, 16).scatter(1, ids, weights)
        probs, routing_map = topk_routing_with_score_function(
            logits, 4, use_pre_softmax=not norm_topk_prob, score_function="softmax"
        )
        wrong, _ = topk_routing_with_score_function(logits, 4, use_pre_softmax=norm_topk_prob, score_function="softmax")
    assert torch.equal(routing_map, hf_dense > 0)
    torch.testing.assert_close(probs, hf_dense, rtol=1e-6, atol=1e-6)
    assert (wrong - hf_dense).abs().max() > 1e-2  # the other setting really differs
    assert transformer_config_from_hf(config).moe_router_pre_softmax == (not norm_topk_prob)


def test_routed_expert_name_keeps_the_layer_projection_and_naming():
    from megatron_r3.model.hf_mapping import routed_expert_name, routed_expert_of

    sequential = "decoder.layers.3.mlp.experts.local_experts.0.linear_fc2.weight"
    grouped = "decoder.layers.3.mlp.experts.linear_fc1.weight0"
    assert routed_expert_name(sequential, 5) == "decoder.layers.3.mlp.experts.local_experts.5.linear_fc2.weight"
    assert routed_expert_name(grouped, 7) == "decoder.layers.3.mlp.experts.linear_fc1.weight7"
    assert routed_expert_of(routed_expert_name(grouped, 7)) == (3, "fc1", 7)
    with pytest.raises(ValueError, match="is not a routed-expert weight"):
        routed_expert_name("decoder.layers.3.mlp.router.weight", 1)
