"""Intranode normal mode: the kernels of `cuda/layout.cu` and `cuda/intranode_*.cu` (in
`libjax_deepep_cuda.so`) as XLA FFI custom calls, for an expert-parallel axis within one node.

Every method runs per shard inside `shard_map`. The custom calls find this rank's communication
buffer (`runtime.CommBuffers`, mapped by every peer over CUDA IPC or peer access) by the Buffer's
id and the device they run on; ring sizes come from the `Config` (clamped to what the buffer holds).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..backend import DispatchResult, RankContext
from ..config import Config
from ..routing import valid_expert_ids
from ..types import DispatchHandle, DispatchLayout, pytree_dataclass
from ..validation import fail
from . import runtime
from .ffi_call import ffi_call
from .library import library

# Without `num_nvl_bytes` the buffer holds the default configs' rings for H = 7168 at 8 ranks.
DEFAULT_NUM_NVL_BYTES = 512 << 20

_TARGETS = {
    "jax_deepep_layout": "jax_deepep_layout_ffi",
    "jax_deepep_dispatch": "jax_deepep_dispatch_ffi",
    "jax_deepep_cached_dispatch": "jax_deepep_cached_dispatch_ffi",
    "jax_deepep_combine": "jax_deepep_combine_ffi",
}


@functools.lru_cache(maxsize=None)
def register_targets():
    lib = library()
    for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA")


def _i64(v) -> np.int64:
    return np.int64(v)


def _kernel_expert_ids(topk_idx, num_experts: int):
    """Expert ids as the kernels take them: int32 ids go in as they are (the kernels treat
    anything outside [0, E) as -1 themselves); wider ids are narrowed by `valid_expert_ids`,
    which checks them first (narrowing could wrap them into range)."""
    return topk_idx if topk_idx.dtype == jnp.int32 else valid_expert_ids(topk_idx, num_experts)


def _shape(a, rows=None):
    return jax.ShapeDtypeStruct(((rows,) if rows is not None else a.shape[:1]) + tuple(a.shape[1:]), a.dtype)


@pytree_dataclass()
class IntranodeRoute:
    """The sender-side arrays of a dispatch that this backend's cached dispatch and combine read."""

    send_count_before: jax.Array  # i32[T, R]: tokens before t sent to each rank
    send_offset: jax.Array  # i32[R]: first row of this rank's block on each rank


def _route(op: str, handle: DispatchHandle) -> IntranodeRoute:
    if not isinstance(handle.route, IntranodeRoute):
        fail(op, "`handle` was not made by this Buffer's intranode kernels (it comes from another backend)")
    return handle.route


