"""Every tensor collective megatron_r3's own code issues goes through here, so one place can check its device.

Why: on GPUs megatron's model groups are NCCL, which accepts only tensors on this rank's GPU ("No backend type
associated with device type cpu"), while on the CPU test machine every group is gloo, which takes anything. A CPU
tensor handed to a model group (the PP >= 2 metric all-reduce of `grpo/mismatch.py`) therefore passed the whole gloo
suite and crashed at step 0 on GPUs. These wrappers are plain pass-throughs to `torch.distributed`, plus one check:

    strict collective devices (MEGATRON_R3_STRICT_COLLECTIVE_DEVICES=1, CPU runs): before each collective the
    installed checker is asked whether `tensor` lives on the device the group's backend would need on GPUs.

On a CPU machine the model device and the host device are both `cpu`, so `tensor.device` cannot tell them apart. In
strict mode the model device is therefore `torch.device("cpu", 0)` (`model_device()`; `platform.distributed.device()`,
`collective_device(model group)` and cpu_support's stand-in for `torch.cuda.current_device()` hand it out), and the
host device stays `torch.device("cpu")`. torch computes on both alike (numerics unchanged), but a tensor factory or
`.to()` call asks for one or the other, exactly where GPU code asks for `cuda` or the CPU. Which device each tensor
would have on a GPU is tracked by the test harness (`tests/distributed/strict_devices.py`: a torch function mode
that follows device requests through ops, as CUDA does), which installs itself with `install_device_check`. Product
code keeps no such tracker and patches nothing: outside strict mode `_CHECK` is None and the wrappers cost one test.

Only megatron_r3's own collectives are checked (megatron-core's run on GPUs already); `tests/unit/
test_collective_devices.py` keeps any new `dist.<collective>(` in the package from bypassing this module.
Object collectives (`all_gather_object`, `broadcast_object_list`) and barriers move no caller tensor and are not
wrapped.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

STRICT_ENV = "MEGATRON_R3_STRICT_COLLECTIVE_DEVICES"

# checker(tensor, group, collective_name) -> None, raising on a wrong device; installed by the strict test harness
_CHECK: Optional[Callable] = None


def strict_mode() -> bool:
    """Whether the strict collective-device mode is on (CPU runs only: on GPUs NCCL itself is the check)."""
    return os.environ.get(STRICT_ENV, "0") not in ("", "0") and not torch.cuda.is_available()


def model_device() -> torch.device:
    """In strict mode, the CPU stand-in for the GPU: `cpu:0`, distinct from the host device `cpu` as a request."""
    return torch.device("cpu", 0)


def install_device_check(check: Optional[Callable]) -> None:
    """Install (or remove, with None) the checker every wrapped collective calls first. Strict mode only."""
    global _CHECK
    if check is not None and not strict_mode():
        raise RuntimeError(f"install_device_check needs {STRICT_ENV}=1 on a CPU run (the model device must be "
                           f"distinguishable from the host device); set it before megatron_r3 is initialised")
    _CHECK = check


def _check(tensors, group, name: str) -> None:
    if _CHECK is None:
        if strict_mode():
            raise RuntimeError(f"{STRICT_ENV}=1 but no device checker is installed: run through the strict test "
                               f"harness (tests/distributed/strict_devices.py), or unset {STRICT_ENV}")
        return
    for tensor in tensors:
        if tensor is not None:
            _CHECK(tensor, group, name)


def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    _check([tensor], group, "all_reduce")
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def all_gather_into_tensor(output, input, group=None, async_op=False):
    _check([output, input], group, "all_gather_into_tensor")
    return dist.all_gather_into_tensor(output, input, group=group, async_op=async_op)


def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
    _check([output, input], group, "reduce_scatter_tensor")
    return dist.reduce_scatter_tensor(output, input, op=op, group=group, async_op=async_op)


def broadcast(tensor, src, group=None, async_op=False):
    _check([tensor], group, "broadcast")
    return dist.broadcast(tensor, src=src, group=group, async_op=async_op)


def send(tensor, dst, group=None):
    _check([tensor], group, "send")
    return dist.send(tensor, dst=dst, group=group)


def recv(tensor, src=None, group=None):
    _check([tensor], group, "recv")
    return dist.recv(tensor, src=src, group=group)


def gather(tensor, gather_list=None, dst=0, group=None):
    _check([tensor, *(gather_list or [])], group, "gather")
    return dist.gather(tensor, gather_list, dst=dst, group=group)
