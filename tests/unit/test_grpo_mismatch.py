"""Train-vs-inference mismatch metrics and the layout-invariant MetricAccumulator."""

import math
import re

import pytest
import torch

from megatron_r3.grpo import MISMATCH_KEYS, MetricAccumulator, rollout_train_mismatch
from tests.unit.host_syncs import forbid_host_syncs

F64 = torch.float64
LN2, LN5 = math.log(2.0), math.log(5.0)


def test_hand_computed_metrics():
    # Δ = train - rollout = [ln2 (exactly at threshold: NOT extreme), ln2 + 0.01, -(ln5 + 0.01), 0.1, ln5 (not tau5)]
    deltas = [LN2, LN2 + 0.01, -(LN5 + 0.01), 0.1, LN5]
    rollout = torch.zeros(6, dtype=F64)
    train = torch.tensor(deltas + [50.0], dtype=F64)  # last token masked out
    mask = torch.tensor([1, 1, 1, 1, 1, 0])
    out = rollout_train_mismatch(train, rollout, mask)
    assert list(out) == list(MISMATCH_KEYS)
    n = 5
    abs_mean = sum(abs(d) for d in deltas) / n
    expect = {
        "rollout_train_logp_abs_diff": abs_mean,
        "rollout_train_logp_sq_diff": sum(d * d for d in deltas) / n,
        "rollout_train_k3_kl": sum(math.exp(d) - 1 - d for d in deltas) / n,
        "rollout_train_extreme_frac_tau2": 3 / n,  # ln2+0.01, ln5+0.01, ln5 ; ln2 itself is not > ln2
        "rollout_train_extreme_frac_tau5": 1 / n,  # only ln5+0.01 ; ln5 itself is not > ln5
        "token_mult_prob_error": math.exp(abs_mean),
        "rollout_train_valid_tokens": 5.0,
    }
    for k, v in expect.items():
        torch.testing.assert_close(out[k], torch.tensor(v, dtype=F64), msg=k)
        assert out[k].dim() == 0 and not out[k].requires_grad


def test_exact_thresholds_in_fp32():
    train = torch.tensor([LN2, -LN2, LN5, -LN5], dtype=torch.float32)
    out = rollout_train_mismatch(train, torch.zeros(4), torch.ones(4, dtype=torch.bool))
    assert out["rollout_train_extreme_frac_tau2"].item() == 0.5  # ±ln5 only
    assert out["rollout_train_extreme_frac_tau5"].item() == 0.0


def test_k3_known_delta_and_direction():
    # r = π_train / π_infer = 2 on every token: k3 = r - 1 - log r = 1 - ln 2 (> 0), for Δ = -ln2: 0.5 - 1 + ln2
    out = rollout_train_mismatch(torch.full((3,), LN2 - 1.0), torch.full((3,), -1.0), torch.ones(3))
    torch.testing.assert_close(out["rollout_train_k3_kl"], torch.tensor(1.0 - LN2))
    out = rollout_train_mismatch(torch.full((3,), -1.0 - LN2), torch.full((3,), -1.0), torch.ones(3))
    torch.testing.assert_close(out["rollout_train_k3_kl"], torch.tensor(0.5 - 1.0 + LN2))
    # identical numerics -> everything exactly 0 except the multiplicative error (exp 0 = 1)
    x = torch.randn(10)
    out = rollout_train_mismatch(x, x, torch.ones(10))
    for k in MISMATCH_KEYS[:5]:
        assert out[k].item() == 0.0
    assert out["token_mult_prob_error"].item() == 1.0


