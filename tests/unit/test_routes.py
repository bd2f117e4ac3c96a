"""Unit tests for megatron_r3.replay.routes: decoding, narrowing and validation."""

import base64
import re

import numpy as np
import pytest
import torch

from megatron_r3.replay.routes import (
    RouteCheck,
    RouteError,
    Routes,
    compact_index_dtype,
    routes_from_array,
    validate_routes,
)
from megatron_r3.rollout.engines.sglang.codec import decode_sglang_routed_experts, encode_sglang_routed_experts


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def distinct_ids(rows, layers, topk, num_experts, moe_layers=None):
    """[rows, layers, topk] int32 ids, distinct within each row; dense layers (moe_layers False) zero-filled."""
    ids = (np.arange(rows)[:, None, None] * 3 + np.arange(layers)[None, :, None] + np.arange(topk)) % num_experts
    ids = ids.astype(np.int32)
    if moe_layers is not None:
        ids[:, ~np.asarray(moe_layers, dtype=bool), :] = 0
    return ids


# ---------------------------------------------------------------------------------------------------- dtypes
def test_compact_dtype_boundaries():
    assert compact_index_dtype(1) == torch.uint8
    assert compact_index_dtype(256) == torch.uint8
    assert compact_index_dtype(257) == torch.int16
    assert compact_index_dtype(32768) == torch.int16
    with pytest.raises(ValueError, match=exact(
        "num_experts=32769 exceeds 32768, the most an int16 expert index can address"
    )):
        compact_index_dtype(32769)
    with pytest.raises(ValueError, match="positive integer"):
        compact_index_dtype(0)


def test_routes_post_init_rejects_bad_tensors():
    with pytest.raises(ValueError, match="3-D"):
        Routes(torch.zeros(4, 2, dtype=torch.uint8), num_experts=8)
    with pytest.raises(ValueError, match="must have dtype torch.uint8 for 8 experts, got torch.int64"):
        Routes(torch.zeros(4, 2, 2, dtype=torch.int64), num_experts=8)
    with pytest.raises(ValueError, match="must have dtype torch.int16 for 300 experts"):
        Routes(torch.zeros(4, 2, 2, dtype=torch.uint8), num_experts=300)
    with pytest.raises(ValueError, match="start_row"):
        Routes(torch.zeros(4, 2, 2, dtype=torch.uint8), num_experts=8, start_row=-1)
    with pytest.raises(ValueError, match="source"):
        Routes(torch.zeros(4, 2, 2, dtype=torch.uint8), num_experts=8, source="vllm?")


def test_routes_properties():
    r = Routes(torch.zeros(5, 3, 2, dtype=torch.int16), num_experts=1000, start_row=7, source="hf")
    assert (r.num_rows, r.num_layers, r.topk, r.end_row) == (5, 3, 2, 12)
    assert r.nbytes() == 5 * 3 * 2 * 2


# ---------------------------------------------------------------------------------------------------- SGLang codec
@pytest.mark.parametrize("wire, num_experts", [
    ("int32", 64), ("int32", 300), ("uint8", 64), ("uint8", 256), ("uint16", 64), ("uint16", 300),
    ("int16", 64), ("int16", 300),
])
def test_encode_decode_round_trip(wire, num_experts):
    ids = distinct_ids(rows=6, layers=4, topk=3, num_experts=num_experts)
    ids[0, 0] = [num_experts - 1, 0, 1]
    payload = encode_sglang_routed_experts(ids, dtype=wire)
    routes = decode_sglang_routed_experts(
        payload, num_layers=4, topk=3, num_experts=num_experts, dtype=wire, start_len=5
    )
    assert routes.source == "sglang"
    assert routes.start_row == 5 and routes.end_row == 11
    assert routes.expert_ids.dtype == compact_index_dtype(num_experts)
    assert torch.equal(routes.expert_ids.to(torch.int64), torch.from_numpy(ids).to(torch.int64))
    assert encode_sglang_routed_experts(routes, dtype=wire) == payload


