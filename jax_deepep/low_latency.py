"""Low-latency ops (SPEC.md section 3): validation, the recv-hook split, then the backend."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import checking
from .backend import LowLatencyOptions, RankContext
from .config import FP8_BLOCK
from .trace_names import named, scoped
from .types import LowLatencyDispatchOutput, LowLatencyHandle, PendingLowLatencyCombine
from .validation import expect_array, fail, index_dtypes


@scoped("low_latency_dispatch")
def low_latency_dispatch(backend, ctx: RankContext, x, topk_idx, *, num_max_dispatch_tokens_per_rank: int,
                         num_experts: int, use_fp8: bool = True, round_scale: bool = False,
                         use_ue8m0: bool = False, return_recv_hook: bool = False) -> LowLatencyDispatchOutput:
    op = "low_latency_dispatch"
    m = num_max_dispatch_tokens_per_rank
    if not isinstance(m, int) or m <= 0:
        fail(op, f"`num_max_dispatch_tokens_per_rank` must be a positive int, got {m!r}")
    if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % ctx.num_ranks:
        fail(op, f"`num_experts` must be a positive int divisible by the number of ranks ({ctx.num_ranks}), "
                 f"got {num_experts!r}")
    expect_array(op, "x", x, ndim=2, dtypes=(jnp.bfloat16,))
    num_tokens, hidden = x.shape
    if num_tokens > m:
        fail(op, f"`x` has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank={m}")
    expect_array(op, "topk_idx", topk_idx, ndim=2, dtypes=index_dtypes(), shape=(num_tokens, None))
    if use_ue8m0 and not use_fp8:
        fail(op, "`use_ue8m0=True` needs `use_fp8=True`")
    if use_fp8 and hidden % FP8_BLOCK:
        fail(op, f"`x` hidden size must be a multiple of {FP8_BLOCK} for FP8, got {hidden}")
    if use_ue8m0 and hidden % (4 * FP8_BLOCK):
        fail(op, f"`x` hidden size must be a multiple of {4 * FP8_BLOCK} for UE8M0 scales, got {hidden}")
    checking.check_expert_ids(topk_idx, num_experts)
    opts = LowLatencyOptions(m, num_experts, bool(use_fp8), bool(round_scale), bool(use_ue8m0))

    def send(x, topk_idx):
        return LowLatencyDispatchOutput(None, None, None, None, None,
                                        transit=backend.low_latency_dispatch_send(ctx, opts, x, topk_idx),
                                        pending=True, options=opts)

    if return_recv_hook:
        return _unmapped_on_cuda(backend, op, send)(x, topk_idx)
    return _one_at_a_time(lambda x, topk_idx: _receive(backend, ctx, send(x, topk_idx)))(x, topk_idx)


@scoped("low_latency_combine")
def low_latency_combine(backend, ctx: RankContext, y, topk_idx, topk_weights, handle: LowLatencyHandle, *,
                        use_logfmt: bool = False, zero_copy: bool = False, return_recv_hook: bool = False):
    op = "low_latency_combine"
    if not isinstance(handle, LowLatencyHandle):
        fail(op, f"`handle` must be the LowLatencyHandle of low_latency_dispatch, got {type(handle).__name__}")
    m, e = handle.num_max_dispatch_tokens_per_rank, handle.num_experts
    expect_array(op, "y", y, ndim=3, dtypes=(jnp.bfloat16,), shape=(e // ctx.num_ranks, ctx.num_ranks * m, None))
    expect_array(op, "topk_idx", topk_idx, ndim=2, dtypes=index_dtypes(), shape=handle.send_slot.shape)
    expect_array(op, "topk_weights", topk_weights, ndim=2, dtypes=(jnp.float32,), shape=handle.send_slot.shape)
    checking.check_expert_ids(topk_idx, e)

    def send(y, topk_idx, topk_weights, handle):
        return PendingLowLatencyCombine(backend.low_latency_combine_send(ctx, y, topk_idx, topk_weights, handle,
                                                                         bool(use_logfmt), bool(zero_copy)))

    if return_recv_hook:
        return _unmapped_on_cuda(backend, op, send)(y, topk_idx, topk_weights, handle)
    return _one_at_a_time(lambda *args: _receive(backend, ctx, send(*args)))(y, topk_idx, topk_weights, handle)


def _one_at_a_time(op):
    """`op` (a send and its receive) under `jax.vmap` runs whole, once per element, in order. Batched
    by plain vmap it would become every element's send, then every receive: more calls in flight
    than the CUDA kernels' two alternating buffer halves hold."""
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
                 "sends would be in flight before the first receive, and they hold two); pass "
                 "return_recv_hook=False, which maps as a loop")

    return guarded


@scoped("low_latency_recv")
def low_latency_recv(backend, ctx: RankContext, pending):
    """Complete a `return_recv_hook=True` dispatch or combine."""
    return _receive(backend, ctx, pending)


def _receive(backend, ctx: RankContext, pending):
    """The receive half of a low-latency op (in the scope of the op, or of low_latency_recv for a hook)."""
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
