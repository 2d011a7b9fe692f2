#!/usr/bin/env bash
# On the GPU machine, one call: build both CUDA libraries with the root CMake, run every GPU test,
# the normal benchmark, both examples and the demo on the CUDA backend, then the low-latency benchmark
# (most wanted first: a call cut short still brings back the first logs), and last the normal bench
# without XLA command buffers, to test where the wall-time overhead of our ops comes from.
# Each step has its own time limit; logs, JSON and charts go to $OUT (default /tmp/jax_deepep_gpu_all).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-/opt/torch/.venv/bin/python3}
LOGS=${OUT:-/tmp/jax_deepep_gpu_all}
mkdir -p "$LOGS"
NV=$("$PY" -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])")
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
export JAX_DEEPEP_LIBRARY=$PWD/build/gpu_all/libjax_deepep_cuda.so
export JAX_DEEPEP_NVSHMEM_LIBRARY=$PWD/build/gpu_all/libjax_deepep_nvshmem.so
export LD_LIBRARY_PATH="$NV/lib:${LD_LIBRARY_PATH:-}"
export NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
status=0

step() {  # step NAME LIMIT_S COMMAND...: run, keep the log, print its tail and the time taken
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - start)) s"
  tail -n "${TAIL:-25}" "$LOGS/$name.log"
  [ "$rc" = 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step build 240 bash -c "cmake -S . -B build/gpu_all -DPython_EXECUTABLE=$PY -DCMAKE_BUILD_TYPE=Release &&
                        cmake --build build/gpu_all -j 16"
[ "$status" = 0 ] || exit 1
step gpu_tests 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_intranode.py tests/test_gpu_low_latency.py
TAIL=45 step bench_normal 200 "$PY" -m jax_deepep.bench --json "$LOGS/normal.json" --png "$LOGS/normal.png" \
  --profile /tmp/jax_deepep_profile_normal
step serve_moe 120 "$PY" examples/serve_moe.py --check
step serve_moe_bf16 120 "$PY" examples/serve_moe.py --check --nofp8
step demo 120 "$PY" -m jax_deepep.demo
step train_moe 150 "$PY" examples/train_moe.py
TAIL=20 step bench_low_latency 150 "$PY" -m jax_deepep.bench --mode low_latency --json "$LOGS/low_latency.json" \
  --png "$LOGS/low_latency.png" --profile /tmp/jax_deepep_profile_ll
# Is the wall-time gap over the kernels XLA's command buffers? Without them the baselines pay per-kernel
# launches too; if their wall time then rises to ours, the fix is command-buffer-compatible handlers.
TAIL=12 step bench_no_command_buffers 150 env XLA_FLAGS=--xla_gpu_enable_command_buffer= \
  "$PY" -m jax_deepep.bench --json "$LOGS/normal_no_command_buffers.json"
exit "$status"