def test_decode_without_dtype_reads_int32():
    ids = np.array([[[1, 2]], [[3, 4]]], dtype=np.int32)  # 2 rows, 1 layer, top-2
    payload = base64.b64encode(ids.tobytes()).decode()  # exactly what an SGLang release without the dtype field sends
    routes = decode_sglang_routed_experts(payload, num_layers=1, topk=2, num_experts=8)
    assert routes.expert_ids.tolist() == [[[1, 2]], [[3, 4]]]
    # bytes payloads work too
    assert decode_sglang_routed_experts(payload.encode(), num_layers=1, topk=2, num_experts=8).num_rows == 2


def test_decode_empty_payload_has_zero_rows():
    routes = decode_sglang_routed_experts("", num_layers=2, topk=2, num_experts=8, start_len=3)
    assert routes.num_rows == 0 and routes.end_row == 3


def test_decode_truncated_base64():
    payload = encode_sglang_routed_experts(np.ones((2, 1, 2), dtype=np.int32))  # 16 bytes -> 24 characters
    with pytest.raises(RouteError, match=exact(
        "routes of sample 's1' on rank 3: routed_experts is not valid base64: "
        "length 23 is not a multiple of 4 (truncated?)"
    )):
        decode_sglang_routed_experts(payload[:-1], num_layers=1, topk=2, num_experts=8, sample_id="s1", rank=3)


def test_decode_bad_base64_character():
    with pytest.raises(RouteError, match="^" + re.escape("routes of sample 7: routed_experts is not valid base64: ")):
        decode_sglang_routed_experts("AAA*AAAA", num_layers=1, topk=2, num_experts=8, sample_id=7)


def test_decode_wrong_byte_count():
    payload = base64.b64encode(np.arange(5, dtype=np.int32).tobytes()).decode()  # 20 bytes, row size 2*2*4 = 16
    with pytest.raises(RouteError, match=exact(
        "routes of sample 'a': routed_experts has 20 bytes of int32, not a multiple of the row size 16 bytes "
        "(2 layers x top-2 x 4 bytes)"
    )):
        decode_sglang_routed_experts(payload, num_layers=2, topk=2, num_experts=8, sample_id="a")


def test_decode_unknown_dtype():
    with pytest.raises(RouteError, match=exact(
        "routes of sample 'a' on rank 0: unknown routed_experts_dtype 'float16' "
        "(expected one of int32, uint8, uint16, int16)"
    )):
        decode_sglang_routed_experts("", num_layers=1, topk=1, num_experts=8, dtype="float16", sample_id="a", rank=0)


def test_decode_missing_payload_explains_server_flag():
    with pytest.raises(RouteError, match="--enable-return-routed-experts"):
        decode_sglang_routed_experts(None, num_layers=1, topk=1, num_experts=8)


@pytest.mark.parametrize("num_experts", [64, 256])
def test_decode_out_of_range_id_does_not_wrap(num_experts):
    ids = np.array([[[1, 2], [3, 4]], [[5, 6], [300, 7]]], dtype=np.int32)  # 300 would wrap to 44 in uint8
    payload = encode_sglang_routed_experts(ids)
    with pytest.raises(RouteError, match=exact(
        f"routes of sample 'x' on rank 1: expert id 300 at row 1 layer 1 slot 0 is out of range [0, {num_experts})"
    )):
        decode_sglang_routed_experts(payload, num_layers=2, topk=2, num_experts=num_experts, sample_id="x", rank=1)


def test_decode_negative_id():
    payload = encode_sglang_routed_experts(np.array([[[0, -1]]], dtype=np.int32))
    with pytest.raises(RouteError, match=re.escape("expert id -1 at row 0 layer 0 slot 1 is out of range [0, 8)")):
        decode_sglang_routed_experts(payload, num_layers=1, topk=2, num_experts=8)


def test_encode_refuses_values_the_wire_dtype_cannot_hold():
    with pytest.raises(ValueError, match="uint8 cannot hold"):
        encode_sglang_routed_experts(np.array([[[300]]]), dtype="uint8")


