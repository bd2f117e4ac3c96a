"""`--trainer-dtype` (train/arguments.apply_trainer_dtype): fp32 on the CPU by default, bf16 with an fp32 router when
asked, and explicit megatron flags win over `auto`."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_r3.train.arguments import apply_trainer_dtype


def args(**overrides):
    base = dict(trainer_dtype="auto", bf16=False, fp16=False, moe_router_dtype=None, moe_grouped_gemm=False)
    return argparse.Namespace(**dict(base, **overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default")
def test_auto_is_fp32_on_the_cpu():
    a = args()
    apply_trainer_dtype(a)
    assert (a.bf16, a.fp16, a.moe_router_dtype, a.moe_grouped_gemm) == (False, False, None, False)


def test_bf16_sets_an_fp32_router_and_keeps_an_explicit_one():
    a = args(trainer_dtype="bf16")
    apply_trainer_dtype(a)
    assert a.bf16 and not a.fp16 and a.moe_router_dtype == "fp32"
    a = args(trainer_dtype="bf16", moe_router_dtype="fp64")
    apply_trainer_dtype(a)
    assert a.moe_router_dtype == "fp64"


def test_fp32_and_explicit_flags():
    a = args(trainer_dtype="fp32", bf16=True)
    apply_trainer_dtype(a)
    assert not a.bf16
    a = args(fp16=True)  # auto with an explicit --fp16: untouched
    apply_trainer_dtype(a)
    assert a.fp16 and not a.bf16 and a.moe_router_dtype is None
