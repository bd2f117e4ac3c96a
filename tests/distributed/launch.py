"""Launch a many-layouts gloo script once under torchrun and return the JSON records its rank 0 wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# torch.distributed's rendezvous variables: a test process that initialised a process group in-process (a
# single-rank unit test) has them set, and a child that inherits them would try to listen on the parent's port
RENDEZVOUS_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def subprocess_env(**extra: str) -> dict:
    """This process's environment for a child launch: rendezvous variables dropped, `extra` added."""
    env = {key: value for key, value in os.environ.items() if key not in RENDEZVOUS_VARIABLES}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(script: str, args: list[str] = (), *, nproc: int = 4, timeout: int = 900) -> list[dict]:
    """Run `script` on `nproc` gloo ranks with `--out FILE`; fail with the output tail if it crashes or hangs."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", str(REPO / script), *args, "--out", out,
        ]
        env = subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        # Output goes to files, not pipes: a helper process a rank leaves behind (e.g. dist checkpointing's) must not
        # keep us waiting for end-of-file after the launch itself has finished. The launch runs in its own session,
        # so a timeout, or stragglers after the end, are killed with every rank.
        with open(os.path.join(tmp, "stdout"), "w+") as stdout, open(os.path.join(tmp, "stderr"), "w+") as stderr:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            stdout.seek(0)
            stderr.seek(0)
            out_text, err_text = stdout.read(), stderr.read()
        if timed_out:
            raise AssertionError(f"{script} did not finish within {timeout} s (a hang?):\n{out_text[-3000:]}\n"
                                 f"{err_text[-3000:]}")
        if proc.returncode != 0 or not os.path.exists(out):
            raise AssertionError(f"{script} exited with {proc.returncode}:\n{out_text[-3000:]}\n{err_text[-6000:]}")
        return json.loads(Path(out).read_text())


def finish_launch(records: list, out: str | None) -> None:
    """Rank 0 writes the launch's records to `out`; every rank then waits for the others and exits."""
    import torch.distributed as dist

    if dist.get_rank() == 0 and out:
        with open(out, "w") as handle:
            json.dump(records, handle, indent=1)
    dist.barrier()
    exit_without_teardown()


def exit_without_teardown() -> None:
    """End a many-layouts rank once its results are written, without tearing down the process groups.

    Each layout re-initialises megatron's parallel state, so a launch ends holding dozens of gloo groups; their
    destruction at interpreter exit joins gloo's transport threads, which was seen spinning for many minutes on a
    loaded 2-core machine. Nothing is left to flush, so the rank exits directly.
    """
    import multiprocessing
    import os
    import sys

    for child in multiprocessing.active_children():  # e.g. dist checkpointing's worker processes
        child.terminate()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
