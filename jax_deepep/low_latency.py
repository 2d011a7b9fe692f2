"""Low-latency ops (docs/API.md): validation, the recv-hook split, then the backend."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import checking
from .backend import LowLatencyOptions, RankContext
from .config import low_latency_rdma_size_hint
from .limits import FP8_BLOCK, LOGFMT_MAX_DECODED_GROUPS, LOW_LATENCY_MAX_TOKENS_PER_RANK
from .logfmt import GROUP as LOGFMT_GROUP
from .no_tokens import NO_TOKENS, NoTokensTransit, serving
from .trace_names import named, scoped
from .types import LowLatencyDispatchOutput, LowLatencyHandle, PendingLowLatencyCombine
from .validation import (boolean, expect_array, expect_top_k, expert_count, fail, index_dtypes, integer, row_hidden,
                         topk_ids)


def _check_rdma_bytes(op: str, num_rdma_bytes: int, m: int, hidden: int, num_ranks: int, num_experts: int):
    """A Buffer's `num_rdma_bytes` (0: not checked) must hold these sizes."""
    if num_rdma_bytes:
        need = low_latency_rdma_size_hint(m, hidden, num_ranks, num_experts)
        if num_rdma_bytes < need:
            fail(op, f"the Buffer is too small: num_rdma_bytes={num_rdma_bytes} but "
                     f"num_max_dispatch_tokens_per_rank={m}, hidden={hidden}, num_experts={num_experts} "
                     f"need {need} (Buffer.get_low_latency_rdma_size_hint)")


@scoped("low_latency_dispatch")
def low_latency_dispatch(backend, ctx: RankContext, x, topk_idx, *, num_max_dispatch_tokens_per_rank: int,
                         num_experts: int, use_fp8: bool = True, round_scale: bool = False,
                         use_ue8m0: bool = False, return_recv_hook: bool = False,
                         num_rdma_bytes: int = 0) -> LowLatencyDispatchOutput:
    """`num_rdma_bytes`: the Buffer's, checked against what these sizes need (0: not checked)."""
    op = "low_latency_dispatch"
    use_fp8, round_scale, use_ue8m0, return_recv_hook = (
        boolean(op, name, value) for name, value in (("use_fp8", use_fp8), ("round_scale", round_scale),
                                                     ("use_ue8m0", use_ue8m0), ("return_recv_hook", return_recv_hook)))
    m = integer(op, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1,
                maximum=LOW_LATENCY_MAX_TOKENS_PER_RANK)
    num_experts = expert_count(op, num_experts, ctx.num_ranks)
    expect_array(op, "x", x, ndim=2, dtypes=(jnp.bfloat16,))
    num_tokens, hidden = x.shape
    if num_tokens > m:
        fail(op, f"`x` has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank={m}")
    row_hidden(op, "x", hidden)
    topk_ids(op, topk_idx, num_tokens)
    if use_ue8m0 and not use_fp8:
        fail(op, "`use_ue8m0=True` needs `use_fp8=True`")
    if use_fp8 and hidden % FP8_BLOCK:
        fail(op, f"`x` hidden size must be a multiple of {FP8_BLOCK} for FP8, got {hidden}")
    if use_ue8m0 and hidden % (4 * FP8_BLOCK):
        fail(op, f"`x` hidden size must be a multiple of {4 * FP8_BLOCK} for UE8M0 scales, got {hidden}")
    _check_rdma_bytes(op, num_rdma_bytes, m, hidden, ctx.num_ranks, num_experts)
    checking.check_expert_ids(topk_idx, num_experts)
    opts = LowLatencyOptions(m, num_experts, use_fp8, round_scale, use_ue8m0)
    sender = serving(backend, num_tokens)

    def send(x, topk_idx):
        transit = sender.low_latency_dispatch_send(ctx, opts, x, topk_idx)
        return LowLatencyDispatchOutput(None, None, None, None, None, transit=transit, pending=True, options=opts)

    if return_recv_hook:
        return _unmapped_on_cuda(backend, op, send)(x, topk_idx)
    return _one_at_a_time(lambda x, topk_idx: _receive(backend, ctx, send(x, topk_idx)))(x, topk_idx)


