"""Checkpoint manifests (issue 14.2) and what a --load / run directory may be resumed from (14.3), on plain files."""

from __future__ import annotations

import json
import os

import pytest

from megatron_r3.platform.parallel_context import ParallelContext, ParallelSizes
from megatron_r3.train.checkpoint_integrity import (
    MANIFEST,
    CheckpointIntegrityError,
    check_resume_source,
    manifest_problems,
    verify_checkpoint,
    write_manifest,
)

ONE = ParallelContext.for_rank(ParallelSizes(), 1, 0)  # a world of one, no process group


def _checkpoint(root, step: int, size: int = 3 * 4096) -> str:
    directory = os.path.join(root, f"step_{step:07d}")
    os.makedirs(os.path.join(directory, "rng"))
    with open(os.path.join(directory, "__0_0.distcp"), "wb") as handle:
        handle.write(bytes(range(256)) * (size // 256))
    with open(os.path.join(directory, "trainer_state.json"), "w") as handle:
        json.dump({"step": step}, handle)
    with open(os.path.join(directory, "rng", "rank_00000.pt"), "wb") as handle:
        handle.write(b"rng" * 10)
    write_manifest(directory, step, ONE)
    with open(os.path.join(root, "latest"), "w") as handle:
        handle.write(str(step))
    return directory


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    directory = _checkpoint(str(tmp_path), 2)
    with open(os.path.join(directory, MANIFEST)) as handle:
        manifest = json.load(handle)
    assert manifest["step"] == 2
    assert sorted(manifest["files"]) == ["__0_0.distcp", "rng/rank_00000.pt", "trainer_state.json"]
    assert manifest["files"]["__0_0.distcp"]["size"] == 3 * 4096
    assert manifest_problems(directory, 2) == []
    verify_checkpoint(str(tmp_path), 2, ONE)


def test_overwritten_block_truncation_and_missing_file_name_the_file_and_the_last_good_step(tmp_path):
    root = str(tmp_path)
    _checkpoint(root, 2)
    damaged = _checkpoint(root, 4)
    distcp = os.path.join(damaged, "__0_0.distcp")
    with open(distcp, "r+b") as handle:  # 4 KiB overwritten in place: same size, loads silently without checksums
        handle.seek(4096)
        handle.write(b"\0" * 4096)
    with pytest.raises(CheckpointIntegrityError) as error:
        verify_checkpoint(root, 4, ONE)
    assert str(error.value) == (f"checkpoint step 4 is damaged: {distcp}: contents changed since the save (checksum "
                                f"mismatch); the last good checkpoint is step 2: write 2 into {root}/latest to resume "
                                f"from it")
    state = os.path.join(damaged, "trainer_state.json")
    with open(state, "r+b") as handle:
        handle.truncate(3)
    os.remove(os.path.join(damaged, "rng", "rank_00000.pt"))
    with pytest.raises(CheckpointIntegrityError) as error:
        verify_checkpoint(root, 4, ONE)
    message = str(error.value)
    assert message.startswith(f"checkpoint step 4 is damaged: {distcp}: contents changed since the save (checksum "
                              f"mismatch) (+2 more damaged file(s));")


def test_no_older_good_checkpoint_is_said(tmp_path):
    directory = _checkpoint(str(tmp_path), 1)
    os.remove(os.path.join(directory, "__0_0.distcp"))
    with pytest.raises(CheckpointIntegrityError, match=r"__0_0.distcp: missing; no older checkpoint verifies$"):
        verify_checkpoint(str(tmp_path), 1, ONE)


def test_checkpoints_without_a_tracker_are_never_silently_restarted_over(tmp_path):
    root = str(tmp_path / "checkpoints")
    os.makedirs(root)
    _checkpoint(root, 2)
    _checkpoint(root, 4)
    assert check_resume_source(None, root, str(tmp_path), overwrite=False) == root  # the tracker: resume
    os.remove(os.path.join(root, "latest"))
    for load, save, flag in ((root, None, "--load"), (None, root, "--save")):
        with pytest.raises(ValueError) as error:
            check_resume_source(load, save, str(tmp_path), overwrite=False)
        assert str(error.value) == (f"{flag} {root} holds checkpoints (steps 2, 4) but no 'latest' tracker file; to "
                                    f"resume from the newest, write 4 into {root}/latest; to start over, use a new "
                                    f"--run-dir / --save")


def test_a_new_run_does_not_overwrite_an_earlier_runs_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert check_resume_source(None, str(tmp_path / "checkpoints"), str(tmp_path), overwrite=False) is None
    metrics.write_text('{"step": 0}\n')
    with pytest.raises(ValueError) as error:
        check_resume_source(None, str(tmp_path / "checkpoints"), str(tmp_path), overwrite=False)
    assert str(error.value) == (f"{metrics} already holds metrics of an earlier run but there is no checkpoint to "
                                f"resume; use a new --run-dir, or pass --overwrite-run-dir to start over here")
    assert check_resume_source(None, str(tmp_path / "checkpoints"), str(tmp_path), overwrite=True) is None
    with pytest.raises(ValueError, match="no checkpoint there"):
        check_resume_source(str(tmp_path), None, str(tmp_path), overwrite=True)
