"""`CudaBackend`: the normal-mode ops as our CUDA kernels, called as XLA FFI custom calls.

Every method runs per shard inside `shard_map`. The custom calls find this rank's
communication buffer by the Buffer's id and the device they run on; ring sizes come from the
`Config` (clamped to what the buffer holds). Handles carry two extra sender-side arrays in
`DispatchHandle.extras`: `send_count_before` (i32[T, R], tokens before t sent to each rank)
and `send_offset` (i32[R], first row of this rank's block on each rank). An axis of several nodes
runs the NVSHMEM internode kernels of `gpu/internode.py` when the Buffer has `num_rdma_bytes`;
other configurations the kernels do not cover (one node of more than 8 ranks) use the pure-JAX
implementation. The low-latency ops run the NVSHMEM kernels of `gpu/low_latency.py` when that
library was built.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .. import reference
from ..backend import DispatchResult, RankContext
from ..config import Config
from ..reference.normal import valid_expert_ids
from ..sizes import combine_slot, dispatch_slot
from ..types import DispatchHandle, DispatchLayout
from ..validation import fail
from . import runtime
from .ffi_call import ffi_call, optional_operand, optional_result

# Without `num_nvl_bytes` the buffer holds the default configs' rings for H = 7168 at 8 ranks.
DEFAULT_NUM_NVL_BYTES = 512 << 20

def _i64(v) -> np.int64:
    return np.int64(v)


def _kernel_expert_ids(topk_idx, num_experts: int):
    """Expert ids as the kernels take them: int32 ids go in as they are (the kernels treat
    anything outside [0, E) as -1 themselves); wider ids are narrowed by `valid_expert_ids`,
    which checks them first (narrowing could wrap them into range)."""
    return topk_idx if topk_idx.dtype == jnp.int32 else valid_expert_ids(topk_idx, num_experts)


def _shape(a, rows=None):
    return jax.ShapeDtypeStruct(((rows,) if rows is not None else a.shape[:1]) + tuple(a.shape[1:]), a.dtype)


def _sender_extras(handle: DispatchHandle):
    """`send_count_before` and `send_offset`, rebuilt when the handle came from another backend."""
    if "send_count_before" in handle.extras:
        return handle.extras["send_count_before"], handle.extras["send_offset"]
    in_rank = handle.is_token_in_rank.astype(jnp.int32)
    count_before = jnp.cumsum(in_rank, axis=0, dtype=jnp.int32) - in_rank
    offset = jnp.max(jnp.where(handle.is_token_in_rank, handle.send_row - count_before, 0), axis=0)
    return count_before, offset.astype(jnp.int32)


def _low_latency_kernels(buffer):
    """The NVSHMEM low-latency kernels of a low-latency Buffer (None: the ops use pure JAX)."""
    if not (buffer.low_latency_mode and buffer.num_rdma_bytes > 0):
        return None
    from . import low_latency

    if not low_latency.available():
        warnings.warn("jax_deepep: low-latency ops use the pure-JAX implementation: "
                      + low_latency.unavailable_reason())
        return None
    # DeepEP's allow_nvlink_for_low_latency_mode=False sends every peer's rows as NVSHMEM puts.
    direct_group = buffer.ranks_per_node if buffer.allow_nvlink_for_low_latency_mode else 1
    return low_latency.LowLatencyKernels(buffer.mesh, buffer.axis_name, buffer.num_rdma_bytes,
                                         direct_group=direct_group)


def _internode_kernels(buffer):
    """The NVSHMEM internode kernels of a normal Buffer over several nodes (None: not that case, or
    they cannot run here, with a warning)."""
    if buffer.low_latency_mode or buffer.ranks_per_node == buffer.num_ranks or buffer.num_rdma_bytes <= 0:
        return None
    from . import internode, low_latency

    if not low_latency.available():
        warnings.warn("jax_deepep: internode ops use the pure-JAX implementation: " + low_latency.unavailable_reason())
        return None
    if buffer.ranks_per_node > internode.MAX_RANKS_PER_NODE:
        warnings.warn(f"jax_deepep: the internode kernels take nodes of up to {internode.MAX_RANKS_PER_NODE} ranks; "
                      f"{buffer.ranks_per_node} per node use the pure-JAX implementation")
        return None
    return internode.InternodeKernels(buffer.mesh, buffer.axis_name, buffer.num_rdma_bytes, buffer.ranks_per_node)


class CudaBackend:
    name = "cuda"

    def __init__(self, buffer):
        self._low_latency = _low_latency_kernels(buffer)
        self._internode = _internode_kernels(buffer)
        lib = runtime._lib()
        self.num_ranks = buffer.num_ranks
        self._native = buffer.num_ranks <= lib.MAX_RANKS and buffer.ranks_per_node == buffer.num_ranks
        self._max_channels = lib.MAX_CHANNELS // 2
        self._max_local_experts = lib.MAX_LOCAL_EXPERTS
        self.comm = None
        if not self._native:
            if self._internode is not None:
                return
            warnings.warn(f"jax_deepep: the CUDA kernels cover one node of up to {lib.MAX_RANKS} "
                          f"ranks; {buffer.num_ranks} ranks with {buffer.ranks_per_node} per node use the "
                          "pure-JAX implementation")
            return
        self.comm = runtime.CommBuffers(buffer.mesh, buffer.axis_name,
                                        buffer.num_nvl_bytes or DEFAULT_NUM_NVL_BYTES)

    def destroy(self):
        if self.comm is not None:
            self.comm.destroy()
        if self._internode is not None:
            self._internode.destroy()
        if self._low_latency is not None:
            self._low_latency.destroy()

    def error_codes(self) -> dict:
        """Kernel errors raised so far ({device ordinal: code}); see cuda/rank_info.h."""
        return {} if self.comm is None else self.comm.error_codes()

    # ---- launch shapes ------------------------------------------------------------------------
    def _ring(self, op: str, ctx: RankContext, config: Config, slot_bytes: int, chunk_tokens: int) -> dict:
        channels = config.num_channels
        if channels > self._max_channels:
            fail(op, f"`config.num_sms` must be at most {2 * self._max_channels}, got {config.num_sms}")
        slots = config.num_max_nvl_chunked_recv_tokens
        if ctx.num_ranks > 1:
            slots = min(slots, self.comm.ring_bytes // (channels * ctx.num_ranks * slot_bytes))
            if slots < chunk_tokens:
                fail(op, f"the Buffer is too small: num_nvl_bytes={self.comm.num_bytes} holds {slots} ring slots "
                         f"of {slot_bytes} bytes per channel and peer, the config needs at least {chunk_tokens}")
        return dict(buffer_id=_i64(self.comm.buffer_id),
                    ring=dict(num_channels=_i64(channels), slots=_i64(slots), chunk_tokens=_i64(chunk_tokens)))

    def _dispatch_ring(self, ctx: RankContext, config: Config, parts, num_topk: int) -> dict:
        """Ring attributes of a (cached) dispatch moving `parts` and `num_topk` ids/weights per token."""
        part_bytes = [int(np.prod(p.shape[1:])) * p.dtype.itemsize for p in parts]
        slot_bytes = dispatch_slot(part_bytes, num_topk).bytes
        return self._ring("dispatch", ctx, config, slot_bytes, config.num_max_nvl_chunked_send_tokens)

    # ---- normal mode ----------------------------------------------------------------------------
    def get_dispatch_layout(self, ctx: RankContext, topk_idx, num_experts: int) -> DispatchLayout:
        if not self._native:
            return reference.BACKEND.get_dispatch_layout(ctx, topk_idx, num_experts)
        num_tokens = topk_idx.shape[0]
        per_rank, per_expert, in_rank = ffi_call(
            "jax_deepep_layout",
            (jax.ShapeDtypeStruct((ctx.num_ranks,), jnp.int32), jax.ShapeDtypeStruct((num_experts,), jnp.int32),
             jax.ShapeDtypeStruct((num_tokens, ctx.num_ranks), jnp.bool_)),
            _kernel_expert_ids(topk_idx, num_experts), axis_name=ctx.axis_name,
            num_experts=_i64(num_experts), num_ranks=_i64(ctx.num_ranks))
        return DispatchLayout(per_rank, None, per_expert, in_rank)

    def dispatch(self, ctx: RankContext, config: Config, parts, topk_idx, topk_weights, layout: DispatchLayout,
                 num_experts: int, num_worst_tokens: int, expert_alignment: int) -> DispatchResult:
        if self._internode is not None:
            return self._internode.dispatch(ctx, parts, topk_idx, topk_weights, layout, num_experts,
                                            num_worst_tokens, expert_alignment)
        if not self._native:
            return reference.BACKEND.dispatch(ctx, config, parts, topk_idx, topk_weights, layout, num_experts,
                                              num_worst_tokens, expert_alignment)
        if num_experts // ctx.num_ranks > self._max_local_experts:
            fail("dispatch", f"at most {self._max_local_experts} experts per rank, got {num_experts // ctx.num_ranks}")
        n, num_tokens, r = num_worst_tokens, parts[0].shape[0], ctx.num_ranks
        has_topk, has_weights = topk_idx is not None, topk_weights is not None
        num_topk = topk_idx.shape[1] if has_topk else 0
        attrs = self._dispatch_ring(ctx, config, parts, num_topk)
        scales = parts[1] if len(parts) == 2 else None
        i32, f32 = jnp.int32, jnp.float32
        (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, recv_src_rank, send_row,
         send_count_before, send_offset, recv_rank_prefix, num_recv_tokens, per_expert) = ffi_call(
            "jax_deepep_dispatch",
            (_shape(parts[0], n), optional_result(None if scales is None else (n,) + scales.shape[1:],
                                                  f32 if scales is None else scales.dtype),
             optional_result((n, num_topk) if has_topk else None, i32),
             optional_result((n, num_topk) if has_weights else None, f32),
             jax.ShapeDtypeStruct((n,), i32), jax.ShapeDtypeStruct((n,), i32),
             jax.ShapeDtypeStruct((num_tokens, r), i32), jax.ShapeDtypeStruct((num_tokens, r), i32),
             jax.ShapeDtypeStruct((r,), i32), jax.ShapeDtypeStruct((r,), i32), jax.ShapeDtypeStruct((), i32),
             jax.ShapeDtypeStruct((num_experts // r,), i32)),
            parts[0], optional_operand(scales, f32),
            optional_operand(_kernel_expert_ids(topk_idx, num_experts) if has_topk else None, i32),
            optional_operand(topk_weights.astype(f32) if has_weights else None, f32),
            layout.is_token_in_rank, layout.num_tokens_per_rank, layout.num_tokens_per_expert,
            axis_name=ctx.axis_name, num_experts=_i64(num_experts), expert_alignment=_i64(expert_alignment), **attrs)
        recv_parts = (recv_x,) if scales is None else (recv_x, recv_scales)
        recv_topk_idx = recv_topk_idx if has_topk else None
        recv_topk_weights = recv_topk_weights if has_weights else None
        handle = DispatchHandle(
            is_token_in_rank=layout.is_token_in_rank, send_row=send_row, recv_src_rank=recv_src_rank,
            recv_src_idx=recv_src_idx, recv_rank_prefix=recv_rank_prefix, num_recv_tokens=num_recv_tokens,
            num_recv_tokens_per_expert=per_expert,
            extras={"send_count_before": send_count_before, "send_offset": send_offset})
        return DispatchResult(recv_parts, recv_topk_idx, recv_topk_weights, per_expert, num_recv_tokens, handle)

    def cached_dispatch(self, ctx: RankContext, config: Config, handle: DispatchHandle, parts, topk_weights=None):
        if self._internode is not None and "forwarded" in handle.extras:
            return self._internode.cached_dispatch(ctx, handle, parts, topk_weights)
        if not self._native:
            return reference.BACKEND.cached_dispatch(ctx, config, handle, parts, topk_weights)
        n = handle.capacity
        has_weights = topk_weights is not None
        num_topk = topk_weights.shape[1] if has_weights else 0
        attrs = self._dispatch_ring(ctx, config, parts, num_topk)
        send_count_before, _ = _sender_extras(handle)
        scales = parts[1] if len(parts) == 2 else None
        f32 = jnp.float32
        recv_x, recv_scales, recv_topk_weights = ffi_call(
            "jax_deepep_cached_dispatch",
            (_shape(parts[0], n), optional_result(None if scales is None else (n,) + scales.shape[1:],
                                                  f32 if scales is None else scales.dtype),
             optional_result((n, num_topk) if has_weights else None, f32)),
            parts[0], optional_operand(scales, f32),
            optional_operand(topk_weights.astype(f32) if has_weights else None, f32),
            handle.is_token_in_rank, handle.send_row, send_count_before, handle.num_recv_tokens,
            axis_name=ctx.axis_name, **attrs)
        recv_parts = (recv_x,) if scales is None else (recv_x, recv_scales)
        return recv_parts, (recv_topk_weights if has_weights else None)

    def combine(self, ctx: RankContext, config: Config, handle: DispatchHandle, y, topk_weights, bias):
        hidden = y.shape[1]
        if self._internode is not None and "forwarded" in handle.extras and hidden % 8 == 0:
            return self._internode.combine(ctx, handle, y, topk_weights, bias)
        if not self._native or hidden % 8:
            return reference.BACKEND.combine(ctx, config, handle, y, topk_weights, bias)
        has_weights = topk_weights is not None
        num_topk = topk_weights.shape[1] if has_weights else 0
        slot_bytes = combine_slot(hidden, num_topk).bytes
        attrs = self._ring("combine", ctx, config, slot_bytes, config.num_max_nvl_chunked_send_tokens)
        send_count_before, send_offset = _sender_extras(handle)
        num_tokens = handle.is_token_in_rank.shape[0]
        f32, bf16 = jnp.float32, jnp.bfloat16
        biases = [optional_operand(b, bf16) for b in (list(bias) + [None, None])[:2]]
        combined_x, combined_topk_weights = ffi_call(
            "jax_deepep_combine",
            (jax.ShapeDtypeStruct((num_tokens, hidden), y.dtype),
             optional_result((num_tokens, num_topk) if has_weights else None, f32)),
            y, optional_operand(topk_weights.astype(f32) if has_weights else None, f32), *biases,
            handle.is_token_in_rank, handle.send_row, send_count_before, send_offset, handle.recv_src_idx,
            handle.recv_rank_prefix, handle.num_recv_tokens, axis_name=ctx.axis_name, **attrs)
        return combined_x, (combined_topk_weights if has_weights else None)

    # ---- low-latency mode: the NVSHMEM kernels, or pure JAX when they are not available --------
    @property
    def _ll(self):
        return self._low_latency if self._low_latency is not None else reference.BACKEND

    def low_latency_dispatch_send(self, ctx, opts, x, topk_idx):
        return self._ll.low_latency_dispatch_send(ctx, opts, x, topk_idx)

    def low_latency_dispatch_recv(self, ctx, opts, transit):
        return self._ll.low_latency_dispatch_recv(ctx, opts, transit)

    def low_latency_combine_send(self, ctx, y, topk_idx, topk_weights, handle, use_logfmt, zero_copy):
        return self._ll.low_latency_combine_send(ctx, y, topk_idx, topk_weights, handle, use_logfmt, zero_copy)

    def low_latency_combine_recv(self, ctx, transit):
        return self._ll.low_latency_combine_recv(ctx, transit)
