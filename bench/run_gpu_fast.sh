#!/usr/bin/env bash
# The fast TE-free trainer on ONE GPU in one command (<= 280 s on an H200 by default):
#
#     bash bench/run_gpu_fast.sh            # tables on stdout; $OUT/bench_gpu_fast.{md,json,log}
#
# Parts: (1) bench/layer_mfu.py at Qwen3-30B-A3B layer shape: SequentialMLP + unfused attention vs GroupedExperts +
# SDPA, step time / TFLOP/s / MFU, bf16 expert agreement, replay on the fast path (R3/off, host syncs);
# (2) bench/profile_step.py: torch.profiler over 2 fast-path steps (GPU time by module, top kernels, top CPU ops,
# the step inside megatron's DDP); (3) bench/grpo_throughput.py on configs/models/qwen3_moe_1b_bench.json, off vs
# R3, bf16 trainer by default (--trainer-dtype auto), CUDA-graph decode, phases and TFLOP/s (each mode <= 130 s);
# (4) the bf16 replay checks of tests/gpu/gpu_checks.py if time is left.
#
# Needs megatron-core (and pybase64) importable; on the lent machine carry the wheels in .whl (see
# /work/.library/device/README.md): they are installed into /tmp/site here when megatron is not importable.
# Parts run in priority order, each under a time limit; whatever does not fit in BENCH_GPU_BUDGET_S (default 270 s)
# is reported as skipped (BENCH_GPU_BUDGET_S=470 runs them all). At most 3 files are written to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_gpu_out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/bench_gpu_fast.XXXXXX)
MD=$OUT/bench_gpu_fast.md
LOG=$OUT/bench_gpu_fast.log
BUDGET=${BENCH_GPU_BUDGET_S:-270}
PY=${PYTHON:-python3}
START=$(date +%s)
: > "$MD"
: > "$LOG"
. bench/gpu_parts.sh
gpu_environment
gpu_header bench/run_gpu_fast.sh

# 1. layer fwd+bwd at Qwen3-30B-A3B shape: megatron local vs fast path, MFU, expert agreement, replay on it
part layer_mfu 70 $PY bench/layer_mfu.py --device cuda --preset qwen3-30b-a3b-4l --steps 10 --warmup 2 \
  --slow-steps 2 --json "$WORK/layer_mfu.json"
# 2. where the fast step's time goes (profiler, fast arm only, 2 steps; then the step inside DDP)
part profile_step 40 $PY bench/profile_step.py --device cuda --steps 2 --warmup 3 --top 25 \
  --json "$WORK/profile_step.json"
# 3. GRPO step throughput on the ~1B bench model, off vs R3, bf16 trainer with grouped experts + SDPA (auto)
# (per-mode timeout: half of what is left, at most 90 s, so a slow mode cannot take the other one's tables with it)
# (a cold start compiles the fused norm/SwiGLU kernels: ~15 s of step 0)
MODE_S=$(( (BUDGET - ($(date +%s) - START) - 6) / 2 ))
[ "$MODE_S" -gt 130 ] && MODE_S=130
part grpo_throughput 265 $PY bench/grpo_throughput.py --device cuda --max-new-tokens 64 --steps 3 --timeout "$MODE_S" \
  --hf-cuda-graph --json "$WORK/grpo_throughput.json"
# 4. the bf16 replay checks (gloo-free single-GPU part of tests/gpu/gpu_checks.py), if time is left
part gpu_checks 60 $PY tests/gpu/gpu_checks.py --out "$WORK/gpu_checks" --only replay_bf16
[ -f "$WORK/gpu_checks/gpu_report.json" ] && cp "$WORK/gpu_checks/gpu_report.json" "$WORK/gpu_checks.json"

merge_results "$OUT/bench_gpu_fast.json"
gpu_footer
