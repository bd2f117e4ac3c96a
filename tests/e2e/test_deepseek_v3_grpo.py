"""A tiny DeepSeek-V3 (MLA, sigmoid router with expert bias, group-limited top-k, shared expert, dense first layer)
trained end to end through the CLI's code path with the embedded hf engine (transformers' DeepseekV3ForCausalLM in
bf16 against the fp32 megatron trainer), replay off and R3, both runs in ONE interpreter (tests/e2e/grpo_runs.py).

R3: every used route is the engine's (`replay/used_route_match` 1.0, every valid token replayed) and the first
update of each step reproduces the old-logprob pass (`train/ppo_kl_first_minibatch` 0). Off: the trainer routes
itself, so some routes differ from the engine's (agreement < 1) and nothing is replayed.

A third run, R3 on the GPU's code path: what `--trainer-dtype auto` picks on a Hopper GPU - a bf16 trainer with an
fp32 router and grouped-GEMM experts (`GroupedExperts`, stacked `linear_fc1.weight` seen per expert; set through
grpo_runs.py's `gpu_settings` because megatron's `--moe-grouped-gemm` check needs CUDA), so the weight load, the
weight sync to the engine, the shared and routed experts, the expert-bias buffer and the final dist checkpoint all
run with the grouped experts' names (every bf16 GPU run failed at its first weight load before the deepseek_v3 family
mapped them). The GPU's SDPA core attention is not forced here: megatron's `--attention-backend` sets process-wide
TE variables that conflict between runs of one interpreter; tests/unit/test_deepseek_v3.py runs MLA through SDPA.
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
    gpu_path = [*FLAGS, "--router-replay", "R3", "--trainer-dtype", "bf16", "--train-iters", "3"]
    saved = str(tmp_path / "runs" / "R3_gpu_path" / "checkpoints")
    runs += [{"name": "R3_gpu_path", "gpu_settings": {"moe_grouped_gemm": True},
              "flags": [*gpu_path, "--save-interval", "2"]},
             {"name": "R3_gpu_path_resumed", "gpu_settings": {"moe_grouped_gemm": True},
              "flags": [*gpu_path, "--load", saved, "--save", str(tmp_path / "resumed"), "--save-interval", "1000"]}]
    runs_file, out = tmp_path / "runs.json", tmp_path / "out.json"
    runs_file.write_text(json.dumps(runs))
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, os.path.join("tests", "e2e", "grpo_runs.py"), "--runs", str(runs_file),
         "--root", str(tmp_path / "runs"), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = json.loads(out.read_text())
    metrics = {record["name"]: record["metrics"] for record in records}
    assert {record["name"]: record["experts"] for record in records} == {
        "off": ["SequentialMLP"], "R3": ["SequentialMLP"], "R3_gpu_path": ["GroupedExperts"],
        "R3_gpu_path_resumed": ["GroupedExperts"]}
    assert [len(metrics[m]) for m in ("off", "R3", "R3_gpu_path")] == [2, 2, 3]
    # the grouped experts' dist checkpoint (with MLA, shared experts, expert_bias) resumes step 2 exactly
    assert [m["step"] for m in metrics["R3_gpu_path_resumed"]] == [2]
    for key, value in metrics["R3_gpu_path"][2].items():
        if not key.startswith(("timing/", "throughput/")):
            assert metrics["R3_gpu_path_resumed"][0][key] == value, key
    for step in metrics["R3"] + metrics["R3_gpu_path"]:
        assert step["replay/used_route_match"] == 1.0
        assert step["train/ppo_kl_first_minibatch"] == 0.0
        assert step["replay/replayed_tokens"] > 0
    for step in metrics["off"]:
        assert step["replay/replayed_tokens"] == 0
        assert step["train/ppo_kl_first_minibatch"] == 0.0
    # bf16 engine vs fp32 trainer: the free routes disagree somewhere, so replay had something to fix
    assert min(step["replay/routing_agreement"] for step in metrics["off"]) < 1.0
    assert metrics["R3"][0]["r3/rollout_train_k3_kl"] < metrics["off"][0]["r3/rollout_train_k3_kl"]
