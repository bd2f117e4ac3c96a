"""tools/demo.py: the per-step progress line parsed from megatron's iteration line (complete, never cut), and the
range-over-seeds table."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LINE = (" [2026-12-01 04:12:09] iteration        4/     100 | elapsed time per iteration (ms): 751.3 | reward/mean: "
        "0.0031 | reward/std: 0.0174 | train/loss: -3.725290E-09 | train/ppo_kl: 3.275E-01 | train/entropy: 3.1061 | "
        "r3/rollout_train_logp_abs_diff: 1.245E-02 | r3/rollout_train_k3_kl: 1.263E-04 | "
        "replay/routing_agreement: 0.9907 | learning rate: 3.000000E-03 | grad norm: 1.150 |")


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "tools", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_iteration_line(demo):
    step, total, fields = demo.parse_iteration_line(LINE)
    assert (step, total) == (4, 100)
    assert fields["train/ppo_kl"] == 0.3275 and fields["r3/rollout_train_k3_kl"] == 1.263e-4
    assert fields["train/loss"] == -3.72529e-09 and fields["grad norm"] == 1.15
    assert demo.parse_iteration_line("[rank0] loading checkpoint") is None


def test_progress_line_is_complete(demo):
    step, total, fields = demo.parse_iteration_line(LINE)
    line = demo.progress_line("off seed 1", step, total, fields, per_step=2.0)
    assert line == ("[off seed 1] step   5/100  reward 0.003  k3 1.26e-04  |dlogp| 1.24e-02  routing agree 0.9907  "
                    "ppo_kl 3.28e-01  2.0 s/step, ~3 min left")


def test_seed_range_table(demo, tmp_path):
    runs = {}
    for seed, rewards in ((1, [0.0, 0.2, 0.4]), (2, [0.1, 0.3, 0.5])):
        for mode in demo.MODES:
            run_dir = tmp_path / f"seed{seed}" / mode
            run_dir.mkdir(parents=True)
            with open(run_dir / "metrics.jsonl", "w") as handle:
                for step, r in enumerate(rewards):
                    handle.write(json.dumps({"step": step, "reward/mean": r + (0.05 if mode == "R3" else 0.0)}) + "\n")
            runs[seed, mode] = str(run_dir)
    table = demo.seed_range_table(runs, ["reward/mean", "train/ppo_kl"], last_n=2)
    assert table.splitlines() == [
        "| metric | off first | off last-2 mean | off last-2 median | R3 first | R3 last-2 mean | R3 last-2 median |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| `reward/mean` | 0 – 0.1000 | 0.3000 – 0.4000 | 0.3000 – 0.4000 | 0.0500 – 0.1500 "
        "| 0.3500 – 0.4500 | 0.3500 – 0.4500 |",
        "| `train/ppo_kl` | — | — | — | — | — | — |",
    ]
