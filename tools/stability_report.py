#!/usr/bin/env python
"""The R3 paper's stability comparison for GRPO runs that differ only in --router-replay: one PNG with the curves
and a Markdown table with a row per run.

    python tools/stability_report.py OUT/off OUT/R2 OUT/R3 --png stability.png --md stability.md

Curves (`tools/plot_metrics.plot_runs`, a line per run): reward, k3 KL, F(2), F(5) (rollout/train extreme-token
fractions, tau = 2 and 5), routing agreement, grad norm, `train/ppo_kl`, entropy.

Table columns, over the steps every run has (runs cut short by a time limit are compared on their common prefix):
- reward step 0: the first rollout's mean reward (the starting policy's; identical across runs that differ only in
  --router-replay); reward best / final: the reward's trailing mean over `--window` steps (one step's batch is
  noisy), its maximum from the first full window on, and at the last step;
- collapse step: the first step whose trailing-mean reward is below `--collapse-frac` of the best trailing mean
  reached before it ("none" if never);
- F(2) mean and max, F(5) mean and max, k3 KL mean and median: `r3/rollout_train_*` per step (F(tau) = fraction of
  response tokens with |logp_train - logp_rollout| > ln tau);
- routing agreement (native trainer top-k = engine's, old-logprob pass) and used-route match (routes the trainer
  actually used = engine's: 1.0 under R3) means; `train/ppo_kl` mean; grad norm mean and max.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))

from megatron_r3.platform.metric_names import (  # noqa: E402
    R3_EXTREME_FRAC_TAU2,
    R3_EXTREME_FRAC_TAU5,
    R3_K3_KL,
    REPLAY_USED_ROUTE_MATCH as USED_ROUTE_MATCH,
    REWARD_MEAN,
    ROUTING_AGREEMENT,
    TRAIN_ENTROPY,
    TRAIN_GRAD_NORM,
    TRAIN_PPO_KL,
)
from megatron_r3.train.metrics_log import STEP  # noqa: E402
from tools.plot_metrics import _fmt, load_runs, plot_runs, run_labels  # noqa: E402

PLOT_KEYS = (REWARD_MEAN, R3_K3_KL, R3_EXTREME_FRAC_TAU2, R3_EXTREME_FRAC_TAU5, ROUTING_AGREEMENT, TRAIN_GRAD_NORM,
             TRAIN_PPO_KL, TRAIN_ENTROPY)
COLUMNS = ("steps", "reward step 0", "reward best", "reward final", "collapse step", "F(2) mean", "F(2) max",
           "F(5) mean", "F(5) max", "k3 KL mean", "k3 KL median", "routing agreement", "used-route match",
           "ppo_kl mean", "grad norm mean", "grad norm max")


def trailing_means(values: list[float], window: int) -> list[float]:
    """Mean of values[max(0, i - window + 1) : i + 1] for every i."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(math.fsum(part) / len(part))
    return out


def collapse_step(steps: list[int], rewards: list[float], window: int, frac: float):
    """First step whose trailing-mean reward is below `frac` x the best trailing mean before it, or None."""
    smooth = trailing_means(rewards, window)
    best = -math.inf
    for i, (step, value) in enumerate(zip(steps, smooth)):
        if i >= window - 1 and best > 0 and value < frac * best:
            return step
        if i >= window - 1:
            best = max(best, value)
    return None


def _values(records: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in records if key in r and math.isfinite(float(r[key]))]


def summarize(records: list[dict], window: int = 5, collapse_frac: float = 0.5) -> dict:
    """The table's numbers for one run (see the module docstring)."""
    rows = [r for r in records if REWARD_MEAN in r]
    steps = [int(r[STEP]) for r in rows]
    rewards = [float(r[REWARD_MEAN]) for r in rows]
    out = {"steps": len(rows)}
    if not rows:
        return out
    smooth = trailing_means(rewards, window)
    first = min(window, len(smooth)) - 1
    out["reward step 0"] = rewards[0]
    out["reward best"] = max(smooth[first:])
    out["reward final"] = smooth[-1]
    out["collapse step"] = collapse_step(steps, rewards, window, collapse_frac)

    def put(name, key, fn):
        values = _values(rows, key)
        out[name] = fn(values) if values else None

    mean = lambda v: math.fsum(v) / len(v)  # noqa: E731
    put("F(2) mean", R3_EXTREME_FRAC_TAU2, mean)
    put("F(2) max", R3_EXTREME_FRAC_TAU2, max)
    put("F(5) mean", R3_EXTREME_FRAC_TAU5, mean)
    put("F(5) max", R3_EXTREME_FRAC_TAU5, max)
    put("k3 KL mean", R3_K3_KL, mean)
    put("k3 KL median", R3_K3_KL, statistics.median)
    put("routing agreement", ROUTING_AGREEMENT, mean)
    put("used-route match", USED_ROUTE_MATCH, mean)
    put("ppo_kl mean", TRAIN_PPO_KL, mean)
    put("grad norm mean", TRAIN_GRAD_NORM, mean)
    put("grad norm max", TRAIN_GRAD_NORM, max)
    return out


def common_prefix(runs: list[list[dict]]) -> list[list[dict]]:
    """Each run cut to the steps every run has logged (runs stopped by a time limit end at different steps)."""
    last = min((max((int(r[STEP]) for r in records), default=-1) for records in runs), default=-1)
    return [[r for r in records if int(r[STEP]) <= last] for records in runs]


def stability_table(run_dirs, window: int = 5, collapse_frac: float = 0.5) -> str:
    """Markdown table, a row per run, over the steps all runs have."""
    runs = common_prefix(load_runs(run_dirs))
    labels = run_labels(run_dirs)
    rows = ["| run | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, records in zip(labels, runs):
        summary = summarize(records, window, collapse_frac)
        cells = []
        for column in COLUMNS:
            value = summary.get(column)
            if column == "steps":
                cells.append(str(value))
            elif column == "collapse step":
                cells.append("none" if value is None else str(value))
            else:
                cells.append(_fmt(value))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_report(run_dirs, png: str, md: str, header: str = "", window: int = 5, collapse_frac: float = 0.5) -> str:
    """The PNG and the Markdown file (header, table, the definitions); returns the table."""
    plot_runs(run_dirs, png, keys=PLOT_KEYS)
    table = stability_table(run_dirs, window, collapse_frac)
    notes = (
        f"Reward best / final: trailing mean over {window} steps (best from the first full window on, last). "
        f"Collapse: first step "
        f"whose trailing mean is below {collapse_frac:g} x the best trailing mean before it. F(tau): fraction of "
        f"response tokens with |logp_train - logp_rollout| > ln tau; k3 KL: mean(exp(d) - 1 - d), d = logp_train - "
        f"logp_rollout, per step (old-logprob pass). All columns over the steps every run has. Figure: "
        f"{os.path.basename(png)}."
    )
    os.makedirs(os.path.dirname(os.path.abspath(md)), exist_ok=True)
    with open(md, "w") as handle:
        handle.write((header.rstrip() + "\n\n" if header else "") + table + "\n\n" + notes + "\n")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--png", required=True)
    parser.add_argument("--md", required=True)
    parser.add_argument("--window", type=int, default=5, help="trailing-mean window of the reward (steps)")
    parser.add_argument("--collapse-frac", type=float, default=0.5)
    args = parser.parse_args(argv)
    try:
        print(write_report(args.run_dirs, args.png, args.md, window=args.window, collapse_frac=args.collapse_frac))
    except (FileNotFoundError, ValueError) as error:
        print(f"stability_report: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
