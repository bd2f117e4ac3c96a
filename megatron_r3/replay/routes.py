"""Ingest and validate the expert ids a rollout engine chose (R3) or the trainer recorded (R2).

One :class:`Routes` per sample holds an integer tensor ``[rows, num_layers, topk]``: row ``r`` is the token at
position ``start_row + r``, the layer axis covers *every* decoder layer (dense layers zero-filled, as SGLang sends
them) and the ids are logical expert ids in ``[0, num_experts)``.

Sources:

* Any rollout engine and any array: :func:`routes_from_array` (numpy or torch, any integer dtype). An engine with
  its own wire format decodes it in its own codec and hands the array here (SGLang's base64:
  :mod:`megatron_r3.rollout.engines.sglang.codec`).
* R2 records, the routes the trainer itself recorded in its old-logprob pass: ``routes_from_array(ids,
  source="r2", ...)``. They go through the same range check and validation so that a recording bug is caught
  here rather than replayed silently.

Everything here runs on CPU, once per sample, outside the GPU hot path. Ids are kept in the compact dtype of
:func:`compact_index_dtype` (uint8 up to 256 experts) until the router widens them to int64 on device.
Validation is fully vectorised; a failure is a :class:`RouteError` naming the sample and the rank (the trainer
makes it collective with `platform.collectives`, so that no rank is left waiting in a collective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

ROUTE_SOURCES = frozenset({"sglang", "hf", "array", "r2"})

_NUMPY_OF_TORCH = {torch.uint8: np.uint8, torch.int16: np.int16}


class RouteError(ValueError):
    """Bad routes for one sample; the message names the sample and the rank that found them."""

    def __init__(self, message: str, *, sample_id: Any, rank: int | None = None):
        self.reason = message
        self.sample_id = sample_id
        self.rank = rank
        where = f"routes of sample {sample_id!r}" + ("" if rank is None else f" on rank {rank}")
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # keep keyword-only fields across pickling (multiprocessing, all_gather_object)
        return _rebuild_route_error, (self.reason, self.sample_id, self.rank)


def _rebuild_route_error(reason, sample_id, rank):
    return RouteError(reason, sample_id=sample_id, rank=rank)


def compact_index_dtype(num_experts: int) -> torch.dtype:
    """Smallest dtype that holds every id in ``[0, num_experts)``: uint8 up to 256 experts, else int16.

    Routes are held and shipped in this dtype (a 30k-token sample with 48 layers and top-8 is ~11 MB in uint8 but
    ~46 MB in int32). int16 rather than uint16 because torch has full int16 support (NCCL needs a uint8 view anyway).
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 32768:
        return torch.int16
    raise ValueError(f"num_experts={num_experts} exceeds 32768, the most an int16 expert index can address")


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields make field-wise == ambiguous; identity is meant
class Routes:
    """Expert ids one engine chose for one sample. Row r is position start_row + r of the token sequence."""

    expert_ids: torch.Tensor  # CPU, [rows, num_layers, topk], dtype compact_index_dtype(num_experts)
    num_experts: int
    start_row: int = 0
    source: str = "array"  # "sglang" | "hf" | "array" | "r2"

    def __post_init__(self):
        for name in ("num_experts", "start_row"):  # accept numpy integers (e.g. from JSON via numpy), store int
            value = getattr(self, name)
            if isinstance(value, np.integer):
                object.__setattr__(self, name, int(value))
        ids = self.expert_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 3:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"Routes.expert_ids must be a 3-D tensor [rows, num_layers, topk], got {shape}")
        if ids.device.type != "cpu":
            raise ValueError(f"Routes.expert_ids must live on the CPU, got device {ids.device}")
        want = compact_index_dtype(self.num_experts)
        if ids.dtype != want:
            raise ValueError(
                f"Routes.expert_ids must have dtype {want} for {self.num_experts} experts, got {ids.dtype} "
                "(build Routes with routes_from_array, which range-checks before narrowing)"
            )
        if isinstance(self.start_row, bool) or not isinstance(self.start_row, int) or self.start_row < 0:
            raise ValueError(f"Routes.start_row must be a non-negative int, got {self.start_row!r}")
        if self.source not in ROUTE_SOURCES:
            raise ValueError(f"Routes.source must be one of {sorted(ROUTE_SOURCES)}, got {self.source!r}")

    @property
    def num_rows(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def topk(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def end_row(self) -> int:
        """One past the last position covered (exclusive)."""
        return self.start_row + self.num_rows

    def nbytes(self) -> int:
        return self.expert_ids.numel() * self.expert_ids.element_size()


def _check_ids_in_range(ids: np.ndarray, num_experts: int, sample_id, rank) -> None:
    """Raise RouteError if any id is outside ``[0, num_experts)``.

    Runs on the wide source values, *before* narrowing: uint8 would turn id 300 into 44, a valid-looking expert,
    and the replay would silently route to the wrong expert. Two reductions; the search for the first offender only
    runs on the error path.
    """
    if ids.size == 0:
        return
    lo = 0 if ids.dtype.kind == "u" else int(ids.min())
    hi = int(ids.max())
    if lo >= 0 and hi < num_experts:
        return
    first = int(np.flatnonzero((ids < 0) | (ids >= num_experts))[0])
    row, layer, slot = np.unravel_index(first, ids.shape)
    value = int(ids.reshape(-1)[first])
    raise RouteError(
        f"expert id {value} at row {row} layer {layer} slot {slot} is out of range [0, {num_experts})",
        sample_id=sample_id,
        rank=rank,
    )


def _narrow(ids: np.ndarray, num_experts: int) -> torch.Tensor:
    """One conversion to the compact dtype (always a fresh, writable, contiguous copy)."""
    target = _NUMPY_OF_TORCH[compact_index_dtype(num_experts)]
    return torch.from_numpy(np.ascontiguousarray(ids.astype(target, copy=True)))


def routes_from_array(
    array,
    *,
    num_experts: int,
    start_row: int = 0,
    source: str = "array",
    sample_id=None,
    rank: int | None = None,
) -> Routes:
    """Build :class:`Routes` from a numpy array or torch tensor ``[rows, num_layers, topk]`` of any integer dtype.

    Used for the embedded HF engine (``source="hf"``), R2 records (``source="r2"``; a device tensor is copied to
    the CPU) and tests. Floats are refused rather than truncated; the range check runs before narrowing.
    """
    if isinstance(array, torch.Tensor):
        tensor = array.detach()
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            kind = str(tensor.dtype).removeprefix("torch.")
            raise RouteError(f"expert ids must be integers, got {kind}", sample_id=sample_id, rank=rank)
        if tensor.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            tensor = tensor.to(torch.int64)  # torch's uint16/32/64 lack reductions and numpy interop on old builds
        ids = tensor.cpu().numpy()
    else:
        ids = np.asarray(array)
        if ids.dtype.kind not in "iu":
            raise RouteError(f"expert ids must be integers, got {ids.dtype.name}", sample_id=sample_id, rank=rank)
    if ids.ndim != 3:
        raise RouteError(
            f"expert ids must be 3-D [rows, num_layers, topk], got shape {tuple(ids.shape)}",
            sample_id=sample_id,
            rank=rank,
        )
    compact_index_dtype(num_experts)  # a clear ValueError for an unusable expert count, before any data check
    _check_ids_in_range(ids, num_experts, sample_id, rank)
    return Routes(_narrow(ids, num_experts), num_experts=num_experts, start_row=start_row, source=source)


@dataclass(frozen=True, eq=False)
class RouteCheck:
    """Result of validate_routes: which rows are unusable, and why (first reason per kind)."""

    bad_rows: torch.Tensor  # bool [rows]
    reasons: tuple[str, ...]  # human-readable, e.g. "row 5 layer 3: duplicate expert id 7"

    @property
    def ok(self) -> bool:
        return not bool(self.bad_rows.any())

    @property
    def num_bad_rows(self) -> int:
        return int(self.bad_rows.sum())


def _first_hit(mask: torch.Tensor) -> tuple[int, int]:
    """(row, column) of the first True of a 2-D mask in row-major order."""
    return tuple(torch.nonzero(mask)[0].tolist())


def validate_routes(
    routes: Routes,
    *,
    num_tokens: int,
    moe_layers: Sequence[bool],
    topk: int,
    sample_id,
    rank: int | None = None,
    allow_row_fallback: bool = False,
) -> RouteCheck:
    """Check ``routes`` against the sample and the model before they are aligned and replayed.

    ``num_tokens`` is T, the length of the sample's token sequence (prompt + response). Structural mismatches
    (row count, layer count, topk, non-zero dense layers) always raise: they mean the routes belong to another
    sample or model, so no row can be trusted. Per-row defects on MoE layers (duplicate or out-of-range ids) raise
    unless ``allow_row_fallback``; then the offending rows are returned in :class:`RouteCheck` so the caller routes
    those tokens natively and counts them. Duplicates matter twice: the replay would be wrong, and Megatron's
    all-to-all dispatcher expects exactly T*K distinct routed rows and crashes on them.
    """

    def fail(message: str):
        raise RouteError(message, sample_id=sample_id, rank=rank)

    if num_tokens < 1:
        fail(f"num_tokens must be >= 1, got {num_tokens}")
    fed = num_tokens - 1  # every position except the last sampled token goes through the model
    if routes.start_row > fed:
        fail(f"start_row {routes.start_row} is beyond the T-1 = {fed} tokens fed")
    if routes.end_row != fed:
        fail(
            f"expected {fed - routes.start_row} rows (T-1 = {fed} tokens fed, start_row {routes.start_row}), "
            f"got {routes.num_rows}"
        )
    moe = torch.as_tensor(list(moe_layers), dtype=torch.bool)
    if routes.num_layers != moe.numel():
        fail(f"expected {moe.numel()} decoder layers (len(moe_layers)), got {routes.num_layers}")
    if routes.topk != topk:
        fail(f"expected topk {topk}, got {routes.topk}")

    ids = routes.expert_ids
    # Dense layers: SGLang zero-fills them. Anything else means the engine's dense/MoE layer map differs from ours,
    # so ids would be replayed into the wrong layers: never a per-row fallback.
    dense_ids = ids[:, ~moe, :]
    dense_nonzero = (dense_ids != 0).any(dim=2)  # [rows, num_dense]
    if bool(dense_nonzero.any()):
        row, col = _first_hit(dense_nonzero.t().contiguous())[::-1]  # first offending layer, then its first row
        layer = int(torch.nonzero(~moe).flatten()[col])
        value = int(dense_ids[row, col][dense_ids[row, col] != 0][0])
        fail(
            f"layer {layer} is a dense layer but holds non-zero expert id {value} at row {row}; "
            "the engine's MoE layer map disagrees with moe_layers"
        )

    moe_index = torch.nonzero(moe).flatten()
    moe_ids = ids[:, moe, :]  # [rows, num_moe, K]
    num_experts = routes.num_experts
    out_of_range = torch.zeros(moe_ids.shape[:2], dtype=torch.bool)
    if moe_ids.numel() and (int(moe_ids.min()) < 0 or int(moe_ids.max()) >= num_experts):
        wide = moe_ids.to(torch.int32)  # int32 so that comparing with num_experts cannot wrap
        out_of_range = ((wide < 0) | (wide >= num_experts)).any(dim=2)  # [rows, num_moe]
    # Duplicates: compare every pair of top-k slots at once over all rows and layers. K is small (K(K-1)/2 passes),
    # and this is ~4x faster on CPU than sorting along K and comparing neighbours.
    duplicate = torch.zeros(moe_ids.shape[:2], dtype=torch.bool)
    for i in range(topk):
        for j in range(i + 1, topk):
            duplicate |= moe_ids[:, :, i] == moe_ids[:, :, j]
    reasons = []
    if bool(out_of_range.any()):
        row, col = _first_hit(out_of_range)
        cell = moe_ids[row, col].to(torch.int32)
        value = int(cell[(cell < 0) | (cell >= num_experts)][0])
        reasons.append(f"row {row} layer {int(moe_index[col])}: expert id {value} out of range [0, {num_experts})")
    if bool(duplicate.any()):
        row, col = _first_hit(duplicate)
        cell = moe_ids[row, col].to(torch.int32).sort().values
        value = int(cell[1:][cell[1:] == cell[:-1]][0])
        reasons.append(f"row {row} layer {int(moe_index[col])}: duplicate expert id {value}")
    bad_rows = (out_of_range | duplicate).any(dim=1)
    if reasons and not allow_row_fallback:
        fail(f"{'; '.join(reasons)} ({int(bad_rows.sum())} of {routes.num_rows} rows bad)")
    return RouteCheck(bad_rows=bad_rows, reasons=tuple(reasons))

