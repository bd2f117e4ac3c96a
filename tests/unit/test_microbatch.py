"""Unit tests for megatron_r3.replay.microbatch with a hand-worked example.

Example used throughout: 2 samples of 3 and 2 tokens, 4 decoder layers of which layer 1 is dense (all-zero ids,
as SGLang sends them), top-2 over 8 experts, tp=2 with sequence parallelism, and this rank's MoE routers are
layers (2, 4).

Layout: BSHD, pad multiple sequence_pad_multiple(tp=2, sp) = 2 -> rows of 4 slots
    slot:    0    1    2    3  |  4    5    6    7
    sample: s0r0 s0r1 s0r2 pad | s1r0 s1r1 pad  pad
Router order (sequence-major [s, b] = [[0,4],[1,5],[2,6],[3,7]]), SP halves it:
    tp rank 0 -> slots [0, 4, 1, 5];  tp rank 1 -> slots [2, 6, 3, 7]
Pad fill ids: slot s -> (2s + [0,1]) mod 8: slot 3 -> [6,7], slot 6 -> [4,5], slot 7 -> [6,7].
"""

import re

import pytest
import torch

from megatron_r3.replay.layout import pack_bshd, router_token_slots, sequence_pad_multiple
from megatron_r3.replay.microbatch import MicrobatchRoutes, localize_routes, routes_from_recorded


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def u8(values):
    return torch.tensor(values, dtype=torch.uint8)


def b(values):
    return torch.tensor(values, dtype=torch.bool)


def assert_equal(actual, expected):
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert torch.equal(actual, expected), (actual, expected)


# per sample [rows, L_all=4, K=2]; layer 1 (index 0) dense -> zeros
SAMPLE0 = u8(
    [
        [[0, 0], [1, 2], [3, 4], [5, 6]],
        [[0, 0], [2, 3], [4, 5], [6, 7]],
        [[0, 0], [3, 4], [5, 6], [7, 0]],
    ]
)
SAMPLE1 = u8(
    [
        [[0, 0], [7, 6], [5, 4], [3, 2]],
        [[0, 0], [6, 5], [4, 3], [2, 1]],
    ]
)


def example(tp_rank, free_rows=None):
    layout = pack_bshd([3, 2], pad_multiple=sequence_pad_multiple(2, 1, True))
    slots = router_token_slots(layout, tensor_model_parallel_size=2, tp_rank=tp_rank, sequence_parallel=True)
    return localize_routes([SAMPLE0, SAMPLE1], layout, slots, (2, 4), num_experts=8, free_rows=free_rows)


def test_example_token_slots():
    layout = pack_bshd([3, 2], pad_multiple=2)
    assert layout.seq_length == 4
    assert router_token_slots(layout, tensor_model_parallel_size=2, tp_rank=0, sequence_parallel=True).tolist() == [
        0, 4, 1, 5
    ]
    assert router_token_slots(layout, tensor_model_parallel_size=2, tp_rank=1, sequence_parallel=True).tolist() == [
        2, 6, 3, 7
    ]


def test_localize_routes_tp_rank0():
    routes = example(0)
    # slots 0,4,1,5 = s0r0, s1r0, s0r1, s1r1; layers 2 and 4 (indices 1, 3)
    expected = u8(
        [
            [[1, 2], [5, 6]],  # s0r0
            [[7, 6], [3, 2]],  # s1r0
            [[2, 3], [6, 7]],  # s0r1
            [[6, 5], [2, 1]],  # s1r1
        ]
    )
    assert_equal(routes.expert_ids, expected)
    assert routes.layer_numbers == (2, 4)
    assert_equal(routes.valid, b([True, True, True, True]))
    assert routes.free_rows is None
    assert (routes.num_valid, routes.num_free, routes.num_tokens) == (4, 0, 4)


def test_localize_routes_tp_rank1_padding_is_distinct():
    routes = example(1)
    # slots 2,6,3,7 = s0r2, pad, pad, pad; pads hold their distinct fill ids in every layer
    expected = u8(
        [
            [[3, 4], [7, 0]],  # s0r2
            [[4, 5], [4, 5]],  # slot 6 pad: (12, 13) mod 8
            [[6, 7], [6, 7]],  # slot 3 pad
            [[6, 7], [6, 7]],  # slot 7 pad: (14, 15) mod 8
        ]
    )
    assert_equal(routes.expert_ids, expected)
    assert_equal(routes.valid, b([True, False, False, False]))
    assert (routes.num_valid, routes.num_free) == (1, 0)


