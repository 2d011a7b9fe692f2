"""Intranode normal mode: the kernels of `cuda/layout.cu` and `cuda/intranode_*.cu` (in the
extension module `_intranode_lib.so`) as XLA FFI custom calls, for an expert-parallel axis within one node.

Every method runs per shard inside `shard_map`. The custom calls find this rank's communication
buffer (`runtime.CommBuffers`, mapped by every peer over CUDA IPC or peer access) by the Buffer's
id and the device they run on; ring sizes come from the `Config`, and one whose rings the buffer
cannot hold is refused at trace time (never shrunk), as is one with more SMs than the device has.
Every block of a launch (`Config.num_sms` of them) must be resident at once: SMs held by other
kernels only delay a launch, unless those kernels wait on it in turn (ranks sharing one GPU, e.g.
under MPS, need their SM counts summed within the device's).

`IntranodeBackend.expert_grouped` (`IntranodeGroupedOps`) runs the same kernels on expert-grouped
arguments: the receivers write each token straight to its (token, local expert) rows.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..backend import DispatchResult, RankContext, grouped_dispatch_result
from ..buffer_keys import BufferKeys
from ..config import Config
from ..routing import grouped_routing, valid_expert_ids
from ..sizes import (GROUPED_COMBINE_CHANNEL_BYTES, combine_slot, dispatch_slot, grouped_combine_slot,
                     grouped_dispatch_slot, intranode_ring_bytes)
from ..types import DispatchHandle, DispatchLayout, ExpertGroupedHandle, pytree_dataclass
from ..validation import expect_array, fail
from . import runtime
from .ffi_call import ffi_call, optional_operand, optional_result, struct_attribute

# Without `num_nvl_bytes` the buffer holds the built-in default configs' rings for H = 7168 at up to
# 42 SMs at 8 ranks, 56 at 4 and 86 at 2, and the expert-grouped combine's f32 rows (the MoE layer's
# default) at the default 20 SMs at up to 8 ranks (tests/test_tune.py checks both).
DEFAULT_NUM_NVL_BYTES = 640 << 20
# An expert-grouped dispatch keeps a table of R * E_l = E row bases per block (cuda/intranode_grouped.cuh),
# internode (R + 1) * E_l of them per sender block (cuda/internode.cuh kInternodeMaxGroupedExperts).
MAX_GROUPED_EXPERTS = 4096

def _sm_count(mesh) -> Optional[int]:
    """The fewest SMs of this process's devices in `mesh` (None where a device reports no count)."""
    counts = [getattr(d, "core_count", None) for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return min(counts) if counts and all(counts) else None


def check_resident(op: str, config: Config, sm_count: Optional[int]):
    """Refuses a Config with more blocks than a device of `sm_count` SMs (None: unknown) holds at once."""
    if sm_count is not None and config.num_sms > sm_count:
        fail(op, f"`config.num_sms`={config.num_sms} is more than the {sm_count} SMs of the device: the "
                 "kernels need every block resident at once (a channel's sender and receiver blocks wait on "
                 f"each other), so they would wait until the timeout; pass a Config with num_sms <= "
                 f"{sm_count // 2 * 2}")


def _bias_operands(bias) -> list:
    """The combine kernels' two bias operands: the given bf16 [T, H] biases, absent ones as (0,) arrays."""
    return [optional_operand(b, jnp.bfloat16) for b in (list(bias) + [None, None])[:2]]


def _cached_dispatch_call(target: str, ctx: RankContext, attrs: dict, parts, topk_weights, weights_shape: tuple,
                          tokens: DispatchHandle, *pair_rows):
    """The cached dispatch custom call `target` of `parts` along the token-level routing `tokens`: (the
    received parts, the received weights of shape `weights_shape` or None). `pair_rows`: the grouped
    dispatch's operands after the routing."""
    has_weights = topk_weights is not None
    scales = parts[1] if len(parts) == 2 else None
    f32 = jnp.float32
    recv_x, recv_scales, recv_weights = ffi_call(
        target,
        (*_received_parts(parts, weights_shape[0]), optional_result(weights_shape if has_weights else None, f32)),
        parts[0], optional_operand(scales, f32),
        optional_operand(topk_weights.astype(f32) if has_weights else None, f32),
        tokens.is_token_in_rank, tokens.send_row, _route("dispatch", tokens).send_count_before, tokens.num_recv_tokens,
        *pair_rows, axis_name=ctx.axis_name, **attrs)
    recv_parts = (recv_x,) if scales is None else (recv_x, recv_scales)
    return recv_parts, (recv_weights if has_weights else None)


def _combine_call(target: str, ctx: RankContext, attrs: dict, y, weights: tuple, topk_weights, num_topk: int, bias,
                  tokens: DispatchHandle, *pair_rows):
    """The combine custom call `target` of `y` back along the token-level routing `tokens`: (the combined
    rows [T, H], the combined `topk_weights` [T, num_topk] or None). `weights`: the operands before
    `topk_weights` (the grouped combine's row weights); `pair_rows`: its operands after the routing."""
    route = _route("combine", tokens)
    num_tokens = tokens.is_token_in_rank.shape[0]
    has_weights = topk_weights is not None
    f32 = jnp.float32
    combined_x, combined_topk_weights = ffi_call(
        target,
        (jax.ShapeDtypeStruct((num_tokens, y.shape[1]), y.dtype),
         optional_result((num_tokens, num_topk) if has_weights else None, f32)),
        y, *weights, optional_operand(topk_weights.astype(f32) if has_weights else None, f32), *_bias_operands(bias),
        tokens.is_token_in_rank, tokens.send_row, route.send_count_before, route.send_offset, tokens.recv_src_idx,
        tokens.recv_rank_prefix, tokens.num_recv_tokens, *pair_rows, axis_name=ctx.axis_name, **attrs)
    return combined_x, (combined_topk_weights if has_weights else None)


def _i64(v) -> np.int64:
    return np.int64(v)


def _kernel_expert_ids(topk_idx, num_experts: int):
    """Expert ids as the kernels take them: int32 ids go in as they are (the kernels treat
    anything outside [0, E) as -1 themselves); wider ids are narrowed by `valid_expert_ids`,
    which checks them first (narrowing could wrap them into range)."""
    return topk_idx if topk_idx.dtype == jnp.int32 else valid_expert_ids(topk_idx, num_experts)


def _part_bytes(parts) -> list:
    return [int(np.prod(p.shape[1:])) * p.dtype.itemsize for p in parts]


def _received_parts(parts, rows: int) -> tuple:
    """The results of `rows` received rows of `parts`: the rows, and FP8 scales or an absent result."""
    scales = parts[1] if len(parts) == 2 else None
    return (_shape(parts[0], rows), optional_result(None if scales is None else (rows,) + scales.shape[1:],
                                                    jnp.float32 if scales is None else scales.dtype))


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
    num_tokens, num_ranks = handle.is_token_in_rank.shape  # checked against the axis by the op
    expect_array(op, "handle.route.send_count_before", handle.route.send_count_before, ndim=2, dtypes=(jnp.int32,),
                 shape=(num_tokens, num_ranks))
    expect_array(op, "handle.route.send_offset", handle.route.send_offset, ndim=1, dtypes=(jnp.int32,),
                 shape=(num_ranks,))
    return handle.route


class IntranodeBackend:
    """Normal mode within one node over CUDA IPC: the `NormalBackend` methods on one Buffer's `CommBuffers`."""

    name = "cuda"
    mode = "intranode"

    def __init__(self, comm: runtime.CommBuffers, sm_count: Optional[int] = None):
        lib = runtime._lib()
        self.comm = comm
        self._max_channels = lib.MAX_CHANNELS // 2
        self._sm_count = sm_count  # the fewest SMs of this process's devices of the Buffer; None: unknown
        self._max_local_experts = lib.MAX_LOCAL_EXPERTS
        self.expert_grouped = IntranodeGroupedOps(self)

    @classmethod
    def open(cls, mesh, axis_name: str, num_nvl_bytes: int, keys: BufferKeys, *,
             timeout_s: float, low_latency_bytes: int = 0) -> "IntranodeBackend":
        """Allocates and maps the communication buffers of the Buffer `keys` names (collective over the
        processes of `mesh`); every wait of their kernels gives up after `timeout_s`, and `destroy()` waits
        up to `timeout_s` for the other processes. `low_latency_bytes`: the low-latency area the buffers
        also hold for `gpu.low_latency.LowLatencyBackend.within_node` (0: none)."""
        return cls(runtime.CommBuffers(mesh, axis_name, num_nvl_bytes or DEFAULT_NUM_NVL_BYTES, keys,
                                       timeout_s=timeout_s, low_latency_bytes=low_latency_bytes),
                   _sm_count(mesh))

    def destroy(self):
        self.comm.destroy()

    def failures(self) -> list:
        return self.comm.failures()

    # ---- launch shapes ------------------------------------------------------------------------
    def _ring(self, op: str, ctx: RankContext, config: Config, slot, hidden_bytes: int,
              half_ring_chunks: bool = False) -> dict:
        """The Buffer id, ring and slot attributes of an op moving rows in slots of `slot` (a `sizes`
        slot); `hidden_bytes` is what `Config.get_nvl_buffer_size_hint` takes for those rows (bf16 bytes
        of a token, f32 bytes of a grouped combine's partial row); with `half_ring_chunks`, chunks of at
        most half the ring."""
        channels = config.num_channels
        if channels > self._max_channels:
            fail(op, f"`config.num_sms` must be at most {2 * self._max_channels}, got {config.num_sms}")
        check_resident(op, config, self._sm_count)
        slots, chunk_tokens = config.num_max_nvl_chunked_recv_tokens, config.num_max_nvl_chunked_send_tokens
        need = intranode_ring_bytes(channels, ctx.num_ranks, slots, slot.bytes)
        if ctx.num_ranks > 1 and need > self.comm.ring_bytes:
            # Shrinking the ring to fit would run another config than the one asked for.
            fail(op, f"the Buffer is too small for `config.num_max_nvl_chunked_recv_tokens`={slots} at "
                     f"`config.num_sms`={config.num_sms}: the rings need {need} bytes ({channels} channels x "
                     f"{ctx.num_ranks} ranks x {slots} slots of {slot.bytes} bytes) but num_nvl_bytes="
                     f"{self.comm.num_bytes} holds {self.comm.ring_bytes}; make the Buffer with num_nvl_bytes >= "
                     f"{config.get_nvl_buffer_size_hint(hidden_bytes, ctx.num_ranks)} (config.get_nvl_buffer_size_"
                     f"hint({hidden_bytes}, {ctx.num_ranks}), as the ops check it), or pass a Config with fewer SMs "
                     "or ring slots")
        if half_ring_chunks:
            chunk_tokens = min(chunk_tokens, max(slots // 2, 1))
        ring = dict(num_channels=_i64(channels), slots=_i64(slots), chunk_tokens=_i64(chunk_tokens))
        return dict(buffer_id=_i64(self.comm.buffer_id), ring=ring, slot=struct_attribute(slot, np.int32))

    def _dispatch_ring(self, ctx: RankContext, config: Config, parts, num_topk: int) -> dict:
        """Attributes of a (cached) dispatch moving `parts` and `num_topk` ids/weights per token."""
        return self._ring("dispatch", ctx, config, dispatch_slot(_part_bytes(parts), num_topk), 2 * parts[0].shape[1])

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
        scales = parts[1] if len(parts) == 2 else None
        i32, f32 = jnp.int32, jnp.float32
        (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, recv_src_rank, send_row,
         send_count_before, send_offset, recv_rank_prefix, num_recv_tokens, per_expert) = ffi_call(
            "jax_deepep_dispatch",
            (*_received_parts(parts, n),
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
            route=IntranodeRoute(send_count_before, send_offset))
        return DispatchResult(recv_parts, recv_topk_idx, recv_topk_weights, per_expert, num_recv_tokens, handle)

    def cached_dispatch(self, ctx: RankContext, config: Config, handle: DispatchHandle, parts, topk_weights=None):
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        attrs = self._dispatch_ring(ctx, config, parts, num_topk)
        return _cached_dispatch_call("jax_deepep_cached_dispatch", ctx, attrs, parts, topk_weights,
                                     (handle.capacity, num_topk), handle)

    def combine(self, ctx: RankContext, config: Config, handle: DispatchHandle, y, topk_weights, bias):
        hidden = y.shape[1]
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        # Chunks of at most half the ring: the receiver releases its heads a chunk of tokens at a time,
        # and the sender's next chunk then still fits behind them (cuda/intranode_combine.cu, `lag`).
        attrs = self._ring("combine", ctx, config, combine_slot(hidden, num_topk), 2 * hidden, half_ring_chunks=True)
        return _combine_call("jax_deepep_combine", ctx, attrs, y, (), topk_weights, num_topk, bias, handle)


class GroupedKernelOps:
    """The expert-grouped ops (`reference.expert_grouped.ExpertGroupedOps` has their contract) on one
    mode's kernels, `backend`'s: one custom call each, whose final receivers write each token straight
    to its grouped rows; the handle's token-level routing has room for every token."""

    max_num_experts = MAX_GROUPED_EXPERTS  # normal.dispatch checks it

    def __init__(self, backend):
        self.backend = backend


class IntranodeGroupedOps(GroupedKernelOps):
    """Expert-grouped ops on the intranode kernels (IntranodeBackend)."""

    def dispatch(self, ctx: RankContext, config: Config, parts, topk_idx, topk_weights, layout: DispatchLayout,
                 num_experts: int, num_worst_tokens: int, expert_alignment: int) -> DispatchResult:
        op = "dispatch"
        if num_experts // ctx.num_ranks > self.backend._max_local_experts:
            fail(op, f"at most {self.backend._max_local_experts} experts per rank, got {num_experts // ctx.num_ranks}")
        n, num_tokens, r = num_worst_tokens, parts[0].shape[0], ctx.num_ranks
        rows, top_k = r * num_tokens, topk_idx.shape[1]
        slot, prefix_offset = grouped_dispatch_slot(_part_bytes(parts), top_k)
        attrs = self.backend._ring(op, ctx, config, slot, 2 * parts[0].shape[1])
        ids, prefix, per_expert = grouped_routing(topk_idx, num_experts)
        weights = jnp.ones(ids.shape, jnp.float32) if topk_weights is None else topk_weights.astype(jnp.float32)
        scales = parts[1] if len(parts) == 2 else None
        i32, f32 = jnp.int32, jnp.float32
        (recv_x, recv_scales, expert, weight, token_row, pair_row, recv_src_idx, recv_src_rank, send_row,
         send_count_before, send_offset, recv_rank_prefix, num_recv_tokens, token_per_expert, num_rows,
         held) = ffi_call(
            "jax_deepep_grouped_dispatch",
            (*_received_parts(parts, n),
             jax.ShapeDtypeStruct((n,), i32), jax.ShapeDtypeStruct((n,), f32), jax.ShapeDtypeStruct((n,), i32),
             jax.ShapeDtypeStruct((rows, top_k), i32), jax.ShapeDtypeStruct((rows,), i32),
             jax.ShapeDtypeStruct((rows,), i32), jax.ShapeDtypeStruct((num_tokens, r), i32),
             jax.ShapeDtypeStruct((num_tokens, r), i32), jax.ShapeDtypeStruct((r,), i32),
             jax.ShapeDtypeStruct((r,), i32), jax.ShapeDtypeStruct((), i32),
             jax.ShapeDtypeStruct((num_experts // r,), i32), jax.ShapeDtypeStruct((), i32),
             jax.ShapeDtypeStruct((num_experts // r,), i32)),
            parts[0], optional_operand(scales, f32), ids, weights, prefix, layout.is_token_in_rank,
            layout.num_tokens_per_rank, per_expert, axis_name=ctx.axis_name, num_experts=_i64(num_experts),
            expert_alignment=_i64(expert_alignment), topk_prefix_offset=_i64(prefix_offset), **attrs)
        tokens = DispatchHandle(
            is_token_in_rank=layout.is_token_in_rank, send_row=send_row, recv_src_rank=recv_src_rank,
            recv_src_idx=recv_src_idx, recv_rank_prefix=recv_rank_prefix, num_recv_tokens=num_recv_tokens,
            num_recv_tokens_per_expert=token_per_expert, route=IntranodeRoute(send_count_before, send_offset))
        recv_parts = (recv_x,) if scales is None else (recv_x, recv_scales)
        return grouped_dispatch_result(tokens, recv_parts, expert, weight, token_row, pair_row, num_rows, held,
                                       topk_weights is not None)

    def cached_dispatch(self, ctx: RankContext, config: Config, handle: ExpertGroupedHandle, parts,
                        topk_weights=None):
        """Returns (grouped rows, f32[N] pair weights from `topk_weights [T, K]` or None)."""
        attrs = self.backend._dispatch_ring(ctx, config, parts, handle.pair_row.shape[1])
        return _cached_dispatch_call("jax_deepep_grouped_cached_dispatch", ctx, attrs, parts, topk_weights,
                                     (handle.capacity,), handle.tokens, handle.pair_row, handle.token_row)

    def combine(self, ctx: RankContext, config: Config, handle: ExpertGroupedHandle, y, topk_weights, bias,
                row_weights=None):
        """(bf16 [T, H]: per token, the sum over its pairs of row_weights[row] * y[row] (unweighted without
        `row_weights`) plus `bias`, in f32 and rounded once; f32 [T, K] or None: for each (t, k) the
        `topk_weights [N]` of its pair's row)."""
        hidden = y.shape[1]
        top_k = handle.pair_row.shape[1]
        # As the plain combine: chunks of at most half the ring (IntranodeBackend.combine says why).
        attrs = self.backend._ring("combine", ctx, config, grouped_combine_slot(hidden, top_k),
                                   GROUPED_COMBINE_CHANNEL_BYTES * hidden, half_ring_chunks=True)
        row_weights = optional_operand(None if row_weights is None else row_weights.astype(jnp.float32), jnp.float32)
        return _combine_call("jax_deepep_grouped_combine", ctx, attrs, y, (row_weights,), topk_weights, top_k, bias,
                             handle.tokens, handle.pair_row)
