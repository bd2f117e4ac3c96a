"""Unit tests for megatron_r3.train.batch with hand-computed model inputs.

Sequences (full token sequences T_j; the model reads 0..T_j-2 and predicts 1..T_j-1, so n_j = T_j - 1 slots):
    seq0 = [10, 11, 12, 13]                 n0 = 3
    seq1 = [20, 21, 22, 23, 24, 25, 26]     n1 = 6   (THD)   /   seq1 = [20, 21, 22]  n1 = 2 (BSHD)
Padding token 99 so that padding is visible in every literal.
"""

import pytest
import torch

from megatron_r3.replay.layout import pack_bshd, pack_thd, router_token_slots, slot_positions
from megatron_r3.train.batch import MicrobatchInputs, microbatch_inputs


def t(values, dtype=torch.long):
    return torch.tensor(values, dtype=dtype)


def f(values):
    return torch.tensor(values, dtype=torch.float32)


def assert_equal(actual, expected):
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert torch.equal(actual, expected), (actual, expected)


SEQ0 = t([10, 11, 12, 13])


# ------------------------------------------------------------------------------------------------------ BSHD
# pack_bshd([3, 2], pad_multiple=4): rows of 4 slots
#   tokens  row0 [10 11 12 99]   row1 [20 21 99 99]
#   labels  row0 [11 12 13 99]   row1 [21 22 99 99]
#   mask    row0 [ 1  1  1  0]   row1 [ 1  1  0  0]
#   pos     row0 [ 0  1  2  3]   row1 [ 0  1  2  3]
# cp=2, chunks of 1: rank 0 keeps positions (0, 3), rank 1 keeps (1, 2)
def bshd_inputs(cp_rank, cp=2, loss_masks=None):
    layout = pack_bshd([3, 2], pad_multiple=4)
    return microbatch_inputs([SEQ0, t([20, 21, 22])], layout, loss_masks=loss_masks, context_parallel_size=cp,
                             cp_rank=cp_rank, pad_token_id=99)


def test_bshd_cp1():
    inputs = bshd_inputs(0, cp=1)
    assert_equal(inputs.tokens, t([[10, 11, 12, 99], [20, 21, 99, 99]]))
    assert_equal(inputs.labels, t([[11, 12, 13, 99], [21, 22, 99, 99]]))
    assert_equal(inputs.loss_mask, f([[1, 1, 1, 0], [1, 1, 0, 0]]))
    assert_equal(inputs.position_ids, t([[0, 1, 2, 3], [0, 1, 2, 3]]))
    assert inputs.packed_seq_params is None


def test_bshd_cp2_rank0():
    inputs = bshd_inputs(0)
    assert_equal(inputs.tokens, t([[10, 99], [20, 99]]))
    assert_equal(inputs.labels, t([[11, 99], [21, 99]]))
    assert_equal(inputs.loss_mask, f([[1, 0], [1, 0]]))
    assert_equal(inputs.position_ids, t([[0, 3], [0, 3]]))
    assert inputs.packed_seq_params is None


def test_bshd_cp2_rank1():
    inputs = bshd_inputs(1)
    assert_equal(inputs.tokens, t([[11, 12], [21, 99]]))
    assert_equal(inputs.labels, t([[12, 13], [22, 99]]))
    assert_equal(inputs.loss_mask, f([[1, 1], [1, 0]]))
    assert_equal(inputs.position_ids, t([[1, 2], [1, 2]]))


def test_bshd_custom_loss_mask_is_zero_on_padding():
    # response-only masks over predicted positions; padding still 0
    masks = [t([0, 1, 1], torch.bool), f([1, 0])]
    full = bshd_inputs(0, cp=1, loss_masks=masks)
    assert_equal(full.loss_mask, f([[0, 1, 1, 0], [1, 0, 0, 0]]))
    assert_equal(bshd_inputs(1, loss_masks=masks).loss_mask, f([[1, 1], [0, 0]]))


