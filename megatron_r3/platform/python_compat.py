"""Python 3.11 support for megatron-core 0.19.2's `megatron.training` package.

The 0.19.2 wheel declares Python >= 3.12 and `megatron.training` uses one 3.12 name: `typing.override`
(megatron/training/models/hybrid.py), so importing `megatron.training.arguments` on 3.11 fails with
`ImportError: cannot import name 'override' from 'typing'`. `typing_extensions.override` is the same decorator
(it only sets `__override__`). Nothing else differs; `tests/unit/test_python_compat.py` fails once it is no longer
needed.
"""

from __future__ import annotations

import sys
import typing


def typing_override() -> None:
    """Answers `ImportError: cannot import name 'override' from 'typing'` on Python < 3.12."""
    if sys.version_info < (3, 12) and not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


def apply_python_compat() -> None:
    typing_override()