def test_localize_routes_free_rows():
    # sample 1 row 0 is unusable (counted native fallback); sample 0 has no bad rows
    free = [None, b([True, False])]
    rank0 = example(0, free)
    # slot 4 = s1r0 is second in rank 0's router order
    assert_equal(rank0.free_rows, b([False, True, False, False]))
    assert (rank0.num_valid, rank0.num_free) == (4, 1)
    rank1 = example(1, free)
    assert_equal(rank1.free_rows, b([False, False, False, False]))
    assert (rank1.num_valid, rank1.num_free) == (1, 0)
    # all None -> no free_rows tensor at all
    assert example(0, [None, None]).free_rows is None


def test_for_layer():
    routes = example(0, [None, b([True, False])])
    layer4 = routes.for_layer(4)
    assert_equal(layer4.expert_ids, u8([[5, 6], [3, 2], [6, 7], [2, 1]]))
    assert_equal(layer4.valid, b([True, True, True, True]))
    assert_equal(layer4.free_rows, b([False, True, False, False]))
    assert_equal(routes.for_layer(2).expert_ids, u8([[1, 2], [7, 6], [2, 3], [6, 5]]))
    with pytest.raises(KeyError) as info:
        routes.for_layer(1)
    assert info.value.args[0] == "no routes for layer 1; this microbatch has layers (2, 4)"


def test_nbytes_one_byte_per_id():
    routes = example(0)
    assert routes.expert_ids.element_size() == 1
    # 4 tokens x 2 layers x top-2 ids at 1 byte + 4 valid bools
    assert routes.nbytes == 16 + 4
    assert example(0, [None, b([True, False])]).nbytes == 16 + 4 + 4
    # >256 experts: int16 ids, 2 bytes each
    wide = localize_routes(
        [SAMPLE0.to(torch.int16) + 256], pack_bshd([3]), torch.arange(3), (2,), num_experts=300
    )
    assert wide.expert_ids.dtype == torch.int16
    assert wide.nbytes == 3 * 1 * 2 * 2 + 3


def test_localize_routes_errors():
    layout = pack_bshd([3, 2])
    with pytest.raises(ValueError, match=exact("layer numbers (0, 2) outside the routes' 4 layers")):
        localize_routes([SAMPLE0, SAMPLE1], layout, torch.arange(6), (0, 2), num_experts=8)
    with pytest.raises(ValueError, match=exact("layer numbers (2, 5) outside the routes' 4 layers")):
        localize_routes([SAMPLE0, SAMPLE1], layout, torch.arange(6), (2, 5), num_experts=8)


def test_localize_routes_no_moe_layers_on_this_rank():
    routes = localize_routes([SAMPLE0, SAMPLE1], pack_bshd([3, 2]), torch.arange(6), (), num_experts=8)
    assert routes.expert_ids.shape == (6, 0, 2)
    assert routes.layer_numbers == ()


def test_routes_from_recorded():
    recorded = {4: u8([[1, 2], [3, 4], [5, 6]]), 2: u8([[7, 0], [6, 1], [5, 2]])}
    valid = b([True, True, False])
    routes = routes_from_recorded(recorded, valid, num_valid=2)
    assert isinstance(routes, MicrobatchRoutes)
    assert routes.layer_numbers == (2, 4)  # sorted, whatever the dict order
    assert_equal(
        routes.expert_ids,
        u8([[[7, 0], [1, 2]], [[6, 1], [3, 4]], [[5, 2], [5, 6]]]),
    )
    assert routes.valid is valid
    assert (routes.num_valid, routes.num_free, routes.free_rows) == (2, 0, None)
    assert_equal(routes.for_layer(4).expert_ids, u8([[1, 2], [3, 4], [5, 6]]))


def test_to_and_pin_memory_on_cpu():
    routes = example(0, [None, b([True, False])])
    moved = routes.to("cpu")
    assert_equal(moved.expert_ids, routes.expert_ids)
    assert_equal(moved.free_rows, routes.free_rows)
    assert (moved.num_valid, moved.num_free, moved.layer_numbers) == (4, 1, (2, 4))
    if not torch.cuda.is_available():
        assert routes.pin_memory() is routes


def test_routes_from_recorded_rank_without_moe_layers():
    # a pipeline stage whose layers are all dense records nothing; that is an empty route set, not a crash
    routes = routes_from_recorded({}, b([True, False]), num_valid=1)
    assert routes.layer_numbers == ()
    assert routes.expert_ids.shape == (2, 0, 0)
    assert (routes.num_tokens, routes.num_valid) == (2, 1)
    with pytest.raises(KeyError):
        routes.for_layer(1)