# ------------------------------------------------------------------------------------------------------- THD
# pack_thd([3, 6], pad_multiple=4): padded (4, 8), 12 slots in one row
#   slot     0  1  2  3 |  4  5  6  7  8  9 10 11
#   tokens  10 11 12 99 | 20 21 22 23 24 25 99 99
#   labels  11 12 13 99 | 21 22 23 24 25 26 99 99
#   mask     1  1  1  0 |  1  1  1  1  1  1  0  0
#   pos      0  1  2  3 |  0  1  2  3  4  5  6  7     (restart per sample)
# cp=2, per document: doc0 chunks of 1, doc1 chunks of 2
#   rank 0 slots [0, 3 | 4, 5, 10, 11];  rank 1 slots [1, 2 | 6, 7, 8, 9]
SEQ1_THD = t([20, 21, 22, 23, 24, 25, 26])


def thd_inputs(cp_rank, cp=2):
    layout = pack_thd([3, 6], pad_multiple=4)
    return microbatch_inputs([SEQ0, SEQ1_THD], layout, context_parallel_size=cp, cp_rank=cp_rank, pad_token_id=99)


def test_slot_positions_restart_per_sample():
    assert_equal(slot_positions(pack_thd([3, 6], pad_multiple=4)), t([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]))
    assert_equal(slot_positions(pack_thd([2, 1, 3])), t([0, 1, 0, 0, 1, 2]))
    assert_equal(slot_positions(pack_bshd([3, 1])), t([0, 1, 2, 0, 1, 2]))


def test_thd_cp1():
    inputs = thd_inputs(0, cp=1)
    assert_equal(inputs.tokens, t([[10, 11, 12, 99, 20, 21, 22, 23, 24, 25, 99, 99]]))
    assert_equal(inputs.labels, t([[11, 12, 13, 99, 21, 22, 23, 24, 25, 26, 99, 99]]))
    assert_equal(inputs.loss_mask, f([[1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0]]))
    assert_equal(inputs.position_ids, t([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]]))


def test_thd_cp2_rank0():
    inputs = thd_inputs(0)
    assert_equal(inputs.tokens, t([[10, 99, 20, 21, 99, 99]]))
    assert_equal(inputs.labels, t([[11, 99, 21, 22, 99, 99]]))
    assert_equal(inputs.loss_mask, f([[1, 0, 1, 1, 0, 0]]))
    assert_equal(inputs.position_ids, t([[0, 3, 0, 1, 6, 7]]))


def test_thd_cp2_rank1():
    inputs = thd_inputs(1)
    assert_equal(inputs.tokens, t([[11, 12, 22, 23, 24, 25]]))
    assert_equal(inputs.labels, t([[12, 13, 23, 24, 25, 26]]))
    assert_equal(inputs.loss_mask, f([[1, 1, 1, 1, 1, 1]]))
    assert_equal(inputs.position_ids, t([[1, 2, 2, 3, 4, 5]]))


def test_thd_packed_seq_params():
    for cp_rank in range(2):
        params = thd_inputs(cp_rank).packed_seq_params
        assert params.qkv_format == "thd"
        # the padded boundaries [0, 4, 12] (the global, pre-CP-split ones, as megatron/TE expect)
        for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            assert_equal(getattr(params, name), t([0, 4, 12], torch.int32))
        assert params.max_seqlen_q == params.max_seqlen_kv == 8


def test_inputs_and_routes_share_slots():
    """The router sees, per token, exactly the slot the model input came from (b=1 THD: router order = model order)."""
    layout = pack_thd([3, 6], pad_multiple=4)
    for cp_rank in range(2):
        inputs = microbatch_inputs([SEQ0, SEQ1_THD], layout, context_parallel_size=2, cp_rank=cp_rank,
                                   pad_token_id=99)
        slots = router_token_slots(layout, context_parallel_size=2, cp_rank=cp_rank)
        packed_tokens = t([10, 11, 12, 99, 20, 21, 22, 23, 24, 25, 99, 99])
        assert_equal(inputs.tokens.reshape(-1), packed_tokens[slots])


def test_to_keeps_values():
    inputs = thd_inputs(0)
    moved = inputs.to("cpu")
    assert isinstance(moved, MicrobatchInputs)
    assert_equal(moved.tokens, inputs.tokens)
    assert moved.packed_seq_params is inputs.packed_seq_params


def test_mask_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="sample 0 has 2 rows, the layout expects 3"):
        bshd_inputs(0, cp=1, loss_masks=[f([1, 1]), f([1, 1])])
