#!/bin/bash
# The bench of our ops before and after a change, in one device call: R=1, and R=2 processes sharing
# GPU 0 under MPS. The "before" tree is an export of an earlier commit in .before/ (git-ignored; name it
# in the device call's carry):
#   here:           rm -rf .before && mkdir .before && git archive REV | tar -x -C .before
#   on the device:  bash scripts/bench_before_after.sh [BENCH ARGS...]
# BENCH ARGS choose the ops (default: --only buffer, normal mode); low latency:
#   bash scripts/bench_before_after.sh --mode low_latency --only ll_
# Prints each side's table (at R=1 with kernel times from a profile); the JSONs go to $OUT/compare.tgz
# (or stay in /tmp/cmp/json).
set -u
ARGS=("$@"); [ ${#ARGS[@]} -gt 0 ] || ARGS=(--only buffer)
PY=${PYTHON:-/opt/torch/.venv/bin/python3}; ROOT=$PWD
NV=$($PY -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])")
export LD_LIBRARY_PATH=$NV/lib:${LD_LIBRARY_PATH:-} NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
build() {  # build DIR SRC
  ( cmake -S "$2" -B "$1" -DPython_EXECUTABLE=$PY -DCMAKE_BUILD_TYPE=Release > "$1.log" 2>&1 &&
    cmake --build "$1" -j 16 >> "$1.log" 2>&1 ) || { tail -20 "$1.log"; exit 1; }
}
mkdir -p /tmp/cmp/json; [ -n "${OUT:-}" ] && trap 'tar czf $OUT/compare.tgz -C /tmp/cmp json' EXIT; build /tmp/cmp/before .before & build /tmp/cmp/after . & wait
lib_env() {  # lib_env SIDE: the library paths of that side (the module files were renamed at 7a8765f)
  local d=/tmp/cmp/$1
  echo "JAX_DEEPEP_LIBRARY=$(ls $d/libjax_deepep_cuda.so $d/_intranode_lib*.so 2>/dev/null | head -1) JAX_DEEPEP_NVSHMEM_LIBRARY=$(ls $d/libjax_deepep_nvshmem.so $d/_nvshmem_lib*.so 2>/dev/null | head -1)"
}
run() {  # run SIDE NAME ARGS...
  local side=$1 name=$2; shift 2
  local src=$ROOT; [ "$side" = before ] && src=$ROOT/.before
  echo "== $side $name"
  (cd $src && env $(lib_env $side) PYTHONPATH=$src timeout -k 15 240 $PY -m jax_deepep.bench "${ARGS[@]}" --json /tmp/cmp/json/${side}_$name.json "$@" 2>&1 \
    | grep -v "^I1\|^W1\|tpu\|^ *$\|GRPC\|Source Location\|grpc_util\|CANCELLED\|UNAVAILABLE" | tail -8)
}
for side in before after; do run $side r1 --warmup 2 --iters 6 --profile /tmp/cmp/profile_$side; done
export CUDA_MPS_PIPE_DIRECTORY=/tmp/cmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/cmp/mpsl CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50
mkdir -p /tmp/cmp/mps /tmp/cmp/mpsl && nvidia-cuda-mps-control -d
i=0; for side in before after; do i=$((i+1)); run $side r2_mps_$i --spawn 2 --warmup 2 --iters 6 --batch 2; done
pkill -KILL -f "jax_deepep.bench" # a job's process that outlived its timeout would block MPS's shutdown
echo quit | nvidia-cuda-mps-control
