#!/usr/bin/env bash
# The fast TE-free trainer (issue 17) on ONE GPU in one command (<= 280 s on an H200 by default):
#
#     bash bench/run_gpu_fast.sh            # tables on stdout; $OUT/bench_gpu_fast.{md,json,log}
#
# Parts: (1) bench/layer_mfu.py at Qwen3-30B-A3B layer shape: SequentialMLP + unfused attention vs GroupedExperts +
# SDPA, step time / TFLOP/s / MFU, bf16 expert agreement, replay on the fast path (R3/off, host syncs);
# (2) bench/profile_step.py: torch.profiler over 2 fast-path steps (GPU time by module, top kernels, top CPU ops,
# the step inside megatron's DDP); (3) bench/grpo_throughput.py on configs/models/qwen3_moe_1b_bench.json, off vs
# R3, bf16 trainer by default (--trainer-dtype auto), phases and TFLOP/s (each mode <= 90 s);
# (4) the bf16 replay checks of tests/gpu/gpu_checks.py if time is left.
#
# Needs megatron-core (and pybase64) importable; on the lent machine carry the wheels in .whl (see
# /work/.library/device/README.md): they are installed into /tmp/site here when megatron is not importable.
# Parts run in priority order, each under a time limit; whatever does not fit in BENCH_GPU_BUDGET_S (default 270 s)
# is reported as skipped (BENCH_GPU_BUDGET_S=430 runs them all). At most 3 files are written to $OUT.
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
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

if ! $PY -c "import megatron.core" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
fi
{
  echo "# bench/run_gpu_fast.sh, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import sys, torch, megatron.core, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__, '| cpu cores', __import__('os').cpu_count())" 2>&1 | tail -1
  $PY -c "import pybase64; print('pybase64', pybase64.__version__)" 2>/dev/null || echo "pybase64 missing"
  git rev-parse --short HEAD 2>/dev/null || echo "no git here"
  echo '```'
} | tee -a "$MD"

# part NAME LIMIT_S CMD...: runs CMD under `timeout`, appends its tables to $MD (and stdout), its log to $LOG
part() {
  local name=$1 limit=$2
  shift 2
  local now left t0 rc
  now=$(date +%s)
  left=$((BUDGET - (now - START)))
  if [ "$left" -lt 25 ]; then
    printf '\n## %s: SKIPPED (time budget of %s s spent)\n' "$name" "$BUDGET" | tee -a "$MD"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  printf '\n## %s\n\n`%s`\n' "$name" "$*" | tee -a "$MD"
  t0=$(date +%s)
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  grep -E '^(\||###|\[[a-z_0-9]+\] |wrote |baseline |pybase64 )' "$WORK/$name.log" | grep -v '^wrote ' | tee -a "$MD"
  if [ "$rc" -ne 0 ]; then
    printf '\n**%s: exit %s%s** (last lines of its log):\n```\n' "$name" "$rc" "$([ "$rc" -eq 124 ] && echo ', timed out')" | tee -a "$MD"
    grep -v -i 'warn' "$WORK/$name.log" | tail -25 | tee -a "$MD"
    echo '```' | tee -a "$MD"
  fi
  printf '\n(%s: exit %s, %s s)\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" | tee -a "$MD"
  { echo "===== $name: $*"; cat "$WORK/$name.log"; } >> "$LOG"
}

# 1. layer fwd+bwd at Qwen3-30B-A3B shape: megatron local vs fast path, MFU, expert agreement, replay on it
part layer_mfu 70 $PY bench/layer_mfu.py --device cuda --preset qwen3-30b-a3b-4l --steps 10 --warmup 2 \
  --slow-steps 2 --json "$WORK/layer_mfu.json"
# 2. where the fast step's time goes (profiler, fast arm only, 2 steps; then the step inside DDP)
part profile_step 40 $PY bench/profile_step.py --device cuda --steps 2 --warmup 3 --top 25 \
  --json "$WORK/profile_step.json"
# 3. GRPO step throughput on the ~1B bench model, off vs R3, bf16 trainer with grouped experts + SDPA (auto)
# (per-mode timeout: half of what is left, at most 90 s, so a slow mode cannot take the other one's tables with it)
MODE_S=$(( (BUDGET - ($(date +%s) - START) - 6) / 2 ))
[ "$MODE_S" -gt 90 ] && MODE_S=90
part grpo_throughput 185 $PY bench/grpo_throughput.py --device cuda --max-new-tokens 64 --steps 3 --timeout "$MODE_S" \
  --json "$WORK/grpo_throughput.json"
# 4. the bf16 replay checks (gloo-free single-GPU part of tests/gpu/gpu_checks.py), if time is left
part gpu_checks 60 $PY tests/gpu/gpu_checks.py --out "$WORK/gpu_checks" --only replay_bf16
[ -f "$WORK/gpu_checks/gpu_report.json" ] && cp "$WORK/gpu_checks/gpu_report.json" "$WORK/gpu_checks.json"

$PY - "$WORK" "$OUT/bench_gpu_fast.json" <<'EOF'
import glob, json, os, sys
work, out = sys.argv[1], sys.argv[2]
merged = {}
for path in sorted(glob.glob(os.path.join(work, "*.json"))):
    try:
        with open(path) as handle:
            merged[os.path.basename(path)[:-5]] = json.load(handle)
    except Exception as error:  # noqa: BLE001
        merged[os.path.basename(path)[:-5]] = {"unreadable": str(error)}
with open(out, "w") as handle:
    json.dump(merged, handle, indent=1, default=str)
print(f"merged {len(merged)} result files into {out}")
EOF
printf '\nTotal %s s. Files: %s\n' "$(( $(date +%s) - START ))" "$(ls "$OUT" | tr '\n' ' ')" | tee -a "$MD"
