"""GRPO step throughput, off vs R3, and where the time goes: `pretrain_grpo.py` for a few steps per mode, read back
from its metrics.jsonl (`timing/*`, `throughput/tokens_per_s`).

    python bench/grpo_throughput.py --device cpu                     # tiny model (configs/models/qwen3_moe_tiny.json)
    python bench/grpo_throughput.py --device cuda --json out.json    # ~1B model (configs/models/qwen3_moe_1b_bench.json)

Each mode is one `pretrain_grpo.py` process (embedded hf rollout engine in bf16 on the same device, megatron trainer
per --trainer-dtype (auto: bf16 on a GPU), synthetic task `copy_last`, a randomly initialised model, so responses run to
--max-new-tokens). Step 0 includes lazy initialisation and is reported apart; the table gives medians over the
other steps. Phases: rollout (generation + route capture + validation + rewards), old_logprob (the old-logprob pass;
R3 replays there), update (all mini-batch forward/backward + optimizer steps), weight_sync (policy -> engine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO, environment, print_table, write_json  # noqa: E402

DEFAULTS = {
    "cpu": dict(hf_config="configs/models/qwen3_moe_tiny.json", prompts=16, group_size=8, max_new_tokens=16,
                steps=4, micro_batch_size=16, global_batch_size=64),
    # one micro-batch per mini-batch on a GPU: at 64 x <= 192 tokens a 1B MoE step is launch-bound, and smaller
    # micro-batches only add launches (measured on an H200: 2207 tokens/s at micro-batch 16, 4443 at 64)
    "cuda": dict(hf_config="configs/models/qwen3_moe_1b_bench.json", prompts=16, group_size=8, max_new_tokens=128,
                 steps=3, micro_batch_size=64, global_batch_size=64),
}
PHASES = ("rollout", "scoring", "batching", "old_logprob", "reference", "update", "weight_sync", "metrics")


def run_mode(args, mode: str, work: str) -> dict:
    run_dir = os.path.join(work, f"grpo_{mode}")
    cmd = [
        sys.executable, "pretrain_grpo.py", "--hf-config", args.hf_config, "--task", "copy_last",
        "--reward-fn", "synthetic", "--rollout-engine", "hf", "--rollout-dtype", "bf16", "--router-replay", mode,
        "--grpo-prompts-per-step", str(args.prompts), "--grpo-group-size", str(args.group_size),
        "--global-batch-size", str(args.global_batch_size), "--micro-batch-size", str(args.micro_batch_size),
        "--max-new-tokens", str(args.max_new_tokens), "--seq-length", str(args.seq_length),
        "--train-iters", str(args.steps), "--lr", "1e-6", "--seed", "1234", "--log-interval", "1",
        "--run-dir", run_dir, "--no-progress", "--save-interval", "1000000",
    ]
    if args.max_tokens_per_microbatch:
        cmd += ["--max-tokens-per-microbatch", str(args.max_tokens_per_microbatch)]
    if args.bf16:
        cmd.append("--bf16")
    else:
        cmd += ["--trainer-dtype", args.trainer_dtype]
    if args.recompute:
        cmd += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    if args.hf_cuda_graph:
        cmd.append("--hf-cuda-graph")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout, env=env)
        code, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as expired:  # keep the steps it logged
        code = "timeout"
        log = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (expired.stdout, expired.stderr))
    wall = time.perf_counter() - start
    out = {"mode": mode, "exit_code": code, "wall_s": wall, "command": " ".join(cmd[1:])}
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as handle:
            out["steps"] = [json.loads(line) for line in handle if line.strip()]
    if code != 0:
        out["log"] = log[-4000:]
    return out


def summarise(run: dict) -> dict:
    steps = run["steps"]
    timed = steps[1:] if len(steps) > 1 else steps
    median = lambda key: statistics.median(s.get(key, 0.0) for s in timed)  # noqa: E731
    tokens = [s["throughput/tokens_per_s"] * s["timing/step_s"] for s in timed]
    out = {"tokens_per_step": statistics.median(tokens), "tokens_per_s": median("throughput/tokens_per_s"),
           "step_s": median("timing/step_s"), "first_step_s": steps[0]["timing/step_s"]}
    for phase in PHASES:
        out[f"{phase}_s"] = median(f"timing/{phase}_s")
    # the step's time outside every timed phase (should be ~0: a large value is time nobody accounts for)
    out["other_s"] = statistics.median(s["timing/step_s"] - sum(s.get(f"timing/{p}_s", 0.0) for p in PHASES)
                                       for s in timed)
    for key in ("r3/rollout_train_k3_kl", "replay/routing_agreement", "replay/used_route_match",
                "rollout/response_length_mean", "throughput/tflops_per_gpu", "throughput/mfu",
                "throughput/train_tflops_per_gpu", "throughput/train_mfu"):
        out[key] = median(key) if all(key in s for s in timed) else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--hf-config", default=None)
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps per mode (step 0 is warm-up)")
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--global-batch-size", type=int, default=None)
    parser.add_argument("--max-tokens-per-microbatch", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="force megatron's --bf16")
    parser.add_argument("--trainer-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="pretrain_grpo.py --trainer-dtype (auto: bf16 + grouped-GEMM experts on a GPU, fp32 on CPU)")
    parser.add_argument("--recompute", action="store_true", help="full activation recompute")
    parser.add_argument("--hf-cuda-graph", action="store_true",
                        help="the hf engine replays its decode forward from a CUDA graph "
                             "(pretrain_grpo.py --hf-cuda-graph)")
    parser.add_argument("--modes", nargs="*", default=["R3", "off"])
    parser.add_argument("--timeout", type=int, default=1800, help="per mode, seconds")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seq_length is None:
        args.seq_length = 64 * -(-(args.max_new_tokens + 32) // 64)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available here")
    work = tempfile.mkdtemp(prefix="grpo_throughput_")
    runs = {mode: run_mode(args, mode, work) for mode in args.modes}
    results = {"environment": environment(args.device), "args": vars(args), "runs": runs}
    failed = [m for m, r in runs.items() if r["exit_code"] != 0]
    for mode in failed:
        print(f"--- {mode} failed (exit {runs[mode]['exit_code']}, {len(runs[mode].get('steps', []))} steps logged):"
              f"\n{runs[mode]['log']}", flush=True)
    summaries = {m: summarise(r) for m, r in runs.items() if r.get("steps")}
    results["summary"] = summaries
    if summaries:
        rows = []
        for mode, s in summaries.items():
            step = s["step_s"] or float("nan")
            rows.append((mode, round(s["tokens_per_step"]), round(s["tokens_per_s"], 1), round(s["step_s"], 3),
                         *(f"{s[f'{p}_s']:.3f} ({100 * s[f'{p}_s'] / step:.0f}%)" for p in (*PHASES, "other")),
                         round(s["first_step_s"], 2), f"{runs[mode]['wall_s']:.0f}",
                         s["throughput/tflops_per_gpu"], s["throughput/train_tflops_per_gpu"],
                         s["throughput/train_mfu"]))
        model = os.path.basename(args.hf_config)
        print_table(f"GRPO step on {args.device}: {model}, {args.prompts} prompts x {args.group_size} samples, "
                    f"<= {args.max_new_tokens} new tokens, mini-batch {args.global_batch_size}, micro-batch "
                    f"{args.micro_batch_size}, {'bf16' if args.bf16 else args.trainer_dtype} trainer, bf16 hf engine"
                    f"{' (CUDA-graph decode)' if args.hf_cuda_graph else ''}; medians "
                    f"of steps 1..{args.steps - 1}",
                    ["mode", "tokens/step", "tokens/s", "step s", *(f"{p} s" for p in (*PHASES, "other")), "step 0 s",
                     "process wall s", "TFLOP/s/GPU (step)", "TFLOP/s/GPU (trainer passes)", "MFU (trainer passes)"],
                    rows)
        if "R3" in summaries and "off" in summaries:
            r3, off = summaries["R3"], summaries["off"]
            ratio_rows = [("step time R3 / off", round(r3["step_s"] / off["step_s"], 3)),
                          ("tokens/s R3 / off", round(r3["tokens_per_s"] / off["tokens_per_s"], 3)),
                          ("old_logprob R3 / off", round(r3["old_logprob_s"] / max(off["old_logprob_s"], 1e-9), 3)),
                          ("update R3 / off", round(r3["update_s"] / max(off["update_s"], 1e-9), 3)),
                          ("k3 KL rollout/train R3, off", f"{r3['r3/rollout_train_k3_kl']:.3e}, "
                                                          f"{off['r3/rollout_train_k3_kl']:.3e}"),
                          ("routing agreement (off) / used route match (R3)",
                           f"{off['replay/routing_agreement']:.4f} / {r3['replay/used_route_match']:.4f}")]
            print_table("R3 vs off", ["quantity", "value"], ratio_rows)
            results["ratios"] = dict(ratio_rows)
    write_json(args.json, results)
    if failed:
        raise SystemExit(f"modes failed: {failed}")


if __name__ == "__main__":
    main()
