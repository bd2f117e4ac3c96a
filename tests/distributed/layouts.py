"""Parallel layouts the gloo tests run on 4 ranks: name -> (ParallelSizes, TransformerConfig overrides)."""

import torch

from megatron_r3.platform.parallel_context import ParallelSizes

F32 = dict(pipeline_dtype=torch.float32)

LAYOUTS = {
    "dp4": (ParallelSizes(), {}),
    "tp2sp": (ParallelSizes(tensor_model_parallel_size=2), dict(sequence_parallel=True)),
    "pp2": (ParallelSizes(pipeline_model_parallel_size=2), F32),
    "pp2vp2": (
        ParallelSizes(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
        dict(F32, virtual_pipeline_model_parallel_size=2),
    ),
    "ep2_alltoall": (ParallelSizes(expert_model_parallel_size=2), dict(moe_token_dispatcher_type="alltoall")),
    "ep2_allgather": (ParallelSizes(expert_model_parallel_size=2), dict(moe_token_dispatcher_type="allgather")),
    "tp2ep2": (
        ParallelSizes(tensor_model_parallel_size=2, expert_model_parallel_size=2),
        dict(sequence_parallel=True, moe_token_dispatcher_type="alltoall"),
    ),
    "pp2ep2": (ParallelSizes(pipeline_model_parallel_size=2, expert_model_parallel_size=2), F32),
    "tp2pp2": (
        ParallelSizes(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
        dict(F32, sequence_parallel=True),
    ),
    # context parallelism; without TransformerEngine it runs through model/cp_attention.py
    "cp2": (ParallelSizes(context_parallel_size=2), {}),
    "cp2tp2sp": (
        ParallelSizes(tensor_model_parallel_size=2, context_parallel_size=2),
        dict(sequence_parallel=True),
    ),
    "cp2ep2": (ParallelSizes(context_parallel_size=2, expert_model_parallel_size=2), {}),
    "cp2pp2": (ParallelSizes(context_parallel_size=2, pipeline_model_parallel_size=2), F32),
    # grouped-GEMM experts (model/grouped_experts.py): data parallel (also run in bf16 by tests/gpu/gpu_checks.py)
    # and under expert TP2 x EP2
    "dp4_grouped": (ParallelSizes(), dict(moe_grouped_gemm=True)),
    "tp2ep2_grouped": (
        ParallelSizes(tensor_model_parallel_size=2, expert_model_parallel_size=2),
        dict(sequence_parallel=True, moe_token_dispatcher_type="alltoall", moe_grouped_gemm=True),
    ),
    # DeepSeek-V3 family: MLA + sigmoid router with expert bias, groups, scaling, shared expert (replay_checks.DEEPSEEK)
    "ds_dp4": (ParallelSizes(), dict(deepseek=True)),
    "ds_tp2sp": (ParallelSizes(tensor_model_parallel_size=2), dict(sequence_parallel=True, deepseek=True)),
    "ds_ep2": (ParallelSizes(expert_model_parallel_size=2), dict(deepseek=True)),
    "ds_pp2": (ParallelSizes(pipeline_model_parallel_size=2), dict(F32, deepseek=True)),
    "ds_cp2": (ParallelSizes(context_parallel_size=2), dict(deepseek=True)),
}
RECOMPUTE = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
}
