"""Normal-mode combine (docs/API.md) against the numpy oracle: sums over the ranks that
received each token in f32, rounded to bf16 once, plus zero, one or two biases."""
import functools

import ml_dtypes
import numpy as np
import pytest

import jax_deepep as deepep
import oracle
from harness import make_mesh, random_bf16, random_tokens, random_topk, random_weights, run_per_rank

T, H, K, E = 12, 128, 4, 24
PADDING_VALUE = 3.0e4  # y rows past num_recv_tokens hold this: any leak shows


def _expert_outputs(rng, want: list, capacity: int):
    """Fresh bf16 `y [R, N, H]` and f32 weights `[R, N, K]`, huge past the received rows."""
    y = random_bf16(rng, (len(want), capacity, H))
    w = random_weights(rng, (len(want), capacity, K))
    for r, result in enumerate(want):
        y[r, result.received.num_kept:] = PADDING_VALUE
        w[r, result.received.num_kept:] = PADDING_VALUE
    return y, w


def _run(mesh, x, topk_idx, y, w, bias, capacity):
    """Dispatch x, then combine y with weights w and the biases (one passed bare, two as a tuple)."""
    return run_per_rank(mesh, _dispatch_then_combine(mesh.size, capacity), x, topk_idx, y, w, tuple(bias))


@functools.lru_cache(maxsize=None)
def _dispatch_then_combine(num_ranks: int, capacity: int):
    """One function object per configuration, so tests that differ only in data share compilations."""
    buffer = deepep.Buffer(make_mesh(num_ranks), "ep")

    def per_rank(x, idx, y, w, bias):
        out = buffer.dispatch(x, topk_idx=idx, num_experts=E, num_worst_tokens=capacity)
        bias_arg = bias[0] if len(bias) == 1 else (bias or None)
        return buffer.combine(y, out.handle, topk_weights=w, bias=bias_arg)

    return per_rank


