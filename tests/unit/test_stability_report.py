"""tools/stability_report.py: the table's reductions (trailing means, collapse step, common prefix) on hand-made
series, and the table itself from metrics files; the supervised warm-up's teacher samples."""

from __future__ import annotations

import json

import pytest

from tools.stability_report import collapse_step, common_prefix, stability_table, summarize, trailing_means


def test_trailing_means():
    assert trailing_means([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert trailing_means([4.0], 5) == [4.0]


def test_collapse_step():
    steps = list(range(8))
    # trailing-2 means (full from step 1): .5, .6, .7, .7, .4, .2, .1; best before step 6 is .7 and .2 < .5 * .7
    rewards = [0.5, 0.5, 0.7, 0.7, 0.7, 0.1, 0.3, -0.1]
    assert collapse_step(steps, rewards, window=2, frac=0.5) == 6
    assert collapse_step(steps, rewards, window=2, frac=0.2) == 7
    assert collapse_step(steps, [0.5] * 8, window=2, frac=0.5) is None
    assert collapse_step(steps, [0.0] * 8, window=2, frac=0.5) is None  # no positive peak: nothing to fall from


def test_summarize_and_common_prefix():
    records = [{"step": i, "reward/mean": r, "r3/rollout_train_extreme_frac_tau2": f}
               for i, (r, f) in enumerate([(0.2, 0.0), (0.4, 0.1), (0.6, 0.0), (float("nan"), 0.3)])]
    out = summarize(records[:3], window=1)
    assert out["steps"] == 3 and out["reward step 0"] == 0.2 and out["reward best"] == 0.6
    assert out["F(2) mean"] == pytest.approx(0.1 / 3) and out["F(2) max"] == 0.1 and out["k3 KL mean"] is None
    cut = common_prefix([records, records[:2]])
    assert [len(r) for r in cut] == [2, 2]


def test_table_rows_per_run(tmp_path):
    for mode, rewards in (("off", [0.5, 0.6, 0.1, 0.1]), ("R3", [0.5, 0.6, 0.7])):
        run = tmp_path / mode
        run.mkdir()
        (run / "config.yaml").write_text(f"router_replay: {mode}\n")
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i, "reward/mean": r, "r3/rollout_train_k3_kl": 1e-3}) + "\n"
            for i, r in enumerate(rewards)))
    table = stability_table([tmp_path / "off", tmp_path / "R3"], window=1)
    lines = table.splitlines()
    assert lines[0].startswith("| run | steps | reward step 0 | reward best | reward final | collapse step |")
    off = lines[2].split(" | ")
    r3 = lines[3].split(" | ")
    assert off[0] == "| off" and off[1] == "3" and off[5] == "2"  # common prefix: 3 steps; 0.1 < 0.5 * 0.6
    assert r3[0] == "| R3" and r3[1] == "3" and r3[5] == "none"


def test_teacher_samples_mask_the_answer_and_eos():
    """The warm-up's samples: `prompt + answer + <eos>`, loss on the slots that predict the answer and the <eos>."""
    from megatron_r3.train.sft_warmup import teacher_samples

    (sample,) = teacher_samples([[1, 10, 11]], [[5, 6]], eos_token_id=2)
    assert sample.tokens.tolist() == [1, 10, 11, 5, 6, 2] and sample.prompt_length == 3
    assert sample.loss_mask().tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]  # slot i predicts token i + 1
    assert sample.rollout_logprobs.shape == (3,) and sample.advantage == 1.0
