"""Model FLOPs of a GRPO step for an MoE GPT, and MFU: what the iteration line, `metrics.jsonl` and `bench/` report.

Counting (2 FLOPs per multiply-add; *model* FLOPs: activation recompute is not counted, as in MFU's definition)
  per token and layer   qkv 2·h·(np + 2·ng)·d, output projection 2·np·d·h;
                        MoE layer: router 2·h·E, the top-k routed experts only (active experts) 2·k·h·f·(3 with a
                        GLU, else 2), shared experts 2·h·f_shared·(3|2) (+ 2·h for the shared-expert gate);
                        dense layer: 2·h·ffn·(3|2)
  per sequence of T     causal core attention: QKᵀ and PV over the T·(T+1)/2 unmasked (query, key) pairs, i.e. the
  tokens and layer      causal half: 2 · 2·np·d · T(T+1)/2
  per token             LM head 2·h·V (padded vocabulary)
  training (fwd+bwd) = 3 × forward. A GRPO step runs forward-only passes (old logprobs, the reference model when
  the KL term is on) and `grpo_iterations` forward+backward passes over the same sequences; rollout generation
  (the inference engine) is not counted.

MFU = achieved model TFLOP/s per GPU / peak dense TFLOP/s per GPU. The peak is `--peak-tflops` when given, else the
vendor's dense bf16 figure from `PEAK_BF16_TFLOPS` by device name (None on the CPU: no MFU). bench/layer_mfu.py also
measures the card's achievable bf16 matmul rate and reports MFU against both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_r3.platform import metric_names

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "B200": 2250.0,
                    "GB200": 2500.0, "L40S": 362.1}


@dataclass(frozen=True)
class FlopsShape:
    """The architecture numbers the FLOPs count needs (megatron names)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int
    num_moe_layers: int = 0
    num_moe_experts: int = 0
    moe_router_topk: int = 0
    moe_ffn_hidden_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    moe_shared_expert_gate: bool = False
    gated_linear_unit: bool = True

    def layer_dense_flops_per_token(self, moe: bool) -> float:
        """Forward FLOPs of one layer per token, without the core attention (T-dependent)."""
        h, d = self.hidden_size, self.kv_channels
        np_, ng = self.num_attention_heads, self.num_query_groups
        mats = 3 if self.gated_linear_unit else 2
        flops = 2 * h * (np_ + 2 * ng) * d + 2 * np_ * d * h
        if moe:
            flops += 2 * h * self.num_moe_experts + 2 * self.moe_router_topk * h * self.moe_ffn_hidden_size * mats
            if self.moe_shared_expert_intermediate_size:
                flops += 2 * h * self.moe_shared_expert_intermediate_size * mats
                flops += 2 * h if self.moe_shared_expert_gate else 0
        else:
            flops += 2 * h * self.ffn_hidden_size * mats
        return float(flops)

    def attention_flops(self, tokens: int) -> float:
        """Forward FLOPs of one layer's causal core attention over one sequence of `tokens` tokens."""
        return 2.0 * 2 * self.num_attention_heads * self.kv_channels * tokens * (tokens + 1) / 2

    def forward_flops(self, sequence_lengths: Sequence[int], *, lm_head: bool = True) -> float:
        """Forward FLOPs of the model over sequences of these lengths (each attends causally within itself)."""
        total = sum(int(t) for t in sequence_lengths)
        moe, dense = self.num_moe_layers, self.num_layers - self.num_moe_layers
        flops = total * (moe * self.layer_dense_flops_per_token(True) + dense * self.layer_dense_flops_per_token(False))
        flops += self.num_layers * sum(self.attention_flops(int(t)) for t in sequence_lengths)
        if lm_head:
            flops += 2.0 * self.hidden_size * self.vocab_size * total
        return flops


def _num_moe_layers(num_layers: int, moe_layer_freq) -> int:
    if moe_layer_freq is None:
        return num_layers
    if isinstance(moe_layer_freq, int):
        return sum(1 for i in range(num_layers) if i % moe_layer_freq == 0)
    return sum(1 for flag in list(moe_layer_freq)[:num_layers] if flag)


