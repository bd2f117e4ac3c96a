"""Unit tests for megatron_r3.train.microbatching.plan_step (pure: sizes and a ParallelContext, no process group).

Example: 4 samples with 4, 3, 6 and 2 tokens (3, 2, 5 and 1 model positions), prompt length 2, one mini-batch of
all 4 on a single rank, pad multiple 2.
- THD, --max-tokens-per-microbatch 8: padded sizes 4, 2, 6, 2 -> greedy groups [s0 s1] (6 tokens), [s2 s3] (8).
  Without pipeline parallelism each row keeps its own length (6, 8); with it (equal_seq_length) every row is
  max(8, max_tokens 8) = 8 long and the first row's last sample takes the 2 extra slots: padded (4, 4).
- BSHD, --micro-batch-size 2: rows of longest-sample length (3 -> 4 and 5 -> 6), or 6 for all under PP.
"""

import torch

from megatron_r3.platform.parallel_context import ParallelContext, ParallelSizes
from megatron_r3.train.microbatching import TrainSample, plan_step


def samples():
    out = []
    for index, length in enumerate((4, 3, 6, 2)):
        tokens = torch.arange(10 * index, 10 * index + length)
        out.append(TrainSample(index=index, tokens=tokens, prompt_length=1,
                               rollout_logprobs=torch.zeros(length - 1), reward=0.0, advantage=float(index)))
    return out


def plan(equal: bool, thd: bool):
    one = ParallelContext.for_rank(ParallelSizes(), 1, 0)
    return plan_step(samples(), one, global_batch_size=4, micro_batch_size=2,
                     max_tokens_per_microbatch=8 if thd else None, pad_multiple=2, equal_seq_length=equal,
                     moe_layer_numbers=(1,), num_experts=4, with_routes=False)


def test_thd_rows_keep_their_length_without_pipeline_parallelism():
    result = plan(equal=False, thd=True)
    assert [[s.index for s in mb.samples] for mb in result.microbatches] == [[0, 1], [2, 3]]
    assert [mb.layout.padded_lengths for mb in result.microbatches] == [(4, 2), (6, 2)]
    assert (result.seq_length, result.micro_batch_size) == (8, 1)


def test_thd_rows_are_padded_to_one_length_under_pipeline_parallelism():
    result = plan(equal=True, thd=True)
    first = result.microbatches[0]
    assert [mb.layout.padded_lengths for mb in result.microbatches] == [(4, 4), (6, 2)]
    assert result.seq_length == 8
    # tokens 0..2 of sample 0 (slots 0-2), pad, tokens 10..11 of sample 1 (slots 4-5), then 4 pad slots
    assert first.inputs.tokens.tolist() == [[0, 1, 2, 0, 10, 11, 0, 0]]
    assert first.inputs.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert first.inputs.packed_seq_params.cu_seqlens_q_padded.tolist() == [0, 4, 8]
    assert first.advantages.tolist() == [[0, 0, 0, 0, 1, 1, 0, 0]]


def test_bshd_rows():
    assert [mb.layout.seq_length for mb in plan(equal=False, thd=False).microbatches] == [4, 6]
    fixed = plan(equal=True, thd=False)
    assert [mb.layout.seq_length for mb in fixed.microbatches] == [6, 6]
    assert (fixed.seq_length, fixed.micro_batch_size) == (6, 2)
