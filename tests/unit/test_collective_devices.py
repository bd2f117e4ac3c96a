"""Collectives take tensors on the device their group's backend needs, decided by the group, never by the data.

On GPUs megatron's model groups are NCCL, which refuses CPU tensors ("No backend type associated with device type
cpu"): a pipeline stage that computes no loss held only CPU zeros in its metric sums, and the step's metric
all-reduce crashed at PP >= 2. On CPU every group is gloo, so these tests stand in a group whose collective device is
`meta` (a device no data of this process lives on) and record the device each collective was handed.
"""

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
