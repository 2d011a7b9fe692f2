"""Normal-mode ops (docs/API.md): validation, autodiff rules, then the backend.

The rules: the cotangent of dispatch is a combine over the same handle; the cotangent of
combine is a cached dispatch. They hold for any backend, so pure JAX and CUDA share them.

An expert-grouped dispatch (`expert_grouped=True`) runs on the backend's `expert_grouped` ops, whose
`combine` is unweighted (the transpose of their dispatch) unless given `row_weights`: the public
combine of a grouped handle passes the handle's pair weights as an argument of its own custom_vjp,
so their gradient flows back through the handle to the dispatch's `topk_weights`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import checking
from .backend import RankContext
from .config import Config
from .limits import MAX_EXPERT_ALIGNMENT, ROW_CHANNELS
from .no_tokens import serving
from .trace_names import named, scoped
from .types import DispatchHandle, DispatchLayout, DispatchOutput, ExpertGroupedHandle
from .validation import (boolean, expect_array, expect_top_k, expert_count, fail, int32_count, integer, row_hidden,
                         token_parts, topk_ids)

_CAPACITY = "num_worst_tokens (the receive capacity N)"  # how errors name it


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable, trace-time arguments of one op (the custom_vjp's non-differentiable part)."""

    backend: Any
    ctx: RankContext
    config: Config
    num_experts: int = 0
    num_worst_tokens: int = 0
    expert_alignment: int = 1


def _output(result, is_fp8: bool) -> DispatchOutput:
    """The op's output, with its checkpoint names (the counts are the named handle's, so a policy that
    saves the handle saves them too)."""
    recv_x = tuple(result.recv_parts) if is_fp8 else result.recv_parts[0]
    handle = named("dispatch", "handle", result.handle)
    return DispatchOutput(named("dispatch", "recv_x", recv_x),
                          named("dispatch", "recv_topk_idx", result.recv_topk_idx),
                          named("dispatch", "recv_topk_weights", result.recv_topk_weights),
                          handle.num_recv_tokens_per_expert, handle.num_recv_tokens, handle)


def _live_rows(handle: DispatchHandle, a):
    """Zero the rows of a receive-side array past the true number of received tokens."""
    live = jnp.arange(handle.capacity) < handle.num_recv_tokens
    return jnp.where(live.reshape(-1, *([1] * (a.ndim - 1))), a, jnp.zeros((), a.dtype))


# The rules' forward passes call the ops' bodies (`_dispatch_body`, ...) directly rather than through
# the custom_vjp, so their checkpoint names, on the outputs and residuals alike, stay visible to a
# `jax.checkpoint` policy (inside a custom_vjp call a policy sees only the call).

def _dispatch_body(static: _Static, parts, topk_weights, topk_idx, layout):
    result = static.backend.dispatch(static.ctx, static.config, parts, topk_idx, topk_weights, layout,
                                     static.num_experts, static.num_worst_tokens, static.expert_alignment)
    return _output(result, len(parts) == 2)


_dispatch = jax.custom_vjp(_dispatch_body, nondiff_argnums=(0,))


def _dispatch_fwd(static, parts, topk_weights, topk_idx, layout):
    out = _dispatch_body(static, parts, topk_weights, topk_idx, layout)
    return out, (out.handle, out.recv_topk_idx)


def _dispatch_bwd(static, residuals, g: DispatchOutput):
    handle, recv_topk_idx = residuals
    fp8 = isinstance(g.recv_x, tuple)
    g_w = g.recv_topk_weights
    if g_w is not None and isinstance(handle, ExpertGroupedHandle):
        g_w = g_w + g.handle.weight  # what a combine of the handle sends back to the pair weights
    if g_w is None and fp8:
        return None, None, None, None
    if g_w is not None:
        g_w = jnp.where(recv_topk_idx >= 0, g_w, 0.0)
    # FP8 tokens carry no gradient, but their weights do: a combine of zero rows, as narrow as the kernels
    # take (one 16-byte piece), brings those back.
    g_rows = jnp.zeros((g.recv_x[0].shape[0], ROW_CHANNELS), jnp.bfloat16) if fp8 else g.recv_x
    g_x, g_topk_weights = static.backend.combine(static.ctx, static.config, handle, g_rows, g_w, ())
    return None if fp8 else (g_x,), g_topk_weights, None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def _cached_dispatch_body(static: _Static, parts, handle):
    recv_parts, _ = static.backend.cached_dispatch(static.ctx, static.config, handle, parts)
    return named("dispatch", "recv_x", recv_parts)


_cached_dispatch = jax.custom_vjp(_cached_dispatch_body, nondiff_argnums=(0,))