def check_combine(got_x, got_w, want, y, w, bias, bf16_node_partials=None):
    assert got_x.dtype == ml_dtypes.bfloat16 and got_x.shape == (len(want), T, H)
    exact = oracle.combine(y.astype(np.float32), want, T, [b.astype(np.float32) for b in bias], bf16_node_partials)
    magnitude = oracle.combine(np.abs(y.astype(np.float32)), want, T, [np.abs(b.astype(np.float32)) for b in bias])
    oracle.assert_rounded_once(got_x, exact, magnitude)
    assert got_w.dtype == np.float32 and got_w.shape == (len(want), T, K)
    np.testing.assert_allclose(got_w, oracle.combine(w, want, T), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_bias", [0, 1, 2])
def test_combine_matches_oracle(mesh, rng, num_bias):
    num_ranks = mesh.size
    capacity = num_ranks * T
    x = random_bf16(rng, (num_ranks, T, H))
    topk_idx = random_topk(rng, num_ranks, T, K, E, "random")
    topk_idx[:, 0] = -1  # token 0 of every rank goes nowhere: zeros (+ bias)
    want = oracle.dispatch([x], topk_idx, None, E, capacity)
    y, w = _expert_outputs(rng, want, capacity)
    bias = [random_bf16(rng, (num_ranks, T, H)) for _ in range(num_bias)]
    got_x, got_w = _run(mesh, x, topk_idx, y, w, bias, capacity)
    check_combine(got_x, got_w, want, y, w, bias)
    unsent = sum((b[:, 0].astype(np.float32) for b in bias), np.zeros((num_ranks, H), np.float32))
    np.testing.assert_array_equal(got_x[:, 0].astype(np.float32),
                                  unsent.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_combine_hot_expert_sums_many_ranks(rng):
    """Eight ranks, every token to experts on most ranks: up to eight terms plus two biases."""
    mesh = make_mesh(8)
    x = random_bf16(rng, (8, T, H))
    topk_idx = np.stack([np.stack([rng.permutation(E)[:8] for _ in range(T)]) for _ in range(8)]).astype(np.int32)
    want = oracle.dispatch([x], topk_idx, None, E, 8 * T)
    y, w = _expert_outputs(rng, want, 8 * T)
    bias = [random_bf16(rng, (8, T, H)) for _ in range(2)]
    check_combine(*_run(mesh, x, topk_idx, y, w, bias, 8 * T), want, y, w, bias)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("ranks_per_node", [1, 4])
def test_combine_across_nodes_rounds_like_the_internode_kernels(rng, ranks_per_node, exact):
    """Eight ranks in nodes of 1 or 4: each node's partial of a token (the f32 sum of its ranks' rows)
    is rounded to bf16 before the partials are summed, unless exact_internode_combine=True (one rounding);
    the weights' partials stay f32 either way."""
    mesh = make_mesh(8)
    buffer = deepep.Buffer(mesh, "ep", ranks_per_node=ranks_per_node, exact_internode_combine=exact)
    x = random_bf16(rng, (8, T, H))
    topk_idx = random_topk(rng, 8, T, K, E, "random")
    want = oracle.dispatch([x], topk_idx, None, E, 8 * T)
    y, w = _expert_outputs(rng, want, 8 * T)
    bias = [random_bf16(rng, (8, T, H))]

    def per_rank(x, idx, y, w, bias):
        out = buffer.dispatch(x, topk_idx=idx, num_experts=E)
        return buffer.combine(y, out.handle, topk_weights=w, bias=bias)

    got_x, got_w = run_per_rank(mesh, per_rank, x, topk_idx, y, w, bias[0])
    check_combine(got_x, got_w, want, y, w, bias, None if exact else ranks_per_node)


def test_combine_without_weights(rng):
    mesh = make_mesh(2)
    buffer = deepep.Buffer(mesh, "ep")
    x, topk_idx, _ = random_tokens(rng, 2, T, H, K, E)

    def per_rank(x, idx):
        out = buffer.dispatch(x, topk_idx=idx, num_experts=E)
        return buffer.combine(out.recv_x, out.handle)

    got_x, got_w = run_per_rank(mesh, per_rank, x, topk_idx)
    assert got_w is None
    want = oracle.dispatch([x], topk_idx, None, E, 2 * T)
    y = np.stack([w.recv_parts[0] for w in want])
    exact = oracle.combine(y.astype(np.float32), want, T)
    oracle.assert_rounded_once(got_x, exact, oracle.combine(np.abs(y.astype(np.float32)), want, T))


def test_combine_no_routing_gives_bias(rng):
    mesh = make_mesh(2)
    x = random_bf16(rng, (2, T, H))
    topk_idx = np.full((2, T, K), -1, np.int32)
    y = random_bf16(rng, (2, 2 * T, H))
    w = random_weights(rng, (2, 2 * T, K))
    bias = [random_bf16(rng, (2, T, H))]
    got_x, got_w = _run(mesh, x, topk_idx, y, w, bias, 2 * T)
    np.testing.assert_array_equal(got_x.astype(np.float32), bias[0].astype(np.float32))
    np.testing.assert_array_equal(got_w, 0.0)


@pytest.mark.parametrize("num_ranks,capacity", [(2, 5), (4, T), (8, T)])
def test_combine_after_capacity_overflow(rng, num_ranks, capacity):
    """Rows dropped by a too-small capacity contribute nothing; everything else still sums."""
    mesh = make_mesh(num_ranks)
    x = random_bf16(rng, (num_ranks, T, H))
    topk_idx = random_topk(rng, num_ranks, T, K, E, "hot")
    want = oracle.dispatch([x], topk_idx, None, E, capacity)
    assert any(r.received.num_recv_tokens > capacity for r in want), "routing did not overflow"
    y, w = _expert_outputs(rng, want, capacity)
    bias = [random_bf16(rng, (num_ranks, T, H))]
    check_combine(*_run(mesh, x, topk_idx, y, w, bias, capacity), want, y, w, bias)


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_combine_when_every_token_goes_to_the_last_rank(rng, num_ranks):
    """Edge case of the receive-block layout: a sender fills its whole block for the last rank."""
    mesh = make_mesh(num_ranks)
    experts_per_rank = E // num_ranks
    x = random_bf16(rng, (num_ranks, T, H))
    topk_idx = np.full((num_ranks, T, K), -1, np.int32)
    topk_idx[..., 0] = E - 1 - rng.integers(0, experts_per_rank, (num_ranks, T))
    topk_idx[:, ::3, 1] = rng.integers(0, experts_per_rank, (num_ranks, (T + 2) // 3))  # some also to rank 0
    want = oracle.dispatch([x], topk_idx, None, E, num_ranks * T)
    y, w = _expert_outputs(rng, want, num_ranks * T)
    bias = [random_bf16(rng, (num_ranks, T, H))]
    check_combine(*_run(mesh, x, topk_idx, y, w, bias, num_ranks * T), want, y, w, bias)


def test_handle_crosses_jit_boundaries(rng):
    """A handle returned from one jitted step drives combine and a cached dispatch in another."""
    num_ranks = 4
    mesh = make_mesh(num_ranks)
    buffer = deepep.Buffer(mesh, "ep")
    x, x_next = random_bf16(rng, (num_ranks, T, H)), random_bf16(rng, (num_ranks, T, H))
    topk_idx = random_topk(rng, num_ranks, T, K, E, "hot")
    handle = run_per_rank(mesh, lambda x, idx: buffer.dispatch(x, topk_idx=idx, num_experts=E).handle, x, topk_idx)
    assert isinstance(handle, deepep.DispatchHandle)
    want = oracle.dispatch([x_next], topk_idx, None, E, num_ranks * T)
    y, w = _expert_outputs(rng, want, num_ranks * T)

    def later_step(x_next, y, w, handle):
        recv = buffer.dispatch(x_next, handle=handle).recv_x
        return recv, buffer.combine(y, handle, topk_weights=w)

    recv, (got_x, got_w) = run_per_rank(mesh, later_step, x_next, y, w, handle)
    for r, result in enumerate(want):
        kept = result.received.num_kept
        np.testing.assert_array_equal(recv[r, :kept].astype(np.float32), result.recv_parts[0][:kept].astype(np.float32))
    check_combine(got_x, got_w, want, y, w, [])
