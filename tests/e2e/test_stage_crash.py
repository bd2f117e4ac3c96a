"""A crash on one pipeline stage ends every rank promptly, without a launcher to kill the others.

Two ranks started directly (no torchrun agent): the last stage raises in its update pass while the first stage waits
in a receive from it. The failed rank exits at once without tearing its process groups down (`pretrain_grpo.run_cli`),
its sockets close, the first stage's receive fails, and it exits too. Bound: 240 s for both on this 2-core machine
(start-up and one rollout included; a hang would wait for gloo's 600 s timeout).
"""

import os
import subprocess
import sys
import time

from tests.distributed.launch import REPO, free_port, subprocess_env

FLAGS = ["--config", "configs/demo_tiny.yaml", "--grpo-prompts-per-step", "4", "--grpo-group-size", "4",
         "--global-batch-size", "16", "--micro-batch-size", "4", "--max-new-tokens", "2", "--no-progress",
         "--train-iters", "1", "--save-interval", "1000", "--pipeline-model-parallel-size", "2"]


def test_crash_on_one_stage_ends_every_rank(tmp_path):
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", RANK=str(rank),
                             LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, "tests/e2e/stage_crash.py", *FLAGS, "--run-dir", str(tmp_path / "run")], cwd=REPO,
            env=env, stdout=open(tmp_path / f"out{rank}", "w"), stderr=open(tmp_path / f"err{rank}", "w"),
            start_new_session=True))
    deadline = time.time() + 240
    try:
        for proc in procs:
            proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    errors = [(tmp_path / f"err{rank}").read_text() for rank in range(2)]
    assert [proc.returncode for proc in procs] == [1, 1], errors[0][-2000:] + errors[1][-2000:]
    assert "injected crash on the last pipeline stage" in errors[1]
