"""GPU test: XLA's per-128-channel FP8 cast (`jax_deepep/fp8.py`) rounds on the GPU exactly as the
numpy oracle and the CUDA kernels do.

The pure-JAX ops, the MoE layer's dense twin and the low-latency kernels must all deliver the same
e4m3 values and scales (fp8.py says why the arithmetic is written as it is). On CPU the suite checks
XLA against numpy (`tests/test_low_latency.py`); XLA:GPU rewrites arithmetic differently, so this
runs the same comparison on the GPU, in a worker process with the GPU visible: the cast alone, the
cast and its inverse in one program (XLA may fuse or drop converts there), and the dense twin's
straight-through form. Inputs: normal, heavy-tailed and tiny-magnitude bf16 rows.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import pytest

import gpu_workers
import oracle


@pytest.mark.gpu
def test_xla_fp8_cast_matches_the_oracle_on_the_gpu():
    if not gpu_workers.has_gpu():
        pytest.skip("needs a CUDA GPU")
    gpu_workers.run_workers(__file__, 1, gpu_workers.worker_env(1, 0.3))


def _inputs(rng):
    shape = (256, 7168)
    yield "normal", rng.standard_normal(shape)
    yield "heavy-tailed", rng.standard_t(2.0, shape)
    yield "tiny", rng.standard_normal(shape) * 1e-3


def worker_main() -> int:
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from jax_deepep.fp8 import per_block_cast_back, per_block_cast_to_fp8

    assert jax.devices()[0].platform == "gpu", jax.devices()
    cast = jax.jit(per_block_cast_to_fp8)
    round_trip = jax.jit(lambda x: per_block_cast_back(*per_block_cast_to_fp8(x)))
    straight_through = jax.jit(lambda x: x + jax.lax.stop_gradient(
        per_block_cast_back(*jax.lax.optimization_barrier(per_block_cast_to_fp8(x))) - x))
    failures = []
    for kind, values in _inputs(np.random.default_rng(0)):
        x = values.astype(ml_dtypes.bfloat16)
        q_ref, s_ref = oracle.fp8_cast(x)
        back_ref = oracle.fp8_dequant(q_ref, s_ref).astype(ml_dtypes.bfloat16).astype(np.float32)
        q, s = (np.asarray(a) for a in cast(jnp.asarray(x)))
        results = {
            "scales": np.mean(s.view(np.uint32) == s_ref.view(np.uint32)),
            "values": np.mean(q.view(np.uint8) == q_ref.view(np.uint8)),
            "round trip": np.mean(np.asarray(round_trip(jnp.asarray(x)), np.float32) == back_ref),
            "straight-through": np.mean(np.asarray(straight_through(jnp.asarray(x)), np.float32) == back_ref),
        }
        for what, same in results.items():
            print(f"{kind}: {what}: {same:.4%} identical to the oracle's")
            if same != 1.0:
                failures.append(f"{kind} {what}: {1 - same:.4%} differ")
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--num-ranks", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.parse_args()
    sys.exit(worker_main())