def test_zero_mask_gives_zeros_not_nan():
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")])
    out = rollout_train_mismatch(bad, torch.zeros(3), torch.zeros(3))
    for k in MISMATCH_KEYS:
        assert out[k].item() == 0.0, k
    acc = MetricAccumulator()
    acc.add_mismatch(bad, torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    means = acc.means()
    assert set(means) == set(MISMATCH_KEYS)
    assert all(v == 0.0 for v in means.values())


def test_bf16_inputs_computed_in_fp32():
    out = rollout_train_mismatch(torch.full((4,), 0.5, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16),
                                 torch.ones(4))
    assert all(v.dtype == torch.float32 for v in out.values())
    torch.testing.assert_close(out["rollout_train_logp_abs_diff"], torch.tensor(0.5))


def _random_batch(seed=0, n=257):
    g = torch.Generator().manual_seed(seed)
    rollout = -torch.rand(n, generator=g) * 5
    train = rollout + torch.randn(n, generator=g) * 0.8
    mask = torch.rand(n, generator=g) > 0.3
    return train, rollout, mask


def test_accumulator_microbatch_split_invariance():
    train, rollout, mask = _random_batch()
    ref = MetricAccumulator()
    ref.add_mismatch(train, rollout, mask)
    expected = ref.means()
    # same as the one-shot local function on the whole batch
    local = rollout_train_mismatch(train, rollout, mask)
    for k in MISMATCH_KEYS:
        assert abs(expected[k] - local[k].item()) < 1e-6, k
    assert expected["rollout_train_valid_tokens"] == mask.sum().item()
    for cuts in ([13, 40, 204], [1] * 257, [100, 0, 157], [257]):
        acc = MetricAccumulator()
        start = 0
        for c in cuts:
            s = slice(start, start + c)
            # any layout per microbatch: 2-D view where it divides evenly
            t, r, m = train[s], rollout[s], mask[s]
            if c % 2 == 0 and c > 0:
                t, r, m = t.view(2, -1), r.view(2, -1), m.view(2, -1)
            acc.add_mismatch(t, r, m)
            start += c
        got = acc.means()
        assert set(got) == set(expected)
        for k in expected:
            assert abs(got[k] - expected[k]) < 1e-6, (cuts, k)


def test_mean_of_means_is_not_the_token_mean():
    """Why the accumulator exists: unequal microbatches make the mean of local means wrong."""
    train = torch.tensor([1.0, 0.0, 0.0, 0.0])
    rollout = torch.zeros(4)
    mask = torch.ones(4)
    acc = MetricAccumulator()
    acc.add_mismatch(train[:1], rollout[:1], mask[:1])
    acc.add_mismatch(train[1:], rollout[1:], mask[1:])
    assert acc.means()["rollout_train_logp_abs_diff"] == 0.25  # mean of local means would be 0.5


def test_add_sums_generic():
    acc = MetricAccumulator()
    acc.add_sums("ppo_kl", torch.tensor(3.0), torch.tensor(4.0))
    acc.add_sums("ppo_kl", 1.0, 4)
    acc.add_sums("empty", torch.tensor(0.0), torch.tensor(0.0))
    acc.add_sums("agree", torch.tensor([2.0]), torch.tensor(8.0, dtype=torch.bfloat16))
    assert acc.means() == {"ppo_kl": 0.5, "empty": 0.0, "agree": 0.25}
    assert len(acc) == 3
    acc.reset()
    assert acc.means() == {}
    with pytest.raises(ValueError, match=re.escape(
            "MetricAccumulator.add_sums: total for 'x' must be a scalar, got shape (2,)")):
        acc.add_sums("x", torch.ones(2), 2.0)


def test_all_reduce_without_process_group_is_noop():
    train, rollout, mask = _random_batch(1, 20)
    acc = MetricAccumulator()
    acc.add_mismatch(train, rollout, mask)
    before = acc.means()
    acc.all_reduce()
    assert acc.means() == before
    acc.add_sums("more", 1.0, 1.0)  # still open: nothing was reduced


def test_mismatch_shape_errors():
    with pytest.raises(ValueError, match=re.escape(
            "rollout_train_mismatch: rollout_logp shape (3,) does not match train_logp shape (4,)")):
        rollout_train_mismatch(torch.zeros(4), torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match=re.escape(
            "rollout_train_mismatch: mask shape (2, 2) does not match train_logp shape (4,)")):
        rollout_train_mismatch(torch.zeros(4), torch.zeros(4), torch.ones(2, 2))
    with pytest.raises(ValueError, match=re.escape(
            "MetricAccumulator.add_mismatch: mask shape (5,) does not match train_logp shape (4,)")):
        MetricAccumulator().add_mismatch(torch.zeros(4), torch.zeros(4), torch.ones(5))


def test_no_host_syncs(monkeypatch):
    train, rollout, mask = _random_batch(2, 64)
    acc = MetricAccumulator()
    forbid_host_syncs(monkeypatch)
    out = rollout_train_mismatch(train, rollout, mask)
    for s in (slice(0, 30), slice(30, 64)):
        acc.add_mismatch(train[s], rollout[s], mask[s])
    acc.add_sums("ppo_kl", out["rollout_train_logp_abs_diff"], out["rollout_train_valid_tokens"])
    acc.all_reduce()
    monkeypatch.undo()
    got = acc.means()  # the one place allowed to sync
    assert abs(got["rollout_train_k3_kl"] - out["rollout_train_k3_kl"].item()) < 1e-6
