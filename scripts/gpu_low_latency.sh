#!/usr/bin/env bash
# On a GPU machine: build libjax_deepep_nvshmem.so on its own (cmake/jax_deepep_nvshmem.cmake), run
# the low-latency GPU tests (R = 1, and R = 2 as two NVSHMEM PEs sharing GPU 0) and the latency
# timing. Logs and low_latency_timing.json go to $1 (default $OUT, else /tmp/jax_deepep_ll).
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-${OUT:-/tmp/jax_deepep_ll}}
mkdir -p "$out_dir"
python=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x /opt/torch/.venv/bin/python3 ]; then python=/opt/torch/.venv/bin/python3; fi
export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
nvshmem=$("$python" -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])")

build=${BUILD_DIR:-/tmp/jax_deepep_nvshmem_build}
mkdir -p "$build/project"
cat > "$build/project/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.24)
project(jax_deepep_nvshmem_only LANGUAGES CXX CUDA)
include($PWD/cmake/jax_deepep_nvshmem.cmake)
CMAKE
cmake -S "$build/project" -B "$build" -DPython_EXECUTABLE="$python" -DCMAKE_BUILD_TYPE=Release >"$out_dir/build.log" 2>&1
cmake --build "$build" -j 16 >>"$out_dir/build.log" 2>&1 || { tail -40 "$out_dir/build.log"; exit 1; }
echo "built $build/libjax_deepep_nvshmem.so"

export JAX_DEEPEP_NVSHMEM_LIBRARY="$build/libjax_deepep_nvshmem.so"
export LD_LIBRARY_PATH="$nvshmem/lib:${LD_LIBRARY_PATH:-}"
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
export NVSHMEM_DISABLE_NVLS=1
export JAX_DEEPEP_TIMING_JSON="$out_dir/low_latency_timing.json"
export PYTHONUNBUFFERED=1
set -o pipefail
"$python" -m pytest -v -s -p no:cacheprovider tests/test_gpu_low_latency.py 2>&1 | tee "$out_dir/test.log"

# Kernel durations at the timing size (R = 1), from Nsight Compute when it is there.
if command -v ncu >/dev/null; then
  PYTHONPATH="$PWD:$PWD/tests" XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 timeout 240 ncu --clock-control none \
    --target-processes all -k "regex:(dispatch|combine)_(send|recv)_kernel" --launch-count 40 \
    --metrics gpu__time_duration.sum --csv --log-file "$out_dir/ncu.csv" \
    "$python" tests/test_gpu_low_latency.py --rank 0 --num-ranks 1 --profile >"$out_dir/ncu_run.log" 2>&1 \
    || tail -20 "$out_dir/ncu_run.log"
  "$python" - "$out_dir/ncu.csv" <<'PY' | tee "$out_dir/ncu_summary.txt"
import csv, statistics, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 5]
head = rows[0]
name, value, unit = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
times = {}
for i, r in enumerate(rows[1:]):  # launch order: 5 FP8 rounds, then 5 bf16 rounds, 4 kernels each
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[r[unit]]
    kernel = next(k for k in ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv") if k in r[name])
    mode = "fp8" if i < 20 else "bf16"
    times.setdefault(f"{kernel} ({mode})", []).append(float(r[value].replace(",", "")) * scale)
print("kernel durations (us; ncu, T=128 H=7168 K=8 E=288, R=1):")
for kernel, ts in times.items():
    print(f"  {kernel:22s} median {statistics.median(ts):8.1f}  min {min(ts):8.1f}  max {max(ts):8.1f}  n={len(ts)}")
PY
fi
