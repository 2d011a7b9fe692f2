"""Expert-grouped dispatch (`dispatch(..., expert_grouped=True)`, docs/API.md) against the numpy oracle:
the grouped rows, their experts and weights, the padded group sizes (and `ragged_dot` over them), the
weighted combine, cached dispatch, a too-small capacity, FP8, T = 0, gradients, and bad input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepep as deepep
import oracle
import vmap_cases
from harness import (enable_x64, int64_ids_beyond_int32, make_mesh, random_bf16, random_tokens, random_topk,
                     random_weights, run_per_rank)

T, H, K, E = 10, 128, 4, 16
RANKS = (1, 2, 4)


@functools.lru_cache(maxsize=None)
def _grouped(num_ranks: int, *, with_weights: bool = True, bias: bool = False, **kwargs):
    """Per rank: a grouped dispatch, then a combine of its rows (with the rows' weights as `topk_weights`).
    One function object per configuration, so tests that differ only in data share one compilation."""
    buffer = deepep.Buffer(make_mesh(num_ranks), "ep")

    def per_rank(x, idx, w, b):
        out = buffer.dispatch(x, topk_idx=idx, topk_weights=w if with_weights else None, num_experts=E,
                              expert_grouped=True, **kwargs)
        rows = out.recv_x[0] if isinstance(out.recv_x, tuple) else out.recv_x
        combined = buffer.combine(rows.astype(jnp.bfloat16), out.handle, topk_weights=out.recv_topk_weights,
                                  bias=b if bias else None)
        return out, combined

    return per_rank


def check_grouped(got, want: list):
    """Compare a per-rank grouped `DispatchOutput` (leaves `[R, ...]`) with the oracle's results."""
    parts = got.recv_x if isinstance(got.recv_x, tuple) else (got.recv_x,)
    for r, w in enumerate(want):
        assert int(got.num_recv_tokens[r]) == w.num_recv_tokens
        np.testing.assert_array_equal(got.num_recv_tokens_per_expert[r], w.num_recv_tokens_per_expert)
        for part, expected in zip(parts, w.recv_parts):
            assert part.shape[1:] == expected.shape and part.dtype == expected.dtype
            np.testing.assert_array_equal(part[r].astype(np.float32), expected.astype(np.float32))
        assert got.recv_topk_idx.dtype == np.int32
        np.testing.assert_array_equal(got.recv_topk_idx[r], w.recv_topk_idx)
        if got.recv_topk_weights is not None:
            assert got.recv_topk_weights.dtype == np.float32
            np.testing.assert_allclose(got.recv_topk_weights[r], w.recv_topk_weights, rtol=1e-6)


@pytest.mark.parametrize("num_ranks", RANKS)
@pytest.mark.parametrize("kind", ["random", "hot", "repeated", "out_of_range"])
@pytest.mark.parametrize("expert_alignment", [1, 4])
def test_grouped_dispatch_and_combine_match_oracle(rng, num_ranks, kind, expert_alignment):
    x, idx, w = random_tokens(rng, num_ranks, T, H, K, E, kind)
    bias = random_bf16(rng, (num_ranks, T, H))
    out, (combined, combined_w) = run_per_rank(
        make_mesh(num_ranks), _grouped(num_ranks, bias=True, expert_alignment=expert_alignment), x, idx, w, bias)
    experts_per_rank = E // num_ranks
    capacity = num_ranks * T * min(K, experts_per_rank) + experts_per_rank * (expert_alignment - 1)
    assert out.recv_x.shape == (num_ranks, capacity, H)
    want = oracle.grouped_dispatch([x], idx, w, E, capacity, expert_alignment)
    check_grouped(out, want)
    for r, w_r in enumerate(want):  # the default capacity keeps every pair
        assert sum(w_r.num_recv_tokens_per_expert) == w_r.num_recv_tokens <= capacity
    exact = oracle.grouped_combine(out.recv_x, want, T, bias=(bias,))
    oracle.assert_rounded_once(combined, exact, terms_magnitude=np.abs(exact).max() + 8)
    np.testing.assert_allclose(combined_w, oracle.grouped_combined_weights(out.recv_topk_weights, want, idx, E),
                               rtol=1e-6)


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_too_small_capacity_drops_rows_past_it(rng, num_ranks):
    x, idx, w = random_tokens(rng, num_ranks, T, H, K, E, "hot")
    capacity = 9
    out, (combined, _) = run_per_rank(make_mesh(num_ranks),
                                      _grouped(num_ranks, num_worst_tokens=capacity, expert_alignment=2), x, idx, w,
                                      None)
    want = oracle.grouped_dispatch([x], idx, w, E, capacity, 2)
    assert max(w_r.num_recv_tokens for w_r in want) > capacity  # rank 0 needs more rows than it holds
    check_grouped(out, want)
    exact = oracle.grouped_combine(out.recv_x, want, T)
    oracle.assert_rounded_once(combined, exact, terms_magnitude=np.abs(exact).max() + 8)


def test_without_weights_every_pair_weighs_one(rng):
    x, idx, _ = random_tokens(rng, 2, T, H, K, E, "repeated")
    out, (combined, _) = run_per_rank(make_mesh(2), _grouped(2, with_weights=False), x, idx, None,
                                      None)
    assert out.recv_topk_weights is None
    want = oracle.grouped_dispatch([x], idx, None, E, 2 * T * K)
    check_grouped(out, want)
    exact = oracle.grouped_combine(out.recv_x, want, T)
    oracle.assert_rounded_once(combined, exact, terms_magnitude=np.abs(exact).max() + 8)


@pytest.mark.parametrize("num_ranks", [1, 4])
def test_fp8_rows_carry_their_scales(rng, num_ranks):
    x, idx, w = random_tokens(rng, num_ranks, T, 256, K, E)
    q, scales = oracle.fp8_cast(x)
    out, _ = run_per_rank(make_mesh(num_ranks), _grouped(num_ranks, expert_alignment=8), (q, scales), idx, w,
                          None)
    capacity = num_ranks * T * min(K, E // num_ranks) + (E // num_ranks) * 7
    check_grouped(out, oracle.grouped_dispatch([q, scales], idx, w, E, capacity, 8))


def test_int64_ids_beyond_int32_make_no_pairs(rng):
    """int64 ids that would wrap into [0, E) when narrowed count as -1, as in the plain layout."""
    x, idx, w = random_tokens(rng, 2, T, H, K, E)
    with enable_x64():
        out, _ = run_per_rank(make_mesh(2), _grouped(2), x, int64_ids_beyond_int32(idx), w, None)
    check_grouped(out, oracle.grouped_dispatch([x], idx, w, E, 2 * T * K))


def test_group_sizes_feed_ragged_dot(rng):
    """`num_recv_tokens_per_expert` are the group sizes of `recv_x`: a ragged_dot with one matrix per local
    expert gives each pair's row times its expert's matrix."""
    num_ranks = 2
    experts_per_rank = E // num_ranks
    x, idx, w = random_tokens(rng, num_ranks, T, H, K, E)
    mats = random_bf16(rng, (num_ranks, experts_per_rank, H, 8))
    buffer = deepep.Buffer(make_mesh(num_ranks), "ep")

    def per_rank(x, idx, w, mats):
        out = buffer.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E, expert_grouped=True,
                              expert_alignment=4)
        return out, jax.lax.ragged_dot(out.recv_x, mats, out.num_recv_tokens_per_expert,
                                       preferred_element_type=jnp.float32)

    out, products = run_per_rank(make_mesh(num_ranks), per_rank, x, idx, w, mats)
    for r in range(num_ranks):
        expert = out.recv_topk_idx[r]
        want = np.einsum("nh,nhf->nf", out.recv_x[r].astype(np.float32),
                         mats[r][np.maximum(expert, 0)].astype(np.float32)) * (expert >= 0)[:, None]
        np.testing.assert_allclose(products[r], want, rtol=1e-5, atol=1e-4)


def test_cached_dispatch_replays_the_grouping(rng):
    num_ranks = 4
    x, idx, w = random_tokens(rng, num_ranks, T, H, K, E, "repeated")
    x2 = random_bf16(rng, (num_ranks, T, H))
    buffer = deepep.Buffer(make_mesh(num_ranks), "ep")

    def per_rank(x, x2, idx, w):
        out = buffer.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E, expert_grouped=True)
        return buffer.dispatch(x2, handle=out.handle, expert_grouped=True)

    cached = run_per_rank(make_mesh(num_ranks), per_rank, x, x2, idx, w)
    assert cached.recv_topk_idx is None and cached.recv_topk_weights is None
    want = oracle.grouped_dispatch([x2], idx, w, E, num_ranks * T * K)
    for r, w_r in enumerate(want):
        np.testing.assert_array_equal(cached.recv_x[r].astype(np.float32), w_r.recv_parts[0].astype(np.float32))
        assert int(cached.num_recv_tokens[r]) == w_r.num_recv_tokens


