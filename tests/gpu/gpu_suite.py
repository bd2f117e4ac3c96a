"""The standing GPU suite: every GPU check that a machine with N GPUs allows, in one command, with a report.

    python tests/gpu/gpu_suite.py --out DIR [--budget-s 470]      (run through tests/gpu/run_gpu_suite.sh)

Always (1 GPU, a NCCL world of one):
  gpu_checks   tests/gpu/gpu_checks.py: bf16 replay checks, no host sync in the replay path, TE-free CP attention
  cli_1gpu     the trainer through the CLI code path (tests/e2e/grpo_runs.py, one process): off/R2/R3 (3 steps,
               checkpoint at 2), R3 resumed from step 2, bf16 R3 + resume, bf16 + distributed optimizer + resume,
               THD packing with --micro-batch-size 4, KL reference model (R3, --reference-replay on/off)
With 2 GPUs (NCCL, torchrun):
  replay_2gpu  tests/distributed/replay_checks.py for DP2, TP2+SP, PP2, PP2xVP2, EP2 alltoall/allgather, CP2
               x recompute none/full/moe x fp32/bf16
  cli_2gpu     the CLI runs for DP2, TP2+SP, PP2, PP2+VP2, EP2, CP2 x off/R2/R3 (2 steps) plus THD (PP2, mbs 4),
               KL (EP2) and save -> resume (EP2, bf16), each compared with the 1-GPU run of the same seed
  overhead     bench/replay_overhead.py (Qwen3-30B-A3B-shaped layers) R3/off step time and bench/sync_count.py
Checks and tolerances (stated in the report):
  - R3: replay/used_route_match == 1.0 on every step of every layout
  - a resumed step equals the uninterrupted run's step bitwise (every metric but timings)
  - KL: the first update's KL to the reference is 0 at step 0 when the reference replays the old-logprob routes
  - layouts vs 1 GPU, steps 0 and 1: reward/mean and rollout/samples equal (rank 0's engine samples them);
    train/loss, ppo_kl, grad_norm, entropy, logp_abs_diff within rel 1e-3 (R2/R3: replayed routes, only summation
    order differs) or rel 2e-2 (off: native routing may flip near-ties, as in tests/e2e/test_grpo_cli.py), abs 1e-6
Writes DIR/gpu_suite.md and DIR/gpu_suite.json (plus the parts' logs in DIR/gpu_suite.log).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BASE = ["--config", "configs/demo_tiny.yaml", "--grpo-prompts-per-step", "8", "--grpo-group-size", "4",
        "--global-batch-size", "16", "--micro-batch-size", "4", "--max-new-tokens", "2", "--no-progress",
        "--save-interval", "1000"]
LAYOUTS_2GPU = {
    "dp2": [],
    "tp2sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "pp2vp2": ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "ep2": ["--expert-model-parallel-size", "2"],
    "cp2": ["--context-parallel-size", "2"],
}
REPLAY_LAYOUTS_2GPU = ["dp4", "tp2sp", "pp2", "pp2vp2", "ep2_alltoall", "ep2_allgather", "cp2"]  # dp4 = DP2 here
COMPARED = ("train/loss", "train/ppo_kl", "train/grad_norm", "train/entropy", "r3/rollout_train_logp_abs_diff")
THD = ["--max-tokens-per-microbatch", "48", "--micro-batch-size", "4"]


def env() -> dict:
    out = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="4", CUBLAS_WORKSPACE_CONFIG=":4096:8",
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    return out


class Suite:
    def __init__(self, out: str, budget_s: float):
        self.out, self.budget_s, self.start = out, budget_s, time.time()
        self.work = os.path.join("/tmp", f"gpu_suite_{os.getpid()}")
        os.makedirs(self.work, exist_ok=True)
        self.results: dict = {}
        self.log = open(os.path.join(out, "gpu_suite.log"), "w")

    def left(self) -> float:
        return self.budget_s - (time.time() - self.start)

    def run(self, name: str, cmd: list[str], limit: float) -> tuple[int, str]:
        limit = min(limit, self.left())
        if limit < 20:
            return -1, f"SKIPPED: time budget of {self.budget_s} s spent"
        start = time.time()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=limit)
            code, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as error:
            code, text = 124, f"TIMEOUT after {limit:.0f} s\n{(error.stdout or b'')[-3000:]!r}"
        self.log.write(f"===== {name} ({time.time() - start:.0f} s, exit {code}): {' '.join(cmd)}\n{text}\n")
        self.log.flush()
        return code, text

    def grpo_runs(self, name: str, runs: list[dict], nproc: int, limit: float) -> dict:
        root = os.path.join(self.work, name)
        os.makedirs(root, exist_ok=True)
        for run in runs:  # resumes point at checkpoints under this launch's root
            run["flags"] = [flag.replace("{root}", root) for flag in run["flags"]]
        runs_file, out_file = os.path.join(root, "runs.json"), os.path.join(root, "out.json")
        with open(runs_file, "w") as handle:
            json.dump(runs, handle)
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                         f"--nproc-per-node={nproc}"]
        code, text = self.run(name, [*launcher, "tests/e2e/grpo_runs.py", "--runs", runs_file, "--root", root,
                                     "--out", out_file], limit)
        records = {}
        if os.path.exists(out_file):
            with open(out_file) as handle:
                records = {r["name"]: r["metrics"] for r in json.load(handle)}
        return {"exit_code": code, "runs": records, "tail": "" if code == 0 else text[-2500:]}


def single_gpu_runs() -> list[dict]:
    runs = []
    for mode in ("off", "R2", "R3"):
        runs.append({"name": f"{mode}", "flags": [*BASE, "--router-replay", mode, "--train-iters", "3",
                                                  "--save-interval", "2"]})
    runs.append({"name": "R3_resumed", "flags": [*BASE, "--router-replay", "R3", "--train-iters", "3", "--load",
                                                 "{root}/R3/checkpoints", "--save", "{root}/R3_resumed_ckpt"]})
    for name, flags in (("bf16", ["--bf16"]), ("bf16_distopt", ["--bf16", "--use-distributed-optimizer"])):
        common = [*BASE, *flags, "--router-replay", "R3", "--train-iters", "3"]
        runs.append({"name": name, "flags": [*common, "--save-interval", "2"]})
        runs.append({"name": f"{name}_resumed", "flags": [*common, "--load", f"{{root}}/{name}/checkpoints",
                                                          "--save", f"{{root}}/{name}_resumed_ckpt"]})
    runs.append({"name": "thd_R3", "flags": [*BASE, *THD, "--router-replay", "R3", "--train-iters", "2"]})
    for ref in ("on", "off"):
        runs.append({"name": f"kl_R3_{ref}", "flags": [*BASE, "--router-replay", "R3", "--reference-replay", ref,
                                                        "--grpo-kl-beta", "0.1", "--train-iters", "2"]})
    return runs


def two_gpu_runs() -> list[dict]:
    runs = [{"name": f"{layout}_{mode}", "flags": [*BASE, *flags, "--router-replay", mode, "--train-iters", "2"]}
            for layout, flags in LAYOUTS_2GPU.items() for mode in ("off", "R2", "R3")]
    runs.append({"name": "pp2_thd_R3", "flags": [*BASE, *LAYOUTS_2GPU["pp2"], *THD, "--router-replay", "R3",
                                                 "--train-iters", "2"]})
    runs.append({"name": "ep2_kl_R3_on", "flags": [*BASE, *LAYOUTS_2GPU["ep2"], "--router-replay", "R3",
                                                   "--grpo-kl-beta", "0.1", "--train-iters", "2"]})
    common = [*BASE, *LAYOUTS_2GPU["ep2"], "--bf16", "--router-replay", "R3", "--train-iters", "3"]
    runs.append({"name": "ep2_bf16", "flags": [*common, "--save-interval", "2"]})
    runs.append({"name": "ep2_bf16_resumed", "flags": [*common, "--load", "{root}/ep2_bf16/checkpoints", "--save",
                                                       "{root}/ep2_bf16_resumed_ckpt"]})
    return runs


# ------------------------------------------------------------------ checks
def check_r3(runs: dict) -> list[str]:
    bad = []
    for name, metrics in runs.items():
        if "R3" in name and "off" not in name.split("_")[-1:]:
            for m in metrics:
                if m.get("replay/used_route_match") != 1.0:
                    bad.append(f"{name} step {m['step']}: used_route_match {m.get('replay/used_route_match')}")
    return bad


def check_resume(runs: dict, full: str, resumed: str) -> list[str]:
    if full not in runs or resumed not in runs or len(runs[full]) < 3 or not runs[resumed]:
        return [f"{resumed}: missing runs"]
    want, got = runs[full][2], runs[resumed][0]
    return [f"{resumed}: {k} {got.get(k)} != {v}" for k, v in want.items()
            if not k.startswith(("timing/", "throughput/")) and got.get(k) != v]


def check_against(runs: dict, reference: dict, name: str, ref_name: str) -> list[str]:
    if name not in runs or ref_name not in reference:
        return [f"{name}: missing (or its 1-GPU reference {ref_name})"]
    rel = 2e-2 if name.endswith("_off") else 1e-3
    bad = []
    for got, want in zip(runs[name][:2], reference[ref_name][:2]):
        for key in ("reward/mean", "rollout/samples"):
            if got.get(key) != want.get(key):
                bad.append(f"{name} step {got['step']}: {key} {got.get(key)} != {want.get(key)}")
        for key in COMPARED:
            g, w = got.get(key), want.get(key)
            if g is None or w is None or abs(g - w) > max(1e-6, rel * abs(w)):
                bad.append(f"{name} step {got['step']}: {key} {g} vs 1-GPU {w} (rel tol {rel})")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_suite_out"))
    parser.add_argument("--budget-s", type=float, default=470.0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch

    gpus = torch.cuda.device_count()
    suite = Suite(args.out, args.budget_s)
    res = suite.results
    res["machine"] = {"gpus": gpus, "gpu": torch.cuda.get_device_name(0) if gpus else "none",
                      "torch": torch.__version__, "cuda": torch.version.cuda,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import megatron.core

        res["machine"]["megatron_core"] = megatron.core.__version__
    except ImportError:
        res["machine"]["megatron_core"] = "missing"
    verdicts: dict[str, list[str]] = {}

    # 1 GPU ------------------------------------------------------------------------------------------------
    code, _ = suite.run("gpu_checks", [sys.executable, "tests/gpu/gpu_checks.py", "--out",
                                       os.path.join(suite.work, "gpu_checks"), "--only", "replay_bf16",
                                       "sync_error", "cp_attention"], 120)
    report = os.path.join(suite.work, "gpu_checks", "gpu_report.json")
    res["gpu_checks"] = json.load(open(report)) if os.path.exists(report) else {"exit_code": code}
    verdicts["gpu_checks"] = [] if code == 0 else [f"exit {code}"]

    one = suite.grpo_runs("cli_1gpu", single_gpu_runs(), 1, 150)
    res["cli_1gpu"] = one
    runs1 = one["runs"]
    bad = [] if one["exit_code"] == 0 else [f"exit {one['exit_code']}: {one['tail'][-600:]}"]
    bad += check_r3(runs1)
    for full in ("R3", "bf16", "bf16_distopt"):
        bad += check_resume(runs1, full, f"{full}_resumed")
    if "kl_R3_on" in runs1 and runs1["kl_R3_on"]:
        first = runs1["kl_R3_on"][0].get("train/ref_kl_first_minibatch")
        if first != 0.0:
            bad.append(f"kl_R3_on: first update's KL to the reference is {first}, not 0")
    verdicts["cli_1gpu"] = bad

    # 2 GPUs -----------------------------------------------------------------------------------------------
    if gpus >= 2:
        out_file = os.path.join(suite.work, "replay_2gpu.json")
        code, _ = suite.run("replay_2gpu", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                                            "tests/distributed/replay_checks.py", *REPLAY_LAYOUTS_2GPU,
                                            "--dtype", "fp32", "bf16", "--out", out_file], 150)
        records = json.load(open(out_file)) if os.path.exists(out_file) else []
        res["replay_2gpu"] = {"exit_code": code, "records": records}
        bad = [] if code == 0 else [f"exit {code}"]
        for r in records:
            failed = [k for k, v in (r.get("results") or {}).items() if not v]
            if r.get("error") or failed:
                bad.append(f"{r['layout']}/{r['recompute']}/{r['dtype']}: {r.get('error') or failed}")
        verdicts["replay_2gpu"] = bad

        two = suite.grpo_runs("cli_2gpu", two_gpu_runs(), 2, 200)
        res["cli_2gpu"] = two
        runs2 = two["runs"]
        bad = [] if two["exit_code"] == 0 else [f"exit {two['exit_code']}: {two['tail'][-600:]}"]
        bad += check_r3(runs2)
        for layout in LAYOUTS_2GPU:
            for mode in ("off", "R2", "R3"):
                bad += check_against(runs2, runs1, f"{layout}_{mode}", mode)
        bad += check_against(runs2, runs1, "pp2_thd_R3", "thd_R3")
        bad += check_resume(runs2, "ep2_bf16", "ep2_bf16_resumed")
        verdicts["cli_2gpu"] = bad

        overhead = {}
        code, text = suite.run("overhead_ep2", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                                                "bench/replay_overhead.py", "--device", "cuda", "--preset",
                                                "qwen3-30b-a3b-4l", "--recompute", "none", "--steps", "20",
                                                "--warmup", "2", "--expert-model-parallel-size", "2",
                                                "--json", os.path.join(suite.work, "ovh.json")], 90)
        overhead["replay_overhead"] = {"exit_code": code, "table": [l for l in text.splitlines() if l.startswith("|")]}
        code, text = suite.run("sync_count", [sys.executable, "bench/sync_count.py", "--device", "cuda"], 60)
        overhead["sync_count"] = {"exit_code": code, "table": [l for l in text.splitlines() if l.startswith("|")]}
        res["overhead"] = overhead
    else:
        res["not_run"] = "2-GPU parts (replay_2gpu, cli_2gpu, overhead with EP2): this machine has < 2 GPUs"

    res["verdicts"] = verdicts
    res["seconds"] = round(time.time() - suite.start, 1)
    write_report(res, args.out)
    ok = all(not v for v in verdicts.values())
    print(f"GPU suite: {'PASS' if ok else 'FAIL'} in {res['seconds']} s; report in {args.out}/gpu_suite.md")
    sys.stdout.flush()
    os._exit(0 if ok else 1)  # no teardown of leftover process groups (see tests/distributed/launch.py)


def write_report(res: dict, out: str) -> None:
    with open(os.path.join(out, "gpu_suite.json"), "w") as handle:
        json.dump(res, handle, indent=1, default=str)
    m = res["machine"]
    lines = [f"# GPU suite ({m['date']})", "",
             f"{m['gpus']} x {m['gpu']}, torch {m['torch']} (CUDA {m['cuda']}), megatron-core {m['megatron_core']}, "
             f"{res['seconds']} s", "", "| part | verdict |", "| --- | --- |"]
    for part, bad in res["verdicts"].items():
        lines.append(f"| {part} | {'PASS' if not bad else 'FAIL (' + str(len(bad)) + ')'} |")
    if "not_run" in res:
        lines += ["", f"Not run: {res['not_run']}"]
    for part, bad in res["verdicts"].items():
        if bad:
            lines += ["", f"## {part} failures", ""] + [f"- {b}" for b in bad[:40]]
    for key in ("cli_1gpu", "cli_2gpu"):
        if key in res:
            lines += ["", f"## {key} (step, reward/mean, train/loss, grad_norm, used_route_match)", "",
                      "| run | step | reward | loss | grad_norm | used_route_match |", "| --- | --- | --- | --- | --- | --- |"]
            for name, metrics in res[key]["runs"].items():
                for mt in metrics:
                    lines.append(f"| {name} | {mt['step']} | {mt.get('reward/mean')} | {mt.get('train/loss'):.6g} | "
                                 f"{mt.get('train/grad_norm'):.6g} | {mt.get('replay/used_route_match')} |")
    if "overhead" in res:
        for name, part in res["overhead"].items():
            lines += ["", f"## {name} (exit {part['exit_code']})", ""] + part["table"]
    with open(os.path.join(out, "gpu_suite.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
