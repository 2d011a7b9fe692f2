"""Normal-mode dispatch (docs/API.md) against the numpy oracle: bf16 and FP8 tokens,
uneven and out-of-range routing, cached mode, expert alignment and a too-small capacity."""
import functools

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_deepep as deepep
import oracle
from harness import (enable_x64, int64_ids_beyond_int32, make_mesh, random_bf16, random_tokens, random_topk,
                     random_weights, run_per_rank)

T, H, K, E = 12, 128, 4, 24


def check_dispatch(got, want: list, *, with_topk: bool = True):
    """Compare a per-rank `DispatchOutput` (leaves `[R, ...]`) with the oracle's results."""
    parts = got.recv_x if isinstance(got.recv_x, tuple) else (got.recv_x,)
    for r, w in enumerate(want):
        kept = w.received.num_kept
        assert got.num_recv_tokens.dtype == np.int32 and got.num_recv_tokens.shape == (len(want),)
        assert int(got.num_recv_tokens[r]) == w.received.num_recv_tokens
        assert len(parts) == len(w.recv_parts)
        for part, expected in zip(parts, w.recv_parts):
            assert part.shape[1:] == expected.shape and part.dtype == expected.dtype
            np.testing.assert_array_equal(part[r, :kept].astype(np.float32), expected[:kept].astype(np.float32))
        assert got.num_recv_tokens_per_expert.dtype == np.int32
        np.testing.assert_array_equal(got.num_recv_tokens_per_expert[r], w.num_recv_tokens_per_expert)
        if not with_topk:
            assert got.recv_topk_idx is None and got.recv_topk_weights is None
            continue
        assert got.recv_topk_idx.dtype == np.int32
        np.testing.assert_array_equal(got.recv_topk_idx[r], w.recv_topk_idx)
        if w.recv_topk_weights is None:
            assert got.recv_topk_weights is None
        else:
            assert got.recv_topk_weights.dtype == np.float32
            np.testing.assert_array_equal(got.recv_topk_weights[r], w.recv_topk_weights)


@functools.lru_cache(maxsize=None)
def _dispatch_with_layout(num_ranks: int, **kwargs):
    """Per-rank layout + dispatch; one function object per configuration, so tests that differ
    only in data share one compilation."""
    buffer = deepep.Buffer(make_mesh(num_ranks), "ep")

    def per_rank(x, idx, w):
        layout = buffer.get_dispatch_layout(idx, E)
        return buffer.dispatch(x, topk_idx=idx, topk_weights=w, layout=layout, **kwargs)

    return per_rank


@pytest.mark.parametrize("kind", ["random", "hot", "out_of_range"])
def test_dispatch_bf16_matches_oracle(mesh, rng, kind):
    num_ranks = mesh.size
    x = random_bf16(rng, (num_ranks, T, H))
    topk_idx = random_topk(rng, num_ranks, T, K, E, kind)
    weights = random_weights(rng, (num_ranks, T, K))
    got = run_per_rank(mesh, _dispatch_with_layout(mesh.size), x, topk_idx, weights)
    assert got.recv_x.shape == (num_ranks, num_ranks * T, H)  # default capacity R * T
    check_dispatch(got, oracle.dispatch([x], topk_idx, weights, E, num_ranks * T))


@pytest.mark.parametrize("num_ranks", [2, 8])
def test_dispatch_with_num_experts_computes_layout(rng, num_ranks):
    mesh = make_mesh(num_ranks)
    buffer = deepep.Buffer(mesh, "ep")
    x = random_bf16(rng, (num_ranks, T, H))
    topk_idx = random_topk(rng, num_ranks, T, K, E, "out_of_range")
    weights = random_weights(rng, (num_ranks, T, K))
    got = run_per_rank(mesh, lambda x, i, w: buffer.dispatch(x, topk_idx=i, topk_weights=w, num_experts=E),
                       x, topk_idx, weights)
    check_dispatch(got, oracle.dispatch([x], topk_idx, weights, E, num_ranks * T))


def test_dispatch_without_weights_or_topk(rng):
    """Without topk_weights the weights are None; with a layout and no topk_idx both are None."""
    mesh = make_mesh(4)
    buffer = deepep.Buffer(mesh, "ep")
    x, topk_idx, _ = random_tokens(rng, 4, T, H, K, E)

    def per_rank(x, idx):
        layout = buffer.get_dispatch_layout(idx, E)
        return (buffer.dispatch(x, topk_idx=idx, num_experts=E),
                buffer.dispatch(x, layout=layout))

    no_weights, no_topk = run_per_rank(mesh, per_rank, x, topk_idx)
    want = oracle.dispatch([x], topk_idx, None, E, 4 * T)
    check_dispatch(no_weights, want)
    check_dispatch(no_topk, want, with_topk=False)


