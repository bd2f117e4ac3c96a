"""metrics.jsonl writer/reader, TensorBoard scalars, resume truncation and the Megatron-style iteration line."""

import json
import math
import os
from datetime import datetime

import pytest
import torch

from megatron_r3.train import metrics_log as ml
from megatron_r3.train.metrics_log import MetricsLogger, format_iteration_line, read_metrics


def _lines(run_dir):
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def test_jsonl_content_and_key_order(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(0, {"train/ppo_kl": 1.5e-05, "reward/mean": 0.25, "replay/fallback_tokens": 3, "a/b": True})
        log.log(1, {"reward/mean": 0.1 + 0.2, "step": 1})
    assert _lines(tmp_path) == [
        '{"step": 0, "a/b": 1, "replay/fallback_tokens": 3, "reward/mean": 0.25, "train/ppo_kl": 1.5e-05}',
        '{"step": 1, "reward/mean": 0.30000000000000004}',
    ]
    recs = read_metrics(tmp_path)
    assert recs[1]["reward/mean"] == 0.1 + 0.2  # floats round-trip exactly
    assert list(recs[0]) == ["step", "a/b", "replay/fallback_tokens", "reward/mean", "train/ppo_kl"]
    assert read_metrics(tmp_path / "metrics.jsonl") == recs


def test_nan_inf_round_trip(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(0, {"x": math.nan, "y": math.inf, "z": -math.inf, "w": 2.0})
    (line,) = _lines(tmp_path)
    assert line == '{"step": 0, "w": 2.0, "x": "nan", "y": "inf", "z": "-inf"}'
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    (rec,) = read_metrics(tmp_path)
    assert math.isnan(rec["x"]) and rec["y"] == math.inf and rec["z"] == -math.inf and rec["w"] == 2.0


@pytest.mark.parametrize("bad", [torch.tensor(1.0), torch.ones(2), torch.nn.Parameter(torch.zeros(())), [1.0], "0.5",
                                 None])
def test_type_error_names_key(tmp_path, bad):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(TypeError, match="train/grad_norm"):
            log.log(0, {"reward/mean": 0.5, "train/grad_norm": bad})
        log.log(0, {"reward/mean": 0.5})  # nothing was written by the failed call
    assert len(_lines(tmp_path)) == 1
    with pytest.raises(TypeError, match="train/ppo_kl"):
        format_iteration_line(0, 1, {"train/ppo_kl": torch.tensor(0.0)}, 1.0)


def test_numpy_scalars_accepted(tmp_path):
    np = pytest.importorskip("numpy")
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(np.int64(2), {"a": np.float32(0.5), "b": np.int32(7)})
    assert _lines(tmp_path) == ['{"step": 2, "a": 0.5, "b": 7}']


def test_steps_must_increase_and_match(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(3, {"a": 1.0})
        with pytest.raises(ValueError, match="not after"):
            log.log(3, {"a": 1.0})
        with pytest.raises(ValueError, match="disagrees"):
            log.log(4, {"step": 5})


def test_resume_truncates_atomically(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for s in range(5):
            log.log(s, {"reward/mean": s / 10, "r3/rollout_train_k3_kl": math.nan if s == 1 else 1e-4})
    before = _lines(tmp_path)
    # A crash mid-write leaves a last line without newline.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "reward/me')
    with pytest.raises(FileExistsError, match="resume_step"):
        MetricsLogger(tmp_path, tensorboard=False)
    with pytest.warns(UserWarning, match="incomplete last line"):
        log = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    assert _lines(tmp_path) == before[:3]  # steps 0, 1, 2 kept byte-identical (NaN included)
    with pytest.raises(ValueError, match="not after"):
        log.log(2, {"reward/mean": 0.0})
    log.log(3, {"reward/mean": 0.9})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # no temp file left behind
    MetricsLogger(tmp_path, tensorboard=False, resume_step=0).close()  # start over
    assert _lines(tmp_path) == []


def test_corrupt_interior_line_raises(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, oops\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        MetricsLogger(tmp_path, tensorboard=False, resume_step=2)


def test_disabled_is_a_noop(tmp_path):
    run = tmp_path / "run"
    log = MetricsLogger(run, enabled=False)
    log.log(0, {"a": 1.0})
    log.log(0, {"a": 1.0})
    log.close()
    assert not run.exists()


def test_flush_every(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False, flush_every=2)
    log.log(0, {"a": 1.0})
    assert _lines(tmp_path) == []
    log.log(1, {"a": 1.0})
    assert len(_lines(tmp_path)) == 2
    log.close()


def test_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as log:
        log.log(0, {"reward/mean": 0.25, "replay/routing_agreement": 1})
        log.log(1, {"reward/mean": 0.5})
    tb = tmp_path / "tensorboard"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(0, 0.25), (1, 0.5)]
    assert [(e.step, e.value) for e in acc.Scalars("replay/routing_agreement")] == [(0, 1.0)]


def test_iteration_line_exact():
    metrics = {
        "reward/mean": 0.3125, "train/ppo_kl": 1.2e-05, "r3/rollout_train_k3_kl": 3.4e-04,
        "replay/routing_agreement": 1.0, "replay/fallback_tokens": 0, "train/grad_norm": 0.53211,
        "train/lr": 1e-6, "train/loss": -0.0123, "r3/rollout_train_extreme_frac_tau2": math.nan,
        "train/skipped_steps": 0, "throughput/tokens_per_s": 4321.06, "timing/rollout_s": 9.0,  # not a headline key
    }
    line = format_iteration_line(3, 50, metrics, 1.2345, now=datetime(2026, 11, 25, 14, 0, 0))
    assert line == (
        " [2026-11-25 14:00:00] iteration        3/      50 | elapsed time per iteration (ms): 1234.5 |"
        " reward/mean: 0.3125 | train/loss: -1.230000E-02 | train/ppo_kl: 1.200E-05 |"
        " r3/rollout_train_k3_kl: 3.400E-04 | r3/rollout_train_extreme_frac_tau2: nan |"
        " replay/routing_agreement: 1.0000 | replay/fallback_tokens: 0 | learning rate: 1.000000E-06 |"
        " grad norm: 0.532 | number of skipped iterations: 0 | throughput/tokens_per_s: 4321.1 |"
    )
    # Timestamp defaults to now; explicit keys (unknown ones in E-notation) in the given order.
    line = format_iteration_line(1, 2, {"timing/rollout_s": 0.5, "reward/mean": 1}, 0.0,
                                 keys=["timing/rollout_s", "reward/mean", "missing"])
    assert line.endswith("] iteration        1/       2 | elapsed time per iteration (ms): 0.0 |"
                         " timing/rollout_s: 5.000E-01 | reward/mean: 1.0000 |")
    datetime.strptime(line[2:21], "%Y-%m-%d %H:%M:%S")


def test_headline_keys_are_registered_metric_names():
    from megatron_r3.platform import metric_names

    assert ml.HEADLINE_KEYS[0] == metric_names.REWARD_MEAN == "reward/mean"
    for key in ml.HEADLINE_KEYS:
        assert metric_names.is_registered(key), key


def test_wandb_offline_run_holds_the_step_metrics(tmp_path, monkeypatch):
    """--wandb-project without credentials logs offline: a local W&B run directory with every step's metrics."""
    pytest.importorskip("wandb")
    from tests.unit.wandb_records import history_rows

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # --wandb-save-dir wins over W&B's own setting
    steps = [{"reward/mean": 0.25, "train/loss": 1.5e-3, "replay/fallback_tokens": 0},
             {"reward/mean": 0.5, "train/loss": -2.0e-4, "replay/fallback_tokens": 3}]
    config = ml.WandbConfig(project="r3-test", exp_name="tiny", save_dir=str(tmp_path / "wb"))
    with MetricsLogger(tmp_path / "run", tensorboard=False, wandb=config) as log:
        for step, metrics in enumerate(steps):
            log.log(step, metrics)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    rows = history_rows(runs[0])
    assert [row["_step"] for row in rows] == [0, 1]
    assert [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows] == steps
    assert read_metrics(tmp_path / "run") == [{"step": i, **m} for i, m in enumerate(steps)]


def test_wandb_mode_is_offline_without_credentials(tmp_path):
    none = {"NETRC": str(tmp_path / "missing")}
    assert ml.wandb_mode(none) == "offline"
    assert ml.wandb_mode({**none, "WANDB_API_KEY": "k"}) == "online"
    assert ml.wandb_mode({**none, "WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}) == "disabled"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    assert ml.wandb_mode({"NETRC": str(tmp_path / "netrc")}) == "online"


def test_no_wandb_project_starts_no_wandb_run(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, wandb=ml.WandbConfig()) as log:
        log.log(0, {"reward/mean": 1.0})
    assert not (tmp_path / "wandb").exists()
