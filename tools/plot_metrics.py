#!/usr/bin/env python3
"""Compare runs: one PNG with a subplot per metric and a line per run, and a Markdown summary table.

    .venv/bin/python tools/plot_metrics.py runs/demo/off runs/demo/R3 [--out PNG] [--keys k1 k2:log ...] [--table]

Each RUN_DIR holds a `metrics.jsonl` (see `megatron_r3.train.metrics_log`). A run is labelled by the `router_replay`
value of its `config.yaml` when there is one (falling back to the directory name, and adding the directory name when
two runs would get the same label). A key a run lacks is skipped with a note on stderr. `--keys` takes metric names,
optionally with a scale suffix: `:log` (values at or below the floor are drawn at the floor), `:symlog` or `:linear`.
The default output is `RUN_DIR0/metrics.png`.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))

from megatron_r3.platform.metric_names import (  # noqa: E402
    R3_EXTREME_FRAC_TAU2,
    R3_K3_KL,
    REWARD_MEAN,
    ROUTING_AGREEMENT,
    TRAIN_GRAD_NORM,
    TRAIN_PPO_KL,
)
from megatron_r3.train.metrics_log import METRICS_FILE, STEP, read_metrics  # noqa: E402

DEFAULT_KEYS = (REWARD_MEAN, R3_K3_KL, R3_EXTREME_FRAC_TAU2, ROUTING_AGREEMENT, TRAIN_PPO_KL, TRAIN_GRAD_NORM)
# Default y scale per key: ("log", floor) draws values <= floor at the floor (R3 can make these exactly 0);
# ("symlog", linthresh) for signed estimates: linear within +-linthresh, so the sign and the size of the typical values
# stay readable next to a large first step. Fractions that are often exactly 0 (the extreme-token fractions) are linear:
# a log axis would draw 0 as its floor.
SCALES = {
    R3_K3_KL: ("log", 1e-10),
    R3_EXTREME_FRAC_TAU2: ("linear", None),
    "r3/rollout_train_extreme_frac_tau5": ("linear", None),
    "r3/rollout_train_logp_abs_diff": ("log", 1e-10),
    "r3/rollout_train_logp_sq_diff": ("log", 1e-12),
    TRAIN_PPO_KL: ("symlog", 1e-3),
}
# y-axis label per key (what the number is); other keys are labelled with their own name.
YLABELS = {
    REWARD_MEAN: "mean reward",
    R3_K3_KL: "k3 KL(rollout || train), nats/token",
    R3_EXTREME_FRAC_TAU2: "fraction of tokens",
    "r3/rollout_train_extreme_frac_tau5": "fraction of tokens",
    "r3/rollout_train_logp_abs_diff": "mean |logp_train - logp_rollout|",
    "r3/rollout_train_logp_sq_diff": "mean (logp_train - logp_rollout)^2",
    ROUTING_AGREEMENT: "fraction of tokens",
    "replay/used_route_match": "fraction of tokens",
    TRAIN_PPO_KL: "KL(old || new), nats/token",
    TRAIN_GRAD_NORM: "L2 norm",
}
_DEFAULT_FLOOR = {"log": 1e-12, "symlog": 1e-8, "linear": None}


def _note(msg: str) -> None:
    print(f"plot_metrics: note: {msg}", file=sys.stderr)


def _find_router_replay(cfg, depth: int = 0):
    if not isinstance(cfg, dict):
        return None
    for name in ("router_replay", "router-replay"):
        if name in cfg and cfg[name] is not None:
            value = cfg[name]
            if isinstance(value, bool):  # YAML 1.1 reads a bare `off` as False
                return "on" if value else "off"
            return str(value)
    if depth < 2:
        for value in cfg.values():
            found = _find_router_replay(value, depth + 1)
            if found is not None:
                return found
    return None


def run_label(run_dir) -> str:
    """`router_replay` from RUN_DIR/config.yaml if present, else the directory name."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        try:
            import yaml

            found = _find_router_replay(yaml.safe_load(cfg_path.read_text(encoding="utf-8")))
            if found is not None:
                return found
        except Exception as e:  # a broken config must not stop the plot
            _note(f"could not read {cfg_path}: {e}")
    return run_dir.resolve().name


