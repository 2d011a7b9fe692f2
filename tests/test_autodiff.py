"""Gradients (docs/API.md) against dense numpy computations: the cotangent of
dispatch is a combine over the same handle, the cotangent of combine a cached dispatch.

Inside shard_map, `jax.grad` of each rank's loss differentiates the sum of all ranks' losses.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_deepep as deepep
import oracle
from harness import make_mesh, random_bf16, random_tokens, random_topk, random_weights, run_per_rank

T, H, K, E = 12, 128, 4, 24

# (num_ranks, capacity): None is the default R * T; T with hot routing overflows.
CASES = [(1, None), (2, None), (4, T), (8, None)]


def _cotangent(rng, shape):
    """bf16-representable f32 values, so that casting them to bf16 loses nothing."""
    return random_bf16(rng, shape).astype(np.float32)


def _as_f32(a):
    return np.asarray(a).astype(np.float32)


def _setup(num_ranks: int, capacity):
    """(mesh, capacity N, Buffer) of a case; a capacity of None is R * T."""
    mesh = make_mesh(num_ranks)
    return mesh, capacity or num_ranks * T, deepep.Buffer(mesh, "ep")


@pytest.mark.parametrize("num_ranks,capacity", CASES)
def test_dispatch_grad(rng, num_ranks, capacity):
    mesh, capacity, buffer = _setup(num_ranks, capacity)
    x, topk_idx, weights = random_tokens(rng, num_ranks, T, H, K, E,
                                         "hot" if capacity < num_ranks * T else "out_of_range")
    g_x = _cotangent(rng, (num_ranks, capacity, H))
    g_w = random_weights(rng, (num_ranks, capacity, K))

    def per_rank(x, idx, w, g_x, g_w):
        def loss(x, w):
            out = buffer.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E, num_worst_tokens=capacity)
            return jnp.sum(out.recv_x.astype(jnp.float32) * g_x) + jnp.sum(out.recv_topk_weights * g_w)

        return jax.grad(loss, argnums=(0, 1))(x, w)

    grad_x, grad_w = run_per_rank(mesh, per_rank, x, topk_idx, weights, g_x, g_w)
    want = oracle.dispatch([x], topk_idx, weights, E, capacity)
    assert grad_x.dtype == ml_dtypes.bfloat16 and grad_w.dtype == np.float32
    oracle.assert_rounded_once(grad_x, oracle.combine(g_x, want, T), oracle.combine(np.abs(g_x), want, T))
    g_w_routed = np.stack([np.where(w.recv_topk_idx >= 0, g, 0.0) for w, g in zip(want, g_w)])
    np.testing.assert_allclose(grad_w, oracle.combine(g_w_routed, want, T), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("expert_grouped", [False, True])
def test_dispatch_grad_with_no_capacity(rng, expert_grouped):
    """`num_worst_tokens=0` receives nothing: the gradients are zeros of the inputs' shapes, not an error."""
    num_ranks = 2
    mesh = make_mesh(num_ranks)
    buffer = deepep.Buffer(mesh, "ep")
    x, topk_idx, weights = random_tokens(rng, num_ranks, T, H, K, E, "random")

    def per_rank(x, idx, w):
        def loss(x, w):
            out = buffer.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E, num_worst_tokens=0,
                                  expert_grouped=expert_grouped)
            return jnp.sum(out.recv_x.astype(jnp.float32)) + jnp.sum(out.recv_topk_weights)

        return jax.grad(loss, argnums=(0, 1))(x, w)

    grad_x, grad_w = run_per_rank(mesh, per_rank, x, topk_idx, weights)
    assert grad_x.shape == x.shape and grad_w.shape == weights.shape
    assert not np.any(_as_f32(grad_x)) and not np.any(grad_w)


@pytest.mark.parametrize("expert_grouped", [False, True])
def test_fp8_dispatch_still_differentiates_the_weights(rng, expert_grouped):
    """FP8 tokens carry no gradient, but `topk_weights` does: its gradient through an FP8 dispatch (and a
    grouped one's weighted combine) equals the one through the same dispatch of bf16 tokens."""
    num_ranks = 4
    mesh = make_mesh(num_ranks)
    buffer = deepep.Buffer(mesh, "ep")
    x, topk_idx, weights = random_tokens(rng, num_ranks, T, H, K, E, "random")
    rows = num_ranks * T * K if expert_grouped else num_ranks * T  # the default capacity N (E_l >= K)
    g_w = random_weights(rng, (num_ranks, rows) if expert_grouped else (num_ranks, rows, K))
    y = random_bf16(rng, (num_ranks, rows, H))

    def per_rank(x, idx, w, g_w, y, fp8):
        def loss(w):
            tokens = deepep.fp8.per_block_cast_to_fp8(x) if fp8 else x
            out = buffer.dispatch(tokens, topk_idx=idx, topk_weights=w, num_experts=E, expert_grouped=expert_grouped)
            total = jnp.sum(out.recv_topk_weights * g_w)
            if expert_grouped:  # its combine weighs the rows by the pair weights the handle holds
                total += jnp.sum(buffer.combine(y, out.handle)[0].astype(jnp.float32))
            return total

        return jax.grad(loss)(w)

    bf16, fp8 = (run_per_rank(mesh, lambda *a, f=f: per_rank(*a, f), x, topk_idx, weights, g_w, y)
                 for f in (False, True))
    assert np.abs(bf16).sum() > 0
    np.testing.assert_array_equal(fp8, bf16)


