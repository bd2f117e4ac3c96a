"""model/flops.py: the FLOPs count against a brute-force count of the matmuls of a tiny model, the causal half,
active experts only, the GRPO pass multiplier, and the peak table / MFU."""

from __future__ import annotations

import pytest

from megatron_r3.model.flops import FlopsShape, grpo_step_flops, grpo_throughput_metrics, peak_tflops


def shape(**overrides):
    base = dict(num_layers=2, hidden_size=8, num_attention_heads=4, num_query_groups=2, kv_channels=4,
                ffn_hidden_size=16, vocab_size=32, num_moe_layers=1, num_moe_experts=6, moe_router_topk=2,
                moe_ffn_hidden_size=5)
    return FlopsShape(**dict(base, **overrides))


def brute_force_forward(s: FlopsShape, lengths):
    """Sum of 2·m·n·k over every matmul a forward does, counting attention pairs one by one."""
    flops = 0
    for t in lengths:
        for layer in range(s.num_layers):
            moe = layer < s.num_moe_layers
            d, h = s.kv_channels, s.hidden_size
            flops += 2 * t * h * (s.num_attention_heads * d) + 2 * 2 * t * h * (s.num_query_groups * d)  # q, k, v
            pairs = sum(q + 1 for q in range(t))  # causal: query q sees keys 0..q
            flops += s.num_attention_heads * (2 * pairs * d + 2 * pairs * d)  # QK^T and PV
            flops += 2 * t * (s.num_attention_heads * d) * h  # output projection
            if moe:
                flops += 2 * t * h * s.num_moe_experts  # router
                flops += s.moe_router_topk * t * (2 * h * 2 * s.moe_ffn_hidden_size + 2 * s.moe_ffn_hidden_size * h)
            else:
                flops += t * (2 * h * 2 * s.ffn_hidden_size + 2 * s.ffn_hidden_size * h)
        flops += 2 * t * h * s.vocab_size
    return flops


@pytest.mark.parametrize("lengths", [[1], [7], [3, 11, 4]])
def test_forward_flops_equal_brute_force(lengths):
    s = shape()
    assert s.forward_flops(lengths) == brute_force_forward(s, lengths)


def test_only_active_experts_and_causal_half_count():
    few, many = shape(num_moe_experts=6), shape(num_moe_experts=600)
    # more experts only add router FLOPs (2·h per expert per token per MoE layer), not expert matmuls
    assert many.forward_flops([10]) - few.forward_flops([10]) == 2 * 8 * (600 - 6) * 10
    s = shape()
    full = 2 * 2 * s.num_attention_heads * s.kv_channels * 100 * 100
    assert s.attention_flops(100) == pytest.approx(full / 2 * 101 / 100)


def test_grpo_step_multiplier_and_mfu():
    s = shape()
    forward = s.forward_flops([5, 9])
    assert grpo_step_flops(s, [5, 9]) == 4 * forward  # old logprob + 3x (fwd+bwd)
    assert grpo_step_flops(s, [5, 9], grpo_iterations=2, reference_pass=True) == 8 * forward
    timings = {"timing/step_s": 2.0, "timing/old_logprob_s": 0.25, "timing/update_s": 0.75}
    out = grpo_throughput_metrics(s, [5, 9], timings, world_size=2, grpo_iterations=1, reference_pass=False,
                                  peak=100.0)
    assert out["throughput/tflops_per_gpu"] == pytest.approx(4 * forward / 2.0 / 2 / 1e12)
    assert out["throughput/train_tflops_per_gpu"] == pytest.approx(4 * forward / 1.0 / 2 / 1e12)
    assert out["throughput/mfu"] == pytest.approx(out["throughput/tflops_per_gpu"] / 100.0)
    assert "throughput/mfu" not in grpo_throughput_metrics(s, [5], timings, world_size=1, grpo_iterations=1,
                                                           reference_pass=False, peak=None)


def test_peak_table():
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA GB200") == 2500.0  # not read as B200
    assert peak_tflops(None) is None and peak_tflops("cpu") is None
    assert peak_tflops("NVIDIA H200", 788.0) == 788.0
