"""The limits of docs/API.md on every backend: top-k, expert alignment, the sizes the low-latency
kernels serve, handles made for another axis size or token count, integer arguments (numpy integers in,
bools out), T = 0, and the Buffer's timeout. Checks made by the ops are traced through the pure-JAX and
(where the library is built) the CUDA backends alike; nothing here needs a GPU."""
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import jax_deepep as deepep
from harness import buffer_with_cuda_backends, make_mesh, run_per_rank
from jax_deepep import gpu
from jax_deepep.buffer_keys import BufferKeys

R, T, H, K, E, M = 2, 8, 128, 4, 8, 8
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32
RDMA_BYTES = 1 << 26
BACKENDS = ["reference", pytest.param("cuda", marks=pytest.mark.skipif(
    not gpu.available(), reason=f"CUDA library: {gpu.unavailable_reason()}"))]


def make_buffer(backend: str, num_ranks: int = R, **kwargs):
    mesh = make_mesh(num_ranks)
    if backend == "cuda":
        return buffer_with_cuda_backends(mesh, **kwargs)
    return deepep.Buffer(mesh, "ep", **kwargs)


def low_latency(backend: str, num_ranks: int = R):
    return make_buffer(backend, num_ranks, low_latency_mode=True, num_rdma_bytes=RDMA_BYTES)


def trace(buffer, fn, *shapes):
    """Trace `fn(*per-rank zeros of `shapes`)` inside jit(shard_map) over the buffer's axis (nothing runs)."""
    def per_rank():
        out = fn(*(jnp.zeros(shape, dtype) for shape, dtype in shapes))
        return jax.tree.map(lambda a: a[None], out)

    mapped = jax.shard_map(per_rank, mesh=buffer.mesh, in_specs=(), out_specs=PartitionSpec("ep"))
    return jax.eval_shape(jax.jit(mapped))


def refused(buffer, fn, *shapes, names=()):
    with pytest.raises(deepep.DeepEPError) as exc_info:
        trace(buffer, fn, *shapes)
    for name in names:
        assert name in str(exc_info.value), (name, str(exc_info.value))
    return str(exc_info.value)


def x_idx(num_tokens=T, top_k=K):
    return ((num_tokens, H), BF16), ((num_tokens, top_k), I32)


def _ll_dispatch(b, x, i, m=M, **kwargs):
    return b.low_latency_dispatch(x, i, num_max_dispatch_tokens_per_rank=m, num_experts=E, use_fp8=False, **kwargs)


# ---- top-k ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [0, 33])
def test_top_k_outside_1_to_32_refused(backend, top_k):
    normal, ll = make_buffer(backend), low_latency(backend)
    names = ["topk_idx", "1 to 32"]
    refused(normal, lambda i: normal.get_dispatch_layout(i, E), ((T, top_k), I32), names=names)
    refused(normal, lambda x, i: normal.dispatch(x, topk_idx=i, num_experts=E), *x_idx(top_k=top_k), names=names)
    refused(ll, lambda x, i: _ll_dispatch(ll, x, i), *x_idx(top_k=top_k), names=names)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_32_traces_and_combine_weights_checked(backend):
    normal = make_buffer(backend)
    trace(normal, lambda x, i: normal.dispatch(x, topk_idx=i, num_experts=E).num_recv_tokens, *x_idx(top_k=32))

    def combine_with_33_weights(x, i, w):
        out = normal.dispatch(x, topk_idx=i, num_experts=E)
        return normal.combine(out.recv_x, out.handle, topk_weights=w)[1]

    refused(normal, combine_with_33_weights, *x_idx(), ((R * T, 33), F32), names=["topk_weights", "1 to 32"])


# ---- expert alignment -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alignment", [0, 65537, 2 ** 31 - 1, 2 ** 32])
def test_expert_alignment_limit(backend, alignment):
    normal = make_buffer(backend)
    refused(normal, lambda x, i: normal.dispatch(x, topk_idx=i, num_experts=E, expert_alignment=alignment),
            *x_idx(), names=["expert_alignment", "[1, 65536]", str(alignment)])