def _cached_dispatch_fwd(static, parts, handle):
    return _cached_dispatch_body(static, parts, handle), handle


def _cached_dispatch_bwd(static, handle, g_parts):
    if len(g_parts) == 2:
        return None, None
    g_x, _ = static.backend.combine(static.ctx, static.config, handle, g_parts[0], None, ())
    return (g_x,), None


_cached_dispatch.defvjp(_cached_dispatch_fwd, _cached_dispatch_bwd)


def _combine_body(static: _Static, y, topk_weights, bias, handle):
    combined_x, combined_topk_weights = static.backend.combine(static.ctx, static.config, handle, y, topk_weights,
                                                               bias)
    return named("combine", "combined_x", combined_x), named("combine", "combined_topk_weights", combined_topk_weights)


_combine = jax.custom_vjp(_combine_body, nondiff_argnums=(0,))


def _combine_fwd(static, y, topk_weights, bias, handle):
    # Empty stand-ins remember how many bias terms there were (and their dtypes).
    bias_marks = tuple(jnp.zeros((0,), b.dtype) for b in bias)
    return _combine_body(static, y, topk_weights, bias, handle), (handle, bias_marks)


def _combine_bwd(static, residuals, g):
    handle, bias_marks = residuals
    g_x, g_w = g
    g_y, g_topk_weights = static.backend.cached_dispatch(static.ctx, static.config, handle, (g_x,), g_w)
    g_y = _live_rows(handle, g_y[0])
    if g_topk_weights is not None:
        g_topk_weights = _live_rows(handle, g_topk_weights)
    g_bias = tuple(g_x.astype(m.dtype) for m in bias_marks)
    return g_y, g_topk_weights, g_bias, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def _grouped_combine_body(static: _Static, y, row_weights, topk_weights, bias, handle):
    combined_x, combined_topk_weights = static.backend.combine(static.ctx, static.config, handle, y, topk_weights,
                                                               bias, row_weights)
    return named("combine", "combined_x", combined_x), named("combine", "combined_topk_weights", combined_topk_weights)


_grouped_combine = jax.custom_vjp(_grouped_combine_body, nondiff_argnums=(0,))


def _grouped_combine_fwd(static, y, row_weights, topk_weights, bias, handle):
    bias_marks = tuple(jnp.zeros((0,), b.dtype) for b in bias)
    out = _grouped_combine_body(static, y, row_weights, topk_weights, bias, handle)
    return out, (handle, y, row_weights, bias_marks)


def _grouped_combine_bwd(static, residuals, g):
    handle, y, row_weights, bias_marks = residuals
    g_x, g_w = g
    (g_rows,), g_topk_weights = static.backend.cached_dispatch(static.ctx, static.config, handle, (g_x,), g_w)
    live = (handle.token_row >= 0)[:, None]
    g_rows = jnp.where(live, g_rows.astype(jnp.float32), 0.0)  # each pair's row gets its token's cotangent
    g_y = (g_rows * row_weights[:, None]).astype(y.dtype)
    g_row_weights = jnp.sum(g_rows * jnp.where(live, y.astype(jnp.float32), 0.0), axis=1)
    g_bias = tuple(g_x.astype(m.dtype) for m in bias_marks)
    return g_y, g_row_weights, g_topk_weights, g_bias, None


_grouped_combine.defvjp(_grouped_combine_fwd, _grouped_combine_bwd)


def _check_topk(op: str, topk_idx, topk_weights, num_tokens: int):
    topk_ids(op, topk_idx, num_tokens)
    if topk_weights is not None:
        expect_array(op, "topk_weights", topk_weights, ndim=2, dtypes=(jnp.float32,), shape=topk_idx.shape)


def _check_nvl_bytes(op: str, config: Config, ctx: RankContext, num_nvl_bytes: int, hidden: int):
    """A Buffer's `num_nvl_bytes` (0: the backend sizes it) must hold `config`'s rings for rows of `hidden`."""
    if num_nvl_bytes:
        need = config.get_nvl_buffer_size_hint(hidden * 2, ctx.num_ranks)
        if num_nvl_bytes < need:
            fail(op, f"the Buffer is too small: num_nvl_bytes={num_nvl_bytes} but this config and "
                     f"hidden size {hidden} need {need} (Config.get_nvl_buffer_size_hint)")


