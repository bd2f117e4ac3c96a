"""The CPU preset of examples/r3_stability/run.py, a few steps only: supervised warm-up (3 steps) exported as a HF
checkpoint, GRPO from it with --router-replay off and R3 (2 steps of 8 prompts x 4 samples each, run side by side),
then the PNG and table.

What it shows: the whole pipeline runs through the real CLIs; the warm-up's cross-entropy falls; both GRPO runs start
from the same weights and data (identical step-0 reward and routing agreement); R3 trains on exactly the engine's
routes while off does not; the report has a row per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.distributed.launch import REPO, subprocess_env


def _records(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_cpu_preset_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "examples/r3_stability/run.py", "--preset", "cpu", "--out", str(out),
           "--warmup-iters", "3", "--grpo-iters", "2", "--modes", "off", "R3", "--budget-s", "600",
           "--", "--grpo-prompts-per-step", "8", "--grpo-group-size", "4", "--global-batch-size", "16",
           "--micro-batch-size", "16"]
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    assert sorted(os.listdir(out)) == ["metrics_R3.jsonl", "metrics_off.jsonl", "metrics_warmup.jsonl",
                                       "r3_stability.md", "r3_stability.png", "run.log", "work"]
    assert (out / "r3_stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "work" / "warmup" / "hf" / "config.json").exists()

    warm = _records(out / "metrics_warmup.jsonl")
    assert [r["step"] for r in warm] == [0, 1, 2]
    assert warm[-1]["train/loss"] < warm[0]["train/loss"]
    assert "eval/reward_mean" in warm[-1]

    off, r3 = _records(out / "metrics_off.jsonl"), _records(out / "metrics_R3.jsonl")
    assert [r["step"] for r in off] == [r["step"] for r in r3] == [0, 1]
    # same starting weights, seed and prompts: the first rollout is identical, and so is the trainer's agreement with
    # the engine in the first MoE layer (layer 1 is dense; deeper layers see R3's replayed routes upstream)
    assert off[0]["reward/mean"] == r3[0]["reward/mean"]
    assert off[0]["replay/routing_agreement/layer_2"] == r3[0]["replay/routing_agreement/layer_2"]
    assert all(r["replay/used_route_match"] == 1.0 for r in r3)
    assert all(r["replay/used_route_match"] < 1.0 for r in off)  # bf16 engine vs fp32 trainer: some flips

    table = (out / "r3_stability.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| off |") or line.startswith("| R3 |")]
    assert len(rows) == 2 and all(row.split(" | ")[1] == "2" for row in rows)  # the steps column
    assert "preset `cpu`" in table