# ---------------------------------------------------------------------------------------------------- arrays / R2
def test_routes_from_array_numpy_and_torch():
    ids = distinct_ids(3, 2, 2, 16)
    a = routes_from_array(ids.astype(np.int64), num_experts=16, start_row=2, source="hf")
    b = routes_from_array(torch.from_numpy(ids).to(torch.int64), num_experts=16, start_row=2, source="r2")
    assert a.expert_ids.dtype == torch.uint8 and b.expert_ids.dtype == torch.uint8
    assert torch.equal(a.expert_ids, b.expert_ids)
    assert (a.source, b.source, b.start_row) == ("hf", "r2", 2)
    # the result owns its memory: mutating the input does not change the routes
    src = torch.from_numpy(ids.copy()).to(torch.uint8)
    c = routes_from_array(src, num_experts=16)
    src.fill_(9)
    assert torch.equal(c.expert_ids, a.expert_ids)


def test_routes_from_array_rejects_floats_and_wrapping_ids():
    with pytest.raises(RouteError, match=exact("routes of sample 3: expert ids must be integers, got float32")):
        routes_from_array(np.zeros((2, 1, 2), dtype=np.float32), num_experts=8, sample_id=3)
    with pytest.raises(RouteError, match=exact("routes of sample 3: expert ids must be integers, got float32")):
        routes_from_array(torch.zeros(2, 1, 2), num_experts=8, sample_id=3)
    with pytest.raises(RouteError, match=exact(
        "routes of sample 3: expert id 300 at row 0 layer 0 slot 1 is out of range [0, 64)"
    )):
        routes_from_array(torch.tensor([[[1, 300]]]), num_experts=64, sample_id=3)
    with pytest.raises(RouteError, match=re.escape("must be 3-D [rows, num_layers, topk], got shape (2, 2)")):
        routes_from_array(np.zeros((2, 2), dtype=np.int32), num_experts=8)


def test_int16_for_many_experts():
    ids = np.array([[[1000, 32767]]], dtype=np.int64)
    r = routes_from_array(ids, num_experts=32768)
    assert r.expert_ids.dtype == torch.int16 and r.expert_ids.tolist() == [[[1000, 32767]]]


# ---------------------------------------------------------------------------------------------------- validation
MOE = [False, True, True]  # layer 0 dense, layers 1-2 MoE


def make_routes(rows=11, start_row=0, num_experts=8, topk=2, moe=MOE):
    return routes_from_array(distinct_ids(rows, len(moe), topk, num_experts, moe), num_experts=num_experts,
                             start_row=start_row)


def test_validate_ok():
    check = validate_routes(make_routes(), num_tokens=12, moe_layers=MOE, topk=2, sample_id="s")
    assert isinstance(check, RouteCheck) and check.ok and check.reasons == ()
    assert check.bad_rows.tolist() == [False] * 11
    multi = validate_routes(make_routes(rows=8, start_row=3), num_tokens=12, moe_layers=MOE, topk=2, sample_id="s")
    assert multi.ok


def test_validate_t_minus_one_rule():
    with pytest.raises(RouteError, match=exact(
        "routes of sample 's' on rank 2: expected 11 rows (T-1 = 11 tokens fed, start_row 0), got 12"
    )):
        validate_routes(make_routes(rows=12), num_tokens=12, moe_layers=MOE, topk=2, sample_id="s", rank=2)
    with pytest.raises(RouteError, match=exact(
        "routes of sample 's': expected 8 rows (T-1 = 11 tokens fed, start_row 3), got 7"
    )):
        validate_routes(make_routes(rows=7, start_row=3), num_tokens=12, moe_layers=MOE, topk=2, sample_id="s")
    # row-count errors are never turned into a fallback
    with pytest.raises(RouteError, match="expected 11 rows"):
        validate_routes(make_routes(rows=10), num_tokens=12, moe_layers=MOE, topk=2, sample_id="s",
                        allow_row_fallback=True)


