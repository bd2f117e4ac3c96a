"""Strict collective devices (see strict_devices.py): replay checks and PP2 CLI runs on 4 gloo ranks, in one launch,
with every megatron_r3 collective checked against the device its group would need on GPUs (NCCL model groups take
only GPU tensors); and the old grpo/mismatch.py bug, planted, is caught there while plain gloo accepts it."""

import pytest

from tests.distributed.launch import run_torchrun
from tests.distributed.strict_devices import CLI_RUNS, REPLAY_LAYOUTS

PLANTED_MESSAGE = (
    "strict collective devices: all_reduce over a model group (NCCL on GPUs) got a (13,) torch.float64 tensor that "
    "would be on the host device on GPUs (NCCL refuses host tensors: 'No backend type associated with device type "
    "cpu'); create it on, or move it to, platform.distributed.collective_device(group)"
)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("strict"))
    records = run_torchrun("tests/distributed/strict_devices.py", ["--root", root, "--plant"], timeout=900)
    return {(r["kind"], r["name"]): r for r in records}


@pytest.mark.parametrize("layout", REPLAY_LAYOUTS)
def test_replay_checks_pass_with_strict_devices(records, layout):
    record = records[("replay", layout)]
    assert record["error"] is None, record["error"]
    assert record["results"] and all(record["results"].values()), record["results"]
    assert record["checked"]["model"] > 0, record  # the R2 gather reduces over model groups: the check ran


@pytest.mark.parametrize("name", list(CLI_RUNS))
def test_pp2_cli_runs_with_strict_devices(records, name):
    record = records[("cli", name)]
    assert record["error"] is None, record["error"]
    assert record["steps"] == 1
    # the step's metric all-reduce runs over the default (NCCL on GPUs) group, the per-layer replay counters over the
    # host group: both kinds were checked
    assert record["checked"]["model"] > 0 and record["checked"]["host"] > 0, record


def test_planted_host_tensor_on_a_model_group_fails_in_strict_mode_only(records):
    strict, plain = records[("planted", "strict")], records[("planted", "plain_gloo")]
    assert strict["accepted"] is None
    assert strict["error"].splitlines()[0] == f"RuntimeError: {PLANTED_MESSAGE}"
    assert plain == dict(plain, accepted=True, error=None)  # gloo alone takes the host tensor: why the mode exists
