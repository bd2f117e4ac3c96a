"""Strict collective devices on gloo ranks: every collective megatron_r3 issues must get a tensor on the device the
group's backend needs on GPUs, although on this CPU machine gloo would take any tensor.

    MEGATRON_R3_STRICT_COLLECTIVE_DEVICES=1 OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 \
        tests/distributed/strict_devices.py --root DIR --out results.json

The rule on GPUs: megatron's model groups (and the world) are NCCL and take only tensors on this rank's GPU; the
host group (`platform.distributed.host_group()`) is gloo and takes host tensors. The bug class this catches: our code
made a tensor on the host (a factory call without a device, `torch.as_tensor(0.0)`, `.cpu()`) and reduced it over a
model group (grpo/mismatch.py under PP >= 2: "No backend type associated with device type cpu" at step 0 on GPUs).

Why a tracker, and why this one. On the CPU every tensor reports `device(type='cpu')`, so the collective cannot look
at `tensor.device`. What does differ is the *request*: GPU code asks for the GPU (`device=device()`, megatron's
`torch.cuda.current_device()` and `device="cuda"`), host code asks for nothing (the default device is the CPU on GPU
runs too) or for `"cpu"`. In strict mode the product hands out `cpu:0` for the GPU (platform/collectives.py), and
`ShadowDevices`, a torch function mode installed here only (tests may instrument torch; product code and megatron
are not patched), follows each tensor from its request through every op as CUDA would place it:
- a factory or `.to()` with a device: that device (`cpu:0`, `cuda`, an int -> model; `cpu` -> host);
- `.cpu()` -> host; an op on tensors -> host only if every tensor input is host (an op with a GPU input runs on the
  GPU), a factory without a device -> host;
- an in-place op keeps its tensor's place; a `.to()` that changes the place returns a copy (as a device move does).
Tensors the mode never sees (made inside autograd's C++ backward) count as model tensors: the mode can miss a wrong
tensor there, never invent one. The checker then compares the tensor's place with the group's:
`collective_device(group)` (host for the host group, model for every other group, as NCCL on GPUs).

`tensor.device` itself reports the tracked place (`cpu:0` for a model tensor, `cpu` for a host one), so code that
allocates with `device=x.device`, as GPU code does, follows x. A wrong device ends the rank at once with the message
(exit code 17), so a launch fails promptly instead of leaving the other ranks waiting in the collective.

`--plant` re-introduces the old grpo/mismatch.py device choice (`_pick_device_before_the_fix`, verbatim: the device of
the first tensor among the sums, which on a pipeline stage without loss are host zeros) for the metric all-reduce over
the default (NCCL on GPUs) group, records the error strict mode raises, and that plain gloo (no check) accepts the
very same call. All ranks make that call, so all raise and none waits.

`--plant-old-pick-device` (one-off, not in CI: the launch must fail, so it cannot share the CI launch) puts the same
old code into whole PP2 CLI runs. Run on 2026-12-01 (4 CPU ranks, `--layouts --cli pp2_R3 --plant-old-pick-device`):
torchrun rc 1 after 18 s; ranks 0 and 1 (the first pipeline stage) exited 17 with "strict collective devices:
all_reduce over a model group (NCCL on GPUs) got a (25,) torch.float64 tensor that would be on the host device on
GPUs (NCCL refuses host tensors: ...)" raised from trainer.train_step, the other ranks were ended by torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

HOST, MODEL = "host", "model"
_TO_FUNCS = (torch.Tensor.to,)
_DEVICE_PROPERTY = torch.Tensor.device  # the getset descriptor; the mode sees its bound `__get__`
_MODEL_DEVICE = torch.device("cpu", 0)


def _place_of_device(device) -> str | None:
    """HOST or MODEL for a device request (None for `meta`, which holds no data)."""
    if device is None:
        return None
    if isinstance(device, int):
        return MODEL  # a CUDA device index
    device = torch.device(device)
    if device.type == "meta":
        return None
    if device.type == "cpu":
        return HOST if device.index is None else MODEL  # strict mode's model device is cpu:0
    return MODEL


def _tensors(value, out: list) -> list:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _tensors(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _tensors(item, out)
    return out


class ShadowDevices(TorchFunctionMode):
    """Where each tensor would live on a GPU run (see the module docstring). Only host tensors are recorded."""

    def __init__(self):
        super().__init__()
        self._host = WeakIdKeyDictionary()
        self.checked = {HOST: 0, MODEL: 0}  # collectives checked per group kind (a check that never ran proves nothing)
        self.fatal = True  # a wrong device ends the process at once (other ranks would wait for it in a collective)

    def place(self, tensor: torch.Tensor) -> str:
        return HOST if tensor in self._host else MODEL

    def _requested(self, func, args, kwargs) -> str | None:
        if "device" in kwargs and kwargs["device"] is not None:
            return _place_of_device(kwargs["device"])
        if func is torch.Tensor.cpu:
            return HOST
        if func in _TO_FUNCS and len(args) > 1:
            target = args[1]
            if isinstance(target, torch.Tensor):
                return self.place(target)
            if isinstance(target, (str, torch.device, int)) and not isinstance(target, bool):
                return _place_of_device(target)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__self__", None) is _DEVICE_PROPERTY:
            # `tensor.device` names the tensor's place, as on GPUs, so `device=x.device` requests follow x
            return _MODEL_DEVICE if out.type == "cpu" and self.place(args[0]) == MODEL else out
        outputs = _tensors(out, [])
        if not outputs:
            return out
        inputs = _tensors(args, _tensors(kwargs, []))
        moves = func is torch.Tensor.cpu or func in _TO_FUNCS
        place = self._requested(func, args, kwargs)
        if place is None:
            place = HOST if all(self.place(t) == HOST for t in inputs) else MODEL
        same = {id(t) for t in inputs}
        if moves and isinstance(out, torch.Tensor) and id(out) in same and self.place(out) != place:
            out = out.clone()  # a device move makes a new tensor; on one CPU `.to()` may return the input itself
            outputs = [out]
        for tensor in outputs:
            if id(tensor) in same and not moves:
                continue  # in place (or a returned input): the tensor stays where it is
            if place == HOST:
                self._host[tensor] = True
            elif tensor in self._host:
                del self._host[tensor]
        return out

    def check(self, tensor: torch.Tensor, group, name: str) -> None:
        """The collective-device rule: raise if `tensor` would not be on the device `group`'s backend needs."""
        from megatron_r3.platform.distributed import collective_device

        want = _place_of_device(collective_device(group))
        have = self.place(tensor)
        self.checked[want] += 1
        if have != want:
            where = "the host (gloo) group" if want == HOST else "a model group (NCCL on GPUs)"
            message = (
                f"strict collective devices: {name} over {where} got a {tuple(tensor.shape)} {tensor.dtype} tensor "
                f"that would be on the {have} device on GPUs (NCCL refuses host tensors: 'No backend type associated "
                f"with device type cpu'); create it on, or move it to, platform.distributed.collective_device(group)")
            if self.fatal:
                print(f"{message}\n{''.join(traceback.format_stack(limit=12))}", file=sys.stderr, flush=True)
                os._exit(17)
            raise RuntimeError(message)