class IntranodeBackend:
    """Normal mode within one node over CUDA IPC: the `NormalBackend` methods on one Buffer's `CommBuffers`."""

    name = "cuda"
    mode = "intranode"

    def __init__(self, comm: runtime.CommBuffers):
        register_targets()
        lib = runtime._lib()
        self.comm = comm
        self._max_channels = int(lib.jax_deepep_max_channels()) // 2
        self._max_local_experts = int(lib.jax_deepep_max_local_experts())

    @classmethod
    def open(cls, mesh, axis_name: str, num_nvl_bytes: int) -> "IntranodeBackend":
        """Allocates and maps the communication buffers (collective over the processes of `mesh`)."""
        return cls(runtime.CommBuffers(mesh, axis_name, num_nvl_bytes or DEFAULT_NUM_NVL_BYTES))

    def destroy(self):
        self.comm.destroy()

    def error_codes(self) -> dict:
        """Kernel errors raised so far ({device ordinal: code}); see cuda/rank_info.h."""
        return self.comm.error_codes()

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
        return dict(buffer_id=_i64(self.comm.buffer_id), num_channels=_i64(channels), ring_slots=_i64(slots),
                    chunk_tokens=_i64(chunk_tokens))

    def _dispatch_ring(self, ctx: RankContext, config: Config, parts, num_topk: int) -> dict:
        """Ring attributes of a (cached) dispatch moving `parts` and `num_topk` ids/weights per token."""
        part_bytes = [int(np.prod(p.shape[1:])) * p.dtype.itemsize for p in parts] + [0]
        slot_bytes = runtime._lib().jax_deepep_dispatch_slot_bytes(part_bytes[0], part_bytes[1], len(parts), num_topk)
        return self._ring("dispatch", ctx, config, slot_bytes, config.num_max_nvl_chunked_send_tokens)

    # ---- normal mode ----------------------------------------------------------------------------
    def get_dispatch_layout(self, ctx: RankContext, topk_idx, num_experts: int) -> DispatchLayout:
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
        if num_experts // ctx.num_ranks > self._max_local_experts:
            fail("dispatch", f"at most {self._max_local_experts} experts per rank, got {num_experts // ctx.num_ranks}")
        n, num_tokens, r = num_worst_tokens, parts[0].shape[0], ctx.num_ranks
        has_topk, has_weights = topk_idx is not None, topk_weights is not None
        num_topk = topk_idx.shape[1] if has_topk else 0
        attrs = self._dispatch_ring(ctx, config, parts, num_topk)
        args = list(parts)
        results = [_shape(p, n) for p in parts]
        if has_topk:
            args.append(_kernel_expert_ids(topk_idx, num_experts))
            results.append(jax.ShapeDtypeStruct((n, num_topk), jnp.int32))
        if has_weights:
            args.append(topk_weights.astype(jnp.float32))
            results.append(jax.ShapeDtypeStruct((n, num_topk), jnp.float32))
        args += [layout.is_token_in_rank, layout.num_tokens_per_rank, layout.num_tokens_per_expert]
        i32 = jnp.int32
        results += [jax.ShapeDtypeStruct((n,), i32), jax.ShapeDtypeStruct((n,), i32),
                    jax.ShapeDtypeStruct((num_tokens, r), i32), jax.ShapeDtypeStruct((num_tokens, r), i32),
                    jax.ShapeDtypeStruct((r,), i32), jax.ShapeDtypeStruct((r,), i32), jax.ShapeDtypeStruct((), i32),
                    jax.ShapeDtypeStruct((num_experts // r,), i32)]
        out = list(ffi_call(
            "jax_deepep_dispatch", tuple(results), *args, axis_name=ctx.axis_name, num_parts=_i64(len(parts)),
            has_topk=has_topk, has_weights=has_weights, num_experts=_i64(num_experts),
            expert_alignment=_i64(expert_alignment), **attrs))
        recv_parts = tuple(out[:len(parts)])
        rest = out[len(parts):]
        recv_topk_idx = rest.pop(0) if has_topk else None
        recv_topk_weights = rest.pop(0) if has_weights else None
        (recv_src_idx, recv_src_rank, send_row, send_count_before, send_offset, recv_rank_prefix, num_recv_tokens,
         per_expert) = rest
        handle = DispatchHandle(
            is_token_in_rank=layout.is_token_in_rank, send_row=send_row, recv_src_rank=recv_src_rank,
            recv_src_idx=recv_src_idx, recv_rank_prefix=recv_rank_prefix, num_recv_tokens=num_recv_tokens,
            num_recv_tokens_per_expert=per_expert,
            route=IntranodeRoute(send_count_before, send_offset))
        return DispatchResult(recv_parts, recv_topk_idx, recv_topk_weights, per_expert, num_recv_tokens, handle)

    def cached_dispatch(self, ctx: RankContext, config: Config, handle: DispatchHandle, parts, topk_weights=None):
        n = handle.capacity
        has_weights = topk_weights is not None
        num_topk = topk_weights.shape[1] if has_weights else 0
        attrs = self._dispatch_ring(ctx, config, parts, num_topk)
        send_count_before = _route("dispatch", handle).send_count_before
        args = list(parts) + ([topk_weights.astype(jnp.float32)] if has_weights else [])
        args += [handle.is_token_in_rank, handle.send_row, send_count_before, handle.num_recv_tokens]
        results = [_shape(p, n) for p in parts]
        if has_weights:
            results.append(jax.ShapeDtypeStruct((n, num_topk), jnp.float32))
        out = ffi_call("jax_deepep_cached_dispatch", tuple(results), *args, axis_name=ctx.axis_name,
                       num_parts=_i64(len(parts)), has_weights=has_weights, **attrs)
        return tuple(out[:len(parts)]), (out[len(parts)] if has_weights else None)

    def combine(self, ctx: RankContext, config: Config, handle: DispatchHandle, y, topk_weights, bias):
        hidden = y.shape[1]
        if hidden % 8:
            fail("combine", f"`y` rows must be a multiple of 16 bytes for the CUDA kernels (hidden size a "
                            f"multiple of 8), got hidden size {hidden}")
        lib = runtime._lib()
        has_weights = topk_weights is not None
        num_topk = topk_weights.shape[1] if has_weights else 0
        slot_bytes = lib.jax_deepep_combine_slot_bytes(hidden, num_topk)
        attrs = self._ring("combine", ctx, config, slot_bytes, config.num_max_nvl_chunked_send_tokens)
        route = _route("combine", handle)
        send_count_before, send_offset = route.send_count_before, route.send_offset
        num_tokens = handle.is_token_in_rank.shape[0]
        args = [y] + ([topk_weights.astype(jnp.float32)] if has_weights else []) + list(bias)
        args += [handle.is_token_in_rank, handle.send_row, send_count_before, send_offset, handle.recv_src_idx,
                 handle.recv_rank_prefix, handle.num_recv_tokens]
        results = [jax.ShapeDtypeStruct((num_tokens, hidden), y.dtype)]
        if has_weights:
            results.append(jax.ShapeDtypeStruct((num_tokens, num_topk), jnp.float32))
        out = ffi_call("jax_deepep_combine", tuple(results), *args, axis_name=ctx.axis_name,
                       num_bias=_i64(len(bias)), has_weights=has_weights, **attrs)
        return out[0], (out[1] if has_weights else None)
