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
