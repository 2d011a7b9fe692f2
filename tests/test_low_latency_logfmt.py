"""LogFMT-10 (`low_latency_combine(..., use_logfmt=True)`, jax_deepep/logfmt.py): the pure-JAX format against
the numpy oracle bit for bit, its documented error bound, and the combine through the pure-JAX backend."""
from decimal import Decimal, getcontext

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_deepep as deepep
import oracle
from harness import make_mesh, random_bf16, random_tokens, random_topk, random_weights, run_per_rank
from jax_deepep import DeepEPError, logfmt

H = 512
GROUPS = H // logfmt.GROUP


def _groups_of_every_kind(rng, num_rows: int):
    """bf16 rows [num_rows, H] whose groups cover what the format distinguishes: scales from 2^-120 to 2^4,
    zeros, negative values, tiny and huge magnitudes, all-equal groups, amax at 1 and just below, subnormals,
    inf and nan."""
    x = rng.standard_normal((num_rows, GROUPS, logfmt.GROUP))
    scale = 2.0 ** rng.uniform(-120, 4, (num_rows, GROUPS, 1))
    x = x * scale
    kind = rng.integers(0, 12, (num_rows, GROUPS))
    x[kind == 1] = 0.0
    x[kind == 2] = rng.choice([-0.25, 0.5, 3.0, 1e-30])  # all equal
    sparse = (kind == 3)[..., None] & (rng.random(x.shape) < 0.7)
    x[sparse] = 0.0
    x[kind == 4] *= 1e30 / np.abs(x[kind == 4]).max(axis=-1, keepdims=True)  # huge
    x[kind == 5] *= 1e-30 / np.abs(x[kind == 5]).max(axis=-1, keepdims=True)  # tiny
    x[kind == 6] = np.abs(x[kind == 6]) / np.abs(x[kind == 6]).max(axis=-1, keepdims=True)  # amax exactly 1
    x[kind == 7] = x[kind == 7] / np.abs(x[kind == 7]).max(axis=-1, keepdims=True) * 0.999  # just below 1
    x[kind == 8, :3] = [1e-39, -3e-40, 2e-45]  # subnormals beside normal values
    x[kind == 9, 5] = rng.choice([np.inf, -np.inf, np.nan])
    x[kind == 10] = rng.uniform(-1, 1, x[kind == 10].shape) * 2.0 ** rng.integers(-30, 0)  # one wide spread
    x[kind == 11, :64] *= 2.0 ** -40  # two magnitudes far apart: the low one is clipped 32 octaves down
    return x.reshape(num_rows, H).astype(ml_dtypes.bfloat16)


def _tie_distance(exact: Decimal, got, unit: Decimal) -> Decimal:
    """How far `exact` lies from the rounding tie nearest to `got`, in units of `unit` (the rounding step)."""
    return Decimal("0.5") - abs(exact - Decimal(float(got))) / unit


def test_the_tables_are_correctly_rounded_far_from_ties():
    """Every table entry is its exact value rounded (to an integer, or to f32) and lies at least 5e-5 of a
    rounding step from a tie: any double-precision log2 / exp2 (the kernels fill the tables on the GPU)
    rounds to the same entries."""
    getcontext().prec = 50
    ln2 = Decimal(2).ln()
    for m, got in enumerate(logfmt.LOG2_MANTISSA):
        exact = (Decimal(128 + m) / 128).ln() / ln2 * logfmt.ONE
        assert _tie_distance(exact, got, Decimal(1)) > Decimal("5e-5"), m
    for table, unit in ((logfmt.EXP2_HIGH, 256), (logfmt.EXP2_LOW, logfmt.ONE)):
        for i, got in enumerate(table):
            exact = (ln2 * i / unit).exp()
            assert _tie_distance(exact, got, Decimal(float(np.spacing(got)))) > Decimal("5e-5"), (unit, i)


