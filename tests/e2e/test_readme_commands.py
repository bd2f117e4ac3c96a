"""The README's commands, run as written in a clean environment: `env -i` with only PATH=/usr/bin:/bin and HOME (no
activated virtual environment, no PYTHONPATH), from the repository root, after `make install`.

Every command of the README's ```bash blocks is accounted for below: run as written, run with flags appended that
make it cheap (later flags win in megatron's parser: fewer steps and samples, a temporary run directory), or not run
here with the reason. A new README command fails `test_every_readme_command_is_accounted_for` until it is added.
Inline commands in the prose must use the project's interpreter too (`.venv/bin/...`), never a bare `python`,
`torchrun` or `pip` from PATH. This is the class of failure a new user hits first: `python` or `torchrun` from PATH
without the project's packages.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest

from tests.distributed.launch import REPO, free_port

README = os.path.join(REPO, "README.md")
CHEAP_RUN = ["--train-iters", "1", "--grpo-prompts-per-step", "2", "--grpo-group-size", "2", "--global-batch-size",
             "4", "--micro-batch-size", "1", "--max-new-tokens", "1", "--no-progress", "--save-interval", "1000"]
# command (after joining `\` continuations, comments stripped) -> how this test treats it
NOT_RUN = {
    "make demo": "10+ minutes; tools/demo.py's parts are tested in tests/unit/test_demo.py",
    "make test": "this test runs inside it",
    "make install": "CI runs it before the tests (make test depends on it)",
}


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks: `\\` continuations joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def clean_run(command: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`command` through bash in a clean environment from the repository root. OMP_NUM_THREADS=1 only keeps the
    4-rank launch from oversubscribing the CI machine; it does not help a command find its interpreter."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["env", "-i", *[f"{k}={v}" for k, v in env.items()], "bash", "-c", command], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def commands():
    with open(README, encoding="utf-8") as handle:
        return readme_commands(handle.read())


def find(commands, prefix: str) -> str:
    matches = [c for c in commands if c.startswith(prefix)]
    assert len(matches) == 1, (prefix, matches)
    return matches[0]


# the commands the tests below run (each prefix names exactly one README command)
RUN = (".venv/bin/python pretrain_grpo.py --config", ".venv/bin/python pretrain_grpo.py --help", ".venv/bin/torchrun ",
       ".venv/bin/python tools/plot_metrics.py", "bash examples/slurm/grpo_sglang.sbatch --dry-run")


def test_every_readme_command_is_accounted_for(commands):
    for command in commands:
        assert command in NOT_RUN or command.startswith(RUN), f"README command not covered by this test: {command}"
    for prefix in RUN:
        find(commands, prefix)


def test_inline_commands_use_the_project_interpreter():
    with open(README, encoding="utf-8") as handle:
        text = re.sub(r"```.*?```", "", handle.read(), flags=re.S)
    # a program with arguments; a bare file name (`tools/demo.py`) is a reference, not a command
    bare = [span for span in re.findall(r"`([^`\n]+)`", text)
            if re.match(r"(python3?|torchrun|pip3?) |(tools|tests|bench|examples)/\S+\.py ", span)]
    assert bare == [], f"README commands that depend on an activated environment: {bare}"


@pytest.fixture(scope="module")
def single_run(commands, tmp_path_factory):
    """The README's one-process GRPO run, cheap, into a temporary run directory (the README's `runs/`)."""
    runs = tmp_path_factory.mktemp("readme_runs")
    command = find(commands, ".venv/bin/python pretrain_grpo.py --config")
    proc = clean_run(command.replace("runs/", f"{runs}/") + " " + shlex.join(CHEAP_RUN))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return command, runs


def test_single_process_run(single_run):
    command, runs = single_run
    run_dir = re.search(r"--run-dir (\S+)", command).group(1).replace("runs/", f"{runs}/")
    assert os.path.exists(os.path.join(run_dir, "metrics.jsonl"))


def test_plot_metrics_on_the_run(commands, single_run):
    _, runs = single_run
    command = find(commands, ".venv/bin/python tools/plot_metrics.py").replace("runs/", f"{runs}/")
    proc = clean_run(command)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wrote " in proc.stdout and "| `reward/mean` |" in proc.stdout


def test_torchrun_run(commands, tmp_path):
    command = find(commands, ".venv/bin/torchrun ")
    assert "--master-port" not in command
    command = command.replace(".venv/bin/torchrun ", f".venv/bin/torchrun --master-port {free_port()} ", 1)
    proc = clean_run(command.replace("runs/", f"{tmp_path}/") + " " + shlex.join(CHEAP_RUN)
                     + f" --run-dir {tmp_path}/tp2pp2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.exists(os.path.join(tmp_path, "tp2pp2", "metrics.jsonl"))


def test_sbatch_dry_run(commands, tmp_path):
    command = find(commands, "bash examples/slurm/grpo_sglang.sbatch --dry-run")
    proc = clean_run(f"RUN_DIR={tmp_path} {command}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== dry run OK" in proc.stdout
    # with no PYTHON given, every step of the job runs the project's interpreter (torchrun through it)
    assert f"{REPO}/.venv/bin/python -m torch.distributed.run --nnodes 2" in proc.stdout


# megatron-core 0.19.2's help text for --moe-paged-stash-buffer-size-factor-cuda has a bare `%` (issue 11 item 3).
def test_help_lists_the_flags(commands):
    proc = clean_run(find(commands, ".venv/bin/python pretrain_grpo.py --help"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for flag in ("--router-replay", "--max-tokens-per-microbatch", "--tensor-model-parallel-size"):
        assert flag in proc.stdout, flag


def test_install_requirements_match_the_readme():
    """The versions the README promises are the ones setup.py installs, and the environment satisfies them."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as handle:
        setup_text = handle.read()
    with open(README, encoding="utf-8") as handle:
        readme = handle.read()
    spec = Requirement(re.search(r'"(transformers[^"]*)"', setup_text).group(1)).specifier
    promised = re.search(r"transformers ≥ (\d+(?:\.\d+)*)", readme).group(1)
    assert str(spec) == f">={promised}", (str(spec), promised)
    assert Version(importlib.metadata.version("transformers")) in spec
    assert re.search(r"python_requires=\">=3\.11\"", setup_text) and "Python ≥ 3.11" in readme


def test_tools_with_a_shebang_are_executable():
    for name in ("plot_metrics.py", "demo.py"):
        path = os.path.join(REPO, "tools", name)
        with open(path, encoding="utf-8") as handle:
            assert handle.readline().startswith("#!/usr/bin/env python3"), name
        mode = subprocess.run(["git", "ls-files", "-s", path], cwd=REPO, capture_output=True, text=True).stdout
        # the mode git records (what a fresh clone gets); the file's own mode outside a git checkout
        assert mode.startswith("100755") if mode else os.access(path, os.X_OK), (name, mode)
