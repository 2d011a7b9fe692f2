"""GPU test: XLA's per-128-channel FP8 cast (`jax_deepep/fp8.py`) on the GPU against the numpy oracle.

The pure-JAX ops, the MoE layer's dense twin and the low-latency kernels must deliver the same
e4m3 values and scales (fp8.py says why the arithmetic is written as it is). On CPU the suite checks
XLA against numpy bit for bit (`tests/test_low_latency.py`); XLA:GPU rewrites arithmetic differently,
so this runs the comparison on the GPU, in a worker process with the GPU visible:
- the cast alone: scales and values identical (before the cast divided with integer steps,
  XLA:GPU's division put 0.1% of the values one e4m3 step off on the H200);
- the cast and its inverse in one program, and the dense twin's straight-through form: both must
  round through e4m3 and bf16 exactly as the dequantised cast (XLA:GPU once folded the pair away);
- for the record, how often XLA's own f32 `448 / amax` is the IEEE quotient (on the H200: 73-77%).
Inputs: normal, heavy-tailed and tiny-magnitude bf16 rows.
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
    straight_through = jax.jit(
        lambda x: x + jax.lax.stop_gradient(per_block_cast_back(*per_block_cast_to_fp8(x)) - x))
    inverse = jax.jit(lambda amax: np.float32(448.0) / amax)
    failures = []
    for kind, values in _inputs(np.random.default_rng(0)):
        x = values.astype(ml_dtypes.bfloat16)
        q_ref, s_ref = oracle.fp8_cast(x)
        q, s = (np.asarray(a) for a in cast(jnp.asarray(x)))
        own_back = oracle.fp8_dequant(q, s).astype(ml_dtypes.bfloat16).astype(np.float32)
        amax = np.maximum(np.abs(x.astype(np.float32)).reshape(-1, 128).max(axis=-1), np.float32(1e-4))
        same_inverse = np.mean(np.asarray(inverse(jnp.asarray(amax))) == np.float32(448.0) / amax)
        print(f"{kind}: 448 / amax: {same_inverse:.4%} identical to the IEEE quotient")
        print(f"{kind}: values: {np.mean(q.view(np.uint8) == q_ref.view(np.uint8)):.4%} identical to the oracle's")
        checks = {
            "scales identical": lambda: np.testing.assert_array_equal(s.view(np.uint32), s_ref.view(np.uint32)),
            "values identical": lambda: np.testing.assert_array_equal(q.view(np.uint8), q_ref.view(np.uint8)),
            "round trip rounds": lambda: np.testing.assert_array_equal(
                np.asarray(round_trip(jnp.asarray(x)), np.float32), own_back),
            "straight-through rounds": lambda: np.testing.assert_array_equal(
                np.asarray(straight_through(jnp.asarray(x)), np.float32), own_back),
        }
        for what, check in checks.items():
            try:
                check()
                print(f"ok   {kind}: {what}")
            except AssertionError as exc:
                print(f"FAIL {kind}: {what}: {exc}")
                failures.append(f"{kind} {what}")
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    gpu_workers.arm_watchdog()
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--num-ranks", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.parse_args()
    sys.exit(worker_main())
