"""tools/plot_metrics.py: comparison PNG, run labels from config.yaml, missing keys, the Markdown summary table."""

import importlib.util
import os

import pytest

from megatron_r3.train.metrics_log import MetricsLogger

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="module")
def pm():
    spec = importlib.util.spec_from_file_location("plot_metrics", os.path.join(REPO, "tools", "plot_metrics.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _make_run(run_dir, records, config=None):
    with MetricsLogger(run_dir, tensorboard=False) as log:
        for step, metrics in enumerate(records):
            log.log(step, metrics)
    if config is not None:
        (run_dir / "config.yaml").write_text(config)
    return run_dir


@pytest.fixture
def two_runs(tmp_path):
    off = _make_run(tmp_path / "run_a", [
        {"reward/mean": r, "r3/rollout_train_k3_kl": 1.5e-3, "r3/rollout_train_extreme_frac_tau2": 0.01,
         "replay/routing_agreement": 0.9, "train/ppo_kl": -1e-4, "train/grad_norm": g}
        for r, g in [(0.1, 1.0), (0.2, 2.0), (0.3, 3.0), (0.5, 4.0)]
    ], config="seed: 1\nrouter_replay: off\n")  # bare `off` is YAML False
    r3 = _make_run(tmp_path / "run_b", [
        {"reward/mean": r, "r3/rollout_train_k3_kl": k, "r3/rollout_train_extreme_frac_tau2": 0.0,
         "replay/routing_agreement": 1.0, "train/ppo_kl": 0.0}  # no train/grad_norm in this run
        for r, k in [(0.1, 0.0), (0.3, 0.0), (0.5, 2e-6), (0.7, 4e-6)]
    ], config="train:\n  router_replay: R3\n")
    return off, r3


def test_plot_png_with_missing_key(pm, two_runs, tmp_path, capsys):
    out = pm.plot_runs(list(two_runs), tmp_path / "cmp.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    err = capsys.readouterr().err
    assert "run 'R3' has no 'train/grad_norm'" in err
    # CLI: default output in the first run dir, custom keys with a scale suffix, --table.
    assert pm.main([str(d) for d in two_runs] + ["--keys", "reward/mean", "train/ppo_kl:symlog", "nope:log",
                                                 "--table", "--last-n", "2"]) == 0
    stdout = capsys.readouterr().out
    assert (two_runs[0] / "metrics.png").stat().st_size > 5000
    assert "| `nope` | — | — | — | — |" in stdout


def test_summary_table_exact(pm, two_runs):
    table = pm.summary_table(two_runs, ["reward/mean", "r3/rollout_train_k3_kl:log", "train/grad_norm"], last_n=2)
    assert table == "\n".join([
        "| metric | off first | off last-2 mean | R3 first | R3 last-2 mean |",
        "| --- | --- | --- | --- | --- |",
        "| `reward/mean` | 0.1000 | 0.4000 | 0.1000 | 0.6000 |",
        "| `r3/rollout_train_k3_kl` | 0.0015 | 0.0015 | 0 | 3.000e-06 |",
        "| `train/grad_norm` | 1.0000 | 3.5000 | — | — |",
    ])


def test_labels(pm, tmp_path):
    a = _make_run(tmp_path / "x" / "seed1", [{"a": 1.0}], config="router_replay: R3\n")
    b = _make_run(tmp_path / "y" / "seed2", [{"a": 1.0}], config="router_replay: R3\n")
    c = _make_run(tmp_path / "plain", [{"a": 1.0}])
    assert pm.run_labels([a, b, c]) == ["R3 (seed1)", "R3 (seed2)", "plain"]


def test_parse_key(pm):
    assert pm._parse_key("r3/rollout_train_k3_kl") == ("r3/rollout_train_k3_kl", ("log", 1e-10))
    assert pm._parse_key("train/grad_norm:log") == ("train/grad_norm", ("log", 1e-12))
    assert pm._parse_key("reward/mean") == ("reward/mean", ("linear", None))
    assert pm._parse_key("weird:key") == ("weird:key", ("linear", None))


def test_missing_run_dir(pm, tmp_path, capsys):
    assert pm.main([str(tmp_path / "nothing")]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_figure_scales_and_labels(pm, two_runs):
    """Zero extreme-token fractions are drawn at 0 (linear axis, not a log floor), ppo_kl is symlog and linear within
    +-1e-3 (its typical |values| after the first step), and every panel names its quantity on the y axis."""
    keys = ["r3/rollout_train_extreme_frac_tau2", "train/ppo_kl", "reward/mean", "r3/rollout_train_k3_kl"]
    fig = pm.build_figure(list(two_runs), keys)
    try:
        tau2, ppo_kl, reward, k3 = fig.axes[:4]
        assert tau2.get_yscale() == "linear"
        assert min(min(line.get_ydata()) for line in tau2.get_lines()) == 0.0
        assert ppo_kl.get_yscale() == "symlog" and ppo_kl.yaxis.get_transform().linthresh == 1e-3
        assert k3.get_yscale() == "log"
        assert [ax.get_ylabel() for ax in (tau2, ppo_kl, reward, k3)] == [
            "fraction of tokens", "KL(old || new), nats/token", "mean reward", "k3 KL(rollout || train), nats/token"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
