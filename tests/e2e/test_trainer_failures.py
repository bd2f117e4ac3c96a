"""Checkpoint atomicity and the non-finite-gradient skip, through the real trainer (one process)."""

import json
import subprocess
import sys

from tests.distributed.launch import REPO, subprocess_env


def test_crash_mid_save_and_nonfinite_grad_skip(tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "tests/e2e/trainer_probe.py", str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(lines[-1][len("PROBE "):])
    assert result["latest_after_crash"] == 1  # the half-written step 2 is invisible
    assert result["restored_step"] == 1 and result["weights_restored"]
    assert result["skip_norm_is_nan"] and result["skipped_steps"] == 1 and result["params_untouched"]