def test_expert_alignment_65536_counts():
    mesh = make_mesh(R)
    buffer = deepep.Buffer(mesh, "ep")
    idx = np.tile(np.arange(K, dtype=np.int32), (R, T, 1))
    x = np.zeros((R, T, H), jnp.bfloat16)
    counts = run_per_rank(mesh, lambda x, i: buffer.dispatch(x, topk_idx=i, num_experts=E,
                                                             expert_alignment=np.int64(65536)).num_recv_tokens_per_expert,
                          x, idx)
    want = np.array([[65536] * K, [0] * K])  # rank 0 holds experts 0..3, which every token names
    np.testing.assert_array_equal(counts, want)


# ---- low-latency sizes the kernels serve ------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_sizes_the_kernels_cannot_serve(backend):
    ll = low_latency(backend)
    refused(ll, lambda x, i: _ll_dispatch(ll, x, i, m=8193), *x_idx(),
            names=["num_max_dispatch_tokens_per_rank", "[1, 8192]", "8193"])
    refused(ll, lambda x, i: _ll_dispatch(ll, x, i), ((T, 100), BF16), ((T, K), I32), names=["`x`", "multiple of 8"])

    def combine_rows_of(hidden):
        def call(x, i, w, y):
            return ll.low_latency_combine(y, i, w, _ll_dispatch(ll, x, i).handle)
        return call, ((E // R, R * M, hidden), BF16)

    call, y = combine_rows_of(12)
    refused(ll, call, *x_idx(), ((T, K), F32), y, names=["`y`", "multiple of 8"])
    call, y = combine_rows_of(136)
    if backend == "cuda":  # the kernels' halves lie where (M, H, E) puts them: one size per Buffer
        refused(ll, call, *x_idx(), ((T, K), F32), y, names=["serve one", f"({M}, {H}, {E})", f"({M}, 136, {E})"])
    else:
        trace(ll, call, *x_idx(), ((T, K), F32), y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normal_mode_rows_of_whole_16_byte_pieces(backend):
    """Normal mode refuses on every backend the hidden sizes the CUDA kernels cannot copy (and H = 0)."""
    b = make_buffer(backend)
    for hidden in (0, 12):
        refused(b, lambda x, i: b.dispatch(x, topk_idx=i, num_experts=E).recv_x, ((T, hidden), BF16), ((T, K), I32),
                names=["`x`", "multiple of 8", str(hidden)])

    def combine(x, i, y):
        return b.combine(y, b.dispatch(x, topk_idx=i, num_experts=E).handle)
    refused(b, combine, *x_idx(), ((R * T, 12), BF16), names=["`y`", "multiple of 8", "12"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_beyond_int32_refused(backend):
    """Expert ids, counts and row indices are int32: larger `num_experts` and capacities are refused by name."""
    b, ll = make_buffer(backend), low_latency(backend)
    refused(b, lambda i: b.get_dispatch_layout(i, 2**31).num_tokens_per_rank, ((T, K), I32),
            names=["num_experts", str(2**31)])
    refused(b, lambda x, i: b.dispatch(x, topk_idx=i, num_experts=E, num_worst_tokens=2**40).recv_x, *x_idx(),
            names=["num_worst_tokens", str(2**40)])
    refused(ll, lambda x, i: ll.low_latency_dispatch(x, i, num_max_dispatch_tokens_per_rank=M, num_experts=2**32,
                                                     use_fp8=False).recv_x, *x_idx(), names=["num_experts"])


@pytest.mark.parametrize("sizes, name", [((8193, H, R, E), "num_max_dispatch_tokens_per_rank"), ((M, 100, R, E), "hidden"),
                                         ((M, H, R, 7), "num_experts"), ((M, H, 0, E), "num_ranks")])
def test_low_latency_size_hint_refuses_what_the_ops_refuse(sizes, name):
    with pytest.raises(deepep.DeepEPError, match=name):
        deepep.Buffer.get_low_latency_rdma_size_hint(*sizes)


def test_low_latency_combine_checks_the_buffer_size():
    ll = deepep.Buffer(make_mesh(R), "ep", low_latency_mode=True,
                       num_rdma_bytes=deepep.Buffer.get_low_latency_rdma_size_hint(M, H, R, E))

    def combine_wider_rows(x, i, w, y):
        return ll.low_latency_combine(y, i, w, _ll_dispatch(ll, x, i).handle)

    refused(ll, combine_wider_rows, *x_idx(), ((T, K), F32), ((E // R, R * M, 4 * H), BF16),
            names=["num_rdma_bytes", f"hidden={4 * H}"])


# ---- handles made for another axis size or token count -----------------------------------------------
def _handle_shapes(make, num_ranks: int):
    """Per-rank shapes of the handle `make(buffer)` returns, traced on a mesh of `num_ranks`."""
    buffer = make_buffer("reference", num_ranks, low_latency_mode=True, num_rdma_bytes=RDMA_BYTES)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), trace(buffer, make(buffer), *x_idx()))


def _zeros_like(shapes):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_handle_from_another_axis_size_refused(backend):
    shapes = _handle_shapes(lambda b: lambda x, i: b.dispatch(x, topk_idx=i, num_experts=E).handle, 2)
    normal = make_buffer(backend, 4)
    refused(normal, lambda y: normal.combine(y, _zeros_like(shapes))[0], ((2 * T, H), BF16),
            names=["`handle", "another axis size"])
    refused(normal, lambda x: normal.dispatch(x, handle=_zeros_like(shapes)).recv_x, ((T, H), BF16),
            names=["`handle", "another axis size"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_handle_from_another_axis_size_refused(backend):
    shapes = _handle_shapes(lambda b: lambda x, i: _ll_dispatch(b, x, i).handle, 2)
    ll = low_latency(backend, 4)
    refused(ll, lambda i, w, y: ll.low_latency_combine(y, i, w, _zeros_like(shapes)),
            ((T, K), I32), ((T, K), F32), ((E // 4, 4 * M, H), BF16), names=["handle.recv_src_info"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_dispatch_handle_of_another_token_count(backend):
    normal = make_buffer(backend)

    def cached(x, i, x2):
        return normal.dispatch(x2, handle=normal.dispatch(x, topk_idx=i, num_experts=E).handle).recv_x

    refused(normal, cached, *x_idx(), ((T + 1, H), BF16), names=["`x`", "`handle`", f"made for {T}"])


# ---- integer arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_integers_accepted_and_bools_refused_by_the_ops(backend):
    normal, ll = make_buffer(backend), low_latency(backend)
    ints = dict(num_experts=np.int64(E), num_worst_tokens=np.int32(R * T), expert_alignment=np.uint8(2))
    trace(normal, lambda x, i: normal.dispatch(x, topk_idx=i, **ints).num_recv_tokens, *x_idx())
    trace(normal, lambda i: normal.get_dispatch_layout(i, np.int16(E)).num_tokens_per_rank, x_idx()[1])
    trace(ll, lambda x, i: ll.low_latency_dispatch(x, i, num_max_dispatch_tokens_per_rank=np.int64(M),
                                                   num_experts=np.int64(E), use_fp8=False).recv_count, *x_idx())
    for name in ints:
        refused(normal, lambda x, i: normal.dispatch(x, topk_idx=i, **{**ints, name: True}).num_recv_tokens,
                *x_idx(), names=[f"`{name}", "True"])
    refused(ll, lambda x, i: ll.low_latency_dispatch(x, i, num_max_dispatch_tokens_per_rank=True, num_experts=E),
            *x_idx(), names=["num_max_dispatch_tokens_per_rank", "True"])
    refused(normal, lambda i: normal.get_dispatch_layout(i, 8.0), x_idx()[1], names=["num_experts", "8.0"])
    # Where the value is only compared or not needed: with a layout, and in cached mode.
    refused(normal, lambda x, i: normal.dispatch(x, topk_idx=i, layout=normal.get_dispatch_layout(i, E),
                                                 num_experts=float(E)).num_recv_tokens,
            *x_idx(), names=["num_experts", f"{float(E)}"])

    def cached(x, i, **args):
        return normal.dispatch(x, handle=normal.dispatch(x, topk_idx=i, num_experts=E).handle, **args).recv_x

    trace(normal, lambda x, i: cached(x, i, num_worst_tokens=np.int64(R * T), expert_alignment=np.int8(4)), *x_idx())
    for name, bad in (("num_worst_tokens", True), ("num_worst_tokens", 8.0), ("expert_alignment", np.bool_(False)),
                      ("expert_alignment", np.float32(2))):
        refused(normal, lambda x, i: cached(x, i, **{name: bad}), *x_idx(), names=[f"`{name}", f"{bad}"])
    refused(normal, lambda x, i: cached(x, i, num_worst_tokens=5), *x_idx(),
            names=["`num_worst_tokens` (5)", f"capacity of {R * T} rows"])


def test_numpy_integers_accepted_and_bools_refused_by_the_buffer():
    mesh = make_mesh(R)
    buffer = deepep.Buffer(mesh, "ep", num_nvl_bytes=np.int64(1 << 30), num_rdma_bytes=np.uint32(0),
                           num_qps_per_rank=np.int8(4), ranks_per_node=np.int64(R))
    assert (buffer.num_nvl_bytes, buffer.num_qps_per_rank, buffer.ranks_per_node) == (1 << 30, 4, R)
    assert type(buffer.num_nvl_bytes) is int
    for name in ("num_nvl_bytes", "num_rdma_bytes", "num_qps_per_rank", "ranks_per_node"):
        with pytest.raises(deepep.DeepEPError, match=f"`{name}`.*True"):
            deepep.Buffer(mesh, "ep", **{name: True})
    with pytest.raises(deepep.DeepEPError, match="`num_nvl_bytes`.*-1"):
        deepep.Buffer(mesh, "ep", num_nvl_bytes=-1)


def test_numpy_integers_accepted_and_bools_refused_by_the_configuration():
    before = deepep.Buffer.num_sms
    try:
        deepep.Buffer.set_num_sms(np.int32(24))
        assert deepep.Buffer.num_sms == 24 and type(deepep.Buffer.num_sms) is int
        for bad in (True, 23, 0, 24.0):
            with pytest.raises(deepep.DeepEPError, match="new_num_sms"):
                deepep.Buffer.set_num_sms(bad)
    finally:
        deepep.Buffer.set_num_sms(before)
    config = deepep.Config(np.int64(20), np.int32(8), np.int64(256))
    assert config == deepep.Config(20, 8, 256) and type(config.num_sms) is int
    assert config.get_nvl_buffer_size_hint(np.int64(2 * H), np.int8(R)) == config.get_nvl_buffer_size_hint(2 * H, R)
    assert config.get_rdma_buffer_size_hint(np.int64(2 * H), np.int64(16)) == config.get_rdma_buffer_size_hint(2 * H, 16)
    assert (deepep.Buffer.get_low_latency_rdma_size_hint(np.int64(M), np.int64(H), np.int64(R), np.int64(E))
            == deepep.Buffer.get_low_latency_rdma_size_hint(M, H, R, E))
    assert deepep.Buffer.get_dispatch_config(np.int64(R)) == deepep.Buffer.get_dispatch_config(R)
    calls = {
        "num_sms": lambda: deepep.Config(True, 8, 256),
        "num_max_nvl_chunked_recv_tokens": lambda: deepep.Config(20, 8, True),
        "num_max_rdma_chunked_send_tokens": lambda: deepep.Config(20, 8, 256, True),
        "hidden_bytes": lambda: config.get_nvl_buffer_size_hint(True, R),
        "num_ranks": lambda: config.get_rdma_buffer_size_hint(2 * H, True),
        "num_experts": lambda: deepep.Buffer.get_low_latency_rdma_size_hint(M, H, R, True),
        "num_max_dispatch_tokens_per_rank": lambda: deepep.Buffer.get_low_latency_rdma_size_hint(0, H, R, E),
    }
    for name, call in calls.items():
        with pytest.raises(deepep.DeepEPError, match=f"`{name}`"):
            call()
    with pytest.raises(deepep.DeepEPError, match="num_ranks"):
        deepep.Buffer.get_combine_config(False)


@pytest.mark.parametrize("args, name", [((3, 1, 2), "num_sms"), ((20, 8, 4), "num_max_nvl_chunked_send_tokens"),
                                        ((20, 0, 4), "num_max_nvl_chunked_send_tokens"),
                                        ((20, 8, 256, 200, 128), "num_max_rdma_chunked_send_tokens")])
def test_config_errors_are_deepep_errors(args, name):
    with pytest.raises(deepep.DeepEPError, match=f"Config: `{name}`"):
        deepep.Config(*args)


# ---- never a raw AttributeError ---------------------------------------------------------------------
def test_python_list_x_and_fp8_y_are_deepep_errors():
    mesh = make_mesh(R)
    buffer = deepep.Buffer(mesh, "ep")
    ll = low_latency("reference")
    rows = [[0.0] * H for _ in range(T)]
    refused(buffer, lambda i: buffer.dispatch(rows, topk_idx=i, num_experts=E), x_idx()[1], names=["`x`", "pair"])
    refused(buffer, lambda i: buffer.dispatch(rows[:2], topk_idx=i, num_experts=E), x_idx()[1], names=["`x[0]`"])
    refused(ll, lambda i: _ll_dispatch(ll, rows, i), x_idx()[1], names=["`x`", "bfloat16", "list"])

    def combine_fp8(x, i):
        out = buffer.dispatch(deepep.fp8.per_block_cast_to_fp8(x), topk_idx=i, num_experts=E)
        return buffer.combine(out.recv_x, out.handle)[0]

    refused(buffer, combine_fp8, *x_idx(), names=["`y`", "bfloat16", "float8_e4m3fn"])

    def reference_combine_fp8(x, i):
        out = deepep.reference.dispatch(deepep.fp8.per_block_cast_to_fp8(x), topk_idx=i, num_experts=E, axis_name="ep")
        return deepep.reference.combine(out.recv_x, out.handle, axis_name="ep")[0]

    refused(buffer, reference_combine_fp8, *x_idx(), names=["`y`", "bfloat16"])


# ---- T = 0 ------------------------------------------------------------------------------------------
def _all_ops_per_rank(normal, ll):
    def per_rank(x, idx, w, keep):
        # `keep` is a non-empty operand: XLA's shard_map lowering rejects a program whose every operand
        # has no elements (unrelated to these ops).
        layout = normal.get_dispatch_layout(idx, E)
        out = normal.dispatch(x, topk_idx=idx, topk_weights=w, layout=layout, expert_alignment=4)
        cached = normal.dispatch(x, handle=out.handle)
        combined = normal.combine(out.recv_x, out.handle, topk_weights=out.recv_topk_weights, bias=x)
        fp8 = normal.dispatch(deepep.fp8.per_block_cast_to_fp8(x), topk_idx=idx, num_experts=E, num_worst_tokens=5)
        fp8_combined, _ = normal.combine(jnp.ones((5, H), BF16), fp8.handle)
        low = [ll.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=M, num_experts=E, use_fp8=use_fp8)
               for use_fp8 in (False, True)]
        ll_combined = ll.low_latency_combine(jnp.ones((E // ll.num_ranks, ll.num_ranks * M, H), BF16), idx, w,
                                             low[0].handle)
        return dict(layout=layout, out=out, cached=cached.recv_x, combined=combined, fp8=fp8,
                    fp8_combined=fp8_combined, low=[(o.recv_x, o.recv_count, o.recv_layout_range) for o in low],
                    ll_combined=ll_combined, keep=keep)

    return per_rank


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_fp8_cast_of_no_rows(use_ue8m0):
    """The FP8 cast of T = 0 rows, jitted: empty values and scales of the documented dtypes and shapes."""
    q, scale = jax.jit(lambda x: deepep.fp8.per_block_cast_to_fp8(x, use_ue8m0=use_ue8m0))(jnp.zeros((0, 1024), BF16))
    assert q.shape == (0, 1024) and q.dtype == jnp.float8_e4m3fn
    assert scale.shape == ((0, 2) if use_ue8m0 else (0, 8))
    assert scale.dtype == (jnp.int32 if use_ue8m0 else jnp.float32)


@pytest.mark.parametrize("num_ranks", [2, 8])
def test_no_tokens(num_ranks):
    """T = 0: every op returns its documented shapes, nothing received, zero counts."""
    mesh = make_mesh(num_ranks)
    normal, ll = make_buffer("reference", num_ranks), low_latency("reference", num_ranks)
    r = num_ranks
    got = run_per_rank(mesh, _all_ops_per_rank(normal, ll), np.zeros((r, 0, H), jnp.bfloat16),
                       np.zeros((r, 0, K), np.int32), np.zeros((r, 0, K), np.float32), np.ones((r, 1), np.float32))
    layout, out = got["layout"], got["out"]
    assert layout.is_token_in_rank.shape == (r, 0, r)
    assert not layout.num_tokens_per_rank.any() and not layout.num_tokens_per_expert.any()
    assert out.recv_x.shape == (r, 0, H) and out.recv_topk_idx.shape == out.recv_topk_weights.shape == (r, 0, K)
    assert out.num_recv_tokens_per_expert.shape == (r, E // r) and not out.num_recv_tokens_per_expert.any()
    assert not out.num_recv_tokens.any() and got["cached"].shape == (r, 0, H)
    combined_x, combined_w = got["combined"]
    assert combined_x.shape == (r, 0, H) and combined_w.shape == (r, 0, K)
    values, scales = got["fp8"].recv_x
    assert values.shape == (r, 5, H) and scales.shape == (r, 5, 1) and not got["fp8"].num_recv_tokens.any()
    assert got["fp8_combined"].shape == (r, 0, H)
    for recv_x, count, layout_range in got["low"]:
        assert jax.tree.map(lambda a: a.shape[:3], recv_x) in ((r, E // r, r * M), ((r, E // r, r * M),) * 2)
        assert not count.any() and not layout_range.any()
    assert got["ll_combined"].shape == (r, 0, H)


def test_low_latency_no_tokens_compiles_in_every_pattern():
    """T = 0 under XLA's default (Shardy) partitioner: low-latency results computed from the zero-size inputs
    failed to compile ("expected at least one operand ... GlobalToLocalShape"), depending on what the program
    returned; they are now constants, as in normal mode."""
    r = 4
    mesh, ll = make_mesh(r), low_latency("reference", r)
    args = np.zeros((r, 0, H), jnp.bfloat16), np.zeros((r, 0, K), np.int32), np.zeros((r, 0, K), np.float32)

    def dispatch(x, idx, **kwargs):
        return ll.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=M, num_experts=E, **kwargs)

    def layer(x, idx, w):  # y from recv_x, as an expert would make it
        d = dispatch(x, idx, use_fp8=False)
        return ll.low_latency_combine(d.recv_x * 2, idx, w, d.handle), d.recv_count

    def counts_and_x(x, idx, w):
        return dispatch(x, idx).recv_count, x

    def hooks(x, idx, w):
        d = ll.low_latency_recv(dispatch(x, idx, use_fp8=True, return_recv_hook=True))
        y = jnp.ones((E // r, r * M, H), BF16)
        return ll.low_latency_recv(ll.low_latency_combine(y, idx, w, d.handle, return_recv_hook=True)), d.recv_x

    (combined, count), (count2, x), (combined2, (values, scales)) = (
        run_per_rank(mesh, fn, *args) for fn in (layer, counts_and_x, hooks))
    assert combined.shape == combined2.shape == (r, 0, H) and x.shape == (r, 0, H)
    assert count.shape == count2.shape == (r, E // r) and not count.any() and not count2.any()
    assert values.shape == (r, E // r, r * M, H) and scales.shape == (r, E // r, r * M, H // 128)
    assert scales.dtype == np.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens_traces(backend):
    normal, ll = make_buffer(backend), low_latency(backend)
    trace(normal, _all_ops_per_rank(normal, ll), ((0, H), BF16), ((0, K), I32), ((0, K), F32), ((1,), F32))


# ---- timeout and exact internode combine ------------------------------------------------------------
def test_timeout_s(monkeypatch):
    mesh = make_mesh(R)
    monkeypatch.delenv("JAX_DEEPEP_TIMEOUT_S", raising=False)
    assert deepep.Buffer(mesh, "ep").timeout_s == 100.0
    monkeypatch.setenv("JAX_DEEPEP_TIMEOUT_S", "2.5")
    assert deepep.Buffer(mesh, "ep").timeout_s == 2.5
    assert deepep.Buffer(mesh, "ep", timeout_s=np.float32(7)).timeout_s == 7.0
    for bad in (0, -1.0, float("inf"), float("nan"), True, "5", 1e9):
        with pytest.raises(deepep.DeepEPError, match="timeout_s"):
            deepep.Buffer(mesh, "ep", timeout_s=bad)
    for bad in ("soon", "0"):
        monkeypatch.setenv("JAX_DEEPEP_TIMEOUT_S", bad)
        with pytest.raises(deepep.DeepEPError, match="JAX_DEEPEP_TIMEOUT_S"):
            deepep.Buffer(mesh, "ep")


def test_exact_internode_combine_is_kept():
    """A bool (numpy's too), kept and handed to the pure-JAX backend, whose combine honours it."""
    mesh = make_mesh(R)
    buffer = deepep.Buffer(mesh, "ep")
    assert buffer.exact_internode_combine is False and buffer.normal_backend.exact_internode_combine is False
    buffer = deepep.Buffer(mesh, "ep", exact_internode_combine=np.bool_(True))
    assert buffer.exact_internode_combine is True and buffer.normal_backend.exact_internode_combine is True
    for bad in (1, 0, "yes", None):
        with pytest.raises(deepep.DeepEPError, match=r"Buffer: `exact_internode_combine` must be True or False"):
            deepep.Buffer(mesh, "ep", exact_internode_combine=bad)


@pytest.mark.parametrize("flag", ["low_latency_mode", "allow_nvlink_for_low_latency_mode"])
def test_mode_flags_are_booleans(flag):
    """A string or a number is no mode flag (bool("no") would be True)."""
    for bad in ("no", 1, None):
        with pytest.raises(deepep.DeepEPError, match=rf"Buffer: `{flag}` must be True or False"):
            deepep.Buffer(make_mesh(R), "ep", num_rdma_bytes=1 << 20, **{flag: bad})


def test_internode_puts_only_is_kept():
    """A bool (numpy's too), False by default, refused otherwise."""
    mesh = make_mesh(R)
    assert deepep.Buffer(mesh, "ep").internode_puts_only is False
    assert deepep.Buffer(mesh, "ep", internode_puts_only=np.bool_(True)).internode_puts_only is True
    for bad in (1, "yes", None):
        with pytest.raises(deepep.DeepEPError, match=r"Buffer: `internode_puts_only` must be True or False"):
            deepep.Buffer(mesh, "ep", internode_puts_only=bad)


@pytest.mark.parametrize("low_latency_mode", [False, True])
def test_timeout_reaches_the_nvshmem_backends(monkeypatch, low_latency_mode):
    """gpu.make_backends hands the Buffer's timeout to the NVSHMEM backends it opens, and
    `exact_internode_combine` and `internode_puts_only` to the internode one (`exact_internode_combine` to
    the pure-JAX one that takes its place)."""
    from jax_deepep.gpu import internode, low_latency as gpu_low_latency, nvshmem

    opened, watched = {}, []
    monkeypatch.setattr(nvshmem, "available", lambda: True)
    monkeypatch.setattr(gpu.failure_watchdog, "watch", lambda b, backends: watched.append(b))  # stand-ins below
    for module, cls in ((internode, "InternodeBackend"), (gpu_low_latency, "LowLatencyBackend")):
        monkeypatch.setattr(getattr(module, cls), "open",
                            classmethod(lambda c, *args, **kwargs: opened.setdefault(c.__name__, kwargs)))
    buffer = types.SimpleNamespace(mesh=None, axis_name="ep", num_ranks=4, ranks_per_node=2, num_nvl_bytes=0,
                                   num_rdma_bytes=1 << 20, low_latency_mode=low_latency_mode,
                                   allow_nvlink_for_low_latency_mode=True, timeout_s=3.5, exact_internode_combine=True,
                                   internode_puts_only=True, num_qps_per_rank=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a low-latency Buffer's normal mode across nodes falls back to pure JAX
        normal, _ = gpu.make_backends(buffer, BufferKeys(buffer_id=1, processes=(0,)))
    assert opened["LowLatencyBackend" if low_latency_mode else "InternodeBackend"]["timeout_s"] == 3.5
    assert opened["LowLatencyBackend" if low_latency_mode else "InternodeBackend"]["num_qps_per_rank"] == 5
    assert watched == [buffer]  # and every GPU Buffer is watched for failures that XLA never reports
    if low_latency_mode:
        assert normal.exact_internode_combine is True
    else:
        assert opened["InternodeBackend"]["exact_combine"] is True
        assert opened["InternodeBackend"]["puts_only"] is True
