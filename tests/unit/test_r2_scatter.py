"""Unit tests for the pure part of R2's inverse path: `scatter_recorded_to_slots`."""

import re

import pytest
import torch

from megatron_r3.replay.layout import pack_bshd, router_token_slots, unpack_per_slot
from megatron_r3.replay.r2 import scatter_recorded_to_slots


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def u8(values):
    return torch.tensor(values, dtype=torch.uint8)


# pack_bshd([2, 1]): rows of 2 slots -> slot 0 = s0r0, 1 = s0r1, 2 = s1r0, 3 = pad
# tp2 + SP: sequence-major [[0, 2], [1, 3]]; tp rank 1 keeps row 1 -> router slots [1, 3]
LAYOUT = pack_bshd([2, 1])
SLOTS_TP1 = router_token_slots(LAYOUT, tensor_model_parallel_size=2, tp_rank=1, sequence_parallel=True)


def test_token_slots_of_the_example():
    assert SLOTS_TP1.tolist() == [1, 3]


def test_scatter_recorded_to_slots_literal():
    recorded = {2: u8([[5, 6], [7, 1]]), 3: u8([[2, 3], [4, 5]])}
    full = scatter_recorded_to_slots(recorded, LAYOUT, SLOTS_TP1, num_layers=3, topk=2, dtype=torch.uint8)
    # [num_slots=4, L_all=3, K=2]; layer 1 (dense / not on this rank) and slots 0, 2 (other TP rank) stay zero;
    # router row 0 -> slot 1, router row 1 -> slot 3
    expected = u8(
        [
            [[0, 0], [0, 0], [0, 0]],
            [[0, 0], [5, 6], [2, 3]],
            [[0, 0], [0, 0], [0, 0]],
            [[0, 0], [7, 1], [4, 5]],
        ]
    )
    assert full.dtype == torch.uint8
    assert torch.equal(full, expected)
    # back to samples: sample 0 row 1 carries the layer-2 / layer-3 ids of router row 0; the pad slot is dropped
    sample0, sample1 = unpack_per_slot(full, LAYOUT)
    assert torch.equal(sample0, u8([[[0, 0], [0, 0], [0, 0]], [[0, 0], [5, 6], [2, 3]]]))
    assert torch.equal(sample1, u8([[[0, 0], [0, 0], [0, 0]]]))


def test_scatter_converts_dtype():
    recorded = {1: torch.tensor([[257, 3], [299, 0]], dtype=torch.int64)}
    full = scatter_recorded_to_slots(recorded, LAYOUT, SLOTS_TP1, num_layers=1, topk=2, dtype=torch.int16)
    assert full.dtype == torch.int16
    assert torch.equal(full, torch.tensor([[[0, 0]], [[257, 3]], [[0, 0]], [[299, 0]]], dtype=torch.int16))


def test_scatter_shape_mismatch_message():
    with pytest.raises(ValueError, match=exact("layer 2 recorded ids of shape (3, 2) for 2 router tokens")):
        scatter_recorded_to_slots({2: torch.zeros(3, 2, dtype=torch.uint8)}, LAYOUT, SLOTS_TP1, 3, 2, torch.uint8)
    with pytest.raises(ValueError, match=exact("layer 1 recorded ids of shape (2, 3) for 2 router tokens")):
        scatter_recorded_to_slots({1: torch.zeros(2, 3, dtype=torch.uint8)}, LAYOUT, SLOTS_TP1, 3, 2, torch.uint8)


def test_scatter_nothing_recorded():
    full = scatter_recorded_to_slots({}, LAYOUT, SLOTS_TP1, num_layers=2, topk=2, dtype=torch.uint8)
    assert torch.equal(full, torch.zeros(4, 2, 2, dtype=torch.uint8))


def test_scatter_layer_number_out_of_range():
    ids = torch.zeros(2, 2, dtype=torch.uint8)
    # layer 0 used to land silently in the last layer (index -1)
    with pytest.raises(ValueError, match=exact("recorded layer number 0 is outside 1..3")):
        scatter_recorded_to_slots({0: ids}, LAYOUT, SLOTS_TP1, 3, 2, torch.uint8)
    with pytest.raises(ValueError, match=exact("recorded layer number 4 is outside 1..3")):
        scatter_recorded_to_slots({4: ids}, LAYOUT, SLOTS_TP1, 3, 2, torch.uint8)
