"""Collectives take tensors on the device their group's backend needs, decided by the group, never by the data.

On GPUs megatron's model groups are NCCL, which refuses CPU tensors ("No backend type associated with device type
cpu"): a pipeline stage that computes no loss held only CPU zeros in its metric sums, and the step's metric
all-reduce crashed at PP >= 2. On CPU every group is gloo, so these tests stand in a group whose collective device is
`meta` (a device no data of this process lives on) and record the device each collective was handed.
"""

import re
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_r3.grpo import mismatch
from megatron_r3.platform import distributed
from megatron_r3.replay import r2


class Recorder:
    def __init__(self):
        self.devices = []

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        self.devices.append(tensor.device.type)


def _fake_model_group(monkeypatch, module_name_for_device: str, target):
    recorder = Recorder()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", recorder.all_reduce)
    monkeypatch.setattr(distributed, "collective_device", lambda group=None: torch.device("meta"))
    if module_name_for_device:
        monkeypatch.setattr(target, module_name_for_device, lambda group=None: torch.device("meta"))
    return recorder


def test_metric_sums_of_a_stage_without_loss_go_to_the_groups_device(monkeypatch):
    recorder = _fake_model_group(monkeypatch, None, None)
    metrics = mismatch.MetricAccumulator()
    metrics.add_sums("train/loss", 0.0, 0.0)  # what a non-last pipeline stage declares
    zeros = torch.zeros(1)
    metrics.add_mismatch(zeros, zeros, zeros)
    metrics.all_reduce(group=object())
    assert recorder.devices == ["meta"]


def test_r2_gather_of_a_rank_that_recorded_nothing_goes_to_the_groups_device(monkeypatch):
    from megatron_r3.replay.layout import pack_bshd

    recorder = _fake_model_group(monkeypatch, "collective_device", r2)
    layout = pack_bshd([3], pad_multiple=1)
    try:
        r2.gather_recorded_routes([{}], [layout], [torch.arange(3)], num_layers=2, topk=2, dtype=torch.uint8,
                                  groups=[object()])
    except (RuntimeError, NotImplementedError):
        pass  # unpacking meta tensors on the host fails after the collective; the device is what is checked here
    assert recorder.devices == ["meta"]


def test_collective_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device(object()) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(distributed, "device", lambda: torch.device("meta"))
    assert distributed.collective_device(object()) == torch.device("meta")


# --- every collective of the package goes through platform/collectives.py (the strict mode's checked path) ---

COLLECTIVE_CALL = re.compile(
    r"\b(?:dist|torch\.distributed)\.(all_reduce|all_gather|all_gather_into_tensor|reduce_scatter|reduce_scatter_tensor"
    r"|broadcast|send|recv|isend|irecv|batch_isend_irecv|gather|scatter|reduce|all_to_all|all_to_all_single)\("
)
IMPORTED_COLLECTIVE = re.compile(r"from torch\.distributed import [^\n]*\b(all_reduce|broadcast|send|recv|all_gather)\b")
# cpu_support.py replaces megatron's own gather/scatter helpers for gloo: those run megatron's tensors, like
# megatron-core's collectives, which the strict mode leaves to the GPU suite
EXEMPT = {"platform/collectives.py", "platform/cpu_support.py"}


def test_every_tensor_collective_of_the_package_goes_through_the_checked_helper():
    package = Path(__file__).resolve().parents[2] / "megatron_r3"
    bypasses = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if relative in EXEMPT:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if COLLECTIVE_CALL.search(line) or IMPORTED_COLLECTIVE.search(line):
                bypasses.append(f"megatron_r3/{relative}:{number}: {line.strip()}")
    assert not bypasses, "call these through megatron_r3.platform.collectives:\n" + "\n".join(bypasses)


def test_the_audit_sees_a_bypass():
    assert COLLECTIVE_CALL.search("        dist.all_reduce(buf, group=group)")
    assert COLLECTIVE_CALL.search("torch.distributed.broadcast(t, src=0)")
    assert not COLLECTIVE_CALL.search("collectives.all_reduce(buf, group=group)")
    assert not COLLECTIVE_CALL.search("dist.all_gather_object(out, obj, group=g)")  # moves no caller tensor


# --- the strict mode's tracker (tests/distributed/strict_devices.py): where each tensor would live on a GPU run ---


def test_shadow_devices_follow_device_requests_like_cuda():
    from tests.distributed.strict_devices import HOST, MODEL, ShadowDevices

    model = torch.device("cpu", 0)
    with ShadowDevices() as shadow:
        host = torch.zeros(3)  # no device: the default device, the CPU on GPU runs too
        scalar = torch.as_tensor(0.0, dtype=torch.float64)
        weight = torch.ones(3, device=model)
        assert [shadow.place(t) for t in (host, scalar, weight)] == [HOST, HOST, MODEL]
        assert shadow.place(host * 2) == HOST and shadow.place(weight + host) == MODEL
        assert shadow.place(torch.stack([scalar, scalar])) == HOST  # the old metric buffer of a stage without loss
        moved = host.to(model)
        assert shadow.place(moved) == MODEL and shadow.place(host) == HOST  # a move copies, the source stays
        assert weight.device == model and host.device == torch.device("cpu")  # .device names the place
        assert shadow.place(torch.empty(2, device=weight.device)) == MODEL
        assert shadow.place(weight.cpu()) == HOST and shadow.place(weight) == MODEL
        host.add_(weight)
        assert shadow.place(host) == HOST  # in place: the tensor stays where it is
        assert shadow.place(weight.view(torch.uint8)) == MODEL
