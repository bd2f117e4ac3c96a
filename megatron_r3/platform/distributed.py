"""torch.distributed and megatron-core model-parallel state, from the usual torchrun environment.

GPU: nccl, one device per LOCAL_RANK. CPU: gloo, with `cpu_support` applied. A single `python` process (no torchrun
variables) becomes a world of one. Process groups are megatron's own (`parallel_state`); this module is where the
package reads them: `initialize_model_parallel` returns this rank's `ParallelContext` (coordinates, groups as a
`ProcessGroupCollection`, the host group, the named rules), which callers pass on explicitly.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from megatron_r3.platform import collectives, cpu_support
from megatron_r3.platform.logging import get_logger
from megatron_r3.platform.parallel_context import ParallelContext, ParallelSizes
from megatron_r3.platform.process import exit_with_parent

log = get_logger(__name__)


def device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when CUDA is available, else the CPU (`cpu:0` in the strict
    collective-device test mode, see `platform/collectives.py`)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if collectives.strict_mode():
        return collectives.model_device()
    return torch.device("cpu")


def collective_device(group=None) -> torch.device:
    """The device a collective over `group` moves tensors on: this rank's GPU for NCCL groups (megatron's model
    groups on GPUs), the CPU for gloo groups (`host_group()`, and every group of a CPU run).

    Decided by the group's backend, never by where the data happens to be: NCCL rejects a CPU tensor ("No backend type
    associated with device type cpu") and gloo on a GPU run would need a device-to-host copy.

    In the strict collective-device test mode (CPU, `platform/collectives.py`) every group but `host_group()` stands
    for an NCCL group, as on GPUs, and reports the model device `cpu:0`."""
    if collectives.strict_mode():
        return torch.device("cpu") if is_host_group(group) else device()
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower():
        return device()
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_torch_distributed(timeout_s: int = 600) -> None:
    """Init the default process group from torchrun's variables (or as a world of one)."""
    cpu_support.apply_cpu_support()
    exit_with_parent()  # a torchrun worker must not outlive its launcher
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def initialize_model_parallel(sizes: ParallelSizes, *, seed: int = 1234, timeout_s: int = 600,
                              sequence_parallel: bool = False) -> ParallelContext:
    """(Re)initialise megatron's parallel state for `sizes`, seed its RNG tracker, and return this rank's
    `ParallelContext` (`sequence_parallel`: megatron's --sequence-parallel, which the context's token rules need).

    Calling it again with other sizes tears the previous groups down first, so one launch can test many layouts.
    """
    from megatron.core import parallel_state, tensor_parallel

    initialize_torch_distributed(timeout_s=timeout_s)
    sizes.check_world(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized() and _same_layout(sizes):
        torch.manual_seed(seed)  # same layout: keep the groups (every new group costs gloo/NCCL connections)
        tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
        return parallel_context(sizes, sequence_parallel=sequence_parallel)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor_model_parallel_size,
        pipeline_model_parallel_size=sizes.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=sizes.virtual_pipeline_model_parallel_size,
        context_parallel_size=sizes.context_parallel_size,
        expert_model_parallel_size=sizes.expert_model_parallel_size,
        expert_tensor_parallel_size=sizes.expert_tensor_parallel_size,
        distributed_timeout_minutes=max(1, timeout_s // 60),
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return parallel_context(sizes, sequence_parallel=sequence_parallel)


def parallel_context(sizes: ParallelSizes, *, sequence_parallel: bool = False) -> ParallelContext:
    """This rank's `ParallelContext` from megatron's initialised groups (after `initialize_model_parallel(sizes)`);
    raises ValueError when megatron's state is another layout than `sizes`. Every rank calls it (the first call
    may create the gloo host group)."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not parallel_state.model_parallel_is_initialized():
        raise ValueError("megatron's parallel state is not initialised: call initialize_model_parallel(sizes) first")
    if not _same_layout(sizes):
        raise ValueError(f"megatron's parallel state is another layout than {sizes}: call "
                         f"initialize_model_parallel(sizes) first")
    return ParallelContext.build(sizes, ProcessGroupCollection.use_mpu_process_groups(), host_group=host_group(),
                                 sequence_parallel=sequence_parallel)


_HOST_GROUP = None


def host_group():
    """A gloo group over the whole world for small host-side agreements (error flags, messages).

    On GPU runs the default group is NCCL, and agreeing on an error through it would need a device tensor and a
    device-to-host copy, i.e. a host sync in the training step; gloo moves host memory only.
    """
    global _HOST_GROUP
    if not dist.is_initialized():
        return None
    if dist.get_backend() == "gloo" and not collectives.strict_mode():
        return dist.group.WORLD  # strict mode: a group of its own, as on GPUs, so the world stands for NCCL
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def is_host_group(group) -> bool:
    """Whether `group` is the host (gloo) group of `host_group()`."""
    return group is not None and group is host_group()


def _same_layout(sizes: ParallelSizes) -> bool:
    """Whether megatron's current parallel state already is `sizes` (None sizes meaning megatron's defaults)."""
    from megatron.core import parallel_state as ps

    vp = ps.get_virtual_pipeline_model_parallel_world_size()
    expert_tp = sizes.expert_tensor_parallel_size or sizes.tensor_model_parallel_size
    return (
        ps.get_tensor_model_parallel_world_size() == sizes.tensor_model_parallel_size
        and ps.get_pipeline_model_parallel_world_size() == sizes.pipeline_model_parallel_size
        and (vp or None) == sizes.virtual_pipeline_model_parallel_size
        and ps.get_context_parallel_world_size() == sizes.context_parallel_size
        and ps.get_expert_model_parallel_world_size() == sizes.expert_model_parallel_size
        and ps.get_expert_tensor_parallel_world_size() == expert_tp
    )


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    global _HOST_GROUP
    _HOST_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


def end_finished_run(code: int = 0) -> None:
    """End a process whose run has finished and written everything: all ranks meet, then exit with `code` without
    the interpreter's teardown.

    Why: a finished CLI run aborted at exit about once in 25 CPU launches ("terminate called without an active
    exception", SIGABRT, torchrun rc 1) after logging every step. That message is C++'s `std::terminate` from a
    `std::thread` destroyed while still joinable: at interpreter exit the process groups that nobody destroyed
    (megatron's model groups, the gloo host group) and dist checkpointing's helper process/threads are torn down by
    static destructors in an unspecified order, racing their own transport threads and the other ranks' exits.
    Nothing is left to write at this point (metrics, TensorBoard and checkpoints are closed by the trainer), so the
    rank waits for the others at a host barrier (no rank exits while another still talks to it), ends helper
    processes it started, flushes its streams and leaves with `os._exit`, which runs no destructors.
    """
    try:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier(group=host_group())
    except Exception as error:  # noqa: BLE001 - another rank died after this one finished: say so, exit non-zero
        log.warning(f"end of run: the final barrier failed ({type(error).__name__}: {error})", all_ranks=True)
        code = code or 1
    finally:
        exit_without_teardown(code)


def exit_without_teardown(code: int) -> None:
    """Leave the process now with `code`: end helper processes it started, flush, `os._exit` (no destructors)."""
    import logging
    import multiprocessing
    import sys

    for child in multiprocessing.active_children():  # e.g. dist checkpointing's async-save manager
        child.terminate()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
