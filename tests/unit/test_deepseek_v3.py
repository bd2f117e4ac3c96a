"""DeepSeek-V3 family: HF `DeepseekV3ForCausalLM` is the oracle for the megatron model built from its config.

Tiny random models (every parameter and the router's `e_score_correction_bias` randomised, the bias large enough to
change the top-k) are converted into a world-of-one megatron model; with HF's routes replayed the fp32 logits must
agree to 1e-4 (the fp32 reassociation noise of two implementations of the same math is ~1e-6 here; a wrong bias,
a swapped projection or a wrong router scale moves them by > 1e-2, checked by the planted-bug cases), and the export
gives back the checkpoint tensors bit-identically.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from megatron_r3.model import families  # noqa: E402
from megatron_r3.model.families import UnsupportedHFConfig  # noqa: E402
from megatron_r3.model.families import deepseek_v3 as ds  # noqa: E402
from megatron_r3.model.hf_mapping import per_expert_named_parameters  # noqa: E402
from megatron_r3.model.hf_module import hf_state_dict_to_checkpoint_names  # noqa: E402
from megatron_r3.model.weights import export_hf_weights, export_order, load_hf_weights  # noqa: E402

TOLERANCE = 1e-4
SEQ, BATCH = 12, 2

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, moe_intermediate_size=16, num_attention_heads=4,
            num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16,
            max_position_embeddings=64, rms_norm_eps=1e-6, attn_implementation="eager", n_routed_experts=8,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, num_nextn_predict_layers=0)
CASES = {
    # q LoRA, n_group 4 with topk_group 2 (topk // topk_group == 2), 2 shared experts, first layer dense
    "q_lora_groups": dict(q_lora_rank=24, num_hidden_layers=3, first_k_dense_replace=1, n_shared_experts=2,
                          num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True,
                          routed_scaling_factor=2.5),
    # no q LoRA, no groups, first two layers dense, YaRN rope, tied embeddings
    "no_q_lora_yarn": dict(q_lora_rank=None, num_hidden_layers=4, first_k_dense_replace=2, n_shared_experts=1,
                           num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=True,
                           routed_scaling_factor=1.7, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # top-1 without normalisation (norm_topk_prob off), 2 shared experts
    "top1_unnormalised": dict(q_lora_rank=24, num_hidden_layers=2, first_k_dense_replace=1, n_shared_experts=2,
                              num_experts_per_tok=1, n_group=1, topk_group=1, norm_topk_prob=False,
                              routed_scaling_factor=2.0),
}
# the gloo layout checks (tests/distributed/convert_checks.py): 4 layers so that PP2 splits them 2 + 2
GLOO_CASES = {
    "gloo_q_lora_groups": dict(CASES["q_lora_groups"], num_hidden_layers=4),
    "gloo_no_q_lora": dict(CASES["no_q_lora_yarn"], tie_word_embeddings=False, n_shared_experts=2),
}


def make_hf(case: str, seed: int = 0):
    config = DeepseekV3Config(**{**BASE, **{**CASES, **GLOO_CASES}[case]})
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(0.5 * noise)  # sigmoid scores lie in (0, 1): a bias of this size reorders the top-k
            elif "norm" in name:
                tensor.copy_(1.0 + 0.2 * noise)
            else:
                tensor.copy_(0.15 * noise)
    return model


def hf_forward(model, tokens):
    """(logits [B, S, V], {layer: ids [B*S, K]} of HF's routers, {layer: unbiased top-k ids})."""
    routes, unbiased, hooks = {}, {}, []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue

        def hook(module, args, output, i=i):
            routes[i] = output[2].detach()
            scores = torch.sigmoid(output[0].detach())
            unbiased[i] = scores.topk(module.top_k, dim=-1).indices

        hooks.append(gate.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(tokens).logits
    for h in hooks:
        h.remove()
    return logits, routes, unbiased


def megatron_forward(chunk, tokens, routes=None, grad=False):
    """Logits [B, S, V]; `routes` {layer: [B*S, K] batch-major} are replayed (the router sees sequence-major)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_r3.replay.router import InstalledRoutes

    batch, seq = tokens.shape
    routers = [layer.mlp.router for layer in chunk.decoder.layers if hasattr(layer.mlp, "router")]
    for router in routers:
        state = router.router_replay
        state.reset()
        if routes is not None:
            ids = routes[router.layer_number - 1].view(batch, seq, -1).transpose(0, 1).reshape(batch * seq, -1)
            state.install(InstalledRoutes(expert_ids=ids.to(torch.uint8)))
            state.action = RouterReplayAction.REPLAY_FORWARD
    try:
        position_ids = torch.arange(seq).unsqueeze(0).expand(batch, -1)
        with torch.set_grad_enabled(grad):
            logits = chunk(tokens, position_ids, None)
    finally:
        errors = [e for r in routers for e in r.router_replay.errors]
        for router in routers:
            router.router_replay.reset()
    assert not errors, errors
    return logits


def convert(world_of_one, model):
    arch = families.arch_from_hf_config(model.config)
    assert families.family_of(model.config) is ds.FAMILY
    config, chunks = families.build_from_hf_config(model.config, world_of_one, use_cpu_initialization=True)
    hf = dict(hf_state_dict_to_checkpoint_names(model))
    filled = load_hf_weights(chunks, hf, arch, world_of_one)
    return arch, config, chunks[0].eval(), hf, filled


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_hf_under_replay_and_export_is_bit_identical(world_of_one, case):
    model = make_hf(case)
    arch, config, chunk, hf, filled = convert(world_of_one, model)
    tokens = torch.randint(0, BASE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    ref, routes, unbiased = hf_forward(model, tokens)

    # the bias changes the top-k (else the expert-bias mapping would be untested)
    changed = sum(int((r.sort(-1).values != unbiased[i].sort(-1).values).any(-1).sum()) for i, r in routes.items())
    assert changed > 0

    replayed = megatron_forward(chunk, tokens, routes)
    diff = (replayed - ref).abs().max().item()
    print(f"{case}: max |megatron - HF| logits under replay = {diff:.3e}")
    assert diff <= TOLERANCE

    # megatron's own routing (biased selection, groups) picks HF's experts: the free run agrees as well
    free = megatron_forward(chunk, tokens, None)
    assert (free - ref).abs().max().item() <= TOLERANCE

    # replaying other ids moves the logits: the comparison above can fail
    shifted = {i: (r + 1) % arch.num_experts for i, r in routes.items()}
    assert (megatron_forward(chunk, tokens, shifted) - ref).abs().max().item() > 1e-2

    exported = dict(export_hf_weights([chunk], arch, world_of_one, receivers="all"))
    assert list(exported) == export_order(arch)
    assert sorted(exported) == sorted(hf)
    for name, tensor in hf.items():
        assert torch.equal(exported[name], tensor), name
    assert filled == len(list(chunk.parameters())) + sum(arch.moe_layers)  # + one expert_bias buffer per MoE layer


def test_planted_bugs_are_caught(world_of_one):
    """A zeroed expert bias changes native routing; a wrong scaling factor changes replayed logits."""
    model = make_hf("q_lora_groups")
    arch, config, chunk, hf, _ = convert(world_of_one, model)
    tokens = torch.randint(0, BASE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    ref, routes, _ = hf_forward(model, tokens)
    bias = chunk.decoder.layers[1].mlp.router.expert_bias
    saved = bias.clone()
    bias.zero_()
    assert (megatron_forward(chunk, tokens, None) - ref).abs().max().item() > 1e-2
    bias.copy_(saved)
    router = chunk.decoder.layers[1].mlp.router
    router.config.moe_router_topk_scaling_factor = 1.0  # shared config object: every layer
    try:
        assert (megatron_forward(chunk, tokens, routes) - ref).abs().max().item() > 1e-2
    finally:
        router.config.moe_router_topk_scaling_factor = 2.5


def test_config_mapping_and_round_trip():
    model_config = DeepseekV3Config(**{**BASE, **CASES["q_lora_groups"]})
    config = families.transformer_config_from_hf(model_config, use_cpu_initialization=True)
    assert (config.multi_latent_attention, config.q_lora_rank, config.kv_lora_rank) == (True, 24, 16)
    assert (config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim) == (16, 8, 12)
    assert (config.moe_router_score_function, config.moe_router_enable_expert_bias) == ("sigmoid", True)
    assert (config.moe_router_num_groups, config.moe_router_group_topk) == (4, 2)
    assert config.moe_router_topk_scaling_factor == 2.5 and config.moe_router_bias_update_rate == 0.0
    assert config.moe_shared_expert_intermediate_size == 32 and config.moe_layer_freq == [0, 1, 1]
    back = ds.hf_config_from_megatron(config, vocab_size=96, max_position_embeddings=64)
    for key in ("q_lora_rank", "kv_lora_rank", "n_group", "topk_group", "n_shared_experts", "first_k_dense_replace",
                "routed_scaling_factor", "norm_topk_prob", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "moe_intermediate_size", "intermediate_size", "num_experts_per_tok", "n_routed_experts"):
        assert getattr(back, key) == getattr(model_config, key), key
    assert ds.arch_from_hf_config(back) == ds.arch_from_hf_config(model_config)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_experts_per_tok=4, norm_topk_prob=False), "norm_topk_prob=False with num_experts_per_tok=4"),
        (dict(num_experts_per_tok=6, n_group=4, topk_group=2), "they agree only when topk // topk_group == 2"),
        (dict(rope_interleave=False), "rope_interleave=False"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1.0, "factor": 2.0}), "rope_type 'linear'"),
    ],
)
def test_unrepresentable_configs_raise(changes, message):
    config = DeepseekV3Config(**{**BASE, **CASES["q_lora_groups"], **changes})
    with pytest.raises(UnsupportedHFConfig, match=message.replace("(", r"\(")):
        ds.arch_from_hf_config(config)


def test_training_path_builds_the_conversion_config(tmp_path):
    """The trainer's config (its argument parsing + megatron's core_transformer_config_from_args) has every field
    of the family's `megatron_fields` equal to the conversion path's `MLATransformerConfig` (YaRN, groups, bias)."""
    import json

    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from tests.unit.test_families import training_config

    values = DeepseekV3Config(**{**BASE, **CASES["no_q_lora_yarn"], "n_group": 2, "topk_group": 1}).to_dict()
    path = tmp_path / "deepseek.json"
    path.write_text(json.dumps(values))
    hf_config = families.load_hf_config(str(path))
    trained = training_config(tmp_path, str(path))
    converted = families.transformer_config_from_hf(hf_config)
    fields = ds.FAMILY.megatron_fields(hf_config)
    assert isinstance(trained, MLATransformerConfig) and isinstance(converted, MLATransformerConfig)
    assert (trained.rope_type, trained.moe_router_num_groups, trained.moe_router_bias_update_rate) == ("yarn", 2, 0.0)
    assert {n: (getattr(trained, n), getattr(converted, n)) for n in fields
            if getattr(trained, n) != getattr(converted, n)} == {}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_modules_match_hf_and_the_cpu_modules(world_of_one, case):
    """The modules a GPU run builds - grouped-GEMM experts (`GroupedExperts`, `--trainer-dtype auto` on Hopper) and
    SDPA core attention (`FusedDotProductAttention` through MLA's k/v widths, `attention_backend` auto on a GPU) -
    built on the CPU in fp32: the replayed logits equal HF's within the fp32 TOLERANCE and the gradients of every
    parameter equal those of the CPU default modules (SequentialMLP, megatron's attention math) to fp32
    reassociation noise (relative 1e-4 of each parameter's gradient scale, where a dropped expert or a wrong head
    width is O(1))."""
    from megatron_r3.model.fused_attention import FusedDotProductAttention
    from megatron_r3.model.grouped_experts import GroupedExperts

    model = make_hf(case)
    arch, _, reference, hf, _ = convert(world_of_one, model)
    config = families.transformer_config_from_hf(model.config, use_cpu_initialization=True, moe_grouped_gemm=True)
    (chunk,) = ds.FAMILY.build_chunks(config, world_of_one, fused_attention=True, **ds.FAMILY.model_kwargs(model.config))
    assert load_hf_weights([chunk], hf, arch, world_of_one) == len(list(per_expert_named_parameters(chunk))) + sum(
        arch.moe_layers)
    chunk.eval()
    layers = chunk.decoder.layers
    assert all(isinstance(layer.self_attention.core_attention, FusedDotProductAttention) for layer in layers)
    assert all(isinstance(layer.mlp.experts, GroupedExperts) for i, layer in enumerate(layers) if arch.moe_layers[i])

    tokens = torch.randint(0, BASE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    ref, routes, _ = hf_forward(model, tokens)
    grads = []
    for built in (chunk, reference):
        built.zero_grad(set_to_none=True)
        logits = megatron_forward(built, tokens, routes, grad=True)
        assert (logits.detach() - ref).abs().max().item() <= TOLERANCE
        (logits.float() ** 2).mean().backward()
        grads.append(named_gradients(built))
    assert sorted(grads[0]) == sorted(grads[1])
    for name, grad in grads[0].items():
        scale = grads[1][name].abs().max().item()
        assert (grad - grads[1][name]).abs().max().item() <= 1e-4 * max(scale, 1e-6), name


def named_gradients(chunk) -> dict:
    """Every parameter's gradient by name, routed experts per expert in SequentialMLP's naming (the grouped stacked
    `linear_fc1.weight` -> `local_experts.{l}.linear_fc1.weight`)."""
    import re

    out = {}
    for name, param in chunk.named_parameters():
        if re.search(r"mlp\.experts\.linear_fc[12]\.weight$", name):
            for local, grad in enumerate(param.grad):
                out[re.sub(r"linear_fc([12])\.weight$", rf"local_experts.{local}.linear_fc\1.weight", name)] = grad
        else:
            out[name] = param.grad.clone()
    return out
