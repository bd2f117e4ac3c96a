"""A guard for per-microbatch tensor code that must never wait on the device."""

import pytest
import torch


def forbid_host_syncs(monkeypatch) -> None:
    """Make every tensor -> Python conversion raise (explicit ones like `.item()` and implicit ones through control
    flow), after proving that the guard itself catches them."""

    def boom(*args, **kwargs):
        raise AssertionError("host sync in per-microbatch code")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for sync in (lambda t: t.item(), lambda t: t.tolist(), lambda t: bool(t > 0), lambda t: float(t)):
        with pytest.raises(AssertionError, match="host sync"):
            sync(torch.ones(()))