def test_no_tokens():
    num_ranks, experts_per_rank = 2, E // 2
    x, idx, w = (np.zeros((num_ranks, 0, H), jnp.bfloat16), np.zeros((num_ranks, 0, K), np.int32),
                 np.zeros((num_ranks, 0, K), np.float32))
    out, (combined, combined_w) = run_per_rank(make_mesh(num_ranks), _grouped(num_ranks, expert_alignment=4), x, idx,
                                               w, None)
    assert out.recv_x.shape == (num_ranks, experts_per_rank * 3, H) and not np.any(out.recv_x.astype(np.float32))
    assert np.all(out.recv_topk_idx == -1) and not np.any(out.num_recv_tokens_per_expert)
    assert not np.any(out.num_recv_tokens)
    assert combined.shape == (num_ranks, 0, H) and combined_w.shape == (num_ranks, 0, K)


def _loss_fns(buffer):
    """Per rank: (x, topk_weights, c) -> loss through dispatch, the rows scaled by (1 + their weight), and
    the weighted combine; and (x, idx, w, x2, r) -> loss through a cached dispatch of x2."""

    def loss(x, idx, w, c):
        out = buffer.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E, expert_grouped=True,
                              expert_alignment=2)
        y = (out.recv_x.astype(jnp.float32) * (1.0 + out.recv_topk_weights[:, None])).astype(jnp.bfloat16)
        combined, _ = buffer.combine(y, out.handle)
        return jnp.sum(combined.astype(jnp.float32) * c)

    def cached_loss(x, idx, w, x2, r):
        out = buffer.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E, expert_grouped=True)
        rows = buffer.dispatch(x2, handle=out.handle).recv_x
        return jnp.sum(rows.astype(jnp.float32) * r)

    return loss, cached_loss


