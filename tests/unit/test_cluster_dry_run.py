"""Multi-node dry run: `examples/slurm/grpo_sglang.sbatch --dry-run` validates the 4-node Qwen3-30B-A3B layout on
this machine (megatron's validate_args at world size 16 + layout checks), and tools/cluster_dry_run.py names what
is wrong in broken layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.distributed.launch import REPO, subprocess_env

SCRIPT = os.path.join(REPO, "examples", "slurm", "grpo_sglang.sbatch")


def run_script(**env):
    # the interpreter running this test (the project's environment), never a `python` from PATH
    full = subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=300)


def test_sbatch_dry_run_validates_the_4_node_qwen3_config(tmp_path):
    proc = run_script(RUN_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "4 nodes x 8 GPUs | SGLang: node1,node2 (TP 4) | trainer: node3,node4 (MASTER_ADDR=node3)" in out
    assert "megatron validate_args + replay checks  passed" in out
    assert "trainer GPUs (world size)               2 x 8 = 16" in out
    assert "SGLang servers                          2 nodes x 2 = 4" in out
    assert "srun --nodes=2 --ntasks-per-node=1 --nodelist=node1,node2" in out
    assert f"{sys.executable} -m torch.distributed.run --nnodes 2 --nproc-per-node 8" in out
    assert "--rdzv-endpoint node3:29500" in out
    assert "--enable-return-routed-experts" not in out  # the launcher adds it; the script must not duplicate it
    assert "== dry run OK" in out


# The in-process checks run in one subprocess: parsing applies megatron_r3's CPU patches to megatron-core, which
# must not leak into this pytest process (tests/unit/test_cpu_support.py inspects the unpatched functions).
CASES = r"""
import contextlib, io, json, os, sys
sys.path.insert(0, os.path.join(REPO, "tools"))
import cluster_dry_run as tool

def run(config, **kwargs):
    report = tool.check_cluster(os.path.join(REPO, "configs", config), **kwargs)
    args = report.args
    return {"failures": {c.name: c.message for c in report.failures}, "table": report.table(),
            "arch": [args.num_layers, args.num_experts, args.moe_router_topk, list(args.moe_layer_freq)]}

out = {}
out["moonlight"] = run("moonlight_16b_a3b.yaml", trainer_nodes=3, gpus_per_node=8, sglang_nodes=1, sglang_tp_size=2)
out["moonlight_1node"] = run("moonlight_16b_a3b.yaml", trainer_nodes=1, gpus_per_node=8, sglang_nodes=1,
                             sglang_tp_size=2, extra=["--pipeline-model-parallel-size", "1",
                                                      "--context-parallel-size", "2"])
out["deepseek_v3_671b"] = run("deepseek_v3_671b.yaml", trainer_nodes=64, gpus_per_node=8, sglang_nodes=4,
                              sglang_tp_size=8)
out["ep16"] = run("qwen3_30b_a3b.yaml", trainer_nodes=2, gpus_per_node=8, sglang_nodes=2, sglang_tp_size=4,
                  extra=["--expert-model-parallel-size", "16", "--tensor-model-parallel-size", "4",
                         "--pipeline-model-parallel-size", "4"])
out["pp5"] = run("qwen3_30b_a3b.yaml", trainer_nodes=3, gpus_per_node=8, sglang_nodes=1, sglang_tp_size=4,
                 extra=["--pipeline-model-parallel-size", "5"])
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = tool.main(["--config", os.path.join(REPO, "configs", "qwen3_30b_a3b.yaml"), "--trainer-nodes", "2",
                      "--sglang-nodes", "2", "--gpus-per-node", "8", "--sglang-tp-size", "3"])
out["main"] = {"code": code, "stderr": err.getvalue()}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def cases():
    full = subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", f"REPO = {str(REPO)!r}\n" + CASES], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_the_tool_exits_nonzero_with_the_failing_checks(cases):
    main = cases["main"]
    assert main["code"] == 1  # the sbatch script runs under `set -e`: a failed dry run stops it
    assert "SGLang TP 3 must divide the GPUs per node (8)" in main["stderr"]
    assert "FAILED: 4 check(s)" in main["stderr"]


def test_moonlight_sized_config_on_3_plus_1_nodes(cases):
    report = cases["moonlight"]
    assert not report["failures"], report["table"]
    layers, experts, topk, freq = report["arch"]
    assert (layers, experts, topk) == (27, 64, 6) and freq[0] == 0  # first layer dense, as in Moonlight


def test_moonlight_on_one_8_gpu_node_tp2_cp2_ep8(cases):
    report = cases["moonlight_1node"]
    assert not report["failures"], report["table"]
    assert "2 x 1 x 2 = 4" in report["table"] and "64 experts / EP 8" in report["table"]


def test_deepseek_v3_671b_on_64_plus_4_nodes(cases):
    report = cases["deepseek_v3_671b"]
    assert not report["failures"], report["table"]
    layers, experts, topk, freq = report["arch"]
    assert (layers, experts, topk) == (61, 256, 8) and freq[:4] == [0, 0, 0, 1]  # first_k_dense_replace 3
    assert "first 4, last 1, 56 layers / 14 stages" in report["table"]


def test_layout_errors_are_named_precisely(cases):
    # megatron's validate_args accepts this one; the expert layout does not fit (found at init time otherwise)
    names = cases["ep16"]["failures"]
    assert list(names) == ["EP x ETP divides TP x CP x DP"], cases["ep16"]["table"]
    assert "EP x ETP = 16 must divide TP x CP x DP = 4" in names["EP x ETP divides TP x CP x DP"]
    # 24 GPUs: megatron stops at its first assertion; the table still names every problem
    names = cases["pp5"]["failures"]
    assert "megatron validate_args + replay checks" in names
    assert "48 layers do not split over 5" in names["layers divisible by PP"]
    assert "TP x PP x CP divides world" in names
