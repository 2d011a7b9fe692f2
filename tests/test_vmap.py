"""`jax.vmap` over an op inside `shard_map` behaves as a loop over the mapped axis, under `jax.grad`
too (docs/API.md): numbers from the pure-JAX backend, the same as a Python loop's.
test_gpu_backend_tracing.py traces the same cases (vmap_cases.py) on the CUDA backend."""
import jax
import numpy as np
import pytest

import jax_deepep as deepep
from harness import make_mesh, random_bf16, random_topk, random_weights, run_per_rank
from vmap_cases import BATCH, CASES, E, H, K, T, looped, mapped

NUM_RANKS = 8


def _buffer(mesh, case):
    if case.low_latency:
        return deepep.Buffer(mesh, "ep", low_latency_mode=True, num_rdma_bytes=1 << 30)
    return deepep.Buffer(mesh, "ep")


def _inputs(rng, routing_batched: bool = True):
    """Per-rank x, topk_idx, topk_weights with a batch axis (none on the routing when not batched)."""
    batch = (BATCH,) if routing_batched else ()
    x = random_bf16(rng, (NUM_RANKS, BATCH, T, H))
    topk_idx = random_topk(rng, NUM_RANKS * int(np.prod(batch)), T, K, E).reshape(NUM_RANKS, *batch, T, K)
    return x, topk_idx, random_weights(rng, (NUM_RANKS, *batch, T, K))


def _assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64))


@pytest.mark.parametrize("name", sorted(CASES))
def test_vmap_is_a_loop(rng, name):
    case = CASES[name]
    mesh = make_mesh(NUM_RANKS)
    buffer = _buffer(mesh, case)
    args = _inputs(rng)
    _assert_same(run_per_rank(mesh, mapped(case, buffer), *args), run_per_rank(mesh, looped(case, buffer), *args))


def test_vmap_over_tokens_with_shared_routing(rng):
    """Only `x` mapped: every element goes through the same routing (unbatched custom-call operands)."""
    case = CASES["combine"]
    mesh = make_mesh(NUM_RANKS)
    buffer = _buffer(mesh, case)
    args = _inputs(rng, routing_batched=False)
    in_axes = (0, None, None)
    _assert_same(run_per_rank(mesh, mapped(case, buffer, in_axes), *args),
                 run_per_rank(mesh, looped(case, buffer, in_axes), *args))
