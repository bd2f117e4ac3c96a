"""DeepSeek-V3 family on the lent GPU(s), one command, a printed table and JSON under $OUT.

    OUT=/tmp/ds_gpu python tests/gpu/deepseek_v3_gpu.py          # (bash tests/gpu/run_deepseek_v3_gpu.sh)

Parts (each a subprocess; a part that fails is reported and the next one runs):
  replay     tests/distributed/replay_checks.py on the DeepSeek-V3 layouts (MLA + sigmoid router with expert bias,
             groups, scaling, shared expert) x recompute none/full/moe x fp32/bf16, on every visible GPU (NCCL):
             ds_dp4 (= DP over the GPUs) always; ds_tp2sp, ds_ep2, ds_pp2, ds_cp2 with 2 or more GPUs
  grpo       tests/e2e/grpo_runs.py, one process: the tiny DeepSeek-V3 off / R3 / R3 with a bf16 trainer, and
             configs/models/deepseek_v3_small.json (512 hidden, 32 experts top-4, 4 groups) off / R3 in bf16,
             3 steps each
Verdicts: every replay check true; R3 runs: replay/used_route_match == 1.0 and train/ppo_kl_first_minibatch == 0
on every step; every run finishes its steps. Without CUDA it runs the same on the CPU (gloo, 1 process, tiny only),
which is what the CPU check of this script exercises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TINY = ["--config", "configs/demo_deepseek_v3.yaml", "--grpo-prompts-per-step", "8", "--grpo-group-size", "4",
        "--global-batch-size", "16", "--micro-batch-size", "4", "--max-new-tokens", "2", "--no-progress",
        "--save-interval", "1000", "--train-iters", "3"]
SMALL = [*TINY, "--hf-config", "configs/models/deepseek_v3_small.json", "--max-new-tokens", "8", "--seq-length", "64",
         "--bf16", "--lr", "1e-4"]


def env() -> dict:
    out = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="4", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    return out


def run(cmd: list[str], log, limit: float) -> int:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    try:
        return subprocess.run(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
    except subprocess.TimeoutExpired:
        return 124


def main() -> None:
    import torch

    out = os.environ.get("OUT", "/tmp/deepseek_v3_gpu")
    os.makedirs(out, exist_ok=True)
    gpus = torch.cuda.device_count()
    nproc = max(1, gpus)
    start = time.time()
    res = {"machine": {"gpus": gpus, "gpu": torch.cuda.get_device_name(0) if gpus else "cpu",
                       "torch": torch.__version__}}
    verdicts: dict[str, list[str]] = {}
    log = open(os.path.join(out, "deepseek_v3_gpu.log"), "w")

    layouts = ["ds_dp4"] + (["ds_tp2sp", "ds_ep2", "ds_pp2", "ds_cp2"] if gpus >= 2 else [])
    dtypes = ["fp32", "bf16"] if gpus else ["fp32"]
    replay_json = os.path.join(out, "replay.json")
    code = run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                "tests/distributed/replay_checks.py", *layouts, "--dtype", *dtypes, "--out", replay_json], log, 240)
    records = json.load(open(replay_json)) if os.path.exists(replay_json) else []
    bad = [] if code == 0 else [f"exit {code}"]
    rows = []
    for r in records:
        failed = [k for k, v in (r.get("results") or {}).items() if not v]
        rows.append((f"{r['layout']}/{r['recompute']}/{r['dtype']}", "ok" if not (failed or r.get("error")) else
                     f"FAIL {failed or r['error'][:80]}", r.get("seconds")))
        if failed or r.get("error"):
            bad.append(rows[-1][0])
    res["replay"], verdicts["replay"] = {"exit_code": code, "records": records}, bad

    runs = [{"name": f"tiny_{m}", "flags": [*TINY, "--router-replay", m]} for m in ("off", "R3")]
    runs.append({"name": "tiny_R3_bf16", "flags": [*TINY, "--router-replay", "R3", "--bf16"]})
    if gpus:
        runs += [{"name": f"small_{m}", "flags": [*SMALL, "--router-replay", m]} for m in ("off", "R3")]
    runs_file, grpo_json = os.path.join(out, "runs.json"), os.path.join(out, "grpo.json")
    with open(runs_file, "w") as handle:
        json.dump(runs, handle)
    code = run([sys.executable, "tests/e2e/grpo_runs.py", "--runs", runs_file, "--root", os.path.join(out, "runs"),
                "--out", grpo_json], log, 300)
    records = json.load(open(grpo_json)) if os.path.exists(grpo_json) else []
    bad = [] if code == 0 else [f"exit {code}"]
    for record in records:
        metrics = record["metrics"]
        if len(metrics) != 3:
            bad.append(f"{record['name']}: {len(metrics)} steps")
        for m in metrics:
            if "R3" in record["name"] and (m.get("replay/used_route_match") != 1.0
                                           or m.get("train/ppo_kl_first_minibatch") != 0.0):
                bad.append(f"{record['name']} step {m['step']}: used_route_match {m.get('replay/used_route_match')}"
                           f", ppo_kl_first_minibatch {m.get('train/ppo_kl_first_minibatch')}")
            rows.append((f"grpo {record['name']} step {m['step']}",
                         f"k3 {m.get('r3/rollout_train_k3_kl', float('nan')):.3e} | match "
                         f"{m.get('replay/used_route_match')} | agree {m.get('replay/routing_agreement', 0):.4f} | "
                         f"kl0 {m.get('train/ppo_kl_first_minibatch')}", m.get("timing/step_s")))
    res["grpo"], verdicts["grpo"] = {"exit_code": code, "records": records}, bad

    res["verdicts"], res["seconds"] = verdicts, round(time.time() - start, 1)
    with open(os.path.join(out, "deepseek_v3_gpu.json"), "w") as handle:
        json.dump(res, handle, indent=1)
    print(f"| part | result | s |\n|---|---|---|")
    for name, result, seconds in rows:
        print(f"| {name} | {result} | {seconds} |")
    ok = all(not v for v in verdicts.values())
    print(f"DeepSeek-V3 GPU check: {'PASS' if ok else 'FAIL'} on {res['machine']['gpu']} x {gpus} in "
          f"{res['seconds']} s; {json.dumps(verdicts)}; JSON in {out}/deepseek_v3_gpu.json")
    sys.stdout.flush()
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()
