#!/usr/bin/env bash
# DeepSeek-V3 family on the lent GPU(s) in one command (see tests/gpu/deepseek_v3_gpu.py):
#     bash tests/gpu/run_deepseek_v3_gpu.sh        # table on stdout, $OUT/deepseek_v3_gpu.json and .log
set -u
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/deepseek_v3_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
. bench/gpu_parts.sh
gpu_environment
exec $PY tests/gpu/deepseek_v3_gpu.py