# Every array of a DispatchHandle: (field, dtype, shape in terms of R (axis size), T (tokens), N (capacity)).
_HANDLE_ARRAYS = (("is_token_in_rank", jnp.bool_, ("T", "R")), ("send_row", jnp.int32, ("T", "R")),
                  ("recv_src_rank", jnp.int32, ("N",)), ("recv_src_idx", jnp.int32, ("N",)),
                  ("recv_rank_prefix", jnp.int32, ("R",)), ("num_recv_tokens", jnp.int32, ()),
                  ("num_recv_tokens_per_expert", jnp.int32, ("E_l",)))


# The arrays an ExpertGroupedHandle adds to its token-level handle (RT = R * T rows, K its top-k).
_GROUPED_HANDLE_ARRAYS = (("token_row", jnp.int32, ("N",)), ("pair_row", jnp.int32, ("RT", "K")),
                          ("weight", jnp.float32, ("N",)), ("num_recv_tokens", jnp.int32, ()),
                          ("num_recv_tokens_per_expert", jnp.int32, ("E_l",)))


def _leading(a) -> int:
    """The leading dimension of a handle field, -1 for a scalar or a non-array (which `_check_arrays` refuses)."""
    shape = getattr(a, "shape", ())
    return shape[0] if len(shape) else -1


def _check_arrays(op: str, name: str, handle, specs, sizes: dict, ctx: RankContext):
    """Each (field, dtype, dims) of `specs` names an array of `handle` with that dtype and shape."""
    arrays = {field: getattr(handle, field) for field, _, _ in specs}
    if not all(hasattr(a, "shape") and hasattr(a, "dtype") for a in arrays.values()):
        fail(op, f"`{name}` must hold the arrays of a {type(handle).__name__} from dispatch")
    for field, dtype, dims in specs:
        want = tuple(sizes[d] for d in dims)
        a = arrays[field]
        if tuple(a.shape) != want or a.dtype != dtype:
            fail(op, f"`handle` does not fit this call: `{name}.{field}` must be {np.dtype(dtype).name}"
                     f"{list(want)} ({', '.join(f'{d}={sizes[d]}' for d in dims) or 'a scalar'}; R is the size "
                     f"of axis {ctx.axis_name!r}), got {np.dtype(a.dtype).name}{list(a.shape)}: was it made "
                     "under another axis size?")


def _check_token_handle(op: str, name: str, handle, ctx: RankContext):
    if not isinstance(handle, DispatchHandle):
        fail(op, f"`{name}` must be the DispatchHandle of an earlier dispatch, got {type(handle).__name__}")
    sizes = {"R": ctx.num_ranks, "T": _leading(handle.is_token_in_rank), "N": _leading(handle.recv_src_idx),
             "E_l": _leading(handle.num_recv_tokens_per_expert)}
    _check_arrays(op, name, handle, _HANDLE_ARRAYS, sizes, ctx)


def _check_handle(op: str, handle, ctx: RankContext):
    """`handle` must be a DispatchHandle (or ExpertGroupedHandle) made over an axis of this size: a handle
    made for another axis size would make the kernels read out of bounds. Its T and N are those of its own
    arrays."""
    if not isinstance(handle, ExpertGroupedHandle):
        _check_token_handle(op, "handle", handle, ctx)
        return
    _check_token_handle(op, "handle.tokens", handle.tokens, ctx)
    tokens = handle.tokens
    sizes = {"N": _leading(handle.token_row), "RT": ctx.num_ranks * tokens.is_token_in_rank.shape[0],
             "K": handle.pair_row.shape[-1] if hasattr(handle.pair_row, "shape") else -1,
             "E_l": _leading(tokens.num_recv_tokens_per_expert)}
    if tokens.capacity != sizes["RT"]:
        fail(op, f"`handle.tokens` must have room for every token (R * T = {sizes['RT']} rows), got "
                 f"{tokens.capacity}")
    _check_arrays(op, "handle", handle, _GROUPED_HANDLE_ARRAYS, sizes, ctx)


def _grouped_ops(op: str, backend):
    """The backend's expert-grouped ops; a backend without them refuses."""
    ops = getattr(backend, "expert_grouped", None)
    if ops is None:
        fail(op, f"expert_grouped=True is not yet implemented on the {backend.name.upper()} {backend.mode} "
                 "backend")
    return ops


def _check_grouped_experts(op: str, backend, ops, num_experts: int):
    """Expert-grouped kernels keep a row base per expert in shared memory: `ops.max_num_experts` of them."""
    limit = getattr(ops, "max_num_experts", None)
    if limit is not None and num_experts > limit:
        fail(op, f"expert_grouped=True serves at most {limit} experts on the {backend.name.upper()} {backend.mode} "
                 f"backend, got num_experts={num_experts}")


