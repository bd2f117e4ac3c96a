import subprocess
import sys

import pytest


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the shim is only applied on Python < 3.12")
def test_typing_override_shim_still_needed():
    proc = subprocess.run(
        [sys.executable, "-c", "import megatron.training.arguments"], capture_output=True, text=True, timeout=120
    )
    assert "cannot import name 'override' from 'typing'" in proc.stderr, (
        "megatron.training imports on this Python without the shim: remove python_compat.typing_override\n"
        + proc.stderr[-2000:]
    )


def test_shim_makes_megatron_training_importable():
    proc = subprocess.run(
        [
            sys.executable, "-c",
            "from megatron_r3.platform.python_compat import apply_python_compat; apply_python_compat(); "
            "import megatron.training.arguments; print('ok')",
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
