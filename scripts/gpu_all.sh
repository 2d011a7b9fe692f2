#!/usr/bin/env bash
# On the GPU machine, in one device call: build both CUDA libraries with the root CMake, then run the
# named steps (all of them by default, most wanted first, so a call cut short still brings back the
# first logs):
#   bash scripts/gpu_all.sh [STEP ...]
# Steps: gpu_tests (= gpu_fp8 gpu_intranode gpu_low_latency gpu_internode gpu_faults; gpu_internode =
#        gpu_internode_2x2 gpu_internode_4x1 (nodes x ranks per node); gpu_faults = one step
#        per memory: gpu_faults_intranode gpu_faults_low_latency gpu_faults_low_latency_nvshmem
#        gpu_faults_internode) bench_normal
#        bench_normal_max_sms serve_moe demo train_moe bench_low_latency tune (a short sweep of Configs, into
#        tuned_configs.json) cpu_tests (the rest of the suite, on this machine, with the libraries built here;
#        cpu_tests_bg: the same on 6 cores, beside the steps after it)
#        bench_internode bench_internode_mps bench_moe bench_moe_r2 bench_low_latency_r2 serve_moe_r2 (the last
#        three: R = 2 processes sharing GPU 0 under MPS) (these six not run by default)
# Each step has its own time limit. With GPU_ALL_BUDGET_S set (say, a little under the device call's limit),
# every limit is cut to what is left of that budget and steps that no longer fit are skipped, so the logs
# are packed before the call ends. Logs, JSON, charts and profile traces are packed into
# $OUT/gpu_logs.tgz (only a few files come back from the device machine), or left in
# /tmp/jax_deepep_gpu_all without $OUT. $PYTHON names the Python that builds and runs everything
# (default: the GPU machine's /opt/torch/.venv/bin/python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-/opt/torch/.venv/bin/python3}
LOGS=/tmp/jax_deepep_gpu_all
rm -rf "$LOGS" && mkdir -p "$LOGS"
[ -n "${OUT:-}" ] && trap 'tar czf "$OUT/gpu_logs.tgz" -C "$LOGS" .' EXIT
NV=$("$PY" -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])")
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
export JAX_DEEPEP_LIBRARY=$PWD/build/gpu_all/_intranode_lib.so
export JAX_DEEPEP_NVSHMEM_LIBRARY=$PWD/build/gpu_all/_nvshmem_lib.so
export LD_LIBRARY_PATH="$NV/lib:${LD_LIBRARY_PATH:-}"
export NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
status=0

fit() {  # fit LIMIT_S: the limit cut to what is left of GPU_ALL_BUDGET_S (10 s kept for packing the logs)
  local left=$(( ${GPU_ALL_BUDGET_S:-1000000} - SECONDS - 10 ))
  echo $(( $1 < left ? $1 : left ))
}

step() {  # step NAME LIMIT_S COMMAND...: run, keep the log, print its tail and the time taken
  local name=$1 limit
  limit=$(fit "$2"); shift 2
  if [ "$limit" -lt 30 ]; then echo "== $name: skipped, GPU_ALL_BUDGET_S spent"; status=1; return; fi
  local start=$SECONDS
  # timeout leads a process group of its own: what the step leaves running (a job's processes outlive
  # SIGTERM) is killed with it, so that no process keeps the GPU or blocks MPS's shutdown.
  timeout -k 15 "$limit" "$@" > "$LOGS/$name.log" 2>&1 &
  local pid=$!
  wait $pid
  local rc=$?
  pkill -KILL -g $pid 2>/dev/null
  echo "== $name: rc=$rc in $((SECONDS - start)) s"
  tail -n "${TAIL:-25}" "$LOGS/$name.log"
  [ "$rc" = 0 ] || status=1
}

