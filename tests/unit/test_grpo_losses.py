"""GRPO policy loss, masked aggregation and logit helpers (hand-computed values, gradients, errors, no host syncs)."""

import math
import re

import pytest
import torch

from megatron_r3.grpo import (
    PolicyLossConfig,
    entropy_from_logits,
    masked_mean,
    masked_sum,
    policy_loss,
    token_logprobs_from_logits,
)
from tests.unit.host_syncs import forbid_host_syncs

F64 = torch.float64


def _crafted():
    """Ratios and advantages chosen so that each clip case appears once; the last token is masked out."""
    ratios = torch.tensor([0.5, 0.5, 1.5, 1.5, 1.0, 1.1, 3.0], dtype=F64)
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0], dtype=F64)
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    old = torch.full((7,), -1.0, dtype=F64)
    logp = old + ratios.log()
    return logp, old, adv, mask, ratios


def test_clipped_surrogate_and_clip_fractions():
    logp, old, adv, mask, _ = _crafted()
    loss, m = policy_loss(logp, old, adv, mask, PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28))
    # per-token max(pg, pg2):
    #   r=0.5,A=-1: max(0.5, 0.8)=0.8 (clip low)  | r=0.5,A=1: max(-0.5,-0.8)=-0.5
    #   r=1.5,A=1: max(-1.5,-1.28)=-1.28 (clip hi) | r=1.5,A=-1: max(1.5,1.28)=1.5
    #   r=1.0,A=1: -1                              | r=1.1,A=-1: 1.1
    expected = (0.8 - 0.5 - 1.28 + 1.5 - 1.0 + 1.1) / 6
    assert loss.dtype == F64 and loss.dim() == 0
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64))
    torch.testing.assert_close(m["clip_frac"], torch.tensor(2 / 6, dtype=F64))
    torch.testing.assert_close(m["clip_frac_low"], torch.tensor(1 / 6, dtype=F64))
    torch.testing.assert_close(m["clip_frac_high"], torch.tensor(1 / 6, dtype=F64))
    torch.testing.assert_close(m["ratio_mean"], torch.tensor(6.1 / 6, dtype=F64))
    torch.testing.assert_close(m["ratio_max"], torch.tensor(1.5, dtype=F64))  # masked 3.0 ignored
    ppo_kl = -(2 * math.log(0.5) + 2 * math.log(1.5) + math.log(1.1)) / 6
    torch.testing.assert_close(m["ppo_kl"], torch.tensor(ppo_kl, dtype=F64))
    torch.testing.assert_close(m["valid_tokens"], torch.tensor(6.0, dtype=F64))
    assert set(m) == {"ppo_kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max",
                      "valid_tokens"}
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_loss_denominator_global_token_mean():
    logp, old, adv, mask, _ = _crafted()
    cfg = PolicyLossConfig()
    full, _ = policy_loss(logp, old, adv, mask, cfg)
    # split into two "microbatches" with the global count as denominator: the sum equals the full token mean
    parts = [slice(0, 2), slice(2, 7)]
    for denom in (6.0, torch.tensor(6.0), torch.tensor([6])):
        total = sum(policy_loss(logp[s], old[s], adv[s], mask[s], cfg, loss_denominator=denom)[0] for s in parts)
        torch.testing.assert_close(total, full)
    loss12, m12 = policy_loss(logp, old, adv, mask, cfg, loss_denominator=12.0)
    torch.testing.assert_close(loss12, full / 2)
    # metrics stay local means whatever the loss denominator
    torch.testing.assert_close(m12["clip_frac"], torch.tensor(2 / 6, dtype=F64))


def test_tis_weight_capping():
    old = torch.full((3,), -1.0, dtype=F64)
    logp = old.clone().requires_grad_(True)
    # exp(old - rollout) = 3 (capped to 2), 1, 0.5
    rollout = torch.tensor([-1.0 - math.log(3.0), -1.0, -1.0 + math.log(2.0)], dtype=F64)
    adv = torch.ones(3, dtype=F64)
    mask = torch.ones(3)
    loss, m = policy_loss(logp, old, adv, mask, PolicyLossConfig(tis_cap=2.0), rollout_logp=rollout)
    torch.testing.assert_close(loss, torch.tensor(-3.5 / 3, dtype=F64))
    torch.testing.assert_close(m["tis_weight_mean"], torch.tensor(3.5 / 3, dtype=F64))
    loss.backward()
    # ratio = 1 inside the clip range: d/dlogp (-A * ratio * w) / N = -w / 3; the weight itself carries no gradient
    torch.testing.assert_close(logp.grad, torch.tensor([-2.0, -1.0, -0.5], dtype=F64) / 3)


