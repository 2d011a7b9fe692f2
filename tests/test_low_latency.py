"""Low-latency dispatch/combine (docs/API.md) against the numpy oracle: per-expert receive
blocks, bf16 and FP8 (f32, power-of-two and packed UE8M0 scales), the recv-hook split."""
import functools

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_deepep as deepep
import oracle
from harness import (enable_x64, int64_ids_beyond_int32, make_mesh, random_bf16, random_tokens, random_topk,
                     random_weights, run_per_rank)

T, M, H, K, E = 6, 8, 128, 4, 24


def low_latency_buffer(mesh, hidden=H):
    size = deepep.Buffer.get_low_latency_rdma_size_hint(M, hidden, mesh.size, E)
    return deepep.Buffer(mesh, "ep", low_latency_mode=True, num_rdma_bytes=size)


def _expert_outputs(rng, received: list, num_ranks: int, hidden: int):
    """Fresh bf16 `y [R, E_l, R * M, H]`, NaN in every row past the expert's count."""
    y = random_bf16(rng, (num_ranks, E // num_ranks, num_ranks * M, hidden))
    for d, rec in enumerate(received):
        for local, count in enumerate(rec.recv_count):
            y[d, local, count:] = np.nan
    return y


def run_low_latency(mesh, x, topk_idx, weights, y, *, return_recv_hook=False, **options):
    """Dispatch then combine `y` per rank; returns (recv_x, recv_count, recv_src_info,
    recv_layout_range, combined), each `[R, ...]`."""
    per_rank = _dispatch_then_combine(mesh.size, x.shape[-1], return_recv_hook, tuple(sorted(options.items())))
    return run_per_rank(mesh, per_rank, x, topk_idx, weights, y)[:5]


@functools.lru_cache(maxsize=None)
def _dispatch_then_combine(num_ranks: int, hidden: int, return_recv_hook: bool, options: tuple):
    """One function object per configuration, so tests that differ only in data share compilations."""
    buffer = low_latency_buffer(make_mesh(num_ranks), hidden)

    def per_rank(x, idx, w, y):
        ll = buffer.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=M, num_experts=E,
                                         return_recv_hook=return_recv_hook, **dict(options))
        if return_recv_hook:
            overlap = jnp.tanh(y.astype(jnp.float32)).sum()  # work XLA may schedule in between
            ll = buffer.low_latency_recv(ll)
        combined = buffer.low_latency_combine(y, idx, w, ll.handle, return_recv_hook=return_recv_hook)
        if return_recv_hook:
            combined = buffer.low_latency_recv(combined)
            return ll.recv_x, ll.recv_count, ll.recv_src_info, ll.recv_layout_range, combined, overlap
        return ll.recv_x, ll.recv_count, ll.recv_src_info, ll.recv_layout_range, combined

    return per_rank


def check_receive_layout(recv_count, recv_src_info, layout_range, received: list):
    num_ranks = len(received)
    assert recv_count.dtype == recv_src_info.dtype == layout_range.dtype == np.int32
    assert recv_src_info.shape[1:] == (len(received[0].rows), num_ranks * M)
    assert layout_range.shape[1:] == (len(received[0].rows), num_ranks, 2)
    for d, rec in enumerate(received):
        np.testing.assert_array_equal(recv_count[d], rec.recv_count)
        np.testing.assert_array_equal(layout_range[d], rec.recv_layout_range)
        for local, rows in enumerate(rec.rows):
            np.testing.assert_array_equal(recv_src_info[d, local, :len(rows)], rows[:, 1])


def check_valid_rows(got, want, received: list, compare=np.testing.assert_array_equal):
    """Compare `[R, E_l, R * M, ...]` blocks on each expert's valid rows only."""
    for d, rec in enumerate(received):
        for local, count in enumerate(rec.recv_count):
            compare(_comparable(got[d, local, :count]), _comparable(want[d][local, :count]))


def _comparable(a):
    """bf16 / FP8 as f32 (numpy compares those poorly); packed int32 scales as they are."""
    return a if a.dtype == np.int32 else a.astype(np.float32)


def close_f32(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def close_dequantised(got, want):
    """Dequantised FP8 rows: one e4m3 step is 2**-3 relative."""
    np.testing.assert_allclose(got, want, rtol=2.0 ** -3, atol=1e-6)


def check_combined(combined, y, weights, received):
    assert combined.dtype == ml_dtypes.bfloat16 and combined.shape == (len(received), T, y.shape[-1])
    y32 = y.astype(np.float32)
    exact = oracle.low_latency_combine(y32, weights, received, T)
    magnitude = oracle.low_latency_combine(np.abs(np.nan_to_num(y32)), weights, received, T)
    oracle.assert_rounded_once(combined, exact, magnitude)


@pytest.mark.parametrize("kind", ["random", "out_of_range"])
def test_low_latency_bf16(mesh, rng, kind):
    num_ranks = mesh.size
    x = random_bf16(rng, (num_ranks, T, H))
    topk_idx = random_topk(rng, num_ranks, T, K, E, kind)
    weights = random_weights(rng, (num_ranks, T, K))
    received = oracle.low_latency_receive(topk_idx, E)
    y = _expert_outputs(rng, received, num_ranks, H)
    recv_x, count, src_info, layout_range, combined = run_low_latency(mesh, x, topk_idx, weights, y,
                                                                      use_fp8=False)
    assert recv_x.dtype == ml_dtypes.bfloat16 and recv_x.shape == (num_ranks, E // num_ranks, num_ranks * M, H)
    check_receive_layout(count, src_info, layout_range, received)
    check_valid_rows(recv_x, [oracle.low_latency_recv_x(x, rec, num_ranks * M) for rec in received], received)
    check_combined(combined, y, weights, received)


def test_low_latency_hot_expert_full_block(rng):
    """Every token of every rank to expert 0 (and T == M): its block is completely full."""
    num_ranks = 8
    mesh = make_mesh(num_ranks)
    x = random_bf16(rng, (num_ranks, M, H))
    topk_idx = random_topk(rng, num_ranks, M, K, E, "hot")
    topk_idx[..., 0] = 0
    topk_idx[..., 1:][topk_idx[..., 1:] == 0] = -1
    weights = random_weights(rng, (num_ranks, M, K))
    received = oracle.low_latency_receive(topk_idx, E)
    assert received[0].recv_count[0] == num_ranks * M
    y = _expert_outputs(rng, received, num_ranks, H)
    recv_x, count, src_info, layout_range, _ = run_low_latency(mesh, x, topk_idx, weights, y, use_fp8=False)
    check_receive_layout(count, src_info, layout_range, received)
    check_valid_rows(recv_x, [oracle.low_latency_recv_x(x, rec, num_ranks * M) for rec in received], received)


@pytest.mark.parametrize("num_ranks", [2, 8])
@pytest.mark.parametrize("round_scale", [False, True])
def test_low_latency_fp8(rng, num_ranks, round_scale):
    mesh = make_mesh(num_ranks)
    h = 256
    x = (rng.standard_normal((num_ranks, T, h)) * rng.uniform(0.01, 100, (num_ranks, T, 1))).astype(ml_dtypes.bfloat16)
    x[:, 0, :128] = 0  # an all-zero block: its amax is clamped, not divided by
    topk_idx = random_topk(rng, num_ranks, T, K, E)
    weights = random_weights(rng, (num_ranks, T, K))
    received = oracle.low_latency_receive(topk_idx, E)
    y = _expert_outputs(rng, received, num_ranks, h)
    (values, scales), count, src_info, layout_range, combined = run_low_latency(
        mesh, x, topk_idx, weights, y, use_fp8=True, round_scale=round_scale)
    assert values.dtype == ml_dtypes.float8_e4m3fn and values.shape == (num_ranks, E // num_ranks, num_ranks * M, h)
    assert scales.dtype == np.float32 and scales.shape == (num_ranks, E // num_ranks, num_ranks * M, h // 128)
    check_receive_layout(count, src_info, layout_range, received)
    want_values, want_scales = oracle.fp8_cast(x.astype(np.float32), round_scale=round_scale)
    if round_scale:
        assert np.all(np.log2(scales[np.isfinite(scales) & (scales > 0)]) % 1 == 0)
    check_valid_rows(scales, [oracle.low_latency_recv_x(want_scales, rec, num_ranks * M) for rec in received],
                     received, np.testing.assert_array_equal if round_scale else close_f32)
    check_valid_rows(values, [oracle.low_latency_recv_x(want_values, rec, num_ranks * M) for rec in received],
                     received, oracle.assert_fp8_values_close)
    check_combined(combined, y, weights, received)


@pytest.mark.parametrize("num_ranks", [2, 8])
def test_low_latency_repeated_experts(rng, num_ranks):
    """A token naming one expert several times is sent to it once (the first occurrence); the repeats act
    like -1 in dispatch and combine (their weights are not added)."""
    mesh = make_mesh(num_ranks)
    x = random_bf16(rng, (num_ranks, T, H))
    topk_idx = random_topk(rng, num_ranks, T, K, E)
    topk_idx[:, :, 2] = topk_idx[:, :, 0]  # every token repeats its first choice (or -1)
    topk_idx[:, 0, :] = 3  # one token names expert 3 in every column
    weights = random_weights(rng, (num_ranks, T, K))
    received = oracle.low_latency_receive(topk_idx, E)
    assert all(len(rows) <= num_ranks * T for rec in received for rows in rec.rows)
    y = _expert_outputs(rng, received, num_ranks, H)
    recv_x, count, src_info, layout_range, combined = run_low_latency(mesh, x, topk_idx, weights, y, use_fp8=False)
    check_receive_layout(count, src_info, layout_range, received)
    check_valid_rows(recv_x, [oracle.low_latency_recv_x(x, rec, num_ranks * M) for rec in received], received)
    check_combined(combined, y, weights, received)


@pytest.mark.parametrize("numerator", [448.0, 1.0])
def test_fp8_cast_divides_as_ieee(rng, numerator):
    """The cast's `448 / amax` (and `1 / scale`) is the IEEE f32 quotient bit for bit, which the
    kernels and the oracle compute and XLA:GPU's division is not (fp8.py)."""
    import jax

    from jax_deepep.fp8 import _correctly_rounded_quotient

    denominators = np.concatenate([
        np.abs(rng.standard_normal(50000)).astype(np.float32) + np.float32(1e-4),
        np.abs(rng.standard_normal(50000)).astype(ml_dtypes.bfloat16).astype(np.float32) + np.float32(1e-4),
        np.exp(rng.uniform(-80, 80, 50000)).astype(np.float32),
        (2.0 ** np.arange(-100, 100)).astype(np.float32),
        np.array([1e-4, 448, 1, 3.3e38, 2.35e-38], np.float32)])
    got = np.asarray(jax.jit(lambda d: _correctly_rounded_quotient(numerator, d))(denominators))
    with np.errstate(over="ignore", under="ignore"):
        want = np.float32(numerator) / denominators
    normal = np.abs(want) >= np.finfo(np.float32).tiny  # beyond that it falls back to XLA's division
    np.testing.assert_array_equal(got[normal].view(np.uint32), want[normal].view(np.uint32))


@pytest.mark.parametrize("num_ranks", [1, 4])
def test_low_latency_fp8_ue8m0(rng, num_ranks):
    """UE8M0 scales: int32 [E_l, R*M, H // 512], four exponent bytes each, lowest block lowest."""
    mesh = make_mesh(num_ranks)
    h = 1024
    x = (rng.standard_normal((num_ranks, T, h)) * np.exp2(rng.integers(-8, 8, (num_ranks, T, h // 128)))
         .repeat(128, axis=-1)).astype(ml_dtypes.bfloat16)
    topk_idx = random_topk(rng, num_ranks, T, K, E)
    weights = random_weights(rng, (num_ranks, T, K))
    received = oracle.low_latency_receive(topk_idx, E)
    y = _expert_outputs(rng, received, num_ranks, h)
    (values, packed), count, src_info, layout_range, _ = run_low_latency(
        mesh, x, topk_idx, weights, y, use_fp8=True, round_scale=True, use_ue8m0=True)
    assert packed.dtype == np.int32 and packed.shape == (num_ranks, E // num_ranks, num_ranks * M, h // 512)
    check_receive_layout(count, src_info, layout_range, received)
    want_values, want_scales = oracle.fp8_cast(x.astype(np.float32), round_scale=True)
    want_packed = oracle.pack_ue8m0(want_scales)
    np.testing.assert_array_equal(oracle.unpack_ue8m0(want_packed), want_scales)
    check_valid_rows(packed, [oracle.low_latency_recv_x(want_packed, rec, num_ranks * M) for rec in received],
                     received)
    check_valid_rows(values, [oracle.low_latency_recv_x(want_values, rec, num_ranks * M) for rec in received],
                     received, oracle.assert_fp8_values_close)


@pytest.mark.parametrize("num_ranks", [2, 8])
@pytest.mark.parametrize("use_fp8", [False, True])
def test_low_latency_recv_hook(rng, num_ranks, use_fp8):
    """The send/recv split through buffer.low_latency_recv gives the same results."""
    mesh = make_mesh(num_ranks)
    x, topk_idx, weights = random_tokens(rng, num_ranks, T, H, K, E, "out_of_range")
    received = oracle.low_latency_receive(topk_idx, E)
    y = _expert_outputs(rng, received, num_ranks, H)
    recv_x, count, src_info, layout_range, combined = run_low_latency(
        mesh, x, topk_idx, weights, y, return_recv_hook=True, use_fp8=use_fp8)
    check_receive_layout(count, src_info, layout_range, received)
    if use_fp8:
        want_values, want_scales = oracle.fp8_cast(x.astype(np.float32))
        recv_x = oracle.fp8_dequant(*recv_x)
        want = [oracle.low_latency_recv_x(oracle.fp8_dequant(want_values, want_scales), rec, num_ranks * M)
                for rec in received]
        check_valid_rows(recv_x, want, received, close_dequantised)
    else:
        check_valid_rows(recv_x, [oracle.low_latency_recv_x(x, rec, num_ranks * M) for rec in received], received)
    check_combined(combined, y, weights, received)


def test_low_latency_int64_ids_with_x64(rng):
    mesh = make_mesh(2)
    x = random_bf16(rng, (2, T, H))
    topk_idx = int64_ids_beyond_int32(random_topk(rng, 2, T, K, E, "out_of_range"))
    weights = random_weights(rng, (2, T, K))
    received = oracle.low_latency_receive(topk_idx, E)
    y = _expert_outputs(rng, received, 2, H)
    with enable_x64():
        recv_x, count, src_info, layout_range, combined = run_low_latency(
            mesh, x, jnp.asarray(topk_idx, jnp.int64), weights, y, use_fp8=False)
    check_receive_layout(count, src_info, layout_range, received)
    check_combined(combined, y, weights, received)


@pytest.mark.parametrize("option", ["zero_copy", "use_logfmt"])
def test_low_latency_combine_options(rng, option):
    """zero_copy changes only how bytes move: exact. use_logfmt sends rows to other ranks as LogFMT-10
    (lossy; tests/test_low_latency_logfmt.py): the oracle's decoded rows, summed and rounded once."""
    num_ranks = 2
    mesh = make_mesh(num_ranks)
    buffer = low_latency_buffer(mesh)
    x = random_bf16(rng, (num_ranks, T, H))
    topk_idx = random_topk(rng, num_ranks, T, K, E)
    weights = random_weights(rng, (num_ranks, T, K))
    received = oracle.low_latency_receive(topk_idx, E)
    y = _expert_outputs(rng, received, num_ranks, H)
    if option == "use_logfmt":  # magnitudes below 1: most groups are encoded
        y = (y.astype(np.float32) / 8).astype(y.dtype)

    def per_rank(x, idx, w, y):
        ll = buffer.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=M, num_experts=E, use_fp8=False)
        return buffer.low_latency_combine(y, idx, w, ll.handle, **{option: True})

    combined = run_per_rank(mesh, per_rank, x, topk_idx, weights, y)
    if option == "zero_copy":
        check_combined(combined, y, weights, received)
        return
    exact = oracle.low_latency_logfmt_combine(y, weights, received, T)
    terms = oracle.low_latency_combine(np.abs(y.astype(np.float64)), weights, received, T)
    oracle.assert_rounded_once(combined, exact, terms)


def test_low_latency_handle_crosses_jit_boundaries(rng):
    """The handle of one jitted dispatch step drives the combine of another."""
    num_ranks = 4
    mesh = make_mesh(num_ranks)
    buffer = low_latency_buffer(mesh)
    x, topk_idx, weights = random_tokens(rng, num_ranks, T, H, K, E, "hot")
    received = oracle.low_latency_receive(topk_idx, E)
    y = _expert_outputs(rng, received, num_ranks, H)
    handle = run_per_rank(mesh, lambda x, idx: buffer.low_latency_dispatch(
        x, idx, num_max_dispatch_tokens_per_rank=M, num_experts=E).handle, x, topk_idx)
    assert isinstance(handle, deepep.LowLatencyHandle)
    combined = run_per_rank(mesh, lambda y, idx, w, handle: buffer.low_latency_combine(y, idx, w, handle),
                            y, topk_idx, weights, handle)
    check_combined(combined, y, weights, received)
