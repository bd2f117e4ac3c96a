# Shared by the one-command GPU scripts (bench/run_gpu.sh, bench/run_gpu_fast.sh, tests/gpu/run_gpu_suite.sh);
# sourced, not run. Run from the repository root.
#
#   gpu_environment          exports PYTHONPATH / NVLink-multicast-off variables; installs the carried wheels
#                            (.whl: megatron-core, pybase64) into /tmp/site when megatron-core is not importable
#   gpu_header TITLE         the card, versions and revision as a Markdown block, to stdout and $MD
#   part NAME LIMIT_S CMD... runs CMD under `timeout` (at most what is left of $BUDGET s since $START), appends its
#                            tables to $MD (and stdout), its whole log to $LOG; skipped when under 25 s are left
#   merge_results OUT_JSON   merges the *.json files of $WORK into one file
#   gpu_footer               the total time and the files written
#
# The caller sets PY, and for part/merge_results/gpu_footer also OUT, WORK, MD, LOG, BUDGET and START.

gpu_environment() {
  export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  if ! $PY -c "import megatron.core" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
  fi
}

gpu_header() {
  {
    echo "# $1, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import sys, torch, megatron.core, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__, '| cpu cores', __import__('os').cpu_count())" 2>&1 | tail -1
    $PY -c "import pybase64; print('pybase64', pybase64.__version__)" 2>/dev/null || echo "pybase64 missing"
    git rev-parse --short HEAD 2>/dev/null || echo "no git here"
    echo '```'
  } | tee -a "$MD"
}

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

merge_results() {
  $PY - "$WORK" "$1" <<'PYEOF'
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
PYEOF
}

gpu_footer() {
  printf '\nTotal %s s. Files: %s\n' "$(( $(date +%s) - START ))" "$(ls "$OUT" | tr '\n' ' ')" | tee -a "$MD"
}
