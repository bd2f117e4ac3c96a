"""Unit tests for megatron_r3.rollout.sampling: filters, greedy, the logprob convention, seeded draws."""

import math

import pytest
import torch

from megatron_r3.rollout.sampling import filter_top_k_top_p, logprobs_for_sampling, sample_tokens


def test_logprobs_are_tempered_log_softmax_and_greedy_uses_temperature_one():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    torch.testing.assert_close(logprobs_for_sampling(logits, 0.5), torch.log_softmax(logits / 0.5, -1))
    torch.testing.assert_close(logprobs_for_sampling(logits, 0.0), torch.log_softmax(logits, -1))
    assert logprobs_for_sampling(logits.bfloat16(), 1.0).dtype == torch.float32


def test_top_k_keeps_k_largest():
    lp = torch.log_softmax(torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]]), -1)
    out = filter_top_k_top_p(lp, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, False, False, True]]
    assert torch.equal(filter_top_k_top_p(lp, top_k=-1), lp)
    assert torch.equal(filter_top_k_top_p(lp, top_k=5), lp)


def test_top_p_nucleus_is_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.05]])
    lp = probs.log()
    kept = lambda p: torch.isfinite(filter_top_k_top_p(lp, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [True, False, True, False, False]  # 0.5 + 0.3
    assert kept(0.85) == [True, True, True, False, False]
    assert kept(0.01) == [True, False, False, False, False]  # always at least the most likely token
    # top-k first, then top-p on the renormalised remainder: {0.5, 0.3} -> {0.625, 0.375}; p=0.6 keeps one
    assert torch.isfinite(filter_top_k_top_p(lp, top_k=2, top_p=0.6))[0].tolist() == [True] + [False] * 4


def test_greedy_picks_argmax_and_reports_untempered_logprob():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 1.0, 2.0]])
    tokens, lps = sample_tokens(logits, temperature=0.0)
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(lps, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


def test_reported_logprob_ignores_filtering_and_draws_stay_inside_filter():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    g = torch.Generator().manual_seed(1)
    tokens, lps = sample_tokens(logits, temperature=0.7, top_k=5, top_p=0.8, generator=g)
    full = torch.log_softmax(logits / 0.7, -1)
    torch.testing.assert_close(lps, full.gather(1, tokens[:, None]).squeeze(1))
    allowed = torch.isfinite(filter_top_k_top_p(full, top_k=5, top_p=0.8))
    assert bool(allowed.gather(1, tokens[:, None]).all())


def test_seeded_draws_reproduce_and_follow_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0), -30.0, math.log(6.0)]]).repeat(20000, 1)
    a = sample_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(7))[0]
    b = sample_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=4).float() / a.numel()
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.3, 0.0, 0.6]), atol=0.015, rtol=0)


def test_sample_tokens_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"logits must be \[batch, vocab\]"):
        sample_tokens(torch.zeros(3), temperature=1.0)
