"""Per-step metrics: `run_dir/metrics.jsonl`, TensorBoard scalars, W&B and a Megatron-style iteration log line.

W&B follows megatron's flags (`--wandb-project`, `--wandb-exp-name`, `--wandb-save-dir`, `--wandb-entity`): a run is
logged when a project is given. It runs offline (a local run directory, `wandb sync DIR` uploads it later) when
`WANDB_MODE=offline`, or when no W&B API key is configured (`WANDB_API_KEY` or `wandb login`), so a machine without
a network never waits on one; an online start that fails within `WANDB_INIT_TIMEOUT_S` falls back to offline.

`metrics.jsonl` holds one JSON object per optimizer step, ``step`` first and the other keys sorted. Values are JSON
numbers (Python ``repr`` precision, so floats round-trip bit-exactly), except non-finite floats: strict JSON has no
NaN/Infinity, so they are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` and `read_metrics` turns them
back into floats. Every line is therefore valid JSON for any reader (``jq``, pandas, ``json.loads``).

`MetricsLogger.log` takes plain host scalars only (``int``, ``float``, ``bool``, numpy scalars). A ``torch.Tensor``
(even 0-dim) or any other type raises ``TypeError`` naming the key: calling ``.item()`` is the trainer's explicit,
once-per-step host sync (``MetricAccumulator.means`` in `megatron_r3.grpo.mismatch`), never a hidden one here.

Metric names come from the one registry, `megatron_r3.platform.metric_names`; ``HEADLINE_KEYS`` is the ordered
subset shown in the iteration line.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from megatron_r3.platform import metric_names

__all__ = [
    "MetricsLogger", "WandbConfig", "format_iteration_line", "read_metrics", "HEADLINE_KEYS", "METRICS_FILE",
    "TENSORBOARD_DIR",
]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

STEP = "step"


# Iteration line: (key, label, format). Formats: "f4"/"f1" fixed decimals, "E" = "{:.3E}", "E6" = "{:.6E}"
# (megatron's loss/learning-rate style), "f3" (megatron's grad norm), "d" integer.
_HEADLINE = (
    (metric_names.REWARD_MEAN, metric_names.REWARD_MEAN, "f4"),
    (metric_names.REWARD_STD, metric_names.REWARD_STD, "f4"),
    (metric_names.ROLLOUT_RESPONSE_LENGTH_MEAN, metric_names.ROLLOUT_RESPONSE_LENGTH_MEAN, "f1"),
    (metric_names.TRAIN_LOSS, metric_names.TRAIN_LOSS, "E6"),
    (metric_names.TRAIN_PPO_KL, metric_names.TRAIN_PPO_KL, "E"),
    (metric_names.TRAIN_CLIP_FRAC, metric_names.TRAIN_CLIP_FRAC, "f4"),
    (metric_names.TRAIN_ENTROPY, metric_names.TRAIN_ENTROPY, "f4"),
    (metric_names.R3_LOGP_ABS_DIFF, metric_names.R3_LOGP_ABS_DIFF, "E"),
    (metric_names.R3_K3_KL, metric_names.R3_K3_KL, "E"),
    (metric_names.R3_EXTREME_FRAC_TAU2, metric_names.R3_EXTREME_FRAC_TAU2, "E"),
    (metric_names.ROUTING_AGREEMENT, metric_names.ROUTING_AGREEMENT, "f4"),
    (metric_names.REPLAY_FALLBACK_TOKENS, metric_names.REPLAY_FALLBACK_TOKENS, "d"),
    (metric_names.TRAIN_LR, "learning rate", "E6"),
    (metric_names.TRAIN_GRAD_NORM, "grad norm", "f3"),
    (metric_names.TRAIN_SKIPPED_STEPS, "number of skipped iterations", "d"),
    (metric_names.THROUGHPUT_TOKENS_PER_S, metric_names.THROUGHPUT_TOKENS_PER_S, "f1"),
    (metric_names.THROUGHPUT_TFLOPS_PER_GPU, "TFLOP/s/GPU", "f1"),
    (metric_names.THROUGHPUT_MFU, "MFU", "f4"),
)
HEADLINE_KEYS = tuple(k for k, _, _ in _HEADLINE)

_NONFINITE_TO_STR = {math.inf: "inf", -math.inf: "-inf"}
_STR_TO_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _check_scalar(key, value) -> Union[int, float]:
    """Plain host scalar -> int/float; anything else (a torch tensor above all) -> TypeError naming the key."""
    if not isinstance(key, str):
        raise TypeError(f"metric names must be str, got {key!r} ({type(key).__name__})")
    if type(value).__module__.startswith("torch"):
        raise TypeError(
            f"metric {key!r} is a {type(value).__module__}.{type(value).__name__}; MetricsLogger takes host scalars "
            f"only (call .item()/.tolist() once, deliberately, where the trainer syncs)"
        )
    if isinstance(value, numbers.Integral):  # includes bool and numpy integers
        return int(value)
    if isinstance(value, numbers.Real):  # includes numpy floating
        return float(value)
    raise TypeError(f"metric {key!r} must be an int or float scalar, got {type(value).__name__}: {value!r:.80}")


def _encode(value: Union[int, float]) -> Union[int, float, str]:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else _NONFINITE_TO_STR[value]
    return value


def _decode(value):
    if isinstance(value, str) and value in _STR_TO_NONFINITE:
        return _STR_TO_NONFINITE[value]
    return value


def _metrics_path(path_or_run_dir) -> Path:
    p = Path(path_or_run_dir)
    return p / METRICS_FILE if p.is_dir() else p


def _parse_lines(text: str, path) -> list[dict]:
    """Records of a metrics.jsonl text. A last line without a newline that does not parse (a write cut short by a
    crash, or a live run mid-write) is dropped with a warning; an unparsable complete line raises ValueError."""
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or STEP not in obj:
                raise ValueError("not a JSON object with a 'step' key")
        except ValueError as e:
            if i == len(lines) - 1:  # no trailing newline: partial write
                warnings.warn(f"{path}: ignoring an incomplete last line ({len(line)} chars)")
                break
            raise ValueError(f"{path}:{i + 1}: corrupt metrics line ({e}): {line[:120]!r}") from None
        records.append({k: _decode(v) for k, v in obj.items()})
    return records


def read_metrics(path_or_run_dir) -> list[dict]:
    """Records of `metrics.jsonl` (a run directory or the file itself), with "nan"/"inf"/"-inf" back as floats."""
    path = _metrics_path(path_or_run_dir)
    return _parse_lines(path.read_text(encoding="utf-8"), path)


def _dump_record(record: Mapping) -> str:
    return json.dumps(record, allow_nan=False) + "\n"


WANDB_INIT_TIMEOUT_S = 30.0


@dataclass
class WandbConfig:
    """megatron's W&B flags, as `MetricsLogger` uses them (no project: no W&B run)."""

    project: Optional[str] = None
    """--wandb-project: the W&B project; W&B logging is on when it is given."""
    exp_name: Optional[str] = None
    """--wandb-exp-name: the run's name (default: the run directory's name)."""
    save_dir: Optional[str] = None
    """--wandb-save-dir: where W&B writes its run directory (default: the run directory)."""
    entity: Optional[str] = None
    """--wandb-entity: the W&B team or user."""

    @classmethod
    def from_args(cls, args) -> "WandbConfig":
        return cls(project=args.wandb_project or None, exp_name=args.wandb_exp_name or None,
                   save_dir=args.wandb_save_dir or None, entity=args.wandb_entity or None)


