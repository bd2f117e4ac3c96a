"""Run every CPU-support probe on an UNPATCHED megatron-core and print {probe: error text} as JSON.

Used by test_cpu_support.py in a fresh interpreter (one import of megatron for all probes). Each probe is the
smallest call that hits the error its patch in megatron_r3/platform/cpu_support.py answers.
"""

import inspect
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def error_of(fn) -> str:
    try:
        result = fn()
    except BaseException as exc:  # noqa: BLE001 - we report whatever it raises
        return f"{type(exc).__name__}: {exc}"
    return f"no error (returned {type(result).__name__})"


def uneven_gather_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from megatron.core.tensor_parallel.mappings import _gather_along_first_dim

    from megatron_r3.platform import cpu_support

    cpu_support.cuda_runtime_stand_ins()  # unpatched, the buffer allocation fails first; get past it to gloo

    message = error_of(
        lambda: _gather_along_first_dim(torch.ones(rank + 1, 2), dist.group.WORLD, output_split_sizes=[1, 2])
    )
    if rank == 0:
        queue.put(message)
    dist.destroy_process_group()


def main(port: int) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from megatron_r3.platform.python_compat import apply_python_compat

    apply_python_compat()
    from megatron.training.utils.common_utils import get_device_arch_version
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe.moe_utils import maybe_move_tensor_to_cpu
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.utils import get_default_causal_mask

    parallel_state.initialize_model_parallel()
    with_grad = torch.nn.Parameter(torch.ones(3))
    with_grad.grad = torch.ones(3)

    class TwoRankGroup:
        def size(self):
            return 2

        def rank(self):
            return 0

    sp_config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=2, sequence_parallel=True, tensor_model_parallel_size=2,
        normalization="RMSNorm",
    )
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    bf16_param = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    probes = {
        "cuda_runtime_stand_ins": error_of(torch.cuda.current_device),
        "cpu_rng_tracker": error_of(lambda: tensor_parallel.model_parallel_cuda_manual_seed(1)),
        "cuda_device_literals": error_of(lambda: torch.zeros([], dtype=torch.int, device="cuda"))
        if 'device="cuda"' in inspect.getsource(schedules.forward_backward_no_pipelining)
        else "literal gone from schedules.forward_backward_no_pipelining",
        "cpu_causal_masks": error_of(lambda: get_default_causal_mask(4)),
        "alltoall_split_sizes_as_numpy": "returns " + type(maybe_move_tensor_to_cpu(torch.tensor([1]), as_numpy=True)).__name__,
        "upstream_torch_norm_sequence_parallel": error_of(lambda: WrappedTorchNorm(sp_config, 8)),
        "cp_rope_slice_on_cpu": error_of(lambda: get_pos_emb_on_this_cp_rank(torch.zeros(8, 1, 1, 4), 0, TwoRankGroup())),
        "cpu_grad_clip": error_of(lambda: clip_grad_by_total_norm_fp32([with_grad], 1.0, 10.0)),
        "device_arch_version_on_cpu": error_of(get_device_arch_version),
        "tensor_cuda_is_identity": error_of(lambda: torch.ones(1).cuda())
        if ".cuda()" in inspect.getsource(LanguageModule.setup_embeddings_and_output_layer)
        else "setup_embeddings_and_output_layer no longer calls .cuda()",
    }
    # last: it needs two other patches to get past the CUDA device queries in the base optimizer's constructor
    from megatron_r3.platform import cpu_support

    cpu_support.cuda_runtime_stand_ins()
    with cpu_support._CudaLiteralsToCpu():
        probes["mixed_precision_optimizers_on_cpu"] = error_of(lambda: Float16OptimizerWithFloat16Params(
            torch.optim.Adam([bf16_param]), OptimizerConfig(bf16=True), None, lambda *args: None))
    dist.destroy_process_group()
    queue = mp.get_context("spawn").SimpleQueue()
    from tests.distributed.launch import free_port

    # a port that is free now (port + 1 was a guess that another process could hold)
    mp.spawn(uneven_gather_worker, args=(free_port(), queue), nprocs=2)
    probes["uneven_gather_scatter_for_gloo"] = queue.get()
    print(json.dumps(probes))


if __name__ == "__main__":
    main(int(sys.argv[1]))