@scoped("get_dispatch_layout")
def get_dispatch_layout(backend, ctx: RankContext, topk_idx, num_experts: int) -> DispatchLayout:
    op = "get_dispatch_layout"
    topk_ids(op, topk_idx)
    num_experts = expert_count(op, num_experts, ctx.num_ranks)
    checking.check_expert_ids(topk_idx, num_experts)
    return serving(backend, topk_idx.shape[0]).get_dispatch_layout(ctx, topk_idx, num_experts)


@scoped("dispatch")
def dispatch(backend, ctx: RankContext, config: Config, x, *, topk_idx=None, topk_weights=None,
             num_experts: Optional[int] = None, layout: Optional[DispatchLayout] = None,
             handle: Optional[DispatchHandle] = None, num_worst_tokens: Optional[int] = None,
             expert_alignment: int = 1, expert_grouped: bool = False, num_nvl_bytes: int = 0) -> DispatchOutput:
    """`num_nvl_bytes`: the Buffer's, checked against what `config` needs (0: not checked)."""
    op = "dispatch"
    expert_grouped = boolean(op, "expert_grouped", expert_grouped)
    if handle is not None:
        if expert_grouped and not isinstance(handle, ExpertGroupedHandle):
            fail(op, "expert_grouped=True with a `handle` needs the ExpertGroupedHandle of an expert-grouped "
                     f"dispatch, got a {type(handle).__name__}")
        return _cached(backend, ctx, config, x, topk_idx, topk_weights, num_experts, layout, handle, num_nvl_bytes,
                       num_worst_tokens, expert_alignment)
    parts = token_parts(op, "x", x)
    num_tokens = parts[0].shape[0]
    backend = serving(backend, num_tokens)
    ops = _grouped_ops(op, backend) if expert_grouped else backend
    _check_nvl_bytes(op, config, ctx, num_nvl_bytes, parts[0].shape[1])
    if topk_idx is None and layout is None:
        fail(op, "routing is missing: pass `topk_idx` with `layout` or `num_experts`, or a `handle`")
    if expert_grouped and topk_idx is None:
        fail(op, "expert_grouped=True needs `topk_idx` (the rows are (token, expert) pairs)")
    if topk_idx is not None:
        _check_topk(op, topk_idx, topk_weights, num_tokens)
    elif topk_weights is not None:
        fail(op, "`topk_weights` needs `topk_idx`")
    if layout is None:
        if num_experts is None:
            fail(op, "pass `layout` (from get_dispatch_layout) or `num_experts`")
        num_experts = expert_count(op, num_experts, ctx.num_ranks)
        checking.check_expert_ids(topk_idx, num_experts)
        layout = backend.get_dispatch_layout(ctx, topk_idx, num_experts)
    else:
        _check_layout(op, layout, ctx, num_tokens)
        layout_experts = layout.num_tokens_per_expert.shape[0]
        if num_experts is not None and int32_count(op, "num_experts", num_experts, minimum=1) != layout_experts:
            fail(op, f"`num_experts` ({num_experts}) disagrees with `layout` ({layout_experts} experts)")
        num_experts = expert_count(op, layout_experts, ctx.num_ranks)
        if topk_idx is not None:
            checking.check_expert_ids(topk_idx, num_experts)
    if expert_grouped:
        _check_grouped_experts(op, backend, ops, num_experts)
    expert_alignment = integer(op, "expert_alignment", expert_alignment, minimum=1, maximum=MAX_EXPERT_ALIGNMENT)
    if num_worst_tokens is None:
        num_worst_tokens = ctx.num_ranks * num_tokens
        if expert_grouped:
            num_worst_tokens = _grouped_capacity(ctx.num_ranks, num_tokens, topk_idx.shape[1],
                                                num_experts // ctx.num_ranks, expert_alignment)
    num_worst_tokens = int32_count(op, _CAPACITY, num_worst_tokens, minimum=0)
    static = _Static(ops, ctx, config, num_experts, num_worst_tokens, expert_alignment)
    return _dispatch(static, parts, topk_weights, topk_idx, layout)


def _grouped_capacity(num_ranks: int, num_tokens: int, top_k: int, num_local_experts: int,
                     expert_alignment: int) -> int:
    """The default N of an expert-grouped dispatch, room for every pair: a token makes at most
    min(K, E_l) pairs on one rank, and each expert's group at most `expert_alignment - 1` padding rows."""
    padding = num_local_experts * (expert_alignment - 1)
    return num_ranks * num_tokens * min(top_k, num_local_experts) + padding


def _check_layout(op: str, layout, ctx: RankContext, num_tokens: int):
    if not isinstance(layout, DispatchLayout):
        fail(op, f"`layout` must be a DispatchLayout from get_dispatch_layout, got {type(layout).__name__}")
    expect_array(op, "layout.is_token_in_rank", layout.is_token_in_rank, ndim=2, dtypes=(jnp.bool_,),
                 shape=(num_tokens, ctx.num_ranks))
    expect_array(op, "layout.num_tokens_per_rank", layout.num_tokens_per_rank, ndim=1, dtypes=(jnp.int32,),
                 shape=(ctx.num_ranks,))
    expect_array(op, "layout.num_tokens_per_expert", layout.num_tokens_per_expert, ndim=1,
                 dtypes=(jnp.int32,))


def _cached(backend, ctx, config, x, topk_idx, topk_weights, num_experts, layout, handle, num_nvl_bytes,
            num_worst_tokens, expert_alignment) -> DispatchOutput:
    op = "dispatch"
    extra = [n for n, v in (("topk_idx", topk_idx), ("topk_weights", topk_weights),
                            ("num_experts", num_experts), ("layout", layout)) if v is not None]
    if extra:
        fail(op, f"cached mode (`handle` given) takes no routing; got {', '.join('`%s`' % e for e in extra)}")
    _check_handle(op, handle, ctx)
    # The first dispatch's capacity and alignment hold; given again, they are checked like theirs.
    integer(op, "expert_alignment", expert_alignment, minimum=1, maximum=MAX_EXPERT_ALIGNMENT)
    if num_worst_tokens is not None and integer(op, _CAPACITY, num_worst_tokens, minimum=0) != handle.capacity:
        fail(op, f"`num_worst_tokens` ({num_worst_tokens}) disagrees with `handle`, made with a capacity of "
                 f"{handle.capacity} rows (cached mode receives into the first dispatch's capacity)")
    num_tokens = handle.is_token_in_rank.shape[0]
    parts = token_parts(op, "x", x)
    if parts[0].shape[0] != num_tokens:
        fail(op, f"`x` has {parts[0].shape[0]} tokens but `handle` was made for {num_tokens}: `x` must have "
                 f"shape [{num_tokens}, *]")
    _check_nvl_bytes(op, config, ctx, num_nvl_bytes, parts[0].shape[1])
    backend = serving(backend, num_tokens)
    ops = _grouped_ops(op, backend) if isinstance(handle, ExpertGroupedHandle) else backend
    recv_parts = _cached_dispatch(_Static(ops, ctx, config), parts, handle)
    recv_x = tuple(recv_parts) if len(parts) == 2 else recv_parts[0]
    return DispatchOutput(recv_x, None, None, handle.num_recv_tokens_per_expert, handle.num_recv_tokens, handle)


@scoped("combine")
def combine(backend, ctx: RankContext, config: Config, y, handle: DispatchHandle, *, topk_weights=None,
            bias=None, num_nvl_bytes: int = 0):
    """`num_nvl_bytes`: the Buffer's, checked against what `config` needs (0: not checked)."""
    op = "combine"
    _check_handle(op, handle, ctx)
    num_tokens = handle.is_token_in_rank.shape[0]
    expect_array(op, "y", y, ndim=2, dtypes=(jnp.bfloat16,), shape=(handle.capacity, None))
    row_hidden(op, "y", y.shape[1])
    _check_nvl_bytes(op, config, ctx, num_nvl_bytes, y.shape[1])
    grouped = isinstance(handle, ExpertGroupedHandle)
    if topk_weights is not None and grouped:
        expect_array(op, "topk_weights", topk_weights, ndim=1, dtypes=(jnp.float32,), shape=(handle.capacity,))
    elif topk_weights is not None:
        expect_array(op, "topk_weights", topk_weights, ndim=2, dtypes=(jnp.float32,),
                     shape=(handle.capacity, None))
        expect_top_k(op, "topk_weights", topk_weights)
    if bias is None:
        bias = ()
    elif not isinstance(bias, (tuple, list)):
        bias = (bias,)
    if len(bias) > 2:
        fail(op, f"`bias` must be None, one or two bf16 [T, H] arrays, got {len(bias)}")
    for i, b in enumerate(bias):
        expect_array(op, f"bias[{i}]", b, ndim=2, dtypes=(jnp.bfloat16,), shape=(num_tokens, y.shape[1]))
    backend = serving(backend, num_tokens)
    if grouped:
        return _grouped_combine(_Static(_grouped_ops(op, backend), ctx, config), y, handle.weight, topk_weights,
                                tuple(bias), handle)
    return _combine(_Static(backend, ctx, config), y, topk_weights, tuple(bias), handle)