def wandb_mode(environ=os.environ) -> str:
    """`WANDB_MODE` when set; otherwise online only with an API key configured, so no network is ever waited on."""
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    if environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


def start_wandb_run(config: WandbConfig, run_dir: Path, resume_step: Optional[int]):
    """A W&B run for `config` (offline without credentials, see `wandb_mode`)."""
    try:
        import wandb
    except ImportError:
        raise ValueError(f"--wandb-project {config.project}: the wandb package is not installed "
                         f"(pip install wandb, or `make install`)") from None
    save_dir = Path(config.save_dir) if config.save_dir else run_dir
    save_dir.mkdir(parents=True, exist_ok=True)
    mode = wandb_mode()

    def init(mode):
        settings = wandb.Settings(mode=mode, silent=True, console="off", x_disable_stats=True,
                                  init_timeout=WANDB_INIT_TIMEOUT_S)
        return wandb.init(project=config.project, entity=config.entity, name=config.exp_name or run_dir.name,
                          dir=str(save_dir), settings=settings,
                          config={"run_dir": str(run_dir), "resume_step": resume_step})

    try:
        return init(mode)
    except Exception as error:  # noqa: BLE001 - wandb raises its own errors for an unreachable server
        if mode != "online":
            raise
        warnings.warn(f"W&B could not start online ({' '.join(str(error).split())[:200]}); logging offline to "
                      f"{save_dir / 'wandb'} (upload later with `wandb sync`)")
        return init("offline")


