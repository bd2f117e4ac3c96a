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
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        # own process group, so a timeout kills the ranks too, not only the launcher
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(
                f"{script} did not finish within {timeout} s (a hang?):\n{stdout[-3000:]}\n{stderr[-3000:]}"
            ) from None
        if proc.returncode != 0 or not os.path.exists(out):
            raise AssertionError(f"{script} exited with {proc.returncode}:\n{stdout[-3000:]}\n{stderr[-6000:]}")
        return json.loads(Path(out).read_text())


def exit_without_teardown() -> None:
    """End a many-layouts rank once its results are written, without tearing down the process groups.

    Each layout re-initialises megatron's parallel state, so a launch ends holding dozens of gloo groups; their
    destruction at interpreter exit joins gloo's transport threads, which was seen spinning for many minutes on a
    loaded 2-core machine. Nothing is left to flush, so the rank exits directly.
    """
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
