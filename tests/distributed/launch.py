"""Launch a many-layouts gloo script once under torchrun and return the JSON records its rank 0 wrote."""

from __future__ import annotations

import json
import os
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
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stdout or b"")[-4000:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-4000:]
            raise AssertionError(f"{script} did not finish within {timeout} s (a hang?):\n{tail}") from None
        if proc.returncode != 0 or not os.path.exists(out):
            raise AssertionError(
                f"{script} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            )
        return json.loads(Path(out).read_text())
