"""The embedded hf engine on a DeepSeek-V3 model: route capture from HF's `DeepseekV3TopkRouter` in SGLang's
`[T-1, num_hidden_layers, K]` layout (dense layers zero), equal to a fresh full-sequence forward's top-k (biased
selection included); weight sync of the expert-bias buffer (MTP checkpoint tensors on load: test_deepseek_v3_mtp.py)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_r3.model.families import arch_from_hf_config  # noqa: E402
from megatron_r3.model.hf_module import hf_state_dict_to_checkpoint_names  # noqa: E402
from megatron_r3.replay.routes import validate_routes  # noqa: E402
from megatron_r3.rollout.base import SamplingParams  # noqa: E402
from megatron_r3.rollout.engines.hf import HFRolloutEngine  # noqa: E402
from tests.unit.test_deepseek_v3 import hf_forward, make_hf  # noqa: E402

PROMPTS = [[5, 17, 90, 3, 42], [7], [11, 12, 13, 14, 15, 16]]


@pytest.mark.parametrize("static_decode", ["off", "on"])  # the first loop (CPU default) and the static-cache loop
def test_routes_layout_dense_zero_and_equal_to_a_fresh_forward(static_decode):
    from megatron_r3.rollout.engines.hf_config import HFEngineConfig

    model = make_hf("q_lora_groups")  # 3 layers, layer 0 dense, top-4 of 8 in 2 of 4 groups, large expert bias
    arch = arch_from_hf_config(model.config)
    moe = list(arch.moe_layers)
    engine = HFRolloutEngine(make_hf("q_lora_groups"), dtype=torch.float32, progress=False)
    engine.generate_config = HFEngineConfig(hf_static_decode=static_decode)
    params = SamplingParams(temperature=1.0, max_new_tokens=5, seed=3)
    result = engine.generate(PROMPTS, params, samples_per_prompt=2, return_routes=True)
    assert not result.failures and len(result.samples) == 6
    for i, sample in enumerate(result.samples):
        T = sample.tokens.numel()
        r = sample.routes
        assert r.expert_ids.shape == (T - 1, arch.num_layers, arch.topk) and r.num_experts == arch.num_experts
        assert validate_routes(r, num_tokens=T, moe_layers=moe, topk=arch.topk, sample_id=i).ok
        assert int(r.expert_ids[:, 0].abs().sum()) == 0  # the dense first layer is zero-filled
        _, routes, _ = hf_forward(model, sample.tokens[:-1].unsqueeze(0))
        for layer in (1, 2):  # the cached decode picked the experts a fresh forward picks (sets; fp32)
            fresh = routes[layer].sort(-1).values
            assert torch.equal(r.expert_ids[:, layer].long().sort(-1).values, fresh), (i, layer)


def test_weight_sync_includes_the_expert_bias_and_ignores_mtp_tensors():
    source, target = make_hf("q_lora_groups", seed=0), make_hf("q_lora_groups", seed=5)
    engine = HFRolloutEngine(target, dtype=torch.float32, progress=False)
    tensors = list(hf_state_dict_to_checkpoint_names(source))
    assert any(name.endswith("e_score_correction_bias") for name, _ in tensors)
    engine.update_weights(tensors)
    live = dict(engine.model.named_buffers())
    assert torch.equal(live["model.layers.1.mlp.gate.e_score_correction_bias"],
                       source.model.layers[1].mlp.gate.e_score_correction_bias)
