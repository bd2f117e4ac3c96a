"""Every tensor collective megatron_r3's own code issues goes through here, so one place can check its device.

Why: on GPUs megatron's model groups are NCCL, which accepts only tensors on this rank's GPU ("No backend type
associated with device type cpu"), while on the CPU test machine every group is gloo, which takes anything. A CPU
tensor handed to a model group (e.g. a metric all-reduce over the pipeline group, PP >= 2) therefore passes the whole
gloo suite and crashes at step 0 on GPUs. These wrappers are plain pass-throughs to `torch.distributed`, plus one check:

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

Also here: the one way a per-rank failure becomes collective (`agree_on_failures`, `raise_if_any_rank_failed`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

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


# ================================================================================================ agreeing on errors
@dataclass(frozen=True)
class RankFailure:
    """One rank's failure as every rank sees it after `agree_on_failures`."""

    rank: int  # global rank
    message: str
    detail: Any = None  # a picklable extra the caller attached (e.g. the sample id of bad routes)


class RanksFailedError(RuntimeError):
    """Raised alike on every rank by `raise_if_any_rank_failed` (the default error type); `.failures` lists them."""

    def __init__(self, message: str, failures: Sequence[RankFailure] = ()):
        super().__init__(message)
        self.failures = list(failures)

    def __reduce__(self):  # keep `failures` across pickling
        return type(self), (str(self), self.failures)


def agree_on_failures(messages: Sequence[str], group, *, detail: Any = None) -> list[RankFailure]:
    """Every rank's failure `messages`, on every rank of `group`, in rank order: the one way this package turns a
    local check into a collective outcome, so that all ranks raise alike instead of some waiting in the next
    collective (a hang, not an error). Every rank of `group` calls it at the same point, with `[]` when its own
    check passed.

    `group` is a host (gloo) group (`ParallelContext.host_group`, `distributed.host_group()`): the agreement moves
    host memory only, never a device tensor, so it adds no device-to-host sync. One 1-int all-reduce when all is
    well; the messages travel (one object all-gather) only when some rank has one. Without an initialised process
    group this rank's messages are returned as rank 0's."""
    messages = list(messages)
    if not (dist.is_available() and dist.is_initialized()):
        return [RankFailure(0, message, detail) for message in messages]
    flag = torch.tensor([1 if messages else 0], dtype=torch.int32)
    all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not int(flag[0]):
        return []
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (messages, detail), group=group)
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    return [RankFailure(rank, message, extra) for rank, (texts, extra) in zip(ranks, gathered) for message in texts]


def describe_error(error: BaseException) -> str:
    """`TypeName: text`, the form one rank's exception takes in an agreed message."""
    return f"{type(error).__name__}: {error}"


def raise_if_any_rank_failed(error: BaseException | str | None, group, *, what: str,
                             error_type: Callable[..., BaseException] = RanksFailedError) -> None:
    """Raise on every rank of `group` alike when any rank failed (`error` not None), or return on all of them.

    The message is the same on every rank, failing ranks in rank order:
    `"{what} failed on {n} of {size} ranks: [rank r] message | ..."`, where a rank's message is its string, or
    `TypeName: text` of its exception (`describe_error`). The raised error is `error_type(message)`, or
    `RanksFailedError(message, failures)` by default, chained from this rank's own exception. Collective as
    `agree_on_failures` (same `group` rules; every rank calls it at the same point)."""
    local = [] if error is None else [error if isinstance(error, str) else describe_error(error)]
    failures = agree_on_failures(local, group)
    if not failures:
        return
    size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    message = f"{what} failed on {len(failures)} of {size} ranks: " + " | ".join(
        f"[rank {failure.rank}] {failure.message}" for failure in failures)
    raised = RanksFailedError(message, failures) if error_type is RanksFailedError else error_type(message)
    raise raised from (error if isinstance(error, BaseException) else None)
