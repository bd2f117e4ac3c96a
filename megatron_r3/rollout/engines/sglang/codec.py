"""SGLang's wire codec for routes: ``meta_info["routed_experts"]`` <-> :class:`~megatron_r3.replay.routes.Routes`.

SGLang 0.5.23 sends base64 of a flat row-major int32 array ``[seqlen - 1 - start_len, num_hidden_layers, top_k]``
(one row per position fed through the model, every decoder layer, dense layers zero) and no dtype field; a
``routed_experts_dtype`` is still honoured if a server sends one. The codec belongs to the engine that speaks it:
the route container and its checks (range, compact dtype) stay in :mod:`megatron_r3.replay.routes`, which this
module hands the decoded array to (:func:`~megatron_r3.replay.routes.routes_from_array`, zero-copy until narrowing).
"""

from __future__ import annotations

import binascii

import numpy as np
import torch

from megatron_r3.replay.routes import RouteError, Routes, routes_from_array

try:  # SIMD base64 (~1.6 GB/s with validation on AVX2); the stdlib decoder manages ~0.45 GB/s.
    import pybase64 as _pybase64
except ImportError:  # pragma: no cover - depends on the environment
    _pybase64 = None

# Wire dtypes a server could announce in meta_info["routed_experts_dtype"] (0.5.23 sends none: int32), as explicit
# little-endian numpy dtypes (SGLang writes ndarray.tobytes() on little-endian hosts; being explicit keeps a
# big-endian reader correct).
WIRE_DTYPES = {
    "int32": np.dtype("<i4"), "uint8": np.dtype("u1"), "uint16": np.dtype("<u2"), "int16": np.dtype("<i2"),
}


def _b64decode(payload: str | bytes) -> bytes:
    if _pybase64 is not None:
        return _pybase64.b64decode(payload, validate=True)
    return binascii.a2b_base64(payload, strict_mode=True)


def decode_sglang_routed_experts(
    payload: str | bytes | None,
    *,
    num_layers: int,
    topk: int,
    num_experts: int,
    dtype: str | None = None,
    start_len: int = 0,
    sample_id=None,
    rank: int | None = None,
) -> Routes:
    """Decode SGLang's ``meta_info["routed_experts"]`` into :class:`Routes` (``source="sglang"``).

    ``payload`` is base64 of a flat row-major array ``[seqlen - 1 - start_len, num_layers, topk]`` in ``dtype``
    (None means int32, what SGLang 0.5.23 sends, with no ``routed_experts_dtype`` field; other names are tolerated).
    ``num_layers`` counts all decoder layers (``num_hidden_layers``), ``topk`` is ``num_experts_per_tok``.
    The bytes are viewed zero-copy with numpy, range-checked, then converted once to the compact dtype.
    """
    if payload is None:
        raise RouteError(
            "the response has no routed_experts (was the SGLang server started with --enable-return-routed-experts "
            "and the request sent with return_routed_experts=true?)",
            sample_id=sample_id,
            rank=rank,
        )
    if not isinstance(payload, (str, bytes, bytearray)):
        raise RouteError(
            f"routed_experts must be a base64 string, got {type(payload).__name__} {str(payload)[:40]!r}",
            sample_id=sample_id,
            rank=rank,
        )
    name = "int32" if dtype is None else str(dtype)
    wire = WIRE_DTYPES.get(name)
    if wire is None:
        raise RouteError(
            f"unknown routed_experts_dtype {name!r} (expected one of {', '.join(WIRE_DTYPES)})",
            sample_id=sample_id,
            rank=rank,
        )
    if num_layers < 1 or topk < 1:
        raise ValueError(f"num_layers and topk must be positive, got num_layers={num_layers}, topk={topk}")
    # Check the length ourselves: the message must not depend on which base64 backend is installed.
    if len(payload) % 4:
        raise RouteError(
            f"routed_experts is not valid base64: length {len(payload)} is not a multiple of 4 (truncated?)",
            sample_id=sample_id,
            rank=rank,
        )
    try:
        raw = _b64decode(payload)
    except (binascii.Error, ValueError, TypeError) as err:
        raise RouteError(f"routed_experts is not valid base64: {err}", sample_id=sample_id, rank=rank) from err
    row_bytes = wire.itemsize * num_layers * topk
    if len(raw) % row_bytes:
        raise RouteError(
            f"routed_experts has {len(raw)} bytes of {name}, not a multiple of the row size {row_bytes} bytes "
            f"({num_layers} layers x top-{topk} x {wire.itemsize} bytes)",
            sample_id=sample_id,
            rank=rank,
        )
    ids = np.frombuffer(raw, dtype=wire).reshape(-1, num_layers, topk)
    return routes_from_array(ids, num_experts=num_experts, start_row=start_len, source="sglang",
                             sample_id=sample_id, rank=rank)


def encode_sglang_routed_experts(expert_ids, dtype: str = "int32") -> str:
    """Inverse of :func:`decode_sglang_routed_experts`: base64 of the flat row-major array in ``dtype``.

    Used by tests and by the stand-in SGLang server. Refuses values the wire dtype cannot hold instead of wrapping.
    """
    wire = WIRE_DTYPES.get(dtype)
    if wire is None:
        raise ValueError(f"unknown routed_experts dtype {dtype!r} (expected one of {', '.join(WIRE_DTYPES)})")
    if isinstance(expert_ids, Routes):
        expert_ids = expert_ids.expert_ids
    if isinstance(expert_ids, torch.Tensor):
        expert_ids = expert_ids.detach().cpu().to(torch.int64).numpy()
    ids = np.asarray(expert_ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"expert ids must be integers, got {ids.dtype.name}")
    info = np.iinfo(wire)
    if ids.size and (int(ids.min()) < info.min or int(ids.max()) > info.max):
        raise ValueError(f"expert ids span [{int(ids.min())}, {int(ids.max())}], which {dtype} cannot hold")
    return binascii.b2a_base64(np.ascontiguousarray(ids, dtype=wire).tobytes(), newline=False).decode("ascii")
