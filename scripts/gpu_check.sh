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

# Kernel times of the R = 1 timing run, from Nsight Systems when it is installed.
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys 2>/dev/null || true)
if [ -n "$NSYS" ] && [ "${PROFILE:-1}" = 1 ]; then
  echo "== kernel profile (nsys)"
  PYTHONPATH=$PWD:$PWD/tests JAX_DEEPEP_TIMING_SMS=${PROFILE_SMS:-20} XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 \
    "$NSYS" profile -o /tmp/jax_deepep_profile --force-overwrite true -t cuda "$PY" tests/test_gpu_intranode.py \
    --rank 0 --num-ranks 1 --port 0 --timing-only > "$LOGS/profile.log" 2>&1
  "$NSYS" stats -q --report cuda_gpu_kern_sum --format csv /tmp/jax_deepep_profile.nsys-rep > "$LOGS/kernels.csv" 2>/dev/null
  echo "kernels at num_sms=${PROFILE_SMS:-20} (medians over every launch of the timing run):"
  "$PY" - "$LOGS/kernels.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(l for l in open(sys.argv[1]) if "," in l))
for r in rows[:14]:
    print(f"{r['Name'][:60]:60s} n={r['Instances']:>6s} med={float(r['Med (ns)'])/1e3:8.1f} us")
PY
else
  echo "(no nsys: kernel profile skipped)"
fi
exit "$status"