def _check_handle(op: str, handle, ctx: RankContext):
    """`handle` must come from a low_latency_dispatch over an axis of this size (the kernels index by it)."""
    if not isinstance(handle, LowLatencyHandle):
        fail(op, f"`handle` must be the LowLatencyHandle of low_latency_dispatch, got {type(handle).__name__}")
    m, e, r = handle.num_max_dispatch_tokens_per_rank, handle.num_experts, ctx.num_ranks
    if e % r:
        fail(op, f"`handle` was made for {e} experts, which {r} ranks cannot share: was it made under another "
                 "axis size?")
    for name, dtype, shape in (("recv_src_info", jnp.int32, (e // r, r * m)),
                               ("recv_layout_range", jnp.int32, (e // r, r, 2)),
                               ("recv_count", jnp.int32, (e // r,)), ("send_slot", jnp.int32, (None, None))):
        expect_array(op, f"handle.{name}", getattr(handle, name), ndim=len(shape), dtypes=(dtype,), shape=shape)
    expect_top_k(op, "handle.send_slot", handle.send_slot)


@scoped("low_latency_combine")
def low_latency_combine(backend, ctx: RankContext, y, topk_idx, topk_weights, handle: LowLatencyHandle, *,
                        use_logfmt: bool = False, zero_copy: bool = False, return_recv_hook: bool = False,
                        num_rdma_bytes: int = 0):
    """`num_rdma_bytes`: the Buffer's, checked against what these sizes need (0: not checked)."""
    op = "low_latency_combine"
    use_logfmt, zero_copy, return_recv_hook = (
        boolean(op, name, value) for name, value in (("use_logfmt", use_logfmt), ("zero_copy", zero_copy),
                                                     ("return_recv_hook", return_recv_hook)))
    _check_handle(op, handle, ctx)
    m, e = handle.num_max_dispatch_tokens_per_rank, handle.num_experts
    expect_array(op, "y", y, ndim=3, dtypes=(jnp.bfloat16,), shape=(e // ctx.num_ranks, ctx.num_ranks * m, None))
    row_hidden(op, "y", y.shape[2])
    expect_array(op, "topk_idx", topk_idx, ndim=2, dtypes=index_dtypes(), shape=handle.send_slot.shape)
    expect_array(op, "topk_weights", topk_weights, ndim=2, dtypes=(jnp.float32,), shape=handle.send_slot.shape)
    _check_rdma_bytes(op, num_rdma_bytes, m, y.shape[2], ctx.num_ranks, e)
    if use_logfmt:
        _check_logfmt(op, y.shape[2], topk_idx.shape[1])
    checking.check_expert_ids(topk_idx, e)

    sender = serving(backend, topk_idx.shape[0])

    def send(y, topk_idx, topk_weights, handle):
        return PendingLowLatencyCombine(sender.low_latency_combine_send(
            ctx, y, topk_idx, topk_weights, handle, use_logfmt, zero_copy))

    if return_recv_hook:
        return _unmapped_on_cuda(backend, op, send)(y, topk_idx, topk_weights, handle)
    return _one_at_a_time(lambda *args: _receive(backend, ctx, send(*args)))(y, topk_idx, topk_weights, handle)


def _check_logfmt(op: str, hidden: int, top_k: int):
    """LogFMT rows are groups of 128 channels, whose decoding parameters the receive keeps for every top-k row."""
    if hidden % LOGFMT_GROUP:
        fail(op, f"`y` hidden size must be a multiple of {LOGFMT_GROUP} for use_logfmt=True, got {hidden}")
    if top_k * (hidden // LOGFMT_GROUP) > LOGFMT_MAX_DECODED_GROUPS:
        fail(op, f"use_logfmt=True serves top_k * hidden / {LOGFMT_GROUP} <= {LOGFMT_MAX_DECODED_GROUPS}, got "
                 f"top_k={top_k} and hidden={hidden}")


def _one_at_a_time(op):
    """`op` (a send and its receive) under `jax.vmap` runs whole, once per element, in order. Batched
    by plain vmap it would become every element's send, then every receive: more calls in flight
    than the CUDA kernels' buffer halves serve (two at the size hint; docs/LOW_LATENCY.md)."""
    return jax.custom_batching.sequential_vmap(op)


def _unmapped_on_cuda(backend, op: str, send):
    """The send of a `return_recv_hook=True` call, refused under `jax.vmap` on the CUDA kernels: mapped, it
    would send every element before the caller receives any (see `_one_at_a_time`)."""
    if backend.name == "reference":
        return send
    guarded = jax.custom_batching.custom_vmap(send)

    @guarded.def_vmap
    def refuse(axis_size, in_batched, *args):
        fail(op, f"`return_recv_hook=True` cannot be mapped by jax.vmap on the CUDA kernels (all {axis_size} "
                 "sends would be in flight before the first receive, more than the buffer's halves serve); pass "
                 "return_recv_hook=False, which maps as a loop")

    return guarded


@scoped("low_latency_recv")
def low_latency_recv(backend, ctx: RankContext, pending):
    """Complete a `return_recv_hook=True` dispatch or combine."""
    return _receive(backend, ctx, pending)


def _receive(backend, ctx: RankContext, pending):
    """The receive half of a low-latency op (in the scope of the op, or of low_latency_recv for a hook)."""
    if isinstance(getattr(pending, "transit", None), NoTokensTransit):
        backend = NO_TOKENS
    if isinstance(pending, PendingLowLatencyCombine):
        return named("low_latency_combine", "combined_x", backend.low_latency_combine_recv(ctx, pending.transit))
    if not isinstance(pending, LowLatencyDispatchOutput) or not pending.pending:
        fail("low_latency_recv", "expects the pending result of low_latency_dispatch or low_latency_combine "
                                 f"called with return_recv_hook=True, got {type(pending).__name__}")
    opts = pending.options
    recv_x, recv_count, recv_src_info, layout_range, send_slot = backend.low_latency_dispatch_recv(
        ctx, opts, pending.transit)
    handle = named("low_latency_dispatch", "handle",
                   LowLatencyHandle(recv_src_info, layout_range, recv_count, send_slot,
                                    opts.num_max_dispatch_tokens_per_rank, opts.num_experts))
    return LowLatencyDispatchOutput(named("low_latency_dispatch", "recv_x", recv_x), handle.recv_count,
                                    handle.recv_src_info, handle.recv_layout_range, handle)
