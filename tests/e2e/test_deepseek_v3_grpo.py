"""A tiny DeepSeek-V3 (MLA, sigmoid router with expert bias, group-limited top-k, shared expert, dense first layer)
trained end to end through the CLI's code path with the embedded hf engine (transformers' DeepseekV3ForCausalLM in
bf16 against the fp32 megatron trainer), replay off and R3, both runs in ONE interpreter (tests/e2e/grpo_runs.py).

R3: every used route is the engine's (`replay/used_route_match` 1.0, every valid token replayed) and the first
update of each step reproduces the old-logprob pass (`train/ppo_kl_first_minibatch` 0). Off: the trainer routes
itself, so some routes differ from the engine's (agreement < 1) and nothing is replayed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.distributed.launch import REPO, subprocess_env

FLAGS = [
    "--config", "configs/demo_tiny.yaml", "--hf-config", "configs/models/deepseek_v3_tiny.json",
    "--grpo-prompts-per-step", "8", "--grpo-group-size", "4", "--global-batch-size", "16", "--micro-batch-size", "4",
    "--max-new-tokens", "2", "--no-progress", "--train-iters", "2", "--check-step0-kl", "1e-6",
]


def test_off_and_r3_on_a_tiny_deepseek_v3(tmp_path):
    runs = [{"name": mode, "flags": [*FLAGS, "--router-replay", mode]} for mode in ("off", "R3")]
    runs_file, out = tmp_path / "runs.json", tmp_path / "out.json"
    runs_file.write_text(json.dumps(runs))
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, os.path.join("tests", "e2e", "grpo_runs.py"), "--runs", str(runs_file),
         "--root", str(tmp_path / "runs"), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    metrics = {record["name"]: record["metrics"] for record in json.loads(out.read_text())}
    assert [len(metrics[m]) for m in ("off", "R3")] == [2, 2]
    for step in metrics["R3"]:
        assert step["replay/used_route_match"] == 1.0
        assert step["train/ppo_kl_first_minibatch"] == 0.0
        assert step["replay/replayed_tokens"] > 0
    for step in metrics["off"]:
        assert step["replay/replayed_tokens"] == 0
        assert step["train/ppo_kl_first_minibatch"] == 0.0
    # bf16 engine vs fp32 trainer: the free routes disagree somewhere, so replay had something to fix
    assert min(step["replay/routing_agreement"] for step in metrics["off"]) < 1.0
    assert metrics["R3"][0]["r3/rollout_train_k3_kl"] < metrics["off"][0]["r3/rollout_train_k3_kl"]
