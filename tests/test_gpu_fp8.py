"""GPU test: XLA's per-128-channel FP8 cast (`jax_deepep/fp8.py`) on the GPU against the numpy oracle.

The pure-JAX ops, the MoE layer's dense twin and the low-latency kernels must deliver the same
e4m3 values and scales (fp8.py says why the arithmetic is written as it is). On CPU the suite checks
XLA against numpy bit for bit (`tests/test_low_latency.py`); XLA:GPU rewrites arithmetic differently,
so this runs the comparison on the GPU, in a worker process with the GPU visible:
- the cast alone: scales and values identical (before the cast divided with integer steps,
  XLA:GPU's division put 0.1% of the values one e4m3 step off on the H200);
- the cast and its inverse in one program, and the dense twin's straight-through form: both must
  round through e4m3 and bf16 exactly as the dequantised cast (XLA:GPU once folded the pair away);
- the cast of a bf16 made from f32 in the same program: it must quantise the rounded bf16, as the
  kernels do (XLA:GPU folded the f32 -> bf16 -> f32 pair, which put serve_moe --check 3e-2 off);
- for the record, how often XLA's own f32 `448 / amax` is the IEEE quotient (on the H200: 73-77%).
Inputs: normal, heavy-tailed and tiny-magnitude bf16 rows.
Then one low-latency MoE layer (`moe.low_latency_moe`, FP8 and bf16) on the same data with the
CUDA kernels, with the pure-JAX buffer and as the dense twin: the received rows must be identical
and the outputs agree to 1e-6. (`examples/serve_moe.py --check` feeds each layer of its dense
decoder the expert-parallel input for the same reason: FP8's rounding steps would turn ulp-level
differences upstream of a layer into logit differences of about 1e-2.)
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

import gpu_workers
import oracle


@pytest.mark.gpu
def test_fp8_cast_and_layer_match_on_the_gpu():
    if not gpu_workers.has_gpu():
        pytest.skip("needs a CUDA GPU")
    from jax_deepep.gpu import nvshmem

    if not nvshmem.available():
        pytest.skip(nvshmem.unavailable_reason())
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
    cast_of_rounded = jax.jit(lambda x32: per_block_cast_to_fp8(x32.astype(jnp.bfloat16)))
    round_trip = jax.jit(lambda x: per_block_cast_back(*per_block_cast_to_fp8(x)))
    straight_through = jax.jit(
        lambda x: x + jax.lax.stop_gradient(per_block_cast_back(*per_block_cast_to_fp8(x)) - x))
    inverse = jax.jit(lambda amax: np.float32(448.0) / amax)
    failures = []
    for kind, values in _inputs(np.random.default_rng(0)):
        x = values.astype(ml_dtypes.bfloat16)
        values32 = values.astype(np.float32)
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
            "cast of a bf16 made in the program": lambda: np.testing.assert_array_equal(
                np.asarray(cast_of_rounded(jnp.asarray(values32))[0]).view(np.uint8),
                oracle.fp8_cast(values32.astype(ml_dtypes.bfloat16))[0].view(np.uint8)),
        }
        for what, check in checks.items():
            try:
                check()
                print(f"ok   {kind}: {what}")
            except AssertionError as exc:
                print(f"FAIL {kind}: {what}: {exc}")
                failures.append(f"{kind} {what}")
    failures += layer_checks()
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    return 0


def layer_checks() -> list:
    """One low-latency MoE layer: CUDA kernels vs the pure-JAX buffer vs the dense twin."""
    import os

    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    import jax_deepep as deepep
    from jax_deepep import moe

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32: the comparison sees the ops only
    mesh = jax.make_mesh((1,), ("ep",))
    t, h, e = 16, 256, 16
    size = deepep.Buffer.get_low_latency_rdma_size_hint(t, h, 1, e)
    buffers = {}
    for backend in ("cuda", "reference"):
        os.environ["JAX_DEEPEP_BACKEND"] = backend
        buffers[backend] = deepep.Buffer(mesh, "ep", low_latency_mode=True, num_rdma_bytes=size)
        assert buffers[backend].backend.name == backend, buffers[backend].backend.name
    failures = []
    for use_fp8 in (True, False):
        config = moe.MoEConfig(hidden=h, ffn_hidden=512, num_experts=e, top_k=4, use_fp8=use_fp8)
        params = moe.init_params(jax.random.key(0), config)
        for seed in range(3):
            x = (jax.random.normal(jax.random.key(seed + 1), (t, h)) * 3).astype(jnp.bfloat16)
            outputs = {}
            for backend, buffer in buffers.items():
                def layer(p, x, buffer=buffer):
                    routing = moe.route(p["router"], x, config)
                    received = buffer.low_latency_dispatch(x, routing.topk_idx, num_max_dispatch_tokens_per_rank=t,
                                                           num_experts=e, use_fp8=use_fp8)
                    y, _ = moe.low_latency_moe(p, x, buffer, config, num_max_dispatch_tokens_per_rank=t)
                    parts = received.recv_x if use_fp8 else (received.recv_x,)
                    return y, parts, received.recv_count

                spec = PartitionSpec()
                fn = jax.jit(jax.shard_map(layer, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False))
                outputs[backend] = jax.tree.map(np.asarray, fn(params, x))
            dense = np.asarray(jax.jit(lambda p, x: moe.dense_moe(p, x, config, bf16_expert_outputs=True))(params, x),
                               np.float32)
            name = f"layer {'fp8' if use_fp8 else 'bf16'} seed {seed}"
            (y_cuda, parts_cuda, count), (y_ref, parts_ref, count_ref) = outputs["cuda"], outputs["reference"]
            problems = []
            if not np.array_equal(count, count_ref):
                problems.append(f"recv_count {count} != {count_ref}")
            else:
                for a, b in zip(parts_cuda, parts_ref):
                    differ = sum(int(np.sum(a[i, :c].astype(np.float32) != b[i, :c].astype(np.float32)))
                                 for i, c in enumerate(count))
                    if differ:
                        problems.append(f"{differ} received elements differ")
            for what, want in (("pure-JAX layer", y_ref), ("dense twin", dense)):
                got, want = y_cuda.astype(np.float32), want.astype(np.float32)
                rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
                print(f"{name}: kernels vs {what}: {rel:.2e}")
                if rel > 1e-6:
                    problems.append(f"vs {what} {rel:.2e}")
            print(f"{'FAIL' if problems else 'ok  '} {name} {'; '.join(problems)}")
            if problems:
                failures.append(name)
    return failures


if __name__ == "__main__":
    gpu_workers.worker_args()
    sys.exit(worker_main())
