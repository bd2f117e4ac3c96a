"""Router replay on 4 gloo ranks: every non-CP layout x recompute none/full/selective-moe, in one torchrun launch.

See `replay_checks.py` for what each check means.
"""

import pytest

from tests.distributed.launch import run_torchrun
from tests.distributed.layouts import LAYOUTS, RECOMPUTE

CASES = [(layout, recompute) for layout in LAYOUTS for recompute in RECOMPUTE]
CHECKS = ["token_slots", "own_bitwise", "own_calls", "r2_roundtrip", "r2_sensitive", "r3_exact", "r3_gather"]
ERROR_CHECKS = ["errors_missing", "errors_extra", "errors_unconsumed"]


@pytest.fixture(scope="module")
def records():
    records = run_torchrun("tests/distributed/replay_checks.py", timeout=1200)
    return {(r["layout"], r["recompute"]): r for r in records}


@pytest.mark.parametrize("layout,recompute", CASES)
def test_replay_layout(records, layout, recompute):
    record = records[(layout, recompute)]
    assert record["error"] is None, record["error"]
    expected = CHECKS + (ERROR_CHECKS if recompute == "none" else [])
    failed = [check for check in expected if not record["results"].get(check)]
    assert not failed, f"{layout}/{recompute}: failed checks {failed}: {record['results']}"
