"""Context-parallel checks for many layouts in ONE torchrun launch (gloo on CPU, or NCCL on GPUs).

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 tests/distributed/cp_checks.py --out results.json [LAYOUT ...]

For every layout (CP layout + its CP1 reference with the same TP/PP/EP) and batch format (padded BSHD, packed THD;
uneven sample lengths, GQA model), the same global microbatches run through megatron's forward_backward_func
twice: once in the CP1 reference layout, once in the CP layout (tokens split per CP rank by
`train.batch.microbatch_inputs`). On every rank:
  weights_equal  the CP model's weights are bitwise the reference weights of the rank with the same
                 (tp, pp, ep, etp) coordinates (CP does not shard weights; same seed, same TP/PP/EP)
  logits         the CP logits, gathered over TP and CP and put back in global slot order, match the reference
                 logits on every real token (fp32 tolerance)
  loss           the summed loss of the microbatches matches the reference
  grads          the gradients, reduced the way megatron's DDP reduces them (SP params over TP, dense over
                 dp x cp, expert params over the expert-data-parallel group), match the reference
  pad_multiple   the batch's pad multiple is a multiple of sequence_pad_multiple(tp, cp, sp) for this layout
Once per launch (first CP layout with cp=2): `bad_length_batch` (unpadded odd-length batch is rejected by the
batch helper with the exact message) and `bad_length_thd` (a packed document of length not divisible by 2*cp
reaching the attention module is rejected with the exact message, on every CP rank, before any collective).
Rank 0 writes one JSON object per (layout, format) with the results, max abs differences and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from megatron_r3.platform.distributed import initialize_model_parallel  # noqa: E402
from megatron_r3.platform.parallel_context import ParallelSizes  # noqa: E402
from tests.distributed.launch import finish_launch  # noqa: E402

initialize_model_parallel(ParallelSizes())  # gloo/NCCL + CPU support before megatron builds anything

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_r3.model.cp_attention import ContextParallelDotProductAttention  # noqa: E402
from megatron_r3.model.gpt import build_gpt_chunks  # noqa: E402
from megatron_r3.platform.distributed import device  # noqa: E402
from megatron_r3.replay.layout import cp_local_slots, pack_bshd, pack_thd, sequence_pad_multiple  # noqa: E402
from megatron_r3.train.batch import microbatch_inputs  # noqa: E402

VOCAB, NUM_LAYERS, EXPERTS, TOPK = 128, 4, 8, 2
MOE_LAYER_FREQ = [0, 1, 1, 1]
PAD_MULTIPLE = 8  # >= sequence_pad_multiple of every layout below, so reference and CP runs see the same layout
BSHD_SEQ_LENGTH = 40
BSHD_LENGTHS = [[13, 40], [29, 6]]  # per microbatch: sample lengths (model tokens), uneven
THD_LENGTHS = [[13, 21, 17], [30, 5, 22]]  # padded to 8: 16+24+24 = 8+32+24... = 64 per microbatch
F32 = dict(pipeline_dtype=torch.float32)
ATOL = 2e-5

# name: (CP1 reference sizes, CP sizes, config overrides)
LAYOUTS = {
    "cp2": (ParallelSizes(), ParallelSizes(context_parallel_size=2), {}),
    "cp2tp2sp": (
        ParallelSizes(tensor_model_parallel_size=2),
        ParallelSizes(tensor_model_parallel_size=2, context_parallel_size=2),
        dict(sequence_parallel=True),
    ),
    "cp2pp2": (
        ParallelSizes(pipeline_model_parallel_size=2),
        ParallelSizes(pipeline_model_parallel_size=2, context_parallel_size=2),
        F32,
    ),
    "cp2ep2": (
        ParallelSizes(expert_model_parallel_size=2),
        ParallelSizes(expert_model_parallel_size=2, context_parallel_size=2),
        {},
    ),
    "cp4": (ParallelSizes(), ParallelSizes(context_parallel_size=4), {}),
    "cp2_recompute": (
        ParallelSizes(),
        ParallelSizes(context_parallel_size=2),
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    ),
    # the fast local modules: SDPA core attention (model/fused_attention.py) and grouped-GEMM experts, under EP2
    "cp2ep2_fast": (
        ParallelSizes(expert_model_parallel_size=2),
        ParallelSizes(expert_model_parallel_size=2, context_parallel_size=2),
        dict(moe_grouped_gemm=True, fused_attention=True),
    ),
    # multi-latent attention (DeepSeek-V3 family, model/mla_attention.py): q/k and v head widths differ
    "cp2_mla": (ParallelSizes(), ParallelSizes(context_parallel_size=2), dict(mla=True)),
    "cp2tp2sp_mla": (
        ParallelSizes(tensor_model_parallel_size=2),
        ParallelSizes(tensor_model_parallel_size=2, context_parallel_size=2),
        dict(sequence_parallel=True, mla=True),
    ),
}
# DeepSeek-V3-style fields of the MLA layouts: MLA without q LoRA, sigmoid router with expert bias and a shared expert
MLA = dict(multi_latent_attention=True, q_lora_rank=None, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8,
           v_head_dim=12, rope_type="rope", rotary_base=10000, moe_router_score_function="sigmoid",
           moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.0, moe_router_topk_scaling_factor=2.5,
           moe_shared_expert_intermediate_size=32, apply_rope_fusion=False)
FORMATS = ("bshd", "thd")


def make_config(sizes: ParallelSizes, overrides: dict) -> TransformerConfig:
    overrides = dict(dict(moe_grouped_gemm=False), **overrides)
    config_class = TransformerConfig
    if overrides.pop("mla", False):
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        config_class, overrides = MLATransformerConfig, dict(overrides, **MLA)
    return config_class(
        num_layers=NUM_LAYERS, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=64, moe_layer_freq=MOE_LAYER_FREQ,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0,
        attention_dropout=0.0, add_bias_linear=False, normalization="RMSNorm", gated_linear_unit=True,
        qk_layernorm=True,
        tensor_model_parallel_size=sizes.tensor_model_parallel_size,
        pipeline_model_parallel_size=sizes.pipeline_model_parallel_size,
        expert_model_parallel_size=sizes.expert_model_parallel_size,
        context_parallel_size=sizes.context_parallel_size,
        **overrides,
    )


def global_batches(fmt: str):
    """The same global microbatches on every rank: (sequences [T_j], layout) per microbatch."""
    gen = torch.Generator().manual_seed(4321)
    batches = []
    for lengths in BSHD_LENGTHS if fmt == "bshd" else THD_LENGTHS:
        sequences = [torch.randint(0, VOCAB, (n + 1,), generator=gen) for n in lengths]
        if fmt == "bshd":
            layout = pack_bshd(lengths, seq_length=BSHD_SEQ_LENGTH, pad_multiple=PAD_MULTIPLE)
        else:
            layout = pack_thd(lengths, pad_multiple=PAD_MULTIPLE)
        batches.append((sequences, layout))
    return batches


def coords() -> tuple[int, int, int, int]:
    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_expert_model_parallel_rank(),
        ps.get_expert_tensor_parallel_rank(),
    )


def reduced_grads(chunks, config) -> list[torch.Tensor]:
    """Gradients reduced like megatron's DDP + finalize_model_grads (sums; divided by the dp x cp size)."""
    tp_group = ps.get_tensor_model_parallel_group()
    dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    expert_dp = ps.get_expert_data_parallel_group()
    out = []
    for chunk in chunks:
        for param in chunk.parameters():
            grad = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
            if getattr(param, "sequence_parallel", False) and config.sequence_parallel and tp_group.size() > 1:
                dist.all_reduce(grad, group=tp_group)
            expert = not getattr(param, "allreduce", True)
            dist.all_reduce(grad, group=expert_dp if expert else dp_cp)
            out.append((grad / dp_cp.size()).cpu())
    return out


