#!/usr/bin/env bash
# On the GPU machine: build libjax_deepep_cuda.so, run the intranode GPU tests (R = 1 in one
# process, R = 2 and 4 as processes sharing GPU 0) and the R = 1 timing.
#   scripts/gpu_check.sh [pytest -k expression]
# Logs and timing.json go to $OUT (or /tmp/jax_deepep_gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-/opt/torch/.venv/bin/python3}
LOGS=${OUT:-/tmp/jax_deepep_gpu_check}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
echo "== build"
start=$(date +%s)
if ! { cmake -S . -B build/gpu -DPython_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release &&
       cmake --build build/gpu -j 16 --target jax_deepep_cuda; } > "$LOGS/build.log" 2>&1; then
  tail -40 "$LOGS/build.log"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"

echo "== tests"
export JAX_DEEPEP_LIBRARY=$PWD/build/gpu/libjax_deepep_cuda.so
export JAX_DEEPEP_TIMING_JSON=$LOGS/timing.json
"$PY" -m pytest -q -p no:cacheprovider -rA -s tests/test_gpu_intranode.py ${1:+-k "$1"} 2>&1 | tee "$LOGS/tests.log" |
  grep -E "^(ok|FAIL|time|rank|----|E |FAILED|PASSED|SKIPPED)|passed|failed|Error|error" | head -150
status=${PIPESTATUS[0]}

# Kernel durations of the R = 1 timing (torch's CUPTI profiler, where torch is installed).
if [ "${PROFILE:-1}" = 1 ]; then
  echo "== kernel durations"
  PYTHONPATH=$PWD:$PWD/tests JAX_DEEPEP_TIMING_SMS=${PROFILE_SMS:-20} JAX_DEEPEP_KERNEL_TIMES=1 \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 "$PY" tests/test_gpu_intranode.py --rank 0 --num-ranks 1 --port 0 \
    --timing-only 2>&1 | tee "$LOGS/kernels.log" | grep -E "^(kernel|time)"
fi
exit "$status"
