"""GPU check of `megatron_r3/model/fusions.py`: the compiled RMSNorm and megatron's fused weighted SwiGLU against the
eager formulas, forward and backward, in bf16 at Qwen3-30B-A3B shapes; their speed; no host sync once compiled.

    python tests/gpu/fusion_checks.py [--json out.json]        # exits 1 on a failed check; needs CUDA + Triton

Tolerance, derived: the fused and the eager kernels are both bf16 roundings of one fp32 computation (the fused kernel
rounds once at its output, eager also rounds intermediates), so each is within a few bf16 half-ulps (2^-9 relative per
rounding) of an fp32 evaluation of the formula. The check: relative L2 error (vs fp32) of the fused result <= 1.25 x
the eager one + 2^-12. A wrong formula (e.g. the weight applied before the cast, a missing gate weight) gives an error
of order 1 or at least the size of a bf16 rounding of the whole value, which fails: `--plant-bug` shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def timed(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def fwd_bwd(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def check(name, fused_fn, eager_fn, inputs, grad, rows, plant_bug=False):
    fp32_inputs = [t.float() for t in inputs]
    truth = fwd_bwd(eager_fn, fp32_inputs, grad.float())
    fused = fwd_bwd(fused_fn, inputs, grad)
    eager = fwd_bwd(eager_fn, inputs, grad)
    if plant_bug:
        fused[0] = fused[0] * 1.01
    ok = True
    for label, f, e, t in zip(("output", *[f"grad {i}" for i in range(len(inputs))]), fused, eager, truth):
        fused_err, eager_err = rel(f, t), rel(e, t)
        passed = fused_err <= 1.25 * eager_err + 2 ** -12
        ok &= passed
        rows.append((f"{name}: {label}", fused_err, eager_err, "PASS" if passed else "FAIL"))
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plant-bug", action="store_true", help="scale the fused output by 1.01: must FAIL")
    args = parser.parse_args()
    from megatron_r3.model import fusions

    if not torch.cuda.is_available() or not fusions.compiled_fusions_available():
        print(f"SKIP: CUDA {torch.cuda.is_available()}, compiled fusions {fusions.compiled_fusions_available()}")
        return 0
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    rows, timing, ok = [], [], True
    for shape in ((4096, 1, 2048), (4096, 1, 32, 128)):
        x = torch.randn(shape, device=dev, dtype=bf16, generator=gen) * 3
        weight = (1 + 0.1 * torch.randn(shape[-1], device=dev, generator=gen)).to(bf16)
        grad = torch.randn(shape, device=dev, dtype=bf16, generator=gen)
        ok &= check(f"rms_norm {list(shape)}", lambda a, w: fusions.rms_norm(a, w, 1e-6),
                    lambda a, w: fusions.rms_norm_reference(a, w, 1e-6), (x, weight), grad, rows, args.plant_bug)
        for label, fn in (("compiled", fusions.rms_norm), ("eager", fusions.rms_norm_reference)):
            timing.append((f"rms_norm {list(shape)} fwd+bwd, {label}",
                           timed(lambda: fwd_bwd(lambda a, w: fn(a, w, 1e-6), (x, weight), grad))))
    rows_routed, ffn = 32768, 768
    fc1 = torch.randn(rows_routed, 2 * ffn, device=dev, dtype=bf16, generator=gen)
    probs = torch.rand(rows_routed, device=dev, generator=gen)
    grad = torch.randn(rows_routed, ffn, device=dev, dtype=bf16, generator=gen)
    ok &= check("weighted_swiglu [32768, 1536]", lambda a, p: fusions.weighted_swiglu(a, p, fused=True),
                lambda a, p: fusions.weighted_swiglu(a, p, fused=False), (fc1, probs), grad, rows, args.plant_bug)
    for label, fused in (("megatron fused", True), ("eager", False)):
        timing.append((f"weighted_swiglu [32768, 1536] fwd+bwd, {label}",
                       timed(lambda: fwd_bwd(lambda a, p: fusions.weighted_swiglu(a, p, fused=fused), (fc1, probs),
                                             grad))))
    # no host sync once compiled
    torch.cuda.set_sync_debug_mode("error")
    try:
        fwd_bwd(lambda a, w: fusions.rms_norm(a, w, 1e-6), (x, weight), torch.ones_like(x))
        fwd_bwd(lambda a, p: fusions.weighted_swiglu(a, p, fused=True), (fc1, probs), grad)
        no_sync = True
    except RuntimeError as error:
        no_sync = False
        print(f"host sync inside a compiled fusion: {error}")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ok &= no_sync
    print("| check | fused rel. error vs fp32 | eager rel. error vs fp32 | verdict |\n|---|---|---|---|")
    for row in rows:
        print("| %s | %.3e | %.3e | %s |" % row)
    print("\n| kernel | ms |\n|---|---|")
    for label, ms in timing:
        print(f"| {label} | {ms:.3f} |")
    print(f"\nno host sync once compiled: {no_sync}\nfusion checks: {'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "timing_ms": timing, "no_sync": no_sync, "pass": bool(ok)}, handle, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
