"""Checksums of every file of a checkpoint, recorded at save and verified at load; and what a --load dir holds.

Without them a few KiB overwritten inside a `.distcp` file load silently (the loss turns NaN later, far from the
cause) and a truncated file fails with a bare EOFError / JSONDecodeError naming no file. At save, every rank hashes
a share of the step directory's files (CRC-32, streamed) and rank 0 writes `MANIFEST.json` (step, size and checksum
per file) into the `.tmp` directory before it is renamed to `step_NNNNNNN/`: the manifest is atomic with the step.
At load, every rank verifies a share and the ranks agree on the problems, so damage ends every rank with the same
one line naming the file and the last checkpoint that still verifies.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Optional

import torch.distributed as dist

from megatron_r3.platform.collectives import agree_on_failures
from megatron_r3.platform.parallel_context import ParallelContext

MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step_(\d{7})$")
_CHUNK = 16 << 20


class CheckpointIntegrityError(ValueError):
    """A checkpoint file is missing, truncated or altered since it was saved."""


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(directory: str) -> list[str]:
    out = []
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.relpath(os.path.join(parent, name), directory)
            if path != MANIFEST and not path.endswith(".tmp"):
                out.append(path)
    return sorted(out)


def write_manifest(directory: str, step: int, parallel: ParallelContext) -> None:
    """Every rank calls this once all ranks have written `directory`; rank 0 writes the manifest atomically."""
    rank, world = parallel.rank, parallel.world_size
    files = _files(directory)  # every rank lists the same (shared) directory: the shares below agree
    mine = {path: {"size": os.path.getsize(os.path.join(directory, path)),
                   "crc32": file_crc32(os.path.join(directory, path))}
            for index, path in enumerate(files) if index % world == rank}
    shares = [mine]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, mine, group=parallel.host_group)
    if rank == 0:
        entries = {path: entry for share in shares for path, entry in share.items()}
        tmp = os.path.join(directory, MANIFEST + ".tmp")
        with open(tmp, "w") as handle:
            json.dump({"step": step, "files": dict(sorted(entries.items()))}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, os.path.join(directory, MANIFEST))


def manifest_problems(directory: str, step: int, share: Optional[tuple[int, int]] = None) -> list[str]:
    """What is wrong with `directory` against its manifest ([] when it verifies); `share` = (rank, world) checks
    only every world-th file. A checkpoint without a manifest (written before manifests existed) has no problems."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as handle:
            manifest = json.load(handle)
        files, recorded_step = manifest["files"], manifest["step"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"{path}: unreadable manifest ({type(error).__name__})"]
    problems = [] if recorded_step == step else [f"{path}: records step {recorded_step}, not {step}"]
    rank, world = share or (0, 1)
    for index, (name, entry) in enumerate(sorted(files.items())):
        if index % world != rank:
            continue
        full = os.path.join(directory, name)
        if not os.path.exists(full):
            problems.append(f"{full}: missing")
        elif os.path.getsize(full) != entry["size"]:
            problems.append(f"{full}: {os.path.getsize(full)} bytes, {entry['size']} when saved (truncated?)")
        elif file_crc32(full) != entry["crc32"]:
            problems.append(f"{full}: contents changed since the save (checksum mismatch)")
    return problems


def checkpoint_steps(root: str) -> list[int]:
    """Steps of the complete step directories under `root` (no `.tmp`), ascending."""
    if not root or not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name))
                  and os.path.isdir(os.path.join(root, name)))


def last_good_step(root: str, before: int) -> Optional[int]:
    """The newest step below `before` whose files verify (only called once a checkpoint failed to verify)."""
    for step in reversed([s for s in checkpoint_steps(root) if s < before]):
        if not manifest_problems(os.path.join(root, f"step_{step:07d}"), step):
            return step
    return None


def verify_checkpoint(root: str, step: int, parallel: ParallelContext) -> None:
    """Raise CheckpointIntegrityError on every rank alike when checkpoint `step` under `root` is damaged (every rank
    verifies a share of the files; the problems are agreed on `parallel`'s host group)."""
    directory = os.path.join(root, f"step_{step:07d}")
    share = (parallel.rank, parallel.world_size)
    failures = agree_on_failures(manifest_problems(directory, step, share=share), parallel.host_group)
    if not failures:
        return
    problems = [failure.message for failure in failures]
    good = last_good_step(root, step)
    fallback = (f"the last good checkpoint is step {good}: write {good} into {os.path.join(root, 'latest')} to "
                f"resume from it" if good is not None else "no older checkpoint verifies")
    more = f" (+{len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
    raise CheckpointIntegrityError(f"checkpoint step {step} is damaged: {problems[0]}{more}; {fallback}")


def check_resume_source(load: Optional[str], save: Optional[str], run_dir: str, overwrite: bool) -> Optional[str]:
    """The checkpoint root to resume from (None: a new run), refusing what would silently lose data.

    - `--load DIR` (or this run's own checkpoint dir) holding step directories but no `latest` tracker: refuse,
      naming the newest step and how to resume from it; a new run there would overwrite those checkpoints.
    - a new run whose run directory already has a metrics.jsonl: refuse unless `overwrite` (--overwrite-run-dir).
    """
    from megatron_r3.train.checkpoint import TRACKER, latest_step

    for root, flag in ((load, "--load"), (save, "--save")):
        if not root:
            continue
        if latest_step(root) is not None:
            return root
        steps = checkpoint_steps(root)
        if steps:
            raise ValueError(
                f"{flag} {root} holds checkpoints (steps {', '.join(map(str, steps))}) but no '{TRACKER}' tracker "
                f"file; to resume from the newest, write {steps[-1]} into {os.path.join(root, TRACKER)}; to start "
                f"over, use a new --run-dir / --save"
            )
        if flag == "--load":
            raise ValueError(f"--load {root}: no checkpoint there (no '{TRACKER}' tracker and no step_NNNNNNN dirs)")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not overwrite and os.path.exists(metrics) and os.path.getsize(metrics) > 0:
        raise ValueError(f"{metrics} already holds metrics of an earlier run but there is no checkpoint to resume; "
                         f"use a new --run-dir, or pass --overwrite-run-dir to start over here")
    return None
