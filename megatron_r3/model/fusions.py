"""Elementwise fusions of the TransformerEngine-free path on GPUs, through megatron's own fuser (`jit_fuser`, which is
`torch.compile` on PyTorch >= 2.2): RMSNorm here, SwiGLU through megatron's `fused_bias_swiglu`.

Why
  Without TE the local spec's norms and activations run as chains of small elementwise kernels. Profiled on an H200
  at Qwen3-30B-A3B layer shape (4 layers, 4096 tokens, bf16), the backward elementwise kernels of the unfused RMSNorm
  (hidden and q/k norms) and SwiGLU took 11.4 of the step's 39.3 ms of kernel time: each op reads and writes the whole
  activation, and the fp32 statistics of the norm double that traffic. TE fuses each into one kernel forward and one
  backward; `torch.compile` (Inductor + Triton, part of every CUDA build of PyTorch) does the same from the eager
  formula, so the numerics stay the formula's. The RMSNorm is compiled with dynamic shapes from the start.

When it runs
  Only for CUDA tensors, and only when megatron's `jit_fuser` is `torch.compile` (megatron's `disable_jit_fuser()`
  turns it off) and Triton is importable. Everywhere else (the CPU, which the tests compare against Hugging Face and
  megatron) the eager formula runs unchanged. The compiled function is built on first use; the first call for a new
  shape class compiles (a few seconds), later calls reuse it (`torch.compile` marks a dimension dynamic once it has
  seen it change, so varying sequence lengths do not recompile again).

Numerics
  RMSNorm: statistics in fp32, normalised activations cast to the input dtype, then times the weight (the Hugging Face
  Qwen3 / Llama formula); the explicit casts are kept by the compiler, so only the order of the mean's summation
  differs from eager. SwiGLU with per-token gate weights: megatron's `weighted_bias_swiglu_impl` (what its
  `TEGroupedMLP` uses), whose compiled kernel keeps `silu(gate) * up` in fp32 before the weight multiply (eager rounds
  it to the activation dtype first): a difference at the activation dtype's rounding level.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return bool(has_triton())


def compiled_fusions_available() -> bool:
    """Whether compiled fusions can run in this process for CUDA tensors: megatron's `jit_fuser` is `torch.compile`
    and Triton is importable (no device is touched)."""
    from megatron.core import jit

    return jit.jit_fuser is torch.compile and _triton_available()


def compiled_fusions_enabled(tensor: torch.Tensor) -> bool:
    """Whether the fused (compiled) kernels run for `tensor`: a CUDA tensor and `compiled_fusions_available()`."""
    return tensor.is_cuda and compiled_fusions_available()


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm, the Hugging Face formula: fp32 statistics, normalised values cast back to `x.dtype`, times `weight`."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@functools.lru_cache(maxsize=None)
def _compiled_rms_norm():
    # dynamic from the start: token counts change with every packed micro-batch, and a first static compile would only
    # be thrown away at the first new length (megatron's own jit_fuser functions take the default and recompile once)
    return torch.compile(rms_norm_reference, dynamic=True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_reference`, one fused kernel forward and backward where `compiled_fusions_enabled(x)`."""
    if compiled_fusions_enabled(x):
        return _compiled_rms_norm()(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def weighted_swiglu(fc1_output: torch.Tensor, probs: torch.Tensor, *, fused: bool) -> torch.Tensor:
    """`silu(gate) * up * probs` per row (`fc1_output` = [gate | up] along the last dim, `probs` one weight per row),
    in `fc1_output`'s dtype. `fused` (the caller's `config.bias_activation_fusion`) and a CUDA input: megatron's
    `weighted_bias_swiglu_impl`; else megatron `MLP`'s unfused formula (the gate weight applied in the activation's
    dtype after rounding `silu(gate) * up` to it)."""
    if fused and compiled_fusions_enabled(fc1_output):
        from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

        return weighted_bias_swiglu_impl(fc1_output, None, probs.unsqueeze(-1))
    gate, up = torch.chunk(fc1_output, 2, dim=-1)
    hidden = torch.nn.functional.silu(gate) * up
    return (hidden * probs.unsqueeze(-1)).to(hidden.dtype)
