#!/usr/bin/env python3
"""`make demo`: a tiny random Qwen3-MoE learns a synthetic task with GRPO on a CPU, once without router replay and
once with R3, from the same seed (bf16 rollout engine, fp32 trainer), then a PNG and tables compare the runs.

    .venv/bin/python tools/demo.py --out runs/demo [--seeds 1234 1 2] [--train-iters 100] [--nproc 1]

Each run is `pretrain_grpo.py --config configs/demo_tiny.yaml --router-replay {off,R3} --seed S`; everything it
writes (metrics.jsonl, TensorBoard, config.yaml, checkpoints) stays under OUT/<mode>/ (one seed) or
OUT/seed<S>/<mode>/ (several), with the run's console output in console.log next to it. One line per step is printed
while a run goes.

The numbers are machine-dependent: CPU kernels and thread counts change the order of fp32 (trainer) and bf16
(rollout engine) reductions, which changes logprobs in their last bits, then which token is sampled or which expert a
near-tie picks, and from there the whole trajectory. Even step 0 differs between machines. One seed is one trajectory:
compare off and R3 over several seeds (`--seeds`); the summary reports each metric's range over the seeds.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO)

MODES = ("off", "R3")
KEYS = [
    "reward/mean",
    "r3/rollout_train_k3_kl",
    "r3/rollout_train_logp_abs_diff",
    "r3/rollout_train_extreme_frac_tau2",
    "replay/routing_agreement",
    "replay/used_route_match",
    "train/ppo_kl",
]
# the per-step progress line: (field of megatron's iteration line, short name, format)
PROGRESS = [
    ("reward/mean", "reward", "{:.3f}"),
    ("r3/rollout_train_k3_kl", "k3", "{:.2e}"),
    ("r3/rollout_train_logp_abs_diff", "|dlogp|", "{:.2e}"),
    ("replay/routing_agreement", "routing agree", "{:.4f}"),
    ("train/ppo_kl", "ppo_kl", "{:.2e}"),
]
_FIELD = re.compile(r"\|\s*([\w/ .()]+?):\s*([-+0-9.eEnaif]+)\s*(?=\|)")
_ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+)")


def parse_iteration_line(line: str):
    """megatron's `iteration i/n | key: value | ...` line -> (i, n, {key: float}); None for any other line."""
    match = _ITERATION.search(line)
    if match is None:
        return None
    fields = {}
    for key, value in _FIELD.findall(line + "|"):
        try:
            fields[key.strip()] = float(value)
        except ValueError:
            pass
    return int(match.group(1)), int(match.group(2)), fields


def progress_line(tag: str, step: int, total: int, fields: dict, per_step: float) -> str:
    """One complete line per step (never cut): the step, the demo's key metrics, seconds per step and the ETA."""
    parts = [f"[{tag}] step {step + 1:>{len(str(total))}}/{total}"]
    for key, short, fmt in PROGRESS:
        if key in fields:
            parts.append(f"{short} {fmt.format(fields[key])}")
    parts.append(f"{per_step:.1f} s/step, ~{per_step * (total - step - 1) / 60:.0f} min left")
    return "  ".join(parts)


def run(mode: str, seed: int, run_dir: str, train_iters: int, nproc: int, extra: list[str], tag: str) -> float:
    """One pretrain_grpo.py run, streamed: a progress line per step on stdout, everything in RUN_DIR/console.log."""
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     f"--nproc-per-node={nproc}"]
    cmd = launcher + ["pretrain_grpo.py", "--config", "configs/demo_tiny.yaml", "--router-replay", mode,
                      "--seed", str(seed), "--train-iters", str(train_iters), "--run-dir", run_dir, "--no-progress",
                      *extra]
    log_path = os.path.join(run_dir, "console.log")
    print(f"\n=== {tag}: {' '.join(cmd)}\n    (console output: {log_path})", flush=True)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    tail: list[str] = []
    first = None  # (step, time) of the first logged step: seconds per step exclude the start-up
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line])[-60:]
            parsed = parse_iteration_line(line)
            if parsed is not None:
                step, total, fields = parsed
                now = time.time()
                if first is None:
                    first = (step, now)
                per_step = (now - first[1]) / (step - first[0]) if step > first[0] else now - start
                print(progress_line(tag, step, total, fields, per_step), flush=True)
        code = proc.wait()
    if code != 0:
        print("".join(tail), end="")
        raise SystemExit(f"the {tag} run failed with exit code {code} (full output: {log_path})")
    return time.time() - start


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.4f}"
    return f"{v:.3e}"


