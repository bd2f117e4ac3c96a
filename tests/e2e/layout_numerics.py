"""One-off measurement behind test_grpo_cli.py's layout tolerance (not run in CI): how far one process and
TP2+PP2(SP) drift apart in one GRPO step under SGD and under Adam.

    OMP_NUM_THREADS=1 .venv/bin/python tests/e2e/layout_numerics.py --out /tmp/layout_numerics

Five CLI runs of step 0 (R3, all 32 samples in one mini-batch, so one optimizer step; checkpoint after it): one
process and TP2+PP2(SP) with SGD lr 1 (no momentum, no weight decay: W1 = W0 - g, so the layouts' gradient
difference is read back as their weights' difference, up to fp32 weight rounding), one process with SGD lr 0.5 (the
gradient itself is 2 (W_0.5 - W_1); lr 0 is refused), one process and TP2+PP2(SP) with the demo's Adam. The
rollout of step 0 runs on the initial weights in every run, so the rollout engine's dtype plays no part. The dist
checkpoints are read back layout-independently (torch.distributed.checkpoint's global tensors). Printed: gradient
difference between the layouts, Adam update difference, the gradient size of the elements Adam moves apart, and how
many weights a bf16 rollout engine would receive as another bf16 value (the cast is a step function: an fp32
difference of 1e-7 becomes one bf16 step where a weight sits at a rounding boundary).

Recorded 2026-12-01 (2-core AMD EPYC, megatron-core 0.19.2, torch 2.13 CPU):
    nonzero grads 165880 of 231616; |g| median 2.21e-04, max 7.28e-02
    SGD: gradient (= update) difference between layouts: max 1.19e-07
    Adam: update difference max 2.03e-05 = 0.0068 lr; 10 elements differ by > 0.001 lr, their |g| median 2.98e-08
    sgd: weights whose bf16 cast differs between layouts: 6 of 231616
    adam: weights whose bf16 cast differs between layouts: 1 of 231616
(nonzero grads read back through lr 0.5: an element whose 0.5 g vanishes in fp32 next to its weight counts as 0.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ["--config", "configs/demo_tiny.yaml", "--grpo-prompts-per-step", "8", "--grpo-group-size", "4",
        "--global-batch-size", "32", "--micro-batch-size", "4", "--max-new-tokens", "2", "--no-progress",
        "--router-replay", "R3", "--train-iters", "1", "--save-interval", "1"]
TP2PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"]
SGD = ["--optimizer", "sgd", "--lr", "1.0", "--sgd-momentum", "0.0"]
RUNS = {  # name: (ranks, extra flags)
    "sgd_half": (1, ["--optimizer", "sgd", "--lr", "0.5", "--sgd-momentum", "0.0"]),
    "sgd_1": (1, SGD),
    "sgd_tp": (4, SGD + TP2PP2),
    "adam_1": (1, []),
    "adam_tp": (4, TP2PP2),
}


def launch(out: str, name: str, nproc: int, extra: list[str]) -> None:
    sys.path.insert(0, REPO)
    from tests.distributed.launch import free_port, subprocess_env

    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    cmd = launcher + ["pretrain_grpo.py", *BASE, "--run-dir", os.path.join(out, name), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(PYTHONPATH=REPO), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def weights(out: str, name: str):
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = os.path.join(out, f"{name}.pt")
    dcp_to_torch_save(os.path.join(out, name, "checkpoints", "step_0000001"), path)
    state = torch.load(path, weights_only=False)
    return {k: v for k, v in state.items()
            if torch.is_tensor(v) and not k.startswith("optimizer") and "_extra_state" not in k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lr", type=float, default=3e-3, help="the Adam runs' learning rate (demo_tiny.yaml)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, (nproc, extra) in RUNS.items():
        if not os.path.exists(os.path.join(args.out, name, "checkpoints", "step_0000001")):
            launch(args.out, name, nproc, extra)
    import torch

    w = {name: weights(args.out, name) for name in RUNS}
    keys = sorted(w["sgd_1"])

    def flat(fn):
        return torch.cat([fn(k).flatten() for k in keys]).double()

    g1 = 2 * flat(lambda k: w["sgd_half"][k] - w["sgd_1"][k])  # W0 - 0.5 g - (W0 - g)
    dg = flat(lambda k: w["sgd_tp"][k] - w["sgd_1"][k])  # (W0 - g_tp) - (W0 - g_1)
    du = flat(lambda k: w["adam_1"][k] - w["adam_tp"][k]).abs()
    nz = g1 != 0
    print(f"nonzero grads {int(nz.sum())} of {g1.numel()}; |g| median {g1[nz].abs().median():.2e}, "
          f"max {g1.abs().max():.2e}")
    print(f"SGD: gradient (= update) difference between layouts: max {dg.abs().max():.2e}")
    sel = du > 1e-3 * args.lr
    line = (f"Adam: update difference max {du.max():.2e} = {du.max() / args.lr:.4f} lr; {int(sel.sum())} elements "
            f"differ by > 0.001 lr")
    if sel.any():
        line += f", their |g| median {g1[sel].abs().median():.2e}"
    print(line)
    for kind in ("sgd", "adam"):  # what a bf16 rollout engine would be synced with after this step
        a, b = (flat(lambda k, n=n: w[n][k].bfloat16().float()) for n in (f"{kind}_1", f"{kind}_tp"))
        print(f"{kind}: weights whose bf16 cast differs between layouts: {int((a != b).sum())} of {a.numel()}")


if __name__ == "__main__":
    main()