@pytest.mark.parametrize("num_ranks", RANKS)
def test_gradients_match_the_chain_rule(rng, num_ranks):
    """loss = sum_t c[t] . sum_e W_te (1 + W_te) x[t], W_te the token's summed weights for expert e:
    dL/dx[t] = c[t] sum_e W_te (1 + W_te), dL/dw[t, k] = (c[t] . x[t]) (1 + 2 W_te) for e = idx[t, k]."""
    x, idx, w = random_tokens(rng, num_ranks, T, H, K, E, "repeated")
    c = rng.standard_normal((num_ranks, T, H)).astype(np.float32)
    x2 = random_bf16(rng, (num_ranks, T, H))
    r = rng.standard_normal((num_ranks, num_ranks * T * K, H)).astype(np.float32)
    loss, cached_loss = _loss_fns(deepep.Buffer(make_mesh(num_ranks), "ep"))
    g_x, g_w = run_per_rank(make_mesh(num_ranks), jax.grad(loss, argnums=(0, 2)), x, idx, w, c)
    g_x2 = run_per_rank(make_mesh(num_ranks), jax.grad(cached_loss, argnums=3), x, idx, w, x2, r)

    ids = oracle.valid_ids(idx, E)
    xf, c64 = x.astype(np.float64), c.astype(np.float64)
    want_x, want_w = np.zeros(x.shape), np.zeros(w.shape)
    for s, t in np.ndindex(ids.shape[:2]):
        summed = {e: w[s, t][ids[s, t] == e].astype(np.float64).sum() for e in set(ids[s, t]) - {-1}}
        want_x[s, t] = c64[s, t] * sum(v * (1 + v) for v in summed.values())
        for k, e in enumerate(ids[s, t]):
            if e >= 0:
                want_w[s, t, k] = c64[s, t] @ xf[s, t] * (1 + 2 * summed[e])
    np.testing.assert_allclose(g_x.astype(np.float64), want_x, rtol=2e-2, atol=2e-2 * np.abs(want_x).max())
    np.testing.assert_allclose(g_w, want_w, rtol=2e-2, atol=2e-2 * np.abs(want_w).max())

    want = oracle.grouped_dispatch([x2], idx, w, E, num_ranks * T * K)
    want_x2 = oracle.grouped_combine(r, want, T, weighted=False)
    np.testing.assert_allclose(g_x2.astype(np.float64), want_x2, rtol=1e-2, atol=1e-2 * np.abs(want_x2).max())