def install() -> ShadowDevices:
    """Turn the strict mode on in this process (before megatron_r3 initialises torch.distributed)."""
    from megatron_r3.platform import collectives

    os.environ[collectives.STRICT_ENV] = "1"
    shadow = ShadowDevices()
    shadow.__enter__()  # for the life of the process, like cpu_support's own mode
    collectives.install_device_check(shadow.check)
    return shadow


CLI_BASE = [
    "--config", "configs/demo_tiny.yaml", "--grpo-prompts-per-step", "8", "--grpo-group-size", "4",
    "--global-batch-size", "16", "--micro-batch-size", "4", "--max-new-tokens", "2", "--no-progress",
    "--train-iters", "1", "--save-interval", "1000", "--pipeline-model-parallel-size", "2",
]
CLI_RUNS = {"pp2_R3": ["--router-replay", "R3"], "pp2_R2": ["--router-replay", "R2"]}
REPLAY_LAYOUTS = ("pp2", "pp2vp2", "tp2sp", "pp2ep2", "cp2")  # each has a model group of 2 for the R2 gather


def _run(fn) -> tuple:
    start = time.time()
    try:
        return fn(), None, round(time.time() - start, 2)
    except Exception as exc:  # record, go on with the next case
        return None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}", round(time.time() - start, 2)