def shape_from_config(config, vocab_size: int) -> FlopsShape:
    """`FlopsShape` of a megatron `TransformerConfig` (or megatron args: same field names)."""
    experts = getattr(config, "num_moe_experts", None) or getattr(config, "num_experts", None) or 0
    heads = config.num_attention_heads
    return FlopsShape(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=getattr(config, "num_query_groups", None) or heads,
        kv_channels=getattr(config, "kv_channels", None) or config.hidden_size // heads,
        ffn_hidden_size=config.ffn_hidden_size,
        vocab_size=vocab_size,
        num_moe_layers=_num_moe_layers(config.num_layers, getattr(config, "moe_layer_freq", 1)) if experts else 0,
        num_moe_experts=experts,
        moe_router_topk=getattr(config, "moe_router_topk", 0) or 0,
        moe_ffn_hidden_size=getattr(config, "moe_ffn_hidden_size", None) or config.ffn_hidden_size,
        moe_shared_expert_intermediate_size=getattr(config, "moe_shared_expert_intermediate_size", None) or 0,
        moe_shared_expert_gate=bool(getattr(config, "moe_shared_expert_gate", False)),
        gated_linear_unit=bool(getattr(config, "gated_linear_unit", None) or getattr(config, "swiglu", False)),
    )


def grpo_step_flops(shape: FlopsShape, sequence_lengths: Sequence[int], *, grpo_iterations: int = 1,
                    reference_pass: bool = False) -> float:
    """Model FLOPs of the trainer's passes in one GRPO step over these (global) sequences: old-logprob forward,
    optional reference forward, `grpo_iterations` forward+backward updates (3× forward each)."""
    forward = shape.forward_flops(sequence_lengths)
    return forward * (1 + int(reference_pass) + 3 * grpo_iterations)


def peak_tflops(device_name: Optional[str], override: Optional[float] = None) -> Optional[float]:
    """Peak dense TFLOP/s per GPU: `override` when given, else `PEAK_BF16_TFLOPS` by the first key found in the
    device name (longest key first, so "GB200" is not read as "B200"), else None."""
    if override:
        return float(override)
    if not device_name:
        return None
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def throughput_metrics(flops: float, seconds: float, world_size: int, peak: Optional[float],
                       prefix: str = metric_names.THROUGHPUT_PREFIX) -> dict:
    """`{prefix}tflops_per_gpu` (and `{prefix}mfu` when the peak is known) for `flops` done in `seconds`."""
    if seconds <= 0:
        return {}
    tflops = flops / seconds / max(1, world_size) / 1e12
    out = {f"{prefix}tflops_per_gpu": tflops}
    if peak:
        out[f"{prefix}mfu"] = tflops / peak
    return out


def grpo_throughput_metrics(shape: FlopsShape, sequence_lengths: Sequence[int], timings: dict, *, world_size: int,
                            grpo_iterations: int, reference_pass: bool, peak: Optional[float]) -> dict:
    """The step's `throughput/tflops_per_gpu` and `throughput/mfu` (model FLOPs of the trainer's passes over the
    whole step time, rollout included) and `throughput/train_tflops_per_gpu`, `throughput/train_mfu` (the same
    FLOPs over the trainer's own time: old-logprob + reference + update passes)."""
    flops = grpo_step_flops(shape, sequence_lengths, grpo_iterations=grpo_iterations, reference_pass=reference_pass)
    out = {metric_names.THROUGHPUT_MODEL_TFLOPS: flops / 1e12}
    out.update(throughput_metrics(flops, timings.get(metric_names.TIMING_STEP_S, 0.0), world_size, peak))
    train_s = sum(timings.get(k, 0.0) for k in (metric_names.TIMING_OLD_LOGPROB_S, metric_names.TIMING_REFERENCE_S,
                                                 metric_names.TIMING_UPDATE_S))
    out.update(throughput_metrics(flops, train_s, world_size, peak, prefix=metric_names.THROUGHPUT_TRAIN_PREFIX))
    return out