def build(sizes: ParallelSizes, overrides: dict):
    parallel = initialize_model_parallel(sizes, sequence_parallel=bool(overrides.get("sequence_parallel")))
    overrides = dict(overrides)
    fused_attention = overrides.pop("fused_attention", False)  # megatron's math unless the layout asks for SDPA
    config = make_config(sizes, overrides)
    torch.manual_seed(1234)
    return config, build_gpt_chunks(config, parallel, vocab_size=VOCAB, max_sequence_length=64,
                                    fused_attention=fused_attention)


def run_format(config, chunks, fmt: str) -> dict:
    """Run the global microbatches of `fmt` through forward_backward_func; return weights, reduced grads, the
    global logits of the real tokens (last stage) and the loss."""
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    cp_group, tp_group = ps.get_context_parallel_group(), ps.get_tensor_model_parallel_group()
    batches = global_batches(fmt)
    microbatches, logits_out = [], []
    for sequences, layout in batches:
        inputs = microbatch_inputs(sequences, layout, context_parallel_size=cp, cp_rank=cp_rank).to(device())
        total = float(layout.valid.sum())  # loss mask is 1 on every real token
        microbatches.append((inputs, layout, total))

    def forward_step(data_iterator, model):
        inputs, layout, total = next(data_iterator)
        output = model(inputs.tokens, inputs.position_ids, None, packed_seq_params=inputs.packed_seq_params)

        def loss_func(logits):
            logits_out.append((logits.detach().clone(), layout))  # the cross entropy works in place
            per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), inputs.labels)
            loss = (per_token * inputs.loss_mask).sum() / total  # global mean over the microbatch's real tokens
            return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place

        return output, loss_func

    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    layout0 = batches[0][1]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=chunks[0],
        num_microbatches=len(microbatches), forward_only=False, seq_length=layout0.seq_length,
        micro_batch_size=layout0.batch_size,
    )
    loss = torch.tensor([sum(float(x["loss"]) for x in losses)], dtype=torch.float64)
    dist.all_reduce(loss, group=cp_group)  # each CP rank's loss covers its tokens
    global_logits = []
    for logits, layout in logits_out:
        if tp_group.size() > 1:
            parts = [torch.empty_like(logits) for _ in range(tp_group.size())]
            dist.all_gather(parts, logits.contiguous(), group=tp_group)
            logits = torch.cat(parts, dim=-1)
        parts = [torch.empty_like(logits) for _ in range(cp)]
        dist.all_gather(parts, logits.contiguous(), group=cp_group)
        full = logits.new_zeros(layout.num_slots, logits.shape[-1])
        for rank, part in enumerate(parts):
            full[cp_local_slots(layout, cp, rank).reshape(-1)] = part.reshape(-1, part.shape[-1])
        global_logits.append(full[layout.valid].cpu())
    return dict(
        coords=coords(),
        last_stage=ps.is_pipeline_last_stage(),
        weights=[p.detach().cpu().clone() for c in chunks for p in c.parameters()],
        grads=reduced_grads(chunks, config),
        logits=global_logits,
        loss=float(loss),
    )


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max([float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()] or [0.0])