def _cli(root: str, name: str, flags: list[str]) -> int:
    import torch.distributed as dist

    from megatron_r3.train.arguments import parse_grpo_args
    from megatron_r3.train.trainer import GRPOTrainer

    run_dir = os.path.join(root, name)
    GRPOTrainer(parse_grpo_args([*CLI_BASE, *flags, "--run-dir", run_dir])).train()
    dist.barrier()
    path = os.path.join(run_dir, "metrics.jsonl")
    return sum(1 for line in open(path) if line.strip()) if os.path.exists(path) else -1


def _pick_device_before_the_fix(self, group) -> torch.device:
    """grpo/mismatch.py's `_pick_device` as it was when PP2 crashed on NCCL (commit a6f552a), verbatim."""
    import torch.distributed as dist
    from torch import Tensor

    for v in list(self._totals.values()) + list(self._counts.values()):
        if isinstance(v, Tensor):
            return v.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", nargs="*", default=list(REPLAY_LAYOUTS))
    parser.add_argument("--cli", nargs="*", default=list(CLI_RUNS))
    parser.add_argument("--plant", action="store_true")
    parser.add_argument("--plant-old-pick-device", action="store_true",
                        help="one-off: the pre-fix mismatch.py device choice in every run (the launch must fail)")
    options = parser.parse_args()
    shadow = install()
    if options.plant_old_pick_device:
        from megatron_r3.grpo.mismatch import MetricAccumulator as planted

        planted._pick_device = _pick_device_before_the_fix

    import torch.distributed as dist

    from megatron_r3.grpo.mismatch import MetricAccumulator
    from megatron_r3.platform import collectives
    from megatron_r3.platform.distributed import initialize_model_parallel
    from megatron_r3.platform.parallel_context import ParallelSizes
    from tests.distributed import replay_checks
    from tests.distributed.launch import finish_launch

    initialize_model_parallel(ParallelSizes())
    records = []
    for name in options.layouts:
        before = dict(shadow.checked)
        results, error, seconds = _run(lambda: replay_checks.check_layout(name, "none", with_errors=False))
        records.append(dict(kind="replay", name=name, results=results, error=error, seconds=seconds,
                            checked={k: shadow.checked[k] - before[k] for k in before}))
    for name in options.cli:
        before = dict(shadow.checked)
        steps, error, seconds = _run(lambda: _cli(options.root, name, CLI_RUNS[name]))
        records.append(dict(kind="cli", name=name, steps=steps, error=error, seconds=seconds,
                            checked={k: shadow.checked[k] - before[k] for k in before}))
    if options.plant:
        # every rank makes the same call, so every rank raises (no rank is left waiting in the collective)
        shadow.fatal = False
        MetricAccumulator._pick_device = _pick_device_before_the_fix

        def stage_without_loss() -> bool:
            metrics = MetricAccumulator()
            metrics.add_sums("train/loss", 0.0, 0.0)  # what a non-last pipeline stage declares
            zeros = torch.zeros(1)  # host zeros: such a stage has no log-probabilities
            metrics.add_mismatch(zeros, zeros, zeros)
            metrics.all_reduce(None)  # the trainer's group on GPUs: the default (NCCL) group
            return True

        accepted, error, seconds = _run(stage_without_loss)
        records.append(dict(kind="planted", name="strict", accepted=accepted, error=error, seconds=seconds))
        collectives.install_device_check(lambda tensor, group, name: None)  # plain gloo: no device rule
        accepted, error, seconds = _run(stage_without_loss)
        records.append(dict(kind="planted", name="plain_gloo", accepted=accepted, error=error, seconds=seconds))
    for record in records:
        if dist.get_rank() == 0:
            print(json.dumps({k: v for k, v in record.items() if k != "results"}), flush=True)
    finish_launch(records, options.out)


if __name__ == "__main__":
    main()
