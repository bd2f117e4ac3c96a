"""Shared helpers of the bench scripts: environment record, Markdown tables, JSON output, timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(device: str) -> dict:
    """Date, machine and versions, for the record of every figure."""
    import torch

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": device,
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores)",
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    for name in ("megatron.core", "transformers", "pybase64", "numpy"):
        try:
            module = __import__(name, fromlist=["__version__"])
            info[name.split(".")[0] if name != "megatron.core" else "megatron_core"] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional packages
            info[name] = None
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True, timeout=10).stdout.strip() + (
            "+dirty" if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                       capture_output=True, text=True, timeout=10).stdout.strip() else "")
    except Exception:  # noqa: BLE001
        info["git"] = None
    try:
        info["loadavg_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def select_device(name: Optional[str]) -> str:
    """`--device` for scripts that build models in this process: None picks cuda when available; cpu hides CUDA
    from this process and what it starts (the trainer and the hf engine pick CUDA whenever it is visible); cuda must
    exist. Call before anything initialises CUDA."""
    import torch

    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    return name


def resolve_device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    return name


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value):
        if isinstance(value, float):
            if value != value:  # nan
                return "n/a"
            if value == 0 or 1e-3 <= abs(value) < 1e6:
                return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
            return f"{value:.3e}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    text = f"\n### {title}\n\n" + markdown_table(headers, rows) + "\n"
    print(text, flush=True)
    return text


def write_json(path: Optional[str], payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1, default=str)
    print(f"wrote {path}", flush=True)


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1e3


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Optional[Callable] = None) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn (after `warmup`), synchronising before and after each call."""
    out = []
    for index in range(warmup + repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        if index >= warmup:
            out.append(time.perf_counter() - start)
    return out


def revision_source(rev: str, path: str) -> str:
    """The text of `path` at git revision `rev`, or from the folder `rev` (a copy of that revision's tree, for a
    machine without the git history, e.g. the lent GPU host)."""
    if os.path.isdir(rev):
        with open(os.path.join(rev, path)) as handle:
            return handle.read()
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout
