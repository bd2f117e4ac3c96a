"""GRPO advantages: group normalisation and broadcast to tokens (hand-computed values)."""

import re

import pytest
import torch

from megatron_r3.grpo import broadcast_to_tokens, group_normalized_advantages


def test_group_normalized_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_normalized_advantages(rewards, 4)
    # group 0: mean 0.5, population std 0.5 -> +-0.5 / (0.5 + 1e-6); group 1: all equal -> exactly 0
    a = 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]), rtol=0, atol=1e-7)
    assert torch.equal(adv[4:], torch.zeros(4))


def test_group_normalized_without_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    adv = group_normalized_advantages(rewards, 4, normalize_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0, 0.0]))


def test_group_normalized_uses_population_std_and_eps():
    rewards = torch.tensor([0.0, 2.0], dtype=torch.float64)
    adv = group_normalized_advantages(rewards, 2, eps=0.5)
    # mean 1, std (unbiased=False) 1 -> +-1 / 1.5
    torch.testing.assert_close(adv, torch.tensor([-1 / 1.5, 1 / 1.5], dtype=torch.float64))
    assert adv.dtype == torch.float64


def test_group_normalized_low_precision_and_int_inputs_compute_in_fp32():
    adv_bf16 = group_normalized_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.bfloat16), 2)
    adv_int = group_normalized_advantages(torch.tensor([1, 0, 0, 1]), 2)
    assert adv_bf16.dtype == torch.float32 and adv_int.dtype == torch.float32
    torch.testing.assert_close(adv_bf16, adv_int)


def test_group_size_one_gives_zero():
    assert torch.equal(group_normalized_advantages(torch.tensor([3.0, -1.0]), 1), torch.zeros(2))


def test_group_normalized_errors():
    with pytest.raises(ValueError, match=re.escape(
            "group_normalized_advantages: num_samples 6 is not divisible by group_size 4")):
        group_normalized_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match=re.escape(
            "group_normalized_advantages: rewards must be 1-D [num_samples], got shape (2, 2)")):
        group_normalized_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match=re.escape(
            "group_normalized_advantages: group_size must be a positive int, got 0")):
        group_normalized_advantages(torch.zeros(4), 0)


def test_broadcast_to_tokens():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    out = broadcast_to_tokens(adv, mask)
    assert torch.equal(out, torch.tensor([[0.0, 2.0, 2.0, 0.0], [-1.0, -1.0, 0.0, 0.0]]))
    # float mask, non-finite advantage does not leak outside the mask
    out = broadcast_to_tokens(torch.tensor([float("nan")]), torch.tensor([[0.0, 0.0]]))
    assert torch.equal(out, torch.zeros(1, 2))


def test_broadcast_to_tokens_errors():
    with pytest.raises(ValueError, match=re.escape(
            "broadcast_to_tokens: response_mask must be [num_samples, seq] with num_samples=2, got shape (3, 4)")):
        broadcast_to_tokens(torch.zeros(2), torch.ones(3, 4))
    with pytest.raises(ValueError, match=re.escape(
            "broadcast_to_tokens: advantages must be 1-D [num_samples], got shape (2, 1)")):
        broadcast_to_tokens(torch.zeros(2, 1), torch.ones(2, 4))