@pytest.mark.parametrize("num_ranks,capacity", CASES)
def test_combine_grad(rng, num_ranks, capacity):
    mesh, capacity, buffer = _setup(num_ranks, capacity)
    x, topk_idx, _ = random_tokens(rng, num_ranks, T, H, K, E, "hot" if capacity < num_ranks * T else "random")
    y = random_bf16(rng, (num_ranks, capacity, H))
    w = random_weights(rng, (num_ranks, capacity, K))
    bias = (random_bf16(rng, (num_ranks, T, H)), random_bf16(rng, (num_ranks, T, H)))
    g_x = _cotangent(rng, (num_ranks, T, H))
    g_w = random_weights(rng, (num_ranks, T, K))

    def per_rank(x, idx, y, w, bias, g_x, g_w):
        handle = buffer.dispatch(x, topk_idx=idx, num_experts=E, num_worst_tokens=capacity).handle

        def loss(y, w, bias):
            combined_x, combined_w = buffer.combine(y, handle, topk_weights=w, bias=bias)
            return jnp.sum(combined_x.astype(jnp.float32) * g_x) + jnp.sum(combined_w * g_w)

        return jax.grad(loss, argnums=(0, 1, 2))(y, w, bias)

    grad_y, grad_w, grad_bias = run_per_rank(mesh, per_rank, x, topk_idx, y, w, bias, g_x, g_w)
    want = oracle.dispatch([g_x, g_w], topk_idx, None, E, capacity)
    assert grad_y.dtype == ml_dtypes.bfloat16 and grad_w.dtype == np.float32
    for r, result in enumerate(want):  # rows past the received ones get zero cotangent
        np.testing.assert_array_equal(_as_f32(grad_y[r]), result.recv_parts[0])
        np.testing.assert_array_equal(grad_w[r], result.recv_parts[1])
    for g_b in grad_bias:
        np.testing.assert_array_equal(_as_f32(g_b), g_x)


def test_cached_dispatch_grad(rng):
    mesh = make_mesh(4)
    buffer = deepep.Buffer(mesh, "ep")
    x, x_next = random_bf16(rng, (4, T, H)), random_bf16(rng, (4, T, H))
    topk_idx = random_topk(rng, 4, T, K, E)
    g = _cotangent(rng, (4, 4 * T, H))

    def per_rank(x, x_next, idx, g):
        handle = buffer.dispatch(x, topk_idx=idx, num_experts=E).handle
        loss = lambda x: jnp.sum(buffer.dispatch(x, handle=handle).recv_x.astype(jnp.float32) * g)  # noqa: E731
        return jax.grad(loss)(x_next)

    grad_x = run_per_rank(mesh, per_rank, x, x_next, topk_idx, g)
    want = oracle.dispatch([x], topk_idx, None, E, 4 * T)
    oracle.assert_rounded_once(grad_x, oracle.combine(g, want, T), oracle.combine(np.abs(g), want, T))


@pytest.mark.parametrize("num_ranks", [2, 8])
def test_moe_round_trip_grad_matches_dense(rng, num_ranks):
    """dispatch -> per-rank expert (multiply by rank + 1) -> combine, against its dense form:
    out[t] = sum over ranks d that receive t of (d + 1) * x[t], so
    grad x[t] = sum over the same d of bf16((d + 1) * g[t]) (the expert's product is bf16)."""
    mesh = make_mesh(num_ranks)
    buffer = deepep.Buffer(mesh, "ep")
    x = random_bf16(rng, (num_ranks, T, H))
    topk_idx = random_topk(rng, num_ranks, T, K, E)
    g = _cotangent(rng, (num_ranks, T, H))

    def per_rank(x, idx, g):
        def loss(x):
            out = buffer.dispatch(x, topk_idx=idx, num_experts=E)
            scale = (jax.lax.axis_index("ep") + 1).astype(jnp.bfloat16)
            combined, _ = buffer.combine(out.recv_x * scale, out.handle)
            return jnp.sum(combined.astype(jnp.float32) * g)

        return jax.grad(loss)(x)

    grad_x = run_per_rank(mesh, per_rank, x, topk_idx, g)
    in_rank = np.stack([oracle.layout(topk_idx[s], E, num_ranks).is_token_in_rank for s in range(num_ranks)])
    per_rank_terms = np.stack([_as_f32((g * (d + 1)).astype(ml_dtypes.bfloat16)) for d in range(num_ranks)])
    exact = np.einsum("srd,dsrh->srh", in_rank.astype(np.float64), per_rank_terms.astype(np.float64))
    oracle.assert_rounded_once(grad_x, exact, np.abs(exact))
