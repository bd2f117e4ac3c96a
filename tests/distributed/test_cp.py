"""Context parallelism without TransformerEngine on 4 gloo ranks, in one torchrun launch of `cp_checks.py`.

Per CP layout (CP2, CP2+TP2(SP), CP2+PP2, CP2+EP2, CP4, CP2 with full recompute, CP2+EP2 with the
fast local modules: SDPA attention and grouped-GEMM experts) and batch format (padded BSHD,
packed THD, uneven lengths, GQA): weights are bitwise those of the CP1 reference with the same TP/PP/EP, and the
logits (gathered to global order), loss and DDP-reduced gradients match it within fp32 tolerance. Plus the
bad-length batch / packed document errors (exact messages). See `cp_checks.py` for the details.
"""

import pytest

from tests.distributed.launch import run_torchrun

LAYOUTS = ["cp2", "cp2tp2sp", "cp2pp2", "cp2ep2", "cp4", "cp2_recompute", "cp2ep2_fast", "cp2_mla", "cp2tp2sp_mla"]
FORMATS = ["bshd", "thd"]
CHECKS = ["weights_equal", "logits", "loss", "grads", "pad_multiple"]
TOLERANCE = 2e-5  # fp32; measured differences are ~1e-7 (logits, loss) and ~2e-8 (grads)


@pytest.fixture(scope="module")
def records():
    records = run_torchrun("tests/distributed/cp_checks.py", timeout=600)
    return {(r["layout"], r["format"]): r for r in records}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cp_matches_cp1_reference(records, layout, fmt):
    record = records[(layout, fmt)]
    assert record["error"] is None, record["error"]
    failed = [check for check in CHECKS if not record["results"].get(check)]
    assert not failed, f"{layout}/{fmt}: failed {failed}; max abs differences {record['max_abs_diff']}"
    assert record["max_abs_diff"]["weights"] == 0.0
    for key in ("logits", "loss", "grads"):
        assert record["max_abs_diff"][key] <= TOLERANCE, record["max_abs_diff"]


def test_bad_lengths_are_rejected_with_clear_errors(records):
    record = records[("cp2", "bad_lengths")]
    assert record["error"] is None, record["error"]
    assert record["results"] == {"bad_length_batch": True, "padded_batch_ok": True, "bad_length_thd": True}
