"""The top-level handler of pretrain_grpo.py (expected errors -> one line, bugs -> traceback) and the parent-death
arming of torchrun workers, without torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_r3.train.launch import is_expected, run_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_expected_error_is_one_line_with_the_traceback_in_the_run_log(tmp_path, capsys):
    def main(argv, run_log):
        run_log.attach(str(tmp_path))
        raise ValueError("--thing 3: must be even\n  (and more)")

    assert run_main(main, ["--hf-config", "configs/models/qwen3_moe_tiny.json"]) == 1
    log = tmp_path / "logs" / "rank_0.log"
    assert capsys.readouterr().err == f"error: --thing 3: must be even (and more) (traceback in {log})\n"
    assert "Traceback (most recent call last)" in log.read_text()


def test_a_bug_keeps_its_traceback(capsys):
    def main(argv, run_log):
        raise TypeError("unsupported operand")

    with pytest.raises(TypeError):
        run_main(main, [])
    assert not is_expected(TypeError("x")) and is_expected(FileNotFoundError("x"))


def test_preflight_error_exits_2_before_main_runs(capsys):
    def main(argv, run_log):
        raise AssertionError("main must not run")

    assert run_main(main, ["--config", "nope.yaml"]) == 2
    assert capsys.readouterr().err == "error: --config nope.yaml: no such file\n"


def test_torchrun_workers_arm_the_parent_death_signal_and_plain_runs_do_not():
    code = ("from megatron_r3.platform.process import exit_with_parent; import os; "
            "print(exit_with_parent(), exit_with_parent(os.environ | {'TORCHELASTIC_RUN_ID': 'x'}))")
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    env["PYTHONPATH"] = REPO
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["prctl"] and out.returncode == 0, out.stderr  # "" prints nothing