def test_k3_kl_to_reference():
    logp = torch.tensor([-1.0, -2.0], dtype=F64)
    ref = torch.tensor([-1.0 + math.log(2.0), -2.0], dtype=F64)  # ref - logp = ln 2, 0
    zero_adv = torch.zeros(2, dtype=F64)
    loss, m = policy_loss(logp, logp, zero_adv, torch.ones(2), PolicyLossConfig(kl_coef=0.1), ref_logp=ref)
    k3 = (2.0 - math.log(2.0) - 1.0, 0.0)
    torch.testing.assert_close(m["ref_kl"], torch.tensor(sum(k3) / 2, dtype=F64))
    torch.testing.assert_close(loss, torch.tensor(0.1 * sum(k3) / 2, dtype=F64))
    assert "tis_weight_mean" not in m


def test_empty_mask_gives_zeros_not_nan():
    x = torch.tensor([float("nan"), float("inf"), -1.0])
    mask = torch.zeros(3)
    cfg = PolicyLossConfig(tis_cap=2.0, kl_coef=0.1)
    for denom in (None, 0.0, torch.tensor(0.0)):
        logp = x.clone().requires_grad_(True)
        loss, m = policy_loss(logp, x, x, mask, cfg, rollout_logp=x, ref_logp=x, loss_denominator=denom)
        assert loss.item() == 0.0
        for k, v in m.items():
            assert v.item() == 0.0, k
        loss.backward()
        assert torch.equal(logp.grad, torch.zeros(3))
    assert masked_mean(x, mask).item() == 0.0
    # zero-size input
    empty = torch.zeros(0)
    loss, m = policy_loss(empty, empty, empty, empty, PolicyLossConfig())
    assert loss.item() == 0.0 and m["ratio_max"].item() == 0.0


def test_masked_positions_with_nan_do_not_leak():
    logp, old, adv, mask, _ = _crafted()
    logp_bad = logp.clone()
    logp_bad[6] = float("nan")
    adv_bad = adv.clone()
    adv_bad[6] = float("inf")
    ref, _ = policy_loss(logp, old, adv, mask, PolicyLossConfig())
    lp = logp_bad.clone().requires_grad_(True)
    loss, m = policy_loss(lp, old, adv_bad, mask, PolicyLossConfig())
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[6] == 0
    assert all(torch.isfinite(v) for v in m.values())


def test_masked_sum_and_mean():
    x = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert masked_sum(x, mask).item() == 4.0
    assert masked_mean(x, mask).item() == 2.0
    assert masked_mean(x, mask, denom=8).item() == 0.5
    assert masked_mean(x, mask.bool(), denom=torch.tensor(4.0)).item() == 1.0
    x2 = torch.arange(6.0).reshape(2, 3)
    m2 = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    assert masked_mean(x2, m2).item() == (0 + 1 + 4 + 5) / 4


def test_policy_loss_gradient_matches_finite_differences():
    torch.manual_seed(0)
    n = 12
    old = -torch.rand(n, dtype=F64) * 3 - 0.1
    # ratios well inside the clip range and well outside it (never within gradcheck's eps of a kink)
    log_r = torch.tensor([0.05, -0.1, 0.12, -0.15, 0.0, 0.08, 0.7, -0.9, 0.6, -0.8, 0.03, -0.04], dtype=F64)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0, 1.5, -0.3, 1.0, -1.0, -1.0, 1.0, 0.7, 0.2], dtype=F64)
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1], dtype=F64)
    rollout = old + torch.randn(n, dtype=F64) * 0.3
    ref = old + torch.randn(n, dtype=F64) * 0.2
    cfg = PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, tis_cap=1.2, kl_coef=0.05)
    logp = (old + log_r).requires_grad_(True)

    def f(lp):
        return policy_loss(lp, old, adv, mask, cfg, rollout_logp=rollout, ref_logp=ref, loss_denominator=7.0)[0]

    assert torch.autograd.gradcheck(f, (logp,), eps=1e-6, atol=1e-8, rtol=1e-6)

    # and the analytic form: unclipped tokens get -A * ratio * w / D + kl_coef * (1 - exp(ref - logp)) / D
    f(logp).backward()
    ratio = log_r.exp()
    w = (old - rollout).exp().clamp(max=1.2)
    clipped = ((ratio < 0.8) & (adv < 0)) | ((ratio > 1.28) & (adv > 0))
    grad = torch.where(clipped, torch.zeros(()), -adv * ratio * w) + 0.05 * (1 - (ref - logp.detach()).exp())
    torch.testing.assert_close(logp.grad, grad * mask / 7.0)


def test_low_precision_inputs_compute_in_fp32():
    logp, old, adv, mask, _ = _crafted()
    loss, m = policy_loss(logp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask, PolicyLossConfig())
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in m.values())


