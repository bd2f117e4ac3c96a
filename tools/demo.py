"""`make demo`: a tiny random Qwen3-MoE learns a synthetic task with GRPO on a CPU, once without router replay and
once with R3, from the same seed (bf16 rollout engine, fp32 trainer), then a PNG and a table compare the runs.

    python tools/demo.py --out runs/demo [--train-iters 100] [--nproc 1]

Each run is `pretrain_grpo.py --config configs/demo_tiny.yaml --router-replay {off,R3}`; everything it writes
(metrics.jsonl, TensorBoard, config.yaml, checkpoints) stays under OUT/<mode>/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

KEYS = [
    "reward/mean",
    "r3/rollout_train_k3_kl",
    "r3/rollout_train_logp_abs_diff",
    "r3/rollout_train_extreme_frac_tau2",
    "replay/routing_agreement",
    "replay/used_route_match",
    "train/ppo_kl",
]


def run(mode: str, out: str, train_iters: int, nproc: int, extra: list[str]) -> float:
    run_dir = os.path.join(out, mode)
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        import shutil

        shutil.rmtree(run_dir)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     f"--nproc-per-node={nproc}"]
    cmd = launcher + ["pretrain_grpo.py", "--config", "configs/demo_tiny.yaml", "--router-replay", mode,
                      "--train-iters", str(train_iters), "--run-dir", run_dir, "--no-progress", *extra]
    print(f"\n=== {mode}: {' '.join(cmd)}", flush=True)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=REPO)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        if " iteration " in line:
            print(line[:220], flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-6000:])
        raise SystemExit(f"the {mode} run failed with exit code {proc.returncode}")
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--train-iters", type=int, default=100)
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run (gloo on CPU)")
    parser.add_argument("--last-n", type=int, default=50, help="steps summarised in the table")
    args, extra = parser.parse_known_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    seconds = {mode: run(mode, out, args.train_iters, args.nproc, extra) for mode in ("off", "R3")}

    from tools.plot_metrics import plot_runs, summary_table

    runs = [os.path.join(out, mode) for mode in ("off", "R3")]
    png = os.path.join(out, "demo.png")
    plot_runs(runs, png, keys=KEYS)
    table = summary_table(runs, KEYS, last_n=args.last_n, with_median=True)
    header = (
        f"megatron_r3 demo, {time.strftime('%Y-%m-%d')}: tiny Qwen3-MoE (4 layers, 8 experts top-2), task "
        f"copy_last, {args.train_iters} GRPO steps per run, bf16 hf rollout engine vs fp32 trainer, "
        f"{args.nproc} rank(s); wall time off {seconds['off']:.0f} s, R3 {seconds['R3']:.0f} s.\n"
    )
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(header + "\n" + table + "\n")
    print("\n" + header + "\n" + table + f"\nplot: {png}\n")


if __name__ == "__main__":
    main()
