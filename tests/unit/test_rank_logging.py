"""platform/logging: console lines from rank 0 by default, every rank on request, debug only under --verbose, and
each line also in the rank's log file (once on the console, even when the run log echoes megatron_r3's records)."""

from __future__ import annotations

import logging

import pytest

from megatron_r3.platform.logging import get_logger, set_verbose
from megatron_r3.train.launch import RunLog


@pytest.fixture
def records():
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger, root = logging.getLogger("megatron_r3"), logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # as train/launch.RunLog sets it
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)
    root.setLevel(level)
    set_verbose(False)


def test_rank_zero_speaks_other_ranks_only_on_request(monkeypatch, capsys, records):
    log = get_logger("megatron_r3.test")
    monkeypatch.setenv("RANK", "0")
    log.info("step line")
    log.info("mine", all_ranks=True)
    monkeypatch.setenv("RANK", "3")
    log.info("never printed")
    log.info("from three", all_ranks=True)
    assert capsys.readouterr().out == "step line\n[rank 0] mine\n[rank 3] from three\n"
    assert [r.getMessage() for r in records] == ["step line", "[rank 0] mine", "[rank 3] from three"]


def test_debug_reaches_the_console_under_verbose_only(monkeypatch, capsys, records):
    monkeypatch.setenv("RANK", "0")
    log = get_logger("megatron_r3.test")
    log.debug("quiet")
    set_verbose(True)
    log.debug("loud")
    assert capsys.readouterr().out == "loud\n"
    assert [r.getMessage() for r in records] == ["quiet", "loud"]  # the log file gets both


@pytest.mark.parametrize("verbose", [False, True])
def test_run_log_console_does_not_repeat_a_printed_line(monkeypatch, capsys, tmp_path, verbose):
    monkeypatch.setenv("RANK", "0")
    run_log = RunLog(verbose=verbose, rank=0)
    try:
        run_log.attach(str(tmp_path))
        get_logger("megatron_r3.test").info("iteration 1")
        get_logger("megatron_r3.test").warning("a warning")
    finally:
        run_log.close()
    out, err = capsys.readouterr()
    assert out == "iteration 1\n"
    assert err.count("a warning") == 1 and "iteration 1" not in err
    text = (tmp_path / "logs" / "rank_0.log").read_text()
    assert "iteration 1" in text and "a warning" in text


def test_package_below_train_speaks_through_the_logger():
    """Below `train/` (which owns the CLI's own error lines), every console line goes through platform/logging:
    no `print(` call anywhere else."""
    import ast
    from pathlib import Path

    import megatron_r3

    package = Path(megatron_r3.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if relative.startswith("train/") or relative == "platform/logging.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{relative}:{node.lineno}")
    assert found == []
