"""RolloutEngine.sync_weights is collective (engine_sync_checks.py, one launch of 2 gloo ranks): every rank walks the
export, rank 0 alone loads it, and a refusal on rank 0 raises the same error on both ranks instead of a hang."""

import pytest

from tests.distributed.launch import run_torchrun

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def records():
    records = run_torchrun("tests/distributed/engine_sync_checks.py", nproc=2, timeout=300)
    return {(r["case"], r["rank"]): r for r in records}


def test_every_rank_walks_the_weights_and_rank0_loads_them(records):
    for rank in (0, 1):
        assert records[("ok", rank)]["walked"] == records[("ok", rank)]["expected"] > 10
    ok = records[("ok", 0)]
    assert ok["version"] == 1  # one update_weights call on rank 0's engine
    assert ok["synced"] == ok["reference"]  # fp32 both: the synced engine holds exactly the policy's weights


def test_a_refusal_on_rank0_raises_the_same_error_on_every_rank(records):
    planted = [records[("planted", rank)] for rank in (0, 1)]
    for record in planted:
        assert record["walked"] == record["expected"]  # nobody left waiting in a gather
        assert record["error"] is not None
    assert planted[0]["error"] == planted[1]["error"]
    assert planted[0]["error"] == ("weight sync to the HFRolloutEngine failed on 1 of 2 ranks: [rank 0] MappingError: "
                                   "update_weights: unknown weight name 'model.layers.0.bogus.weight' (not a "
                                   "parameter of this model)")