def _span(values: list[float]) -> str:
    """`min – max` over seeds (one value: that value)."""
    lo, hi = min(values), max(values)
    return _fmt(lo) if lo == hi else f"{_fmt(lo)} – {_fmt(hi)}"


def seed_range_table(runs: dict, keys, last_n: int) -> str:
    """Markdown table, a row per metric: per mode, the range over seeds of the first step's value and of the mean and
    median over the last `last_n` steps; then the per-seed ratio off/R3 of the k3 medians."""
    from megatron_r3.train.metrics_log import METRICS_FILE, read_metrics

    stats = {}  # (mode, key) -> {"first": [...], "mean": [...], "median": [...]}
    for (seed, mode), run_dir in runs.items():
        records = read_metrics(os.path.join(run_dir, METRICS_FILE))
        for key in keys:
            values = [float(r[key]) for r in records if key in r]
            if not values:
                continue
            tail = values[-last_n:]
            entry = stats.setdefault((mode, key), {"first": [], "mean": [], "median": []})
            entry["first"].append(values[0])
            entry["mean"].append(math.fsum(tail) / len(tail))
            entry["median"].append(statistics.median(tail))
    header = ["metric"] + [f"{mode} {what}" for mode in MODES for what in
                           ("first", f"last-{last_n} mean", f"last-{last_n} median")]
    rows = [header, ["---"] * len(header)]
    for key in keys:
        row = [f"`{key}`"]
        for mode in MODES:
            entry = stats.get((mode, key))
            row += [_span(entry[w]) for w in ("first", "mean", "median")] if entry else ["—"] * 3
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234],
                        help="one off and one R3 run per seed (default: the config's seed 1234)")
    parser.add_argument("--train-iters", type=int, default=100)
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run (gloo on CPU)")
    parser.add_argument("--last-n", type=int, default=50, help="steps summarised in the tables")
    args, extra = parser.parse_known_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    several = len(args.seeds) > 1
    runs, seconds = {}, {}
    for seed in args.seeds:
        for mode in MODES:
            run_dir = os.path.join(out, f"seed{seed}", mode) if several else os.path.join(out, mode)
            runs[seed, mode] = run_dir
            seconds[seed, mode] = run(mode, seed, run_dir, args.train_iters, args.nproc, extra,
                                      tag=f"{mode} seed {seed}" if several else mode)

    from tools.plot_metrics import plot_runs, summary_table

    png = os.path.join(out, "demo.png")
    labels = [f"{mode} seed {seed}" if several else mode for (seed, mode) in runs]
    plot_runs(list(runs.values()), png, keys=KEYS, labels=labels)
    walls = ", ".join(f"{mode}{f' seed {seed}' if several else ''} {s:.0f} s" for (seed, mode), s in seconds.items())
    header = (
        f"megatron_r3 demo, {time.strftime('%Y-%m-%d')}: tiny Qwen3-MoE (4 layers, 8 experts top-2), task "
        f"copy_last, {args.train_iters} GRPO steps per run, bf16 hf rollout engine vs fp32 trainer, "
        f"{args.nproc} rank(s), seeds {' '.join(map(str, args.seeds))}, {os.cpu_count()} CPU core(s).\n"
        f"Wall time: {walls}.\n"
        "The numbers depend on the machine (CPU kernels and threads change fp32/bf16 reduction order, hence sampled "
        "tokens and near-tie routes): compare ranges over seeds, not single values.\n"
    )
    sections = []
    if several:
        sections.append(f"Range over seeds {', '.join(map(str, args.seeds))} (min – max):\n\n"
                        + seed_range_table(runs, KEYS, args.last_n))
    for seed in args.seeds:
        sections.append(f"Seed {seed}:\n\n" + summary_table([runs[seed, m] for m in MODES], KEYS,
                                                            last_n=args.last_n, with_median=True))
    text = header + "\n" + "\n\n".join(sections) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(text)
    print("\n" + text + f"\nplot: {png}\nsummary: {os.path.join(out, 'summary.md')}\n")


if __name__ == "__main__":
    main()