class MetricsLogger:
    """Appends one JSON line per step to ``run_dir/metrics.jsonl`` and the same scalars to TensorBoard
    (``run_dir/tensorboard``).

    ``enabled`` is True on the logging rank only; elsewhere every method is a no-op and nothing is touched on disk.
    Steps must strictly increase. ``flush_every`` flushes the file and the TensorBoard writer every N logged steps
    (``close`` always flushes).

    ``resume_step=N`` (resuming from the checkpoint of step N, so step N is the next to be logged) atomically rewrites
    metrics.jsonl without the lines of step >= N, which a crash between logging and checkpointing leaves behind, and
    tells TensorBoard to purge its events of step >= N. ``resume_step=0`` starts over. Without ``resume_step`` the run
    must be fresh: an existing non-empty metrics.jsonl raises FileExistsError rather than being mixed into.

    ``tensorboard_dir`` (megatron's --tensorboard-dir) defaults to ``run_dir/tensorboard``; ``wandb`` with a project
    also logs every step to W&B.
    """

    def __init__(self, run_dir, *, enabled: bool = True, tensorboard: bool = True, flush_every: int = 1,
                 resume_step: Optional[int] = None, tensorboard_dir=None, wandb: Optional[WandbConfig] = None):
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = bool(enabled)
        self.flush_every = int(flush_every)
        self.last_step: Optional[int] = None
        self._file = None
        self._writer = None
        self._wandb = None
        self._unflushed = 0
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            if self.path.exists() and self.path.stat().st_size > 0:
                raise FileExistsError(
                    f"{self.path} already has metrics; pass resume_step=N when resuming from step N "
                    f"(or resume_step=0 to start over), or use a new run directory"
                )
        else:
            if resume_step < 0:
                raise ValueError(f"resume_step must be >= 0, got {resume_step}")
            self._truncate(int(resume_step))
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: slow import, logging rank only

            log_dir = tensorboard_dir or self.run_dir / TENSORBOARD_DIR
            self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step)
        if wandb is not None and wandb.project:
            self._wandb = start_wandb_run(wandb, self.run_dir, resume_step)

    def _truncate(self, resume_step: int) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        records = _parse_lines(text, self.path)
        keep = [r for r in records if r[STEP] < resume_step]
        self.last_step = max((r[STEP] for r in keep), default=None)
        new_text = "".join(_dump_record({k: _encode(v) for k, v in r.items()}) for r in keep)
        if new_text == text:
            return
        tmp = self.path.with_name(f"{self.path.name}.tmp.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(new_text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Union[int, float]]) -> None:
        """Write the metrics of one step (a line in metrics.jsonl and TensorBoard scalars)."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log after close()")
        step = _check_scalar(STEP, step)
        if not isinstance(step, int):
            raise TypeError(f"step must be an int, got {step!r}")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"metrics step {step} is not after the last logged step {self.last_step}")
        values = {k: _check_scalar(k, v) for k, v in metrics.items()}
        if STEP in values and values.pop(STEP) != step:
            raise ValueError(f"metrics['step'] = {metrics[STEP]!r} disagrees with step={step}")
        record = {STEP: step}
        for k in sorted(values):
            record[k] = _encode(values[k])
        self._file.write(_dump_record(record))
        if self._writer is not None:
            for k in sorted(values):
                self._writer.add_scalar(k, values[k], global_step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        self.last_step = step
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()
        self._unflushed = 0

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            wandb.teardown()  # finish() returns before W&B's writer process has flushed the run file; this waits for it
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _format_value(value, fmt: str) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return _encode(value)
    if fmt == "d":
        if float(value).is_integer():
            return str(int(value))
        fmt = "f1"
    if fmt == "E":
        return f"{value:.3E}"
    if fmt == "E6":
        return f"{value:.6E}"
    return f"{value:.{int(fmt[1:])}f}"


def format_iteration_line(step: int, total_steps: int, metrics: Mapping[str, Union[int, float]], elapsed_s: float,
                          *, keys: Optional[Iterable[str]] = None, now: Optional[datetime] = None) -> str:
    """A Megatron `training_log`-style line for one step:

    `` [2026-11-25 14:00:00] iteration        3/      50 | elapsed time per iteration (ms): 1234.5 | reward/mean:
    0.3125 | train/ppo_kl: 1.200E-05 | ... | grad norm: 0.532 |``

    ``keys`` defaults to ``HEADLINE_KEYS`` (in that order); keys missing from ``metrics`` are skipped. Keys outside
    the headline table are shown with their own name in ``{:.3E}`` style. ``now`` fixes the timestamp (tests).
    """
    known = {k: (label, fmt) for k, label, fmt in _HEADLINE}
    stamp = (now or datetime.now()).strftime("%Y-%m-%d %H:%M:%S")
    out = f" [{stamp}] iteration {int(step):8d}/{int(total_steps):8d} |"
    out += f" elapsed time per iteration (ms): {elapsed_s * 1000.0:.1f} |"
    for key in HEADLINE_KEYS if keys is None else keys:
        if key not in metrics:
            continue
        label, fmt = known.get(key, (key, "E"))
        out += f" {label}: {_format_value(_check_scalar(key, metrics[key]), fmt)} |"
    return out