def compare(name: str, formats) -> dict:
    """{format: record} for one layout: the CP1 reference and the CP run of every format."""
    ref_sizes, cp_sizes, overrides = LAYOUTS[name]
    config, chunks = build(ref_sizes, overrides)
    references = {}
    for fmt in formats:
        ref = run_format(config, chunks, fmt)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, ref)
        references[fmt] = (
            {r["coords"]: r for r in everyone},
            next(r["logits"] for r in everyone if r["last_stage"]),
            next(r["loss"] for r in everyone if r["last_stage"]),
        )
    config, chunks = build(cp_sizes, overrides)
    sp = bool(overrides.get("sequence_parallel", False))
    need = sequence_pad_multiple(cp_sizes.tensor_model_parallel_size, cp_sizes.context_parallel_size, sp)
    records = {}
    for fmt in formats:
        start = time.time()
        by_coords, ref_logits, ref_loss = references[fmt]
        mine = run_format(config, chunks, fmt)
        ref_here = by_coords.get(mine["coords"])
        diffs = dict(
            weights=max_diff(mine["weights"], ref_here["weights"]) if ref_here else float("inf"),
            grads=max_diff(mine["grads"], ref_here["grads"]) if ref_here else float("inf"),
            logits=max_diff(mine["logits"], ref_logits) if mine["last_stage"] else 0.0,
            loss=abs(mine["loss"] - ref_loss) if mine["last_stage"] else 0.0,
        )
        results = dict(
            weights_equal=diffs["weights"] == 0.0,
            logits=diffs["logits"] <= ATOL,
            loss=diffs["loss"] <= ATOL,
            grads=diffs["grads"] <= ATOL,
            pad_multiple=PAD_MULTIPLE % need == 0,
        )
        worst = torch.tensor(list(diffs.values()), dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        flags = torch.tensor([int(v) for v in results.values()])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        records[fmt] = dict(
            results={k: bool(f) for k, f in zip(results, flags.tolist())},
            max_abs_diff=dict(zip(diffs, [float(x) for x in worst.tolist()])),
            reference_loss=ref_loss,
            cp_seconds=round(time.time() - start, 2),
        )
    return records


BAD_BATCH_MESSAGE = (
    "sequence length 13 is not divisible by 2 * context_parallel_size = 4; pad it (sequence_pad_multiple) before "
    "the context-parallel split"
)
BAD_THD_MESSAGE = (
    "packed document 1 padded length 6 is not divisible by 2 * context_parallel_size = 4; pad every sequence to a "
    "multiple of replay.layout.sequence_pad_multiple(...) before the context-parallel split"
)


def check_bad_lengths() -> dict:
    """Run in a CP2 layout: the batch helper and the attention module reject lengths the split cannot handle."""
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    assert cp == 2
    results = {}
    sequences = [torch.arange(14), torch.arange(9)]
    try:
        microbatch_inputs(sequences, pack_bshd([13, 8]), context_parallel_size=cp, cp_rank=cp_rank)
        results["bad_length_batch"] = False
    except ValueError as exc:
        results["bad_length_batch"] = str(exc) == BAD_BATCH_MESSAGE
    # ...and padding with sequence_pad_multiple makes the same batch acceptable
    padded = pack_bshd([13, 8], pad_multiple=sequence_pad_multiple(1, cp, False))
    results["padded_batch_ok"] = microbatch_inputs(sequences, padded, context_parallel_size=cp, cp_rank=cp_rank).tokens.shape == (2, 8)

    config = make_config(ParallelSizes(context_parallel_size=2), {})
    pgs = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
    attention = ContextParallelDotProductAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pgs)
    cu = torch.tensor([0, 8, 14], dtype=torch.int32)  # second document: 6 tokens, not a multiple of 4
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=8, max_seqlen_kv=8)
    q, kv = torch.randn(7, 4, 16), torch.randn(7, 2, 16)
    try:
        attention(q, kv, kv, None, packed_seq_params=params)
        results["bad_length_thd"] = False
    except ValueError as exc:
        results["bad_length_thd"] = str(exc) == BAD_THD_MESSAGE
    flags = torch.tensor([int(v) for v in results.values()])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return {k: bool(f) for k, f in zip(results, flags.tolist())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("layouts", nargs="*", default=list(LAYOUTS))
    parser.add_argument("--formats", nargs="*", default=list(FORMATS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rank = dist.get_rank()
    records, launch_start = [], time.time()
    for name in args.layouts:
        start = time.time()
        try:
            per_format, error = compare(name, args.formats), None
        except Exception as exc:  # report, keep going with the next layout
            per_format = {fmt: {} for fmt in args.formats}
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
        for fmt, record in per_format.items():
            record = dict(layout=name, format=fmt, error=error, seconds=round(time.time() - start, 2), **record)
            records.append(record)
            if rank == 0:
                print(json.dumps(record), flush=True)
    if "cp2" in args.layouts:
        start = time.time()
        try:
            initialize_model_parallel(LAYOUTS["cp2"][1])
            record = dict(results=check_bad_lengths(), error=None)
        except Exception as exc:
            record = dict(results={}, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}")
        record = dict(layout="cp2", format="bad_lengths", seconds=round(time.time() - start, 2), **record)
        records.append(record)
        if rank == 0:
            print(json.dumps(record), flush=True)
    if rank == 0:
        print(json.dumps(dict(total_seconds=round(time.time() - launch_start, 2))), flush=True)
    finish_launch(records, args.out)


if __name__ == "__main__":
    main()
