"""Bad input (docs/API.md): a `DeepEPError` at trace time whose message names the argument
and what was expected. Everything here only traces (`jax.eval_shape`): nothing runs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import jax_deepep as deepep
from harness import make_mesh

R, T, H, K, E, M = 2, 8, 128, 4, 8, 8
BF16, F32, I32, FP8 = jnp.bfloat16, jnp.float32, jnp.int32, jnp.float8_e4m3fn


def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


X, IDX, W = spec((T, H), BF16), spec((T, K), I32), spec((T, K), F32)


def trace(mesh, fn, *args):
    """Trace `fn` per rank inside jit(shard_map) over "ep" with per-rank abstract args."""
    global_args = jax.tree.map(lambda a: spec((mesh.size * a.shape[0], *a.shape[1:]), a.dtype), args)
    per_rank = lambda *a: jax.tree.map(lambda out: out[None], fn(*a))  # noqa: E731
    mapped = jax.shard_map(per_rank, mesh=mesh, in_specs=PartitionSpec("ep"), out_specs=PartitionSpec("ep"))
    return jax.eval_shape(jax.jit(mapped), *global_args)


def normal_buffer(mesh, **kwargs):
    return deepep.Buffer(mesh, "ep", **kwargs)


def low_latency_buffer(mesh, num_rdma_bytes=None):
    if num_rdma_bytes is None:
        num_rdma_bytes = deepep.Buffer.get_low_latency_rdma_size_hint(M, 4 * H, R, E)
    return deepep.Buffer(mesh, "ep", low_latency_mode=True, num_rdma_bytes=num_rdma_bytes)


def _handle(b, x, idx):
    return b.dispatch(x, topk_idx=idx, num_experts=E).handle


def _ll(b, x, idx, **kwargs):
    return b.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=M, num_experts=E, use_fp8=False,
                                  **kwargs)


# (make buffer, per-rank call, abstract per-rank args, substrings the message must contain)
NORMAL_CASES = {
    "x_dtype": (lambda b, x, i: b.dispatch(x, topk_idx=i, num_experts=E), [spec((T, H), F32), IDX],
                ["`x`", "bfloat16"]),
    "x_ndim": (lambda b, x, i: b.dispatch(x, topk_idx=i, num_experts=E), [spec((T, H, 1), BF16), IDX],
               ["`x`", "2-D"]),
    "fp8_hidden": (lambda b, q, s, i: b.dispatch((q, s), topk_idx=i, num_experts=E),
                   [spec((T, 100), FP8), spec((T, 1), F32), IDX], ["x[0]", "128"]),
    "fp8_scales_shape": (lambda b, q, s, i: b.dispatch((q, s), topk_idx=i, num_experts=E),
                         [spec((T, 256), FP8), spec((T, 1), F32), IDX], ["x[1]", f"[{T}, 2]"]),
    "fp8_scales_dtype": (lambda b, q, s, i: b.dispatch((q, s), topk_idx=i, num_experts=E),
                         [spec((T, H), FP8), spec((T, 1), BF16), IDX], ["x[1]", "float32"]),
    "fp8_triple": (lambda b, q, s, i: b.dispatch((q, s, s), topk_idx=i, num_experts=E),
                   [spec((T, H), FP8), spec((T, 1), F32), IDX], ["`x`", "pair"]),
    "topk_idx_dtype": (lambda b, x, i: b.dispatch(x, topk_idx=i, num_experts=E), [X, spec((T, K), F32)],
                       ["topk_idx", "int32"]),
    "topk_idx_tokens": (lambda b, x, i: b.dispatch(x, topk_idx=i, num_experts=E), [X, spec((T + 1, K), I32)],
                        ["topk_idx", f"[{T}, *]"]),
    "topk_weights_shape": (lambda b, x, i, w: b.dispatch(x, topk_idx=i, topk_weights=w, num_experts=E),
                           [X, IDX, spec((T, K + 1), F32)], ["topk_weights", f"[{T}, {K}]"]),
    "topk_weights_dtype": (lambda b, x, i, w: b.dispatch(x, topk_idx=i, topk_weights=w, num_experts=E),
                           [X, IDX, spec((T, K), BF16)], ["topk_weights", "float32"]),
    "num_experts_indivisible": (lambda b, x, i: b.dispatch(x, topk_idx=i, num_experts=E + 1), [X, IDX],
                                ["num_experts", str(E + 1), "divisible"]),
    "num_experts_missing": (lambda b, x, i: b.dispatch(x, topk_idx=i), [X, IDX], ["num_experts", "layout"]),
    "routing_missing": (lambda b, x: b.dispatch(x, num_experts=E), [X], ["topk_idx", "handle"]),
    "layout_tokens": (lambda b, x, i, j: b.dispatch(x, topk_idx=i, layout=b.get_dispatch_layout(j, E)),
                      [X, IDX, spec((T + 2, K), I32)], ["layout", f"[{T}, {R}]"]),
    "layout_num_experts": (lambda b, x, i: b.dispatch(x, topk_idx=i, num_experts=2 * E,
                                                      layout=b.get_dispatch_layout(i, E)),
                           [X, IDX], ["num_experts", "layout"]),
    "num_worst_tokens": (lambda b, x, i: b.dispatch(x, topk_idx=i, num_experts=E, num_worst_tokens=-1), [X, IDX],
                         ["num_worst_tokens", ">= 0", "-1"]),
    "expert_alignment": (lambda b, x, i: b.dispatch(x, topk_idx=i, num_experts=E, expert_alignment=0), [X, IDX],
                         ["expert_alignment", "[1, 65536]"]),
    "cached_with_routing": (lambda b, x, i: b.dispatch(x, handle=_handle(b, x, i), topk_idx=i), [X, IDX],
                            ["topk_idx", "handle"]),
    "cached_tokens": (lambda b, x, i, x2: b.dispatch(x2, handle=_handle(b, x, i)), [X, IDX, spec((T + 1, H), BF16)],
                      ["`x`", f"[{T}, *]"]),
    "handle_type": (lambda b, x: b.dispatch(x, handle={"send_row": x}), [X], ["handle", "DispatchHandle"]),
    "config_type": (lambda b, x, i: b.dispatch(x, topk_idx=i, num_experts=E, config={"num_sms": 20}), [X, IDX],
                    ["config", "Config"]),
    "layout_topk_idx_ndim": (lambda b, i: b.get_dispatch_layout(i, E), [spec((T,), I32)], ["topk_idx", "2-D"]),
    "layout_num_experts_zero": (lambda b, i: b.get_dispatch_layout(i, 0), [IDX], ["num_experts", ">= 1"]),
    "layout_num_experts_indivisible": (lambda b, i: b.get_dispatch_layout(i, 3), [IDX], ["num_experts", "divisible"]),
    "combine_y_rows": (lambda b, x, i: b.combine(x, _handle(b, x, i)), [X, IDX], ["`y`", f"[{R * T}, *]"]),
    "combine_y_dtype": (lambda b, x, i, y: b.combine(y, _handle(b, x, i)), [X, IDX, spec((R * T, H), F32)],
                        ["`y`", "bfloat16"]),
    "combine_topk_weights": (lambda b, x, i, y, w: b.combine(y, _handle(b, x, i), topk_weights=w),
                             [X, IDX, spec((R * T, H), BF16), W], ["topk_weights", f"[{R * T}, *]"]),
    "combine_bias_shape": (lambda b, x, i, y: b.combine(y, _handle(b, x, i), bias=y),
                           [X, IDX, spec((R * T, H), BF16)], ["bias[0]", f"[{T}, {H}]"]),
    "combine_three_biases": (lambda b, x, i, y: b.combine(y, _handle(b, x, i), bias=(x, x, x)),
                             [X, IDX, spec((R * T, H), BF16)], ["bias", "two"]),
    "combine_handle": (lambda b, y: b.combine(y, None), [spec((R * T, H), BF16)], ["handle", "DispatchHandle"]),
    "combine_handle_field_none": (lambda b, x, i: b.combine(x, dataclasses.replace(_handle(b, x, i),
                                                                                   recv_src_idx=None)),
                                  [X, IDX], ["handle", "DispatchHandle"]),
    "cached_handle_field_list": (lambda b, x, i: b.dispatch(x, handle=dataclasses.replace(_handle(b, x, i),
                                                                                          is_token_in_rank=[1, 2])),
                                 [X, IDX], ["handle", "DispatchHandle"]),
    "low_latency_on_normal_buffer": (lambda b, x, i: _ll(b, x, i), [X, IDX], ["low_latency_mode=True"]),
}

LOW_LATENCY_CASES = {
    "tokens_over_max": (lambda b, x, i: _ll(b, x, i), [spec((M + 1, H), BF16), spec((M + 1, K), I32)],
                        ["num_max_dispatch_tokens_per_rank", str(M)]),
    "fp8_hidden": (lambda b, x, i: b.low_latency_dispatch(x, i, num_max_dispatch_tokens_per_rank=M, num_experts=E),
                   [spec((T, 200), BF16), IDX], ["`x`", "128"]),
    "ue8m0_hidden": (lambda b, x, i: b.low_latency_dispatch(x, i, num_max_dispatch_tokens_per_rank=M, num_experts=E,
                                                            round_scale=True, use_ue8m0=True),
                     [spec((T, 256), BF16), IDX], ["`x`", "512"]),
    "num_experts_indivisible": (lambda b, x, i: b.low_latency_dispatch(x, i, num_max_dispatch_tokens_per_rank=M,
                                                                       num_experts=E - 1), [X, IDX],
                                ["num_experts", "divisible"]),
    "max_tokens_type": (lambda b, x, i: b.low_latency_dispatch(x, i, num_max_dispatch_tokens_per_rank=0,
                                                               num_experts=E), [X, IDX],
                        ["num_max_dispatch_tokens_per_rank", "[1, 8192]"]),
    "x_dtype": (lambda b, x, i: _ll(b, x, i), [spec((T, H), F32), IDX], ["`x`", "bfloat16"]),
    "topk_idx_tokens": (lambda b, x, i: _ll(b, x, i), [X, spec((T - 1, K), I32)], ["topk_idx", f"[{T}, *]"]),
    "combine_y_ndim": (lambda b, x, i, w: b.low_latency_combine(x, i, w, _ll(b, x, i).handle), [X, IDX, W],
                       ["`y`", "3-D"]),
    "combine_y_shape": (lambda b, x, i, w: b.low_latency_combine(x[None], i, w, _ll(b, x, i).handle), [X, IDX, W],
                        ["`y`", f"[{E // R}, {R * M}, *]"]),
    "combine_weights": (lambda b, x, i, y: b.low_latency_combine(y, i, i, _ll(b, x, i).handle),
                        [X, IDX, spec((E // R, R * M, H), BF16)], ["topk_weights", "float32"]),
    "combine_handle": (lambda b, i, w, y: b.low_latency_combine(y, i, w, None),
                       [IDX, W, spec((E // R, R * M, H), BF16)], ["handle", "LowLatencyHandle"]),
    "use_fp8_not_bool": (lambda b, x, i: b.low_latency_dispatch(x, i, num_max_dispatch_tokens_per_rank=M,
                                                                num_experts=E, use_fp8=1),
                         [X, IDX], ["use_fp8", "True or False"]),
    "zero_copy_not_bool": (lambda b, x, i, w: b.low_latency_combine(_ll(b, x, i).recv_x, i, w, _ll(b, x, i).handle,
                                                                    zero_copy="yes"),
                           [X, IDX, W], ["zero_copy", "True or False"]),
    "recv_not_pending": (lambda b, x, i: b.low_latency_recv(_ll(b, x, i)), [X, IDX],
                         ["low_latency_recv", "return_recv_hook=True"]),
}


def _check(exc_info, substrings):
    message = str(exc_info.value)
    for s in substrings:
        assert s in message, f"{s!r} not in the error message {message!r}"


_MODES = {"normal": (NORMAL_CASES, normal_buffer), "low_latency": (LOW_LATENCY_CASES, low_latency_buffer)}


@pytest.mark.parametrize("mode,case", [(mode, case) for mode, (cases, _) in _MODES.items() for case in sorted(cases)])
def test_bad_input(mode, case):
    cases, make_buffer = _MODES[mode]
    fn, args, substrings = cases[case]
    mesh = make_mesh(R)
    buffer = make_buffer(mesh)
    with pytest.raises(deepep.DeepEPError) as exc_info:
        trace(mesh, lambda *a: fn(buffer, *a), *args)
    _check(exc_info, substrings)


def test_good_input_traces():
    """The fixtures above are right apart from the one thing each case breaks."""
    mesh = make_mesh(R)
    normal, low_latency = normal_buffer(mesh), low_latency_buffer(mesh)

    def per_rank(x, i, w):
        out = normal.dispatch(x, topk_idx=i, topk_weights=w, num_experts=E)
        combined = normal.combine(out.recv_x, out.handle, topk_weights=out.recv_topk_weights, bias=(x, x))
        ll = _ll(low_latency, x, i)
        return combined, low_latency.low_latency_combine(ll.recv_x, i, w, ll.handle)

    trace(mesh, per_rank, X, IDX, W)


def test_normal_buffer_too_small():
    mesh = make_mesh(R)
    buffer = normal_buffer(mesh, num_nvl_bytes=1 << 10)
    with pytest.raises(deepep.DeepEPError) as exc_info:
        trace(mesh, lambda x, i: buffer.dispatch(x, topk_idx=i, num_experts=E), X, IDX)
    need = deepep.Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(2 * H, R)
    _check(exc_info, ["num_nvl_bytes", str(1 << 10), str(need)])


@pytest.mark.parametrize("num_rdma_bytes", [0, 1 << 10])
def test_low_latency_buffer_too_small(num_rdma_bytes):
    mesh = make_mesh(R)
    buffer = low_latency_buffer(mesh, num_rdma_bytes)
    with pytest.raises(deepep.DeepEPError) as exc_info:
        trace(mesh, lambda x, i: _ll(buffer, x, i), X, IDX)
    _check(exc_info, ["num_rdma_bytes"])


@pytest.mark.parametrize("op", ["get_dispatch_layout", "dispatch", "low_latency_dispatch"])
def test_outside_shard_map(op):
    mesh = make_mesh(R)
    buffer = low_latency_buffer(mesh)
    calls = {
        "get_dispatch_layout": lambda x, i: buffer.get_dispatch_layout(i, E),
        "dispatch": lambda x, i: buffer.dispatch(x, topk_idx=i, num_experts=E),
        "low_latency_dispatch": lambda x, i: _ll(buffer, x, i),
    }
    with pytest.raises(deepep.DeepEPError) as exc_info:
        jax.eval_shape(jax.jit(calls[op]), X, IDX)
    _check(exc_info, [op, "shard_map", "'ep'"])


def test_axis_size_differs_from_buffer():
    buffer = normal_buffer(make_mesh(2))
    with pytest.raises(deepep.DeepEPError) as exc_info:
        trace(make_mesh(4), lambda i: buffer.get_dispatch_layout(i, E), IDX)
    _check(exc_info, ["'ep'", "4", "2 ranks"])


def test_destroyed_buffer():
    mesh = make_mesh(R)
    buffer = normal_buffer(mesh)
    buffer.destroy()
    with pytest.raises(deepep.DeepEPError) as exc_info:
        trace(mesh, lambda i: buffer.get_dispatch_layout(i, E), IDX)
    _check(exc_info, ["destroyed"])


def test_next_combine_buffer_points_to_zero_copy():
    """DeepEP's get_next_low_latency_combine_buffer has no JAX form: the error says what replaces it."""
    buffer = low_latency_buffer(make_mesh(R))
    with pytest.raises(deepep.DeepEPError) as exc_info:
        buffer.get_next_low_latency_combine_buffer(None)
    _check(exc_info, ["get_next_low_latency_combine_buffer", "zero_copy=True"])


def test_bad_ids_in_data_are_no_trace_error():
    """Out-of-range ids are data, not a trace-time error (they behave like -1; see test_checked)."""
    mesh = make_mesh(R)
    buffer = normal_buffer(mesh)
    idx = np.full((R * T, K), E + 5, np.int32)
    out = jax.jit(jax.shard_map(lambda i: buffer.get_dispatch_layout(i, E).num_tokens_per_expert[None],
                                mesh=mesh, in_specs=PartitionSpec("ep"), out_specs=PartitionSpec("ep")))(
        jax.device_put(idx, jax.sharding.NamedSharding(mesh, PartitionSpec("ep"))))
    assert not np.asarray(out).any()
