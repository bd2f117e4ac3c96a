"""`model/fusions.py` on the CPU: the eager formulas run (the compiled kernels are GPU-only; tests/gpu/fusion_checks.py
compares them there), and the trainer turns megatron's SwiGLU fusion off where nothing can compile it."""

import argparse

import torch

from megatron_r3.model import fusions


def test_cpu_tensors_take_the_eager_formulas():
    assert not fusions.compiled_fusions_enabled(torch.zeros(1))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, generator=gen).to(torch.bfloat16)
    weight = torch.randn(16, generator=gen).to(torch.bfloat16)
    expected = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(fusions.rms_norm(x, weight, 1e-6), expected)


def test_weighted_swiglu_is_megatrons_unfused_formula():
    gen = torch.Generator().manual_seed(1)
    fc1 = torch.randn(7, 8, generator=gen).to(torch.bfloat16)
    probs = torch.rand(7, generator=gen)
    gate, up = fc1[:, :4], fc1[:, 4:]
    expected = ((torch.nn.functional.silu(gate) * up) * probs[:, None]).to(torch.bfloat16)
    for fused in (False, True):  # a CPU tensor never takes the compiled kernel
        out = fusions.weighted_swiglu(fc1, probs, fused=fused)
        assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_trainer_turns_swiglu_fusion_off_without_a_gpu_compiler(monkeypatch):
    from megatron_r3.train import arguments

    args = argparse.Namespace(bias_swiglu_fusion=True, apply_rope_fusion=True, gradient_accumulation_fusion=True)
    monkeypatch.setattr(arguments, "gpu_compiled_fusions_available", lambda: False)
    arguments.disable_fusions_without_transformer_engine(args)
    assert (args.bias_swiglu_fusion, args.apply_rope_fusion, args.gradient_accumulation_fusion) == (False,) * 3
    args = argparse.Namespace(bias_swiglu_fusion=True, apply_rope_fusion=True)
    monkeypatch.setattr(arguments, "gpu_compiled_fusions_available", lambda: True)
    arguments.disable_fusions_without_transformer_engine(args)
    assert (args.bias_swiglu_fusion, args.apply_rope_fusion) == (True, False)