def test_policy_loss_errors():
    x = torch.zeros(4)
    cfg = PolicyLossConfig()
    with pytest.raises(ValueError, match=re.escape("policy_loss: old_logp shape (3,) does not match logp shape (4,)")):
        policy_loss(x, torch.zeros(3), x, x, cfg)
    with pytest.raises(ValueError, match=re.escape(
            "policy_loss: advantages shape (4, 1) does not match logp shape (4,)")):
        policy_loss(x, x, torch.zeros(4, 1), x, cfg)
    with pytest.raises(ValueError, match=re.escape("policy_loss: mask shape (5,) does not match logp shape (4,)")):
        policy_loss(x, x, x, torch.ones(5), cfg)
    with pytest.raises(ValueError, match=re.escape(
            "policy_loss: rollout_logp shape (2,) does not match logp shape (4,)")):
        policy_loss(x, x, x, x, cfg, rollout_logp=torch.zeros(2))
    with pytest.raises(ValueError, match=re.escape(
            "policy_loss: config.tis_cap is set but rollout_logp was not given")):
        policy_loss(x, x, x, x, PolicyLossConfig(tis_cap=2.0))
    with pytest.raises(ValueError, match=re.escape("policy_loss: config.kl_coef > 0 but ref_logp was not given")):
        policy_loss(x, x, x, x, PolicyLossConfig(kl_coef=0.01))
    with pytest.raises(ValueError, match=re.escape("policy_loss: loss_denominator must be a scalar, got shape (2,)")):
        policy_loss(x, x, x, x, cfg, loss_denominator=torch.ones(2))


def test_config_validation():
    with pytest.raises(ValueError, match=re.escape("PolicyLossConfig: clip_ratio_low must be in [0, 1), got 1.0")):
        PolicyLossConfig(clip_ratio_low=1.0)
    with pytest.raises(ValueError, match=re.escape("PolicyLossConfig: clip_ratio_high must be >= 0, got -0.1")):
        PolicyLossConfig(clip_ratio_high=-0.1)
    with pytest.raises(ValueError, match=re.escape("PolicyLossConfig: tis_cap must be > 0 or None, got 0.0")):
        PolicyLossConfig(tis_cap=0.0)
    with pytest.raises(ValueError, match=re.escape("PolicyLossConfig: kl_coef must be >= 0, got -1.0")):
        PolicyLossConfig(kl_coef=-1.0)


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1000.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("-inf"), float("-inf")]])
    h = entropy_from_logits(logits.bfloat16())
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, torch.tensor([math.log(4.0), 0.0, math.log(2.0)]))
    x = torch.randn(3, 5, 7, dtype=F64)
    p = x.softmax(-1)
    torch.testing.assert_close(entropy_from_logits(x), -(p * p.log()).sum(-1))
    lg = logits.clone().requires_grad_(True)
    entropy_from_logits(lg).sum().backward()
    assert torch.isfinite(lg.grad).all()


def test_token_logprobs_from_logits():
    x = torch.randn(2, 3, 11, dtype=F64)
    labels = torch.randint(0, 11, (2, 3))
    for t in (1.0, 0.7):
        expected = torch.log_softmax(x / t, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(token_logprobs_from_logits(x, labels, temperature=t), expected)
    # hand-computed: uniform logits over 4 -> -ln 4; bf16 logits give fp32 output
    out = token_logprobs_from_logits(torch.zeros(1, 4, dtype=torch.bfloat16), torch.tensor([2]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([-math.log(4.0)]))
    with pytest.raises(ValueError, match=re.escape(
            "token_logprobs_from_logits: labels shape (2, 4) must equal logits shape without the vocab dim (2, 3)")):
        token_logprobs_from_logits(x, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("token_logprobs_from_logits: temperature must be > 0, got 0.0")):
        token_logprobs_from_logits(x, labels, temperature=0.0)


def test_no_host_syncs(monkeypatch):
    logp, old, adv, mask, _ = _crafted()
    rollout = old - 0.1
    ref = old + 0.1
    logits = torch.randn(7, 5, dtype=F64)
    labels = torch.randint(0, 5, (7,))
    lp = logp.clone().requires_grad_(True)
    forbid_host_syncs(monkeypatch)
    cfg = PolicyLossConfig(tis_cap=2.0, kl_coef=0.1)
    for denom in (None, 5.0, torch.tensor(6.0)):
        loss, metrics = policy_loss(lp, old, adv, mask, cfg, rollout_logp=rollout, ref_logp=ref,
                                    loss_denominator=denom)
        loss.backward()
    masked_mean(logp, mask)
    entropy_from_logits(logits)
    token_logprobs_from_logits(logits, labels, temperature=0.5)
    monkeypatch.undo()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
