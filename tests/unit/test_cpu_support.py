"""Each CPU patch answers one exact megatron-core/torch error. The probes reproduce that error on an unpatched
megatron-core in a fresh interpreter: the day one stops failing, upstream no longer needs the patch and the test
says so."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_r3.platform import cpu_support
from tests.distributed.launch import REPO, free_port, subprocess_env

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU support is only applied without CUDA")

# patch -> text the unpatched call still produces
EXPECTED = {
    "cuda_runtime_stand_ins": "Torch not compiled with CUDA enabled",
    "cpu_rng_tracker": "Torch not compiled with CUDA enabled",
    "cuda_device_literals": "Torch not compiled with CUDA enabled",
    "cpu_causal_masks": "Torch not compiled with CUDA enabled",
    "alltoall_split_sizes_as_numpy": "returns Tensor",
    "uneven_gather_scatter_for_gloo": "invalid tensor size",
    "cp_rope_slice_on_cpu": "pin_memory=True requires a CUDA or other accelerator backend",
    "cpu_grad_clip": "AssertionError",
    "device_arch_version_on_cpu": "Torch not compiled with CUDA enabled",
    "tensor_cuda_is_identity": "Torch not compiled with CUDA enabled",
    "mixed_precision_optimizers_on_cpu": "Received torch.BFloat16Tensor",
}


@pytest.fixture(scope="module")
def probes():
    script = Path(__file__).with_name("cpu_support_probes.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(free_port())], capture_output=True, text=True, timeout=300, cwd=REPO,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_patch_is_probed_and_documented():
    assert set(cpu_support.PATCHES) == set(EXPECTED)
    for name in cpu_support.PATCHES:
        doc = getattr(cpu_support, name).__doc__
        assert doc and doc.startswith("Answers `"), f"{name} must name the exact error it answers"
        assert EXPECTED[name].split(" ")[0] in doc or name == "alltoall_split_sizes_as_numpy"
        assert EXPECTED[name] in doc or name in ("alltoall_split_sizes_as_numpy", "cpu_grad_clip")


def test_grad_clip_probe_fails_on_the_cuda_type_check():
    import importlib.util

    # Read the file, not the live function: another test in this process may already have applied the patch.
    origin = importlib.util.find_spec("megatron.core.optimizer.clip_grads").origin
    source = Path(origin).read_text()
    body = source.split("def clip_grad_by_total_norm_fp32", 1)[1].split("\ndef ", 1)[0]
    assert "torch.cuda.FloatTensor" in body, "the CUDA type check is gone: remove cpu_support.cpu_grad_clip"


@pytest.mark.parametrize("patch", sorted(EXPECTED))
def test_patch_still_needed(probes, patch):
    assert EXPECTED[patch] in probes[patch], (
        f"unpatched megatron-core no longer gives {EXPECTED[patch]!r} ({probes[patch]!r}): "
        f"remove cpu_support.{patch}"
    )


def test_triton_is_real_not_stubbed():
    import megatron.core.transformer.moe.ops.paged_stash as paged_stash

    assert hasattr(paged_stash, "triton")


def test_upstream_torch_norm_still_refuses_sequence_parallelism(probes):
    """Why model/norm.py exists (not a patch): megatron's local-spec norm without apex refuses SP on every device.
    The day this fails, `SequenceParallelNorm` could give way to megatron's own norm."""
    assert "sequence parallel not supported by torch LayerNorm" in probes["upstream_torch_norm_sequence_parallel"]
