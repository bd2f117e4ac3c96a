"""CPU support for megatron-core 0.19.2: the ONE place that touches megatron-core internals.

megatron-core is written for CUDA. On a CPU-only torch (laptops, CI, the `make demo` path) a handful of
call sites fail. Each function below answers exactly one of those failures; its docstring quotes the error it
answers, and `tests/unit/test_cpu_support.py` reproduces that error on an unpatched interpreter, so the test
fails (and tells us to delete the patch) the day upstream no longer needs it.

Nothing here runs when CUDA is available: `apply_cpu_support()` is a no-op on a GPU machine. Nothing here
changes numerics: the patches only move device placement, RNG bookkeeping and collective plumbing to what
gloo and the CPU can do.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch

_APPLIED = False
# Patch names, in the order they are applied; tests and the README refer to them.
PATCHES = (
    "cuda_runtime_stand_ins",
    "cpu_rng_tracker",
    "cuda_device_literals",
    "cpu_causal_masks",
    "alltoall_split_sizes_as_numpy",
    "uneven_gather_scatter_for_gloo",
    "cp_rope_slice_on_cpu",
    "cpu_grad_clip",
    "device_arch_version_on_cpu",
    "tensor_cuda_is_identity",
    "mixed_precision_optimizers_on_cpu",
)


def cpu_support_needed() -> bool:
    """True when megatron-core must run on the CPU (no usable CUDA device)."""
    return not torch.cuda.is_available()


def check_megatron_importable() -> None:
    """megatron-core 0.19.2 imports `triton` unconditionally (moe/ops/paged_stash.py).

    We do not stub it: the CPU install pulls the real `triton` wheel (it imports without a GPU). This check turns
    the bare `ModuleNotFoundError: No module named 'triton'` into an actionable message.
    """
    if importlib.util.find_spec("triton") is None:
        raise ImportError(
            "megatron-core 0.19.2 needs the `triton` package to import (moe/ops/paged_stash.py imports it "
            "unconditionally); install it with `pip install triton` (it imports fine on a CPU-only machine)"
        )


class _CpuEvent:
    """Stand-in for torch.cuda.Event: on the CPU every op is already complete when it returns."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _CpuStream:
    """Stand-in for torch.cuda.Stream: the CPU has one implicit, synchronous stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _CpuStream)

    def __hash__(self):
        return 0


def cuda_runtime_stand_ins() -> None:
    """Answers `AssertionError: Torch not compiled with CUDA enabled` from `torch.cuda.current_device()`.

    megatron-core calls torch.cuda.current_device()/Stream()/Event()/current_stream()/synchronize() unconditionally
    on the training path (router buffers, RoPE, the alltoall dispatcher's D2H stream, mappings' output buffers).
    On a CPU-only torch they raise; here they map onto the CPU device and a synchronous stream.
    """
    from megatron_r3.platform import collectives

    # strict collective-device test mode: megatron's "GPU" tensors ask for the model device cpu:0 (collectives.py)
    cpu = collectives.model_device() if collectives.strict_mode() else torch.device("cpu")
    stream = _CpuStream()
    torch.cuda.current_device = lambda: cpu
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.current_stream = lambda device=None: stream
    torch.cuda.default_stream = lambda device=None: stream
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.is_current_stream_capturing = lambda: False
    torch.Tensor.record_stream = lambda self, s: None


def cpu_rng_tracker() -> None:
    """Answers `AssertionError: Torch not compiled with CUDA enabled` from
    `megatron.core.tensor_parallel.random.model_parallel_cuda_manual_seed` (via `torch.cuda.get_rng_state()`).

    The model-parallel RNG tracker stores and swaps *CUDA* generator states (weight init in TP regions, dropout,
    activation-recompute RNG restore). On the CPU the same bookkeeping is done with the CPU generator, so
    forked regions and recompute stay reproducible exactly as on the GPU.
    """
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state
    mp_random.CudaRNGStatesTracker.add = add


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaLiteralsToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites `device="cuda"` (keyword or `.to("cuda")`) to the CPU (to the model device `cpu:0` in the strict
    collective-device test mode, see collectives.py)."""

    def __init__(self):
        super().__init__()
        from megatron_r3.platform import collectives

        self.cpu = collectives.model_device() if collectives.strict_mode() else "cpu"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cpu = self.cpu
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = cpu
        if args and func is torch.Tensor.to:
            args = tuple(cpu if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


_CUDA_LITERALS_MODE: _CudaLiteralsToCpu | None = None


def cuda_device_literals() -> None:
    """Answers `AssertionError: Torch not compiled with CUDA enabled` from
    `megatron.core.pipeline_parallel.schedules.forward_backward_no_pipelining` (and the pipelined schedules), which
    build `torch.zeros([], dtype=torch.int, device="cuda")` to count tokens.

    Those are string literals inside function bodies, so no attribute can be swapped: a process-wide torch
    function mode maps `device="cuda"` onto the CPU. Measured cost on the tiny CPU model: see bench/README.
    """
    global _CUDA_LITERALS_MODE
    if _CUDA_LITERALS_MODE is None:
        _CUDA_LITERALS_MODE = _CudaLiteralsToCpu()
        _CUDA_LITERALS_MODE.__enter__()  # stays pushed for the life of the process


def cpu_causal_masks() -> None:
    """Answers `AssertionError: Torch not compiled with CUDA enabled` from
    `megatron.core.transformer.utils.get_default_causal_mask` during activation recompute.

    The mask helpers hard-code `device="cuda"` and are also called while autograd re-runs a checkpointed layer,
    where torch function modes are not active; fused_softmax imports them by name, so both modules are updated.
    """
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    def get_sliding_window_causal_mask(sq, skv, window_size):
        mask = torch.ones(sq, skv, dtype=torch.bool, device="cpu")
        upper = torch.triu(mask, diagonal=skv - sq - window_size[0])
        return ~torch.tril(upper, diagonal=skv - sq + window_size[1])

    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = get_default_causal_mask
        module.get_sliding_window_causal_mask = get_sliding_window_causal_mask


def alltoall_split_sizes_as_numpy() -> None:
    """Answers `TypeError: all_to_all_single(): incompatible function arguments` in the alltoall token dispatcher.

    `MoEAlltoAllTokenDispatcher` turns its split sizes into host lists with
    `moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)`, which converts only CUDA tensors; CPU tensors stay
    tensors and `dist.all_to_all_single` rejects them. CPU tensors are converted too.
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def uneven_gather_scatter_for_gloo() -> None:
    """Answers `RuntimeError: ProcessGroupGloo::allgather: invalid tensor size` (and the reduce-scatter twin) in
    `tensor_parallel.mappings._gather_along_first_dim` with `output_split_sizes`.

    The alltoall dispatcher with expert-tensor parallelism gathers uneven per-rank chunks; NCCL accepts that, gloo
    does not. The chunks are padded to the largest size, moved with the equal-size collective, and unpadded.
    """
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    original_gather = mappings._gather_along_first_dim
    original_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(size) for size in output_split_sizes]
        largest, rest = max(sizes), tuple(input_.shape[1:])
        padded = input_.new_zeros((largest,) + rest)
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((largest * len(sizes),) + rest)
        dist.all_gather_into_tensor(gathered, padded, group=group)
        return torch.cat([gathered[i * largest : i * largest + n] for i, n in enumerate(sizes)], dim=0)

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(size) for size in input_split_sizes]
        largest, rest = max(sizes), tuple(input_.shape[1:])
        padded = input_.new_zeros((largest * len(sizes),) + rest)
        for i, chunk in enumerate(torch.split(input_, sizes, dim=0)):
            padded[i * largest : i * largest + sizes[i]] = chunk
        out = input_.new_empty((largest,) + rest)
        dist.reduce_scatter_tensor(out, padded, group=group)
        return out[: sizes[group.rank()]].clone()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


def cp_rope_slice_on_cpu() -> None:
    """Answers `RuntimeError: pin_memory=True requires a CUDA or other accelerator backend; no pinned memory
    allocator is available on this system.` from `rope_utils.get_pos_emb_on_this_cp_rank` (context parallelism,
    padded batches: `RotaryEmbedding.forward` slices the rotary table for this CP rank).

    It builds its 2-element chunk index with `torch.tensor(..., device="cpu", pin_memory=True).cuda()`. Same
    selection (chunks r and 2*cp-1-r of 2*cp), index built on the table's device; the modules that imported the
    function by name are updated too.
    """
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding

    def get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
        if cp_group is None:
            raise ValueError("cp_group must be provided to get positional embedding per CP rank")
        cp_size, cp_rank = cp_group.size(), cp_group.rank()
        cp_idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
        pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[(seq_dim + 1) :])
        pos_emb = pos_emb.index_select(seq_dim, cp_idx)
        return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[(seq_dim + 2) :])

    for module in (rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding):
        module.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank


def cpu_grad_clip() -> None:
    """Answers `AssertionError` at `assert param.grad.type() == 'torch.cuda.FloatTensor'` in
    `megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32` (every optimizer step with --clip-grad).

    The check only insists the fp32 grads live on a GPU. The same clipping (scale every grad by
    max_norm / (total_norm + 1e-6) when that is below 1) is applied to CPU fp32 grads; the optimizer module imported
    the function by name, so it is updated too.
    """
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attribute = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attribute).detach() for p in parameters if getattr(p, attribute, None) is not None]
        for grad in grads:
            if grad.dtype not in (torch.float32, torch.bfloat16):
                raise TypeError(f"clip_grad_by_total_norm_fp32 expects fp32/bf16 grads, got {grad.dtype}")
        coefficient = max_norm / (total_norm + 1.0e-6)
        if isinstance(coefficient, torch.Tensor):
            torch._foreach_mul_(grads, coefficient.clamp_max(1.0))
        elif coefficient < 1.0:
            torch._foreach_mul_(grads, coefficient)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def device_arch_version_on_cpu() -> None:
    """Answers `AssertionError: Torch not compiled with CUDA enabled` from
    `megatron.training.arguments.validate_args` -> `get_device_arch_version()` (tensor or context parallelism > 1).

    validate_args asks for the GPU's compute capability to decide whether CUDA_DEVICE_MAX_CONNECTIONS must be 1.
    A CPU has no compute capability; it reports 0 (pre-Blackwell rules, the variable is set by pretrain_grpo.py).
    """
    from megatron.training import arguments
    from megatron.training.utils import common_utils

    common_utils.get_device_arch_version = lambda: 0
    arguments.get_device_arch_version = common_utils.get_device_arch_version


def tensor_cuda_is_identity() -> None:
    """Answers `AssertionError: Torch not compiled with CUDA enabled` from
    `LanguageModule.setup_embeddings_and_output_layer` (tied embeddings with pipeline parallelism), which calls
    `weight.data.cuda()` before all-reducing the shared embedding between the first and last stage.

    On the CPU every tensor already lives where the collectives expect it, so `.cuda()` returns the tensor itself.
    """
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def mixed_precision_optimizers_on_cpu() -> None:
    """Answers `TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor,  torch.cuda.HalfTensor, or
    torch.cuda.BFloat16Tensor. Received torch.BFloat16Tensor` from `Float16OptimizerWithFloat16Params.__init__`
    (--bf16 / --fp16) and `DistributedOptimizer.__init__` (--use-distributed-optimizer, any dtype).

    Both sort parameters into 16-bit and fp32 groups by the *name* of their CUDA tensor type. While they are
    constructed (and only then), `Tensor.type()` without arguments names a CPU tensor's type as its CUDA twin, so the
    same groups, fp32 main copies and shards are built for CPU parameters.
    """
    from megatron.core.optimizer import distrib_optimizer, optimizer

    original_type = torch.Tensor.type

    def cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            name = original_type(self)  # (may come back through a torch function mode already renamed)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return original_type(self, dtype, non_blocking, **kwargs)

    def constructed_with_cuda_type_names(cls) -> None:
        original_init = cls.__init__
        if getattr(original_init, "_megatron_r3_cpu_support", False):
            return

        @functools.wraps(original_init)
        def __init__(self, *args, **kwargs):
            torch.Tensor.type = cuda_named_type
            try:
                original_init(self, *args, **kwargs)
            finally:
                torch.Tensor.type = original_type

        __init__._megatron_r3_cpu_support = True
        cls.__init__ = __init__

    constructed_with_cuda_type_names(optimizer.Float16OptimizerWithFloat16Params)
    constructed_with_cuda_type_names(distrib_optimizer.DistributedOptimizer)


def apply_cpu_support(force: bool = False) -> bool:
    """Apply every CPU patch once (before building models). Returns True if the patches are active.

    A no-op on machines with CUDA unless `force` (tests use it to exercise the patches explicitly).
    """
    global _APPLIED
    if _APPLIED:
        return True
    if not (force or cpu_support_needed()):
        return False
    check_megatron_importable()
    from megatron_r3.platform.python_compat import apply_python_compat

    apply_python_compat()  # device_arch_version_on_cpu imports megatron.training
    for name in PATCHES:
        globals()[name]()
    _APPLIED = True
    return True