def run_labels(run_dirs) -> list[str]:
    labels = [run_label(d) for d in run_dirs]
    names = [Path(d).resolve().name for d in run_dirs]
    return [f"{lab} ({name})" if labels.count(lab) > 1 and lab != name else lab for lab, name in zip(labels, names)]


def load_runs(run_dirs) -> list[list[dict]]:
    runs = []
    for d in run_dirs:
        path = Path(d) / METRICS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no {METRICS_FILE} (is this a run directory?)")
        runs.append(read_metrics(path))
    return runs


def _series(records, key):
    steps, values = [], []
    for r in records:
        if key in r:
            steps.append(r[STEP])
            values.append(float(r[key]))
    return steps, values


def _parse_key(spec: str):
    """`key` or `key:scale` -> (key, (scale, floor or linthresh))."""
    key, sep, scale = spec.rpartition(":")
    if not sep or scale not in _DEFAULT_FLOOR:
        return spec, SCALES.get(spec, ("linear", None))
    default = SCALES.get(key)
    return key, (scale, default[1] if default and default[0] == scale else _DEFAULT_FLOOR[scale])


def build_figure(run_dirs, keys=DEFAULT_KEYS, labels=None):
    """The comparison figure: a subplot per metric (y scale from SCALES or the key's suffix, y label from YLABELS), a
    line per run (`labels`: one legend entry per run, default `run_labels`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(run_dirs)
    labels = list(labels) if labels is not None else run_labels(run_dirs)
    specs = [_parse_key(k) for k in keys]
    ncols = min(3, len(specs))
    nrows = math.ceil(len(specs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (key, (scale, param)) in zip(axes.flat, specs):
        drawn = 0
        for records, label in zip(runs, labels):
            steps, values = _series(records, key)
            if not steps:
                _note(f"run {label!r} has no {key!r}; skipped in that plot")
                continue
            values = [v if math.isfinite(v) else math.nan for v in values]
            if scale == "log":
                values = [max(v, param) if not math.isnan(v) else v for v in values]
            ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=label)
            drawn += 1
        title = key
        if scale == "log":
            ax.set_yscale("log")
            title += f"  (log, floor {param:g})"
        elif scale == "symlog":
            ax.set_yscale("symlog", linthresh=param)
            title += f"  (symlog, linear within ±{param:g})"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(YLABELS.get(key, key), fontsize=9)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(specs):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def plot_runs(run_dirs, out, keys=DEFAULT_KEYS, labels=None) -> Path:
    """Write the comparison PNG to `out` and return its path."""
    import matplotlib.pyplot as plt

    fig = build_figure(run_dirs, keys, labels)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(v) -> str:
    if v is None:
        return "—"
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.4f}"
    return f"{v:.3e}"


def summary_table(run_dirs, keys=DEFAULT_KEYS, last_n: int = 10, with_median: bool = False) -> str:
    """Markdown table, a row per metric: per run, the value at its first logged step and the mean over its last
    `last_n` logged steps that have the metric ("—" where the run lacks it); `with_median` adds the median over the
    same steps (per-step mismatch metrics are spiky: a few steps dominate the mean)."""
    runs = load_runs(run_dirs)
    labels = run_labels(run_dirs)
    keys = [_parse_key(k)[0] for k in keys]
    header = ["metric"]
    for label in labels:
        header += [f"{label} first", f"{label} last-{last_n} mean"]
        if with_median:
            header.append(f"{label} last-{last_n} median")
    rows = [header, ["---"] * len(header)]
    for key in keys:
        row = [f"`{key}`"]
        for records in runs:
            _, values = _series(records, key)
            if not values:
                row += [_fmt(None)] * (3 if with_median else 2)
                continue
            tail = values[-last_n:]
            row += [_fmt(values[0]), _fmt(math.fsum(tail) / len(tail))]
            if with_median:
                row.append(_fmt(statistics.median(tail)))
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR0/metrics.png)")
    parser.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="metric names, optional :log/:symlog")
    parser.add_argument("--table", action="store_true", help="also print the Markdown summary table")
    parser.add_argument("--last-n", type=int, default=10, help="steps averaged in the table (default 10)")
    args = parser.parse_args(argv)
    try:
        out = plot_runs(args.run_dirs, args.out or Path(args.run_dirs[0]) / "metrics.png", args.keys)
        print(f"wrote {out}")
        if args.table:
            print(summary_table(args.run_dirs, args.keys, args.last_n))
    except (FileNotFoundError, ValueError) as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