def test_combine_topk_weights_gradient(rng):
    """combine's `topk_weights [N]` go back to rows through a cached dispatch: repeats of an expert add up."""
    num_ranks = 2
    x, idx, w = random_tokens(rng, num_ranks, T, H, K, E, "repeated")
    buffer = deepep.Buffer(make_mesh(num_ranks), "ep")

    def per_rank(x, idx, w, v):
        out = buffer.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E, expert_grouped=True)

        def f(row_weights):
            _, combined_w = buffer.combine(out.recv_x, out.handle, topk_weights=row_weights)
            return jnp.sum(combined_w * v)

        return jax.grad(f)(out.recv_topk_weights)

    v = random_weights(rng, w.shape)
    got = run_per_rank(make_mesh(num_ranks), per_rank, x, idx, w, v)
    want = oracle.grouped_dispatch([x], idx, v, E, num_ranks * T * K)  # the pair weights of v are the sums
    for r, w_r in enumerate(want):
        np.testing.assert_allclose(got[r], w_r.recv_topk_weights, rtol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda b, x, idx: b.dispatch(x, layout=b.get_dispatch_layout(idx, E), expert_grouped=True),
     "expert_grouped=True needs `topk_idx`"),
    (lambda b, x, idx: b.dispatch(x, topk_idx=idx, num_experts=E, expert_grouped=1), "`expert_grouped` must be"),
    (lambda b, x, idx: b.dispatch(x, handle=b.dispatch(x, topk_idx=idx, num_experts=E).handle, expert_grouped=True),
     "needs the ExpertGroupedHandle"),
    (lambda b, x, idx: b.combine(x[:1], b.dispatch(x, topk_idx=idx, num_experts=E, expert_grouped=True).handle),
     "`y` must have shape \\[80, \\*\\]"),
    (lambda b, x, idx: b.combine(
        *(lambda out: (out.recv_x, out.handle))(b.dispatch(x, topk_idx=idx, num_experts=E, expert_grouped=True)),
        topk_weights=jnp.zeros((2 * T * K, K), jnp.float32)), "`topk_weights` must be a 1-D float32"),
])
def test_bad_input(rng, call, message):
    x, idx, _ = random_tokens(rng, 2, T, H, K, E)
    buffer = deepep.Buffer(make_mesh(2), "ep")
    with pytest.raises(deepep.DeepEPError, match=message):
        run_per_rank(make_mesh(2), lambda x, idx: call(buffer, x, idx), x, idx)


def _dispatch_and_combine(buffer, x, topk_idx, topk_weights):
    """A vmap_cases-style case: grouped dispatch, a cached dispatch of it, and the weighted combine."""
    out = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=vmap_cases.E,
                          expert_grouped=True, expert_alignment=2)
    again = buffer.dispatch(jnp.cos(x), handle=out.handle).recv_x
    combined = buffer.combine(jnp.sin(out.recv_x) + again, out.handle, topk_weights=out.recv_topk_weights)
    return out.recv_x, out.recv_topk_idx, out.recv_topk_weights, out.num_recv_tokens_per_expert, *combined


def test_vmap_is_a_loop(rng):
    """`jax.vmap` of the grouped ops (and `jax.grad` of it) gives what a Python loop gives."""
    num_ranks, batch = 4, vmap_cases.BATCH
    case = vmap_cases.Case(_dispatch_and_combine, targets=None)
    buffer = deepep.Buffer(make_mesh(num_ranks), "ep")
    x = random_bf16(rng, (num_ranks, batch, vmap_cases.T, vmap_cases.H))
    idx = random_topk(rng, num_ranks * batch, vmap_cases.T, vmap_cases.K, vmap_cases.E, "repeated")
    args = (x, idx.reshape(num_ranks, batch, vmap_cases.T, vmap_cases.K),
            random_weights(rng, (num_ranks, batch, vmap_cases.T, vmap_cases.K)))
    got = run_per_rank(make_mesh(num_ranks), vmap_cases.mapped(case, buffer), *args)
    want = run_per_rank(make_mesh(num_ranks), vmap_cases.looped(case, buffer), *args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64))
