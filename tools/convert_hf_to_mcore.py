#!/usr/bin/env python
"""Convert a HF model directory (a registered family: Qwen3-MoE, Qwen2-MoE, DeepSeek-V3, GLM-4.5) (safetensors, possibly sharded) to a megatron-core dist checkpoint.

    python -m torch.distributed.run --nproc-per-node 4 tools/convert_hf_to_mcore.py \
        --hf-dir HF_DIR --out MCORE_DIR --tensor-model-parallel-size 2 --expert-model-parallel-size 2

The layout used for the conversion does not matter for the result: `megatron.core.dist_checkpointing` stores every
tensor under its global key and offsets, so the checkpoint loads into any TP/PP/VP/EP layout (see
`tools/convert_mcore_to_hf.py`, and `megatron_r3.model.dist_checkpoint.load_dist_checkpoint` for training). Each rank reads
only the safetensors tensors of its own shard. The HF config is stored next to the checkpoint as `hf_config.json`.
A checkpoint's MTP layers (DeepSeek-V3 / GLM-4.5) are not converted: the conversion stops naming them unless
`--mtp-checkpoint-tensors skip` is given (the converted checkpoint, and HF exports of it, then contain no MTP layers).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))

from megatron_r3.platform.dtypes import SHORT_NAMES, torch_dtype  # noqa: E402


def add_layout_args(parser: argparse.ArgumentParser) -> None:
    """Megatron's own flag names for the parallel layout (shared with convert_mcore_to_hf.py)."""
    group = parser.add_argument_group("parallel layout (megatron flag names)")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    group.add_argument("--expert-model-parallel-size", type=int, default=1)
    group.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    group.add_argument("--sequence-parallel", action="store_true", help="accepted for symmetry; weights are the same")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=1,
                       help="pad the vocabulary to a multiple of this times TP (pad rows are zero)")


def parallel_sizes(args):
    from megatron_r3.platform.parallel_context import ParallelSizes

    return ParallelSizes(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )


def build_chunks(hf_config, args):
    """(arch, chunks, this rank's ParallelContext) of `hf_config` in the layout given by `args` (parallel state
    initialised here)."""
    import torch

    from megatron_r3.model.families import arch_from_hf_config, build_from_hf_config
    from megatron_r3.platform.distributed import initialize_model_parallel

    sequence_parallel = args.sequence_parallel and args.tensor_model_parallel_size > 1
    parallel = initialize_model_parallel(parallel_sizes(args), sequence_parallel=sequence_parallel)
    arch = arch_from_hf_config(hf_config)
    _, chunks = build_from_hf_config(
        hf_config,
        parallel,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        params_dtype=torch_dtype(args.dtype),
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    return arch, chunks, parallel


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    parser.add_argument("--out", required=True, help="output directory of the megatron dist checkpoint")
    parser.add_argument("--dtype", choices=sorted(SHORT_NAMES), default="fp32", help="parameter dtype of the checkpoint")
    add_layout_args(parser)
    from megatron_r3.model.hf_load_config import HFLoadConfig
    from megatron_r3.platform.typed_config import add_config_arguments

    add_config_arguments(parser, HFLoadConfig, "HF checkpoint load")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_r3.model.families import load_hf_config
    from megatron_r3.model.dist_checkpoint import save_dist_checkpoint
    from megatron_r3.model.hf_load_config import HFLoadConfig
    from megatron_r3.model.weights import SafetensorsSource, load_hf_weights
    from megatron_r3.platform.typed_config import config_from_args

    hf_config = load_hf_config(args.hf_dir)
    arch, chunks, parallel = build_chunks(hf_config, args)
    source = SafetensorsSource(args.hf_dir)
    try:
        load_hf_weights(chunks, source, arch, parallel, config_from_args(HFLoadConfig, args))
    finally:
        source.close()
    save_dist_checkpoint(chunks, args.out, parallel, hf_config=hf_config)
    if parallel.is_global_rank_zero:
        print(f"wrote megatron dist checkpoint {args.out} ({arch.model_type}, {arch.num_layers} layers, "
              f"{arch.num_experts} experts)", flush=True)


if __name__ == "__main__":
    main()
    from megatron_r3.platform.distributed import destroy

    destroy()
