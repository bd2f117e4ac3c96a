"""GLM-4.5 family (`glm4_moe`: GQA attention with q/k/v biases and q/k norm, partial RoPE, DeepSeek-V3's sigmoid
router with expert bias, groups and scaling, shared experts, dense-first layers) against HF's `Glm4MoeForCausalLM`:
fp32 logits with HF's routes replayed within 1e-4 (measured ~2e-6; replaying other ids moves them by > 1e-2), the
native routing picks HF's experts, and the export is bit-identical."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM  # noqa: E402

from megatron_r3.model import families  # noqa: E402
from megatron_r3.model.families import UnsupportedHFConfig  # noqa: E402
from megatron_r3.model.hf_module import hf_state_dict_to_checkpoint_names  # noqa: E402
from megatron_r3.model.weights import export_hf_weights, export_order, load_hf_weights  # noqa: E402
from tests.unit.test_deepseek_v3 import hf_forward, megatron_forward  # noqa: E402

CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=80, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8, num_experts_per_tok=4,
              n_group=4, topk_group=2, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
              norm_topk_prob=True, attention_bias=True, use_qk_norm=True, max_position_embeddings=64,
              rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5},
              attn_implementation="eager", num_nextn_predict_layers=0)


def make_hf():
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(Glm4MoeConfig(**CONFIG)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(0.5 * noise)
            elif "norm" in name:
                tensor.copy_(1.0 + 0.2 * noise)
            else:
                tensor.copy_(0.15 * noise)
    return model


def test_logits_equal_hf_under_replay_and_export_is_bit_identical(world_of_one):
    model = make_hf()
    arch = families.arch_from_hf_config(model.config)
    assert (arch.qkv_bias, arch.qk_norm, arch.moe_layers) == (True, True, (False, True, True))
    config, chunks = families.build_from_hf_config(model.config, world_of_one, use_cpu_initialization=True)
    assert (config.moe_router_score_function, config.moe_router_num_groups, config.add_qkv_bias) == ("sigmoid", 4, True)
    hf = dict(hf_state_dict_to_checkpoint_names(model))
    load_hf_weights(chunks, hf, arch, world_of_one)
    chunk = chunks[0].eval()
    assert chunk.rotary_pos_emb.inv_freq.numel() == 4  # partial RoPE: 16 * 0.5 dims, 4 frequencies
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    ref, routes, unbiased = hf_forward(model, tokens)
    assert any((r.sort(-1).values != unbiased[i].sort(-1).values).any() for i, r in routes.items())
    diff = (megatron_forward(chunk, tokens, routes) - ref).abs().max().item()
    print(f"glm4_moe: max |megatron - HF| logits under replay = {diff:.3e}")
    assert diff <= 1e-4
    assert (megatron_forward(chunk, tokens, None) - ref).abs().max().item() <= 1e-4
    shifted = {i: (r + 1) % arch.num_experts for i, r in routes.items()}
    assert (megatron_forward(chunk, tokens, shifted) - ref).abs().max().item() > 1e-2
    exported = dict(export_hf_weights(chunks, arch, world_of_one, receivers="all"))
    assert list(exported) == export_order(arch) and sorted(exported) == sorted(hf)
    assert all(torch.equal(exported[name], hf[name]) for name in hf)


def test_router_checks_are_the_deepseek_family_s():
    with pytest.raises(UnsupportedHFConfig, match="they agree only when topk // topk_group == 2"):
        families.arch_from_hf_config(Glm4MoeConfig(**dict(CONFIG, num_experts_per_tok=6)))