@pytest.mark.parametrize("num_ranks", [1, 2, 8])
def test_dispatch_fp8_pair(rng, num_ranks):
    mesh = make_mesh(num_ranks)
    h = 256
    values, scales = oracle.fp8_cast(rng.standard_normal((num_ranks, T, h)) * 3)
    topk_idx = random_topk(rng, num_ranks, T, K, E, "hot")
    weights = random_weights(rng, (num_ranks, T, K))
    got = run_per_rank(mesh, _dispatch_with_layout(mesh.size), (values, scales), topk_idx, weights)
    assert isinstance(got.recv_x, tuple)
    assert got.recv_x[0].dtype == ml_dtypes.float8_e4m3fn and got.recv_x[1].dtype == np.float32
    check_dispatch(got, oracle.dispatch([values, scales], topk_idx, weights, E, num_ranks * T))


@pytest.mark.parametrize("num_ranks", [1, 4])
def test_cached_dispatch(rng, num_ranks):
    """A handle replays the routing for new tokens, bf16 and FP8; no top-k outputs."""
    mesh = make_mesh(num_ranks)
    buffer = deepep.Buffer(mesh, "ep")
    x, x_next = random_bf16(rng, (num_ranks, T, H)), random_bf16(rng, (num_ranks, T, H))
    fp8_next = oracle.fp8_cast(rng.standard_normal((num_ranks, T, H)))
    topk_idx = random_topk(rng, num_ranks, T, K, E)
    weights = random_weights(rng, (num_ranks, T, K))

    def per_rank(x, x_next, fp8_next, idx, w):
        first = buffer.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E, expert_alignment=4)
        return (buffer.dispatch(x_next, handle=first.handle),
                buffer.dispatch(fp8_next, handle=first.handle))

    cached_bf16, cached_fp8 = run_per_rank(mesh, per_rank, x, x_next, fp8_next, topk_idx, weights)
    check_dispatch(cached_bf16, oracle.dispatch([x_next], topk_idx, None, E, num_ranks * T, 4), with_topk=False)
    check_dispatch(cached_fp8, oracle.dispatch(list(fp8_next), topk_idx, None, E, num_ranks * T, 4),
                   with_topk=False)


@pytest.mark.parametrize("expert_alignment", [3, 16])
def test_expert_alignment(rng, expert_alignment):
    mesh = make_mesh(4)
    x = random_bf16(rng, (4, T, H))
    topk_idx = random_topk(rng, 4, T, K, E, "hot")
    weights = random_weights(rng, (4, T, K))
    per_rank = _dispatch_with_layout(mesh.size, expert_alignment=expert_alignment)
    got = run_per_rank(mesh, per_rank, x, topk_idx, weights)
    assert np.all(got.num_recv_tokens_per_expert % expert_alignment == 0)
    check_dispatch(got, oracle.dispatch([x], topk_idx, weights, E, 4 * T, expert_alignment))


@pytest.mark.parametrize("num_ranks,capacity", [(2, 5), (4, T), (8, T)])
def test_capacity_overflow(rng, num_ranks, capacity):
    """With N below what arrives, rows [0, N) are still right, num_recv_tokens is the true
    count, and every other output (other ranks, padding rows) is intact."""
    mesh = make_mesh(num_ranks)
    x = random_bf16(rng, (num_ranks, T, H))
    topk_idx = random_topk(rng, num_ranks, T, K, E, "hot")
    weights = random_weights(rng, (num_ranks, T, K))
    per_rank = _dispatch_with_layout(mesh.size, num_worst_tokens=capacity)
    got = run_per_rank(mesh, per_rank, x, topk_idx, weights)
    want = oracle.dispatch([x], topk_idx, weights, E, capacity)
    assert got.recv_x.shape == (num_ranks, capacity, H)
    assert any(w.received.num_recv_tokens > capacity for w in want), "routing did not overflow"
    assert any(w.received.num_recv_tokens < capacity for w in want), "no rank with padding rows"
    check_dispatch(got, want)


def test_dispatch_int64_ids_with_x64(rng):
    mesh = make_mesh(2)
    x = random_bf16(rng, (2, T, H))
    topk_idx = int64_ids_beyond_int32(random_topk(rng, 2, T, K, E, "out_of_range"))
    weights = random_weights(rng, (2, T, K))
    with enable_x64():
        got = run_per_rank(mesh, _dispatch_with_layout(2), x, jnp.asarray(topk_idx, jnp.int64), weights)
    check_dispatch(got, oracle.dispatch([x], topk_idx, weights, E, 2 * T))
