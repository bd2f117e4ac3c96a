#!/usr/bin/env bash
# The GPU part of the bench suite in ONE command, for the lent H100 (about 8 minutes, one GPU):
#
#     bash bench/run_gpu.sh                 # tables on stdout; $OUT/bench_gpu.{md,json,log}
#
# Needs megatron-core (and pybase64) importable; on the lent machine carry the wheels in .whl (see
# /work/.library/device/README.md): they are installed into /tmp/site here when megatron is not importable.
# Parts run in priority order, each under a time limit; whatever does not fit in BENCH_GPU_BUDGET_S (default 540 s)
# is reported as skipped. At most 3 files are written to $OUT (the lent machine returns at most 8).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_gpu_out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/bench_gpu.XXXXXX)
MD=$OUT/bench_gpu.md
LOG=$OUT/bench_gpu.log
BUDGET=${BENCH_GPU_BUDGET_S:-540}
BASELINE=${BENCH_BASELINE:-af9bcad}   # the commit before the layout / recompute-queue optimisations (a git revision, or
                                      # a folder holding that revision's files where the machine has no git history)
PY=${PYTHON:-python3}
START=$(date +%s)
: > "$MD"
: > "$LOG"
. bench/gpu_parts.sh
gpu_environment
gpu_header bench/run_gpu.sh

# 1. bf16 replay checks + no host sync in layout/copy/install/replay (re-validates the optimised code paths)
part gpu_checks 90 $PY tests/gpu/gpu_checks.py --out "$WORK/gpu_checks" --only replay_bf16 sync_error
[ -f "$WORK/gpu_checks/gpu_report.json" ] && cp "$WORK/gpu_checks/gpu_report.json" "$WORK/gpu_checks.json"
# 2. host syncs with a calibrated counter
part sync_count 90 $PY bench/sync_count.py --device cuda --json "$WORK/sync_count.json"
# 3. layout pipeline cost (host CPU of the GPU machine + copy + int64 on the GPU), before/after
part layout_cost 90 $PY bench/layout_cost.py --device cuda --baseline "$BASELINE" --json "$WORK/layout_cost.json"
# 4. GRPO step throughput on the ~1B model, off vs R3 (each mode one pretrain_grpo.py process)
part grpo_throughput 330 $PY bench/grpo_throughput.py --device cuda --max-new-tokens 64 --steps 3 --timeout 160 \
  --json "$WORK/grpo_throughput.json"
# 5. replay memory: MicrobatchRoutes and the recompute queue at Qwen3-30B-A3B layer shape (before/after)
part replay_memory 100 $PY bench/replay_memory.py --device cuda --preset qwen3-30b-a3b-4l --baseline "$BASELINE" \
  --json "$WORK/replay_memory.json"
# 6. route transport: bytes per id, SGLang decode throughput on this host's CPU, copy rate
part route_transport 60 $PY bench/route_transport.py --device cuda --json "$WORK/route_transport.json"
# 7. replay overhead at Qwen3-30B-A3B layer shape
part overhead_none 120 $PY bench/replay_overhead.py --device cuda --preset qwen3-30b-a3b-4l --recompute none \
  --steps 20 --warmup 2 --json "$WORK/overhead_none.json"
part overhead_full 150 $PY bench/replay_overhead.py --device cuda --preset qwen3-30b-a3b-4l --recompute full \
  --steps 20 --warmup 2 --json "$WORK/overhead_full.json"
# 8. mismatch reduction, hf engine bf16 vs trainer fp32, same batch (also measured on CPU)
part mismatch 120 $PY bench/mismatch_reduction.py --device cuda --model deep --steps 4 --json "$WORK/mismatch.json"

merge_results "$OUT/bench_gpu.json"
gpu_footer
