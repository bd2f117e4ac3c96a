#!/usr/bin/env python
"""The R3 paper's stability experiment at small scale, in one command: supervised warm-up of a small MoE on a
verifiable task, then GRPO from that checkpoint three times (--router-replay off, R2, R3; everything else identical),
then one PNG and the paper-style table.

    python examples/r3_stability/run.py --preset cpu --out runs/r3_stability            # 2 CPU cores, < 15 min
    python examples/r3_stability/run.py --preset gpu --out $OUT --work /tmp/r3s         # one H200, < 9 min

Stages (each skipped when its output exists, so a re-run after a lost machine continues where it stopped):
1. `python -m megatron_r3.train.sft_warmup --config warmup_PRESET.yaml --stop-at-eval-reward 0.6` ->
   WORK/warmup/hf (HF checkpoint of a partially competent policy);
2. `pretrain_grpo.py --config grpo_PRESET.yaml --hf-checkpoint WORK/warmup/hf --router-replay MODE` for each mode,
   `--parallel` of them at a time (the GPU preset runs all three at once on the one GPU: these small models leave it
   mostly idle), with periodic checkpoints (a re-run resumes them);
3. `tools/stability_report.py`: OUT/r3_stability.png and OUT/r3_stability.md, refreshed while the runs go.

`--budget-s` bounds the whole command: GRPO runs still going when it is spent are stopped, and the report compares
the steps every run finished. OUT receives only the deliverables (PNG, table, each run's metrics as
metrics_MODE.jsonl, metrics_warmup.jsonl, run.log); checkpoints and logs stay in WORK (default OUT/work).
Extra arguments after `--` go to every GRPO run (e.g. `-- --lr 0.001`): identical for all modes by construction.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, REPO)

PRESETS = {
    "cpu": dict(warmup="warmup_cpu.yaml", grpo="grpo_cpu.yaml", parallel=3, budget_s=14 * 60, save_interval=25,
                stop_reward=0.6),
    "gpu": dict(warmup="warmup_gpu.yaml", grpo="grpo_gpu.yaml", parallel=3, budget_s=510, save_interval=10,
                stop_reward=0.6),
}
MODES = ("off", "R2", "R3")
REPORT_EVERY_S = 60.0


class Log:
    """Progress lines to stdout and OUT/run.log."""

    def __init__(self, path: str):
        self.handle = open(path, "a")

    def __call__(self, message: str) -> None:
        line = f"[r3_stability {time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        self.handle.write(line + "\n")
        self.handle.flush()


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def _env(port: int) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               MASTER_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", "1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)  # each run is its own single-process world
    return env


def _steps_logged(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as handle:
        return sum(1 for line in handle if line.strip())


def _last_metrics(run_dir: str) -> dict:
    import json

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    last = None
    with open(path) as handle:
        for line in handle:
            if line.strip():
                last = line
    try:
        return json.loads(last) if last else {}
    except ValueError:  # a line being written
        return {}


def _tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as handle:
        kept = [line for line in handle if "warn" not in line.lower()]
    return "".join(kept[-lines:])


def warm_up(args, preset: dict, log: Log, deadline: float) -> str:
    run_dir = os.path.join(args.work, "warmup")
    hf_dir = os.path.join(run_dir, "hf")
    if os.path.exists(os.path.join(hf_dir, "config.json")):
        log(f"warm-up: {hf_dir} exists, skipped")
        return hf_dir
    cmd = [sys.executable, "-m", "megatron_r3.train.sft_warmup", "--config", os.path.join(HERE, preset["warmup"]),
           "--run-dir", run_dir, "--no-progress", "--save-interval", str(args.warmup_save_interval),
           "--stop-at-eval-reward", str(args.stop_reward)]
    if args.warmup_iters:
        cmd += ["--train-iters", str(args.warmup_iters)]
        import yaml

        with open(os.path.join(HERE, preset["warmup"])) as handle:
            lr_warmup = int(yaml.safe_load(handle).get("lr_warmup_iters") or 0)
        if lr_warmup >= args.warmup_iters:  # megatron's scheduler needs warm-up < decay steps
            cmd += ["--lr-warmup-iters", str(args.warmup_iters // 5)]
    log("warm-up: " + " ".join(cmd))
    start = time.time()
    out_log = os.path.join(args.work, "warmup.log")
    with open(out_log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(_free_ports(1)[0]), stdout=handle, stderr=subprocess.STDOUT)
        seen = 0
        while proc.poll() is None:
            time.sleep(2.0)
            seen = _echo_new_lines(out_log, seen, log, (" sft step", "sft_warmup:"))
            if time.time() > deadline:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
                raise SystemExit(f"warm-up stopped by --budget-s after {time.time() - start:.0f} s (a re-run resumes "
                                 f"its last checkpoint); log: {out_log}")
        _echo_new_lines(out_log, seen, log, (" sft step", "sft_warmup:"))
    if proc.returncode != 0:
        print(_tail(out_log))
        raise SystemExit(f"the warm-up failed with exit code {proc.returncode}; log: {out_log}")
    log(f"warm-up done in {time.time() - start:.0f} s")
    return hf_dir


def _echo_new_lines(path: str, seen: int, log: Log, prefixes) -> int:
    with open(path, errors="replace") as handle:
        lines = handle.readlines()
    for line in lines[seen:]:
        if line.startswith(prefixes):
            log(line.strip())
    return len(lines)


def grpo_runs(args, preset: dict, hf_dir: str, log: Log, deadline: float, report) -> dict:
    """Run the modes (`args.parallel` at a time) until done or the deadline; returns {mode: wall seconds}."""
    pending = [m for m in args.modes]
    running: dict = {}
    walls: dict = {}
    ports = iter(_free_ports(len(pending)))
    last_report = time.time()
    while pending or running:
        while pending and len(running) < args.parallel:
            mode = pending.pop(0)
            run_dir = os.path.join(args.work, mode)
            if _finished(run_dir, args):
                log(f"{mode}: finished earlier ({_steps_logged(run_dir)} steps), skipped")
                continue
            cmd = [sys.executable, "pretrain_grpo.py", "--config", os.path.join(HERE, preset["grpo"]),
                   "--hf-checkpoint", hf_dir, "--router-replay", mode, "--run-dir", run_dir, "--no-progress",
                   "--save-interval", str(args.save_interval)]
            if args.grpo_iters:
                cmd += ["--train-iters", str(args.grpo_iters)]
            cmd += args.extra
            log(f"{mode}: " + " ".join(cmd))
            handle = open(os.path.join(args.work, f"{mode}.log"), "a")
            proc = subprocess.Popen(cmd, cwd=REPO, env=_env(next(ports)), stdout=handle, stderr=subprocess.STDOUT)
            running[mode] = (proc, handle, time.time())
        time.sleep(5.0)
        for mode, (proc, handle, start) in list(running.items()):
            if proc.poll() is None:
                continue
            handle.close()
            del running[mode]
            walls[mode] = time.time() - start
            if proc.returncode != 0:
                log(f"{mode}: FAILED with exit code {proc.returncode}; last lines of its log:\n"
                    + _tail(os.path.join(args.work, f"{mode}.log")))
            else:
                log(f"{mode}: done, {_steps_logged(os.path.join(args.work, mode))} steps in {walls[mode]:.0f} s")
        if time.time() - last_report > REPORT_EVERY_S:
            last_report = time.time()
            status = []
            for mode in args.modes:
                last = _last_metrics(os.path.join(args.work, mode))
                if last:
                    status.append(f"{mode} step {last.get('step')} reward {last.get('reward/mean', float('nan')):.3f} "
                                  f"k3 {last.get('r3/rollout_train_k3_kl', float('nan')):.2e}")
            log("progress: " + "; ".join(status) if status else "progress: starting")
            report(partial=True)
        if time.time() > deadline and (running or pending):
            log(f"--budget-s spent: stopping {sorted(running)} (not started: {pending}); the report compares the "
                f"steps every run finished")
            for mode, (proc, handle, start) in running.items():
                proc.send_signal(signal.SIGTERM)
            for mode, (proc, handle, start) in running.items():
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                handle.close()
                walls[mode] = time.time() - start
            running.clear()
            pending.clear()
    return walls


def _finished(run_dir: str, args) -> bool:
    import yaml

    config = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(config):
        return False
    with open(config) as handle:
        iters = yaml.safe_load(handle).get("train_iters")
    return bool(iters) and _steps_logged(run_dir) >= int(iters)


def environment_line() -> str:
    import warnings

    warnings.filterwarnings("ignore")  # megatron's "TransformerEngine not installed" notes on import
    parts = [f"python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}")
        else:
            parts.append("CPU only")
    except ImportError:
        pass
    for name in ("megatron.core", "transformers"):
        try:
            module = __import__(name, fromlist=["__version__"])
            parts.append(f"{name.split('.')[-1] if name != 'megatron.core' else 'megatron-core'} {module.__version__}")
        except ImportError:
            parts.append(f"{name} missing")
    parts.append(f"{os.cpu_count()} CPU cores, {platform.machine()}")
    return ", ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", required=True, help="deliverables: PNG, table, metrics JSONL, run.log")
    parser.add_argument("--work", default=None, help="runs and checkpoints (default OUT/work)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--parallel", type=int, default=None, help="GRPO runs at a time (preset default)")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock bound of the command (preset)")
    parser.add_argument("--warmup-iters", type=int, default=None, help="override the warm-up's --train-iters")
    parser.add_argument("--grpo-iters", type=int, default=None, help="override the GRPO runs' --train-iters")
    parser.add_argument("--save-interval", type=int, default=None, help="GRPO checkpoint interval (preset)")
    parser.add_argument("--warmup-save-interval", type=int, default=100)
    parser.add_argument("--stop-reward", type=float, default=None,
                        help="the warm-up stops once its sampled reward reaches this (partial competence; preset)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    preset = PRESETS[args.preset]
    args.parallel = args.parallel or preset["parallel"]
    args.budget_s = args.budget_s or preset["budget_s"]
    args.save_interval = args.save_interval or preset["save_interval"]
    args.stop_reward = preset["stop_reward"] if args.stop_reward is None else args.stop_reward
    args.out = os.path.abspath(args.out)
    args.work = os.path.abspath(args.work or os.path.join(args.out, "work"))
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    start = time.time()
    deadline = start + args.budget_s
    log = Log(os.path.join(args.out, "run.log"))
    command = "python examples/r3_stability/run.py " + " ".join(argv)
    log(f"{command}\n  {environment_line()}\n  budget {args.budget_s:.0f} s, modes {args.modes}, "
        f"{args.parallel} at a time, work {args.work}")

    hf_dir = warm_up(args, preset, log, deadline)
    _copy(os.path.join(args.work, "warmup", "metrics.jsonl"), os.path.join(args.out, "metrics_warmup.jsonl"))
    warm = _last_metrics(os.path.join(args.work, "warmup"))
    walls: dict = {}

    def report(partial: bool = False) -> None:
        from tools.stability_report import write_report

        run_dirs = [os.path.join(args.work, m) for m in args.modes
                    if os.path.exists(os.path.join(args.work, m, "metrics.jsonl"))]
        if not run_dirs:
            return
        for mode in args.modes:
            _copy(os.path.join(args.work, mode, "metrics.jsonl"), os.path.join(args.out, f"metrics_{mode}.jsonl"))
        header = (
            f"# R3 stability experiment, preset `{args.preset}`{' (PARTIAL: runs still going)' if partial else ''}\n\n"
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `{command}`; {environment_line()}.\n"
            f"Warm-up: {warm.get('step', -1) + 1} supervised steps, final loss {warm.get('train/loss', float('nan')):.4f},"
            f" sampled reward {warm.get('eval/reward_mean', float('nan')):.4f}. GRPO: "
            f"`{preset['grpo']}` for every mode (only --router-replay differs)"
            + (f", extra flags `{' '.join(args.extra)}`" if args.extra else "")
            + ". Wall time per run: "
            + (", ".join(f"{m} {s:.0f} s" for m, s in walls.items()) if walls else "—")
            + f"; whole command {time.time() - start:.0f} s."
        )
        try:
            write_report(run_dirs, os.path.join(args.out, "r3_stability.png"),
                         os.path.join(args.out, "r3_stability.md"), header=header)
        except Exception as error:  # noqa: BLE001 - a report of partial runs must not stop the runs
            log(f"report failed: {type(error).__name__}: {error}")
            if not partial:
                raise

    walls.update(grpo_runs(args, preset, hf_dir, log, deadline, report))
    report()
    with open(os.path.join(args.out, "r3_stability.md")) as handle:
        log("table:\n" + handle.read())
    log(f"done in {time.time() - start:.0f} s: {os.path.join(args.out, 'r3_stability.png')}, "
        f"{os.path.join(args.out, 'r3_stability.md')}")


def _copy(src: str, dst: str) -> None:
    if os.path.exists(src):
        shutil.copyfile(src, dst)


if __name__ == "__main__":
    main()
