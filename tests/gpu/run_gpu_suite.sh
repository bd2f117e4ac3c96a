#!/usr/bin/env bash
# The standing GPU suite in ONE command per machine kind (see tests/gpu/gpu_suite.py for what runs and the
# tolerances). About 8 minutes on an H200; on 1 GPU the 2-GPU parts are reported as not run.
#
#     bash tests/gpu/run_gpu_suite.sh          # report: $OUT/gpu_suite.md, $OUT/gpu_suite.json, $OUT/gpu_suite.log
#
# The lent machine has no megatron-core: carry the wheels in .whl (megatron-core 0.19.2 and pybase64, cp312
# manylinux; see /work/.library/device/README.md); they are installed into /tmp/site when megatron is missing.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_suite_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
. bench/gpu_parts.sh
gpu_environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
exec $PY tests/gpu/gpu_suite.py --out "$OUT" --budget-s "${GPU_SUITE_BUDGET_S:-470}"
