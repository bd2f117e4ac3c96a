"""R2's inverse path: routes recorded by the routers of every rank, back to per-sample global `[n, L_all, K]`.

R2 records the trainer's own routes in the old-logprob pass and replays them in the update passes. The update
may partition samples into microbatches differently (token-budget packing, other microbatch counts), so recorded
routes are first returned to the sample they belong to, in the same format the rollout engines deliver, and then
laid out again like any R3 routes.

Each rank scatters what its routers recorded into a zero `[num_slots, L_all, K]` tensor (its own token slots and
MoE layers); a MAX all-reduce over the tensor×context-parallel group (token slots differ under SP and CP) and the
pipeline group (layers differ) fills in the rest. Ranks that hold the same slot and layer (TP without SP) recorded
identical ids, so MAX is exact. Dense layers stay zero, as in SGLang's format.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from megatron_r3.platform import collectives
from megatron_r3.platform.distributed import collective_device
from megatron_r3.replay.layout import PackedLayout, unpack_per_slot


def scatter_recorded_to_slots(
    recorded: dict[int, torch.Tensor], layout: PackedLayout, token_slots: torch.Tensor, num_layers: int, topk: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Pure part: this rank's recorded ids `{layer_number: [num_tokens, topk]}` into `[num_slots, L_all, K]`."""
    full = torch.zeros(layout.num_slots, num_layers, topk, dtype=dtype, device=token_slots.device)
    for number, ids in recorded.items():
        if not 1 <= number <= num_layers:  # 0 would silently write into the last layer (index -1)
            raise ValueError(f"recorded layer number {number} is outside 1..{num_layers}")
        if ids.shape != (token_slots.shape[0], topk):
            raise ValueError(
                f"layer {number} recorded ids of shape {tuple(ids.shape)} for {token_slots.shape[0]} router tokens"
            )
        full[token_slots, number - 1] = ids.to(dtype)
    return full


def gather_recorded_routes(
    recorded: Sequence[dict[int, torch.Tensor]],
    layouts: Sequence[PackedLayout],
    token_slots: Sequence[torch.Tensor],
    *,
    num_layers: int,
    topk: int,
    dtype: torch.dtype,
    groups: Sequence = (),
) -> list[list[torch.Tensor]]:
    """Per microbatch, per sample: recorded routes `[n_j, L_all, K]` (CPU, compact dtype).

    groups: the process groups to complete the slots/layers over, typically megatron's tensor-and-context-parallel
    group and pipeline-model-parallel group (groups of size 1 are skipped). One all-reduce per group for all
    microbatches together.
    """
    if not (len(recorded) == len(layouts) == len(token_slots)):
        raise ValueError("recorded, layouts and token_slots must have one entry per microbatch")
    # the groups' backend decides where the bytes travel (a rank that recorded nothing must not hand NCCL a CPU tensor)
    live = [group for group in groups if group is not None and dist.get_world_size(group) > 1]
    device = collective_device(live[0]) if live else next(
        (ids.device for per_mb in recorded for ids in per_mb.values()), torch.device("cpu"))
    fulls = [
        scatter_recorded_to_slots(per_mb, layout, slots.to(device), num_layers, topk, dtype)
        for per_mb, layout, slots in zip(recorded, layouts, token_slots)
    ]
    flat = torch.cat([full.reshape(-1) for full in fulls])
    # Reduced as bytes (NCCL has no int16): every slot/layer is either zero ("not mine") on all but one rank or
    # identical on the ranks that hold it, so a byte-wise MAX reproduces the value exactly.
    as_bytes = flat.view(torch.uint8)
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            collectives.all_reduce(as_bytes, op=dist.ReduceOp.MAX, group=group)
    flat = flat.cpu()
    out, start = [], 0
    for full, layout in zip(fulls, layouts):
        size = full.numel()
        out.append(unpack_per_slot(flat[start : start + size].view(full.shape), layout))
        start += size
    return out