@pytest.mark.parametrize("seed", range(4))
def test_reference_matches_the_oracle_bit_for_bit(seed):
    x = _groups_of_every_kind(np.random.default_rng(seed), 512)
    got = np.asarray(jax.jit(logfmt.round_trip)(jnp.asarray(x)))
    want = oracle.logfmt_round_trip(x)
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_every_bf16_value_round_trips_as_the_oracle_says():
    """All 65536 bf16 bit patterns, each in a group with amax 0.75 (encoded) beside zeros."""
    values = np.arange(1 << 16, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
    values = np.where(np.abs(values) < 0.75, values, 0.0)  # larger ones would leave the group unencoded
    rows = np.zeros((1 << 16, logfmt.GROUP), np.float32)
    rows[:, 0], rows[:, 1] = values, 0.75
    rows = rows.astype(ml_dtypes.bfloat16)
    got = np.asarray(jax.jit(logfmt.round_trip)(jnp.asarray(rows)))
    np.testing.assert_array_equal(got.view(np.uint32), oracle.logfmt_round_trip(rows).view(np.uint32))


def _encoded_groups(x):
    magnitude = np.abs(x.astype(np.float64)).reshape(*x.shape[:-1], -1, logfmt.GROUP)
    magnitude = np.where(magnitude < 2.0 ** -126, 0.0, magnitude)
    amax, amin = magnitude.max(-1), magnitude.min(-1)
    return (amax >= 2.0 ** -126) & (amax < 1) & (amin < amax), amax, amin


def test_the_documented_error_bound():
    """Encoded values decode within (2^step - 1) / 2 + 2^-15 of their magnitude plus 2^-32 amax (and 2^-126);
    other groups are exact; values keep their sign."""
    x = _groups_of_every_kind(np.random.default_rng(7), 2048)
    got = oracle.logfmt_round_trip(x).astype(np.float64)
    exact = x.astype(np.float64)
    encoded, amax, amin = _encoded_groups(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_amin = np.where(amin == 0, np.log2(amax) - 32, np.maximum(np.log2(np.maximum(amin, 1e-300)),
                                                                       np.log2(amax) - 32))
        step = np.where(encoded, (np.log2(amax) - log_amin) / 510, 0)
    relative = np.repeat((2.0 ** step - 1) / 2 + 2.0 ** -15, logfmt.GROUP, axis=-1)
    floor = np.repeat(amax * 2.0 ** -32, logfmt.GROUP, axis=-1) + 2.0 ** -126
    on = np.repeat(encoded, logfmt.GROUP, axis=-1)
    err = np.abs(got[on] - exact[on])
    assert np.all(err <= np.abs(exact[on]) * relative[on] + floor[on])
    np.testing.assert_array_equal(got[~on].view(np.uint64), exact[~on].view(np.uint64))
    assert np.all(np.sign(got[on]) * np.sign(exact[on]) >= 0)
    assert np.max(step) <= 32 / 510 + 1e-12 and np.max(relative) < 0.0223


def test_row_bytes_count_the_compact_groups():
    x = _groups_of_every_kind(np.random.default_rng(3), 64)
    encoded = _encoded_groups(x)[0]
    want = logfmt.meta_bytes(H) + np.sum(np.where(encoded, 160, 256), axis=-1)
    np.testing.assert_array_equal(np.asarray(logfmt.row_bytes(jnp.asarray(x))), want)
    assert logfmt.meta_bytes(7168) == 224 and logfmt.meta_bytes(384) == 16


T, K, E, M = 24, 4, 16, 24


def low_latency_buffer(mesh, hidden=H):
    size = deepep.Buffer.get_low_latency_rdma_size_hint(M, hidden, mesh.size, E)
    return deepep.Buffer(mesh, "ep", low_latency_mode=True, num_rdma_bytes=size)


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_logfmt_combine_of_the_pure_jax_backend(rng, num_ranks):
    """Rows from other ranks are decoded as the oracle decodes them, a rank's own rows stay exact, the sum is
    rounded once; and the result keeps the documented bound from the bf16 combine."""
    mesh = make_mesh(num_ranks)
    buffer = low_latency_buffer(mesh)
    x, topk_idx, weights = random_tokens(rng, num_ranks, T, H, K, E)
    received = oracle.low_latency_receive(topk_idx, E)
    y = np.zeros((num_ranks, E // num_ranks, num_ranks * M, H), ml_dtypes.bfloat16)
    for d, rec in enumerate(received):
        for local, rows in enumerate(rec.rows):
            y[d, local, :len(rows)] = _groups_of_every_kind(rng, len(rows)) if len(rows) else 0

    def per_rank(x, idx, w, y):
        ll = buffer.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=M, num_experts=E, use_fp8=False)
        return buffer.low_latency_combine(y, idx, w, ll.handle, use_logfmt=True)

    with np.errstate(invalid="ignore", over="ignore"):
        combined = run_per_rank(mesh, per_rank, x, topk_idx, weights, y).astype(np.float64)
        want = oracle.low_latency_logfmt_combine(y, weights, received, T)
        terms = oracle.low_latency_combine(np.abs(np.nan_to_num(y.astype(np.float64))), np.abs(weights), received, T)
        finite = np.isfinite(want) & (terms < 1e30)
        oracle.assert_rounded_once(combined[finite], want[finite], terms[finite])
        np.testing.assert_array_equal(np.isnan(combined), np.isnan(want))
        if num_ranks == 1:  # nothing travels
            exact = oracle.low_latency_combine(y, weights, received, T)
            oracle.assert_rounded_once(combined[finite], exact[finite], terms[finite])
        # vs the bf16 combine: 2.3 % of the terms' magnitude, 2^-32 of their groups' amax, bf16 rounding
        exact = oracle.low_latency_combine(y, weights, received, T)
        magnitude = np.abs(np.nan_to_num(y.astype(np.float64))).reshape(*y.shape[:-1], -1, logfmt.GROUP)
        amax = np.repeat(magnitude.max(axis=-1), logfmt.GROUP, axis=-1)
        clipped = oracle.low_latency_combine(amax * 2.0 ** -32 + 2.0 ** -126, np.abs(weights), received, T)
        bound = 0.0223 * terms + clipped + np.abs(exact) * 2.0 ** -8
        assert np.all(np.abs(combined - exact)[finite] <= bound[finite])


def test_logfmt_needs_groups_of_128_channels():
    mesh = make_mesh(2)
    h = 136
    buffer = low_latency_buffer(mesh, h)
    rng = np.random.default_rng(0)
    x = random_bf16(rng, (2, T, h))
    topk_idx = random_topk(rng, 2, T, K, E)
    weights = random_weights(rng, (2, T, K))
    y = random_bf16(rng, (2, E // 2, 2 * M, h))

    def per_rank(x, idx, w, y):
        ll = buffer.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=M, num_experts=E, use_fp8=False)
        return buffer.low_latency_combine(y, idx, w, ll.handle, use_logfmt=True)

    with pytest.raises(DeepEPError, match=r"`y` hidden size must be a multiple of 128 for use_logfmt=True, got 136"):
        run_per_rank(mesh, per_rank, x, topk_idx, weights, y)