def test_validate_layer_count_and_topk():
    with pytest.raises(RouteError, match=exact(
        "routes of sample 's': expected 4 decoder layers (len(moe_layers)), got 3"
    )):
        validate_routes(make_routes(), num_tokens=12, moe_layers=MOE + [True], topk=2, sample_id="s",
                        allow_row_fallback=True)
    with pytest.raises(RouteError, match=exact("routes of sample 's': expected topk 4, got 2")):
        validate_routes(make_routes(), num_tokens=12, moe_layers=MOE, topk=4, sample_id="s", allow_row_fallback=True)


def test_validate_duplicates_raise_or_fall_back():
    ids = distinct_ids(11, 3, 2, 8, MOE)
    ids[5, 2] = [7, 7]
    ids[9, 1] = [3, 3]
    ids[9, 2] = [4, 4]
    routes = routes_from_array(ids, num_experts=8)
    with pytest.raises(RouteError, match=exact(
        "routes of sample 'd' on rank 0: row 5 layer 2: duplicate expert id 7 (2 of 11 rows bad)"
    )):
        validate_routes(routes, num_tokens=12, moe_layers=MOE, topk=2, sample_id="d", rank=0)
    check = validate_routes(routes, num_tokens=12, moe_layers=MOE, topk=2, sample_id="d", allow_row_fallback=True)
    assert not check.ok and check.num_bad_rows == 2
    assert check.bad_rows.tolist() == [i in (5, 9) for i in range(11)]
    assert check.reasons == ("row 5 layer 2: duplicate expert id 7",)


def test_validate_out_of_range_in_hand_built_tensor():
    # Routes built by hand (not via routes_from_array) may hold ids >= num_experts in the compact dtype.
    ids = torch.from_numpy(distinct_ids(3, 3, 2, 8, MOE)).to(torch.uint8)
    ids[1, 1] = torch.tensor([200, 1])
    ids[2, 2] = torch.tensor([5, 5])
    routes = Routes(ids, num_experts=8)
    check = validate_routes(routes, num_tokens=4, moe_layers=MOE, topk=2, sample_id=0, allow_row_fallback=True)
    assert check.bad_rows.tolist() == [False, True, True]
    assert check.reasons == ("row 1 layer 1: expert id 200 out of range [0, 8)", "row 2 layer 2: duplicate expert id 5")
    with pytest.raises(RouteError, match=exact(
        "routes of sample 0: row 1 layer 1: expert id 200 out of range [0, 8); "
        "row 2 layer 2: duplicate expert id 5 (2 of 3 rows bad)"
    )):
        validate_routes(routes, num_tokens=4, moe_layers=MOE, topk=2, sample_id=0)


def test_validate_non_zero_dense_layer():
    moe = [True, False, True, False]
    ids = distinct_ids(5, 4, 2, 8, moe)
    ids[4, 3] = [0, 6]
    ids[2, 1] = [1, 0]  # layer 1 is the first offending dense layer
    routes = routes_from_array(ids, num_experts=8)
    with pytest.raises(RouteError, match=exact(
        "routes of sample 'z': layer 1 is a dense layer but holds non-zero expert id 1 at row 2; "
        "the engine's MoE layer map disagrees with moe_layers"
    )):
        validate_routes(routes, num_tokens=6, moe_layers=moe, topk=2, sample_id="z", allow_row_fallback=True)


def test_validate_zero_rows():
    routes = make_routes(rows=0, start_row=4)
    assert validate_routes(routes, num_tokens=5, moe_layers=MOE, topk=2, sample_id=1).ok


# ---------------------------------------------------------------------------------------------------- errors
def test_route_error_format():
    err = RouteError("bad", sample_id="abc", rank=3)
    assert str(err) == "routes of sample 'abc' on rank 3: bad"
    assert (err.reason, err.sample_id, err.rank) == ("bad", "abc", 3)
    err = RouteError("bad", sample_id=17)
    assert str(err) == "routes of sample 17: bad" and err.rank is None
    assert isinstance(err, ValueError)


def test_route_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(RouteError("bad", sample_id=("p", 1), rank=2)))
    assert str(err) == "routes of sample ('p', 1) on rank 2: bad" and err.sample_id == ("p", 1)
