"""The one collective "agree on an error across ranks" helper (`platform/collectives.py`): every rank raises alike,
with the failing ranks' messages, or none does. Two real gloo ranks (mp.spawn, no torchrun) plus the no-group path."""

from __future__ import annotations

import os
import socket

import pytest

from megatron_r3.platform.collectives import RankFailure, RanksFailedError, agree_on_failures, raise_if_any_rank_failed


class ShardError(ValueError):
    pass


def test_without_a_process_group_the_local_outcome_is_the_outcome():
    assert agree_on_failures([], None) == []
    assert agree_on_failures(["a", "b"], None, detail=7) == [RankFailure(0, "a", 7), RankFailure(0, "b", 7)]
    raise_if_any_rank_failed(None, None, what="loading")
    local = ShardError("shard 3 is truncated")
    with pytest.raises(RanksFailedError) as caught:
        raise_if_any_rank_failed(local, None, what="loading")
    assert str(caught.value) == "loading failed on 1 of 1 ranks: [rank 0] ShardError: shard 3 is truncated"
    assert caught.value.__cause__ is local and caught.value.failures == [
        RankFailure(0, "ShardError: shard 3 is truncated")]
    with pytest.raises(KeyError, match="^'sync failed on 1 of 1 ranks: \\[rank 0\\] no server'$"):
        raise_if_any_rank_failed("no server", None, what="sync", error_type=KeyError)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    lines = []
    try:
        world = dist.group.WORLD
        lines.append(repr(agree_on_failures([], world)))  # all well
        lines.append(repr(agree_on_failures(["bad shard"] if rank == 1 else [], world, detail=f"s{rank}")))
        for error in (ShardError("truncated") if rank == 1 else None,  # one rank fails
                      ShardError(f"bad {rank}")):  # both fail
            try:
                raise_if_any_rank_failed(error, world, what="checkpoint load")
                lines.append("no error")
            except RanksFailedError as raised:
                lines.append(f"{type(raised.__cause__).__name__}|{raised}|{len(raised.failures)}")
        # a sub-group: global ranks, not group ranks, name the failure
        pair = dist.new_group([1])
        if rank == 1:
            lines.append(repr(agree_on_failures(["alone"], pair)))
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(lines))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_raise_alike(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        lines = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert lines[0] == "[]"
        assert lines[1] == "[RankFailure(rank=1, message='bad shard', detail='s1')]"
        cause_one = "ShardError" if rank == 1 else "NoneType"  # chained from the local exception only
        assert lines[2] == f"{cause_one}|checkpoint load failed on 1 of 2 ranks: [rank 1] ShardError: truncated|1"
        assert lines[3] == ("ShardError|checkpoint load failed on 2 of 2 ranks: [rank 0] ShardError: bad 0 | "
                            "[rank 1] ShardError: bad 1|2")
        assert lines[4:] == (["[RankFailure(rank=1, message='alone', detail=None)]"] if rank == 1 else [])