gpu_test() {  # gpu_test NAME LIMIT_S FILE [PYTEST ARGS...]: one GPU test file; workers stop before the limit, logs kept
  local name=$1 limit file=$3
  limit=$(fit "$2"); shift 3
  JAX_DEEPEP_WORKER_TIMEOUT_S=$((limit - 20)) JAX_DEEPEP_WORKER_LOGS="$LOGS/workers" \
    step "$name" "$limit" "$PY" -m pytest -q -p no:cacheprovider -m gpu "$file" "$@"  # step kills leftover workers
}

bench_normal() {  # bench_normal NAME [bench flags...]: the normal bench with a profile, trace kept
  local name=$1; shift
  TAIL=45 step "$name" 200 "$PY" -m jax_deepep.bench --json "$LOGS/$name.json" --png "$LOGS/$name.png" \
    --profile "/tmp/jax_deepep_profile_$name" "$@"
  find "/tmp/jax_deepep_profile_$name" -name perfetto_trace.json.gz -exec cp {} "$LOGS/$name.trace.json.gz" \;
}

bench_internode() {  # bench_internode NAME [bench flags...]: 2 processes on this host as 2 nodes of 1 rank
  local name=$1; shift
  TAIL=20 step "$name" 240 "$PY" -m jax_deepep.bench --mode internode --spawn 2 --ranks-per-node 1 \
    --warmup 2 --iters 5 --batch 2 --json "$LOGS/$name.json" "$@"
}

# MPS lets the processes sharing GPU 0 run kernels at the same time (without it they time-slice).
mps_on() {
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/jax_deepep_mps CUDA_MPS_LOG_DIRECTORY=/tmp/jax_deepep_mps_log
  export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY" && nvidia-cuda-mps-control -d
}
mps_off() {
  echo quit | nvidia-cuda-mps-control
  cp -r "$CUDA_MPS_LOG_DIRECTORY" "$LOGS/mps_log" 2>/dev/null
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY CUDA_MPS_ACTIVE_THREAD_PERCENTAGE
}

serve_in_processes() {  # serve_in_processes N: examples/serve_moe.py --check as N processes of one job on GPU 0
  local port=$((20000 + RANDOM % 20000)) i rc=0 pids=()
  for ((i = 0; i < $1; i++)); do
    CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=$(awk "BEGIN {print 0.8 / $1}") "$PY" examples/serve_moe.py \
      --check --distributed --coordinator_address=127.0.0.1:$port --num_processes=$1 --process_id=$i &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || rc=1; done
  return $rc
}

run_step() {
  case $1 in
    gpu_tests) run_step gpu_fp8; run_step gpu_intranode; run_step gpu_low_latency; run_step gpu_internode
               run_step gpu_faults ;;
    gpu_fp8) gpu_test gpu_fp8 90 tests/test_gpu_fp8.py ;;
    gpu_intranode) gpu_test gpu_intranode 240 tests/test_gpu_intranode.py ;;
    gpu_low_latency) gpu_test gpu_low_latency 260 tests/test_gpu_low_latency.py ;;
    gpu_internode) run_step gpu_internode_2x2; run_step gpu_internode_4x1 ;;
    gpu_internode_2x2) gpu_test "$1" 200 tests/test_gpu_internode.py -k two_nodes ;;
    gpu_internode_4x1) gpu_test "$1" 200 tests/test_gpu_internode.py -k four_nodes ;;
    gpu_faults) for m in intranode low_latency low_latency_nvshmem internode; do run_step "gpu_faults_$m"; done ;;
    gpu_faults_intranode) gpu_test "$1" 300 tests/test_gpu_faults.py -k intranode ;;
    gpu_faults_low_latency) gpu_test "$1" 300 tests/test_gpu_faults.py -k "low_latency and not nvshmem" ;;
    gpu_faults_low_latency_nvshmem) gpu_test "$1" 300 tests/test_gpu_faults.py -k nvshmem ;;
    gpu_faults_internode) gpu_test "$1" 300 tests/test_gpu_faults.py -k internode ;;
    # On CPU devices only: 8 workers each taking most of the GPU's memory would fail and crash.
    cpu_tests) JAX_PLATFORMS=cpu TAIL=6 step cpu_tests 420 "$PY" -m pytest -q -p no:cacheprovider -m "not gpu" -n 16 \
                 -rfE ;;  # pytest-xdist: the image has it
    # The same on 6 of the 16 cores, beside the steps named after it (collected before the logs are packed).
    cpu_tests_bg) ( JAX_PLATFORMS=cpu TAIL=6 step cpu_tests 600 "$PY" -m pytest -q -p no:cacheprovider -m "not gpu" \
                      -n 6 -rfE; exit "$status" ) &
                  background=$! ;;
    bench_normal) bench_normal bench_normal ;;
    bench_normal_max_sms) bench_normal bench_normal_max_sms --num-sms max ;;
    serve_moe) step serve_moe 120 "$PY" examples/serve_moe.py --check
               step serve_moe_bf16 120 "$PY" examples/serve_moe.py --check --nofp8 ;;
    serve_moe_r2) mps_on && step serve_moe_r2 180 bash -c "PY=$PY; $(declare -f serve_in_processes); serve_in_processes 2"
                  mps_off ;;
    demo) step demo 120 "$PY" -m jax_deepep.demo ;;
    train_moe) step train_moe 150 "$PY" examples/train_moe.py ;;
    bench_low_latency) TAIL=20 step bench_low_latency 150 "$PY" -m jax_deepep.bench --mode low_latency \
                         --json "$LOGS/low_latency.json" --png "$LOGS/low_latency.png" \
                         --profile /tmp/jax_deepep_profile_ll ;;
    bench_low_latency_r2) mps_on && TAIL=20 step bench_low_latency_r2 280 "$PY" -m jax_deepep.bench --mode low_latency \
                            --spawn 2 --rotations 4 --json "$LOGS/low_latency_r2.json" \
                            --profile /tmp/jax_deepep_profile_ll_r2; mps_off ;;  # 4 sets: 8 overfill 0.4 of the GPU
    bench_internode) bench_internode bench_internode ;;
    tune) TAIL=30 step tune 420 "$PY" -m jax_deepep.tune --short --output "$LOGS/tuned_configs.json" ;;
    bench_moe) TAIL=25 step bench_moe 300 "$PY" -m jax_deepep.bench --mode moe --iters 10 --json "$LOGS/moe.json" \
                 --profile /tmp/jax_deepep_profile_moe  # each layer's kernels: where the grouped layout gains or loses
               # the Buffer's layouts again on every SM (docs/PERFORMANCE.md, "The MoE layer")
               TAIL=8 step bench_moe_max_sms 120 "$PY" -m jax_deepep.bench --mode moe --iters 10 --num-sms max \
                 --only buffer --json "$LOGS/moe_max_sms.json" ;;
    # Both paths between the "nodes" sharing the GPU: through NVSHMEM's mapping, then as puts (the network's).
    bench_internode_mps) mps_on && { bench_internode bench_internode_mps
                                     bench_internode bench_internode_mps_puts --internode-puts-only; }; mps_off ;;
    bench_moe_r2) mps_on && TAIL=12 step bench_moe_r2 240 "$PY" -m jax_deepep.bench --mode moe --spawn 2 \
                    --iters 10 --json "$LOGS/moe_r2.json"; mps_off ;;
    *) echo "unknown step $1"; status=1 ;;
  esac
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step build 240 bash -c "cmake -S . -B build/gpu_all -DPython_EXECUTABLE=$PY -DCMAKE_BUILD_TYPE=Release &&
                        cmake --build build/gpu_all -j 16"
[ "$status" = 0 ] || exit 1
steps=("$@")
[ ${#steps[@]} = 0 ] && steps=(gpu_tests bench_normal bench_normal_max_sms serve_moe demo train_moe bench_low_latency tune cpu_tests)
background=
for s in "${steps[@]}"; do run_step "$s"; done
[ -z "$background" ] || wait "$background" || status=1
exit "$status"
