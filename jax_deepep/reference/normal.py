"""Pure-JAX normal mode: layout, dispatch, cached dispatch and combine, per shard.

The exchange is one padded `all_to_all` per payload. A sender packs the rows for rank d into
slot block d (capacity C = min(T, N) rows: no receiver can keep more than that of one sender),
and a receiver compacts the blocks into rows ordered by (source rank, source token index).
Everything is gathers and cumulative sums; the only scatters move int32 token indices.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..backend import DispatchResult, RankContext
from ..routing import valid_expert_ids
from ..types import DispatchHandle, DispatchLayout
from ..varying import vary_like


def get_dispatch_layout(ctx: RankContext, topk_idx, num_experts: int) -> DispatchLayout:
    idx = valid_expert_ids(topk_idx, num_experts)
    experts_per_rank = num_experts // ctx.num_ranks
    num_tokens_per_expert = jnp.bincount(jnp.where(idx >= 0, idx, num_experts).ravel(),
                                         length=num_experts + 1)[:num_experts].astype(jnp.int32)
    dest_rank = jnp.where(idx >= 0, idx // experts_per_rank, -1)
    is_token_in_rank = jnp.any(dest_rank[:, :, None] == jnp.arange(ctx.num_ranks)[None, None, :], axis=1)
    num_tokens_per_rank = jnp.sum(is_token_in_rank, axis=0, dtype=jnp.int32)
    num_tokens_per_rdma_rank = None
    if ctx.num_nodes > 1:
        in_node = jnp.any(is_token_in_rank.reshape(-1, ctx.num_nodes, ctx.ranks_per_node), axis=2)
        num_tokens_per_rdma_rank = jnp.sum(in_node, axis=0, dtype=jnp.int32)
    return DispatchLayout(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert,
                          is_token_in_rank)


def _send_slots(is_token_in_rank):
    """Position of each token inside its block for each destination, -1 if not sent."""
    pos = jnp.cumsum(is_token_in_rank, axis=0, dtype=jnp.int32) - 1
    return jnp.where(is_token_in_rank, pos, -1)


def _send_table(is_token_in_rank, capacity: int):
    """i32[R, C]: which source token fills slot j of block d (T where the slot is empty)."""
    num_tokens, num_ranks = is_token_in_rank.shape
    pos = _send_slots(is_token_in_rank)
    dest = jnp.broadcast_to(jnp.arange(num_ranks, dtype=jnp.int32), pos.shape)
    slot = jnp.where(pos >= 0, pos, capacity)  # out of range: dropped by the scatter
    token = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None], pos.shape)
    table = jnp.full((num_ranks, capacity), num_tokens, jnp.int32)
    return table.at[dest, slot].set(token, mode="drop")


def gather_rows(a, rows):
    """a[rows] with out-of-range rows, negative ones included, giving zeros (jnp.take would wrap -1)."""
    if a.shape[0] == 0:  # every row is out of range (T = 0 or N = 0); jnp.take refuses an empty axis
        return vary_like(jnp.zeros(rows.shape + a.shape[1:], a.dtype), a, rows)
    rows = jnp.where(rows < 0, a.shape[0], rows)
    return jnp.take(a, rows, axis=0, mode="fill", fill_value=0)


def _forward(ctx: RankContext, handle: DispatchHandle, payload):
    """Move per-token rows `payload [T, ...]` to the receive layout `[N, ...]`."""
    num_tokens = handle.is_token_in_rank.shape[0]
    capacity = min(num_tokens, handle.capacity)
    table = _send_table(handle.is_token_in_rank, capacity)
    send = gather_rows(payload, table)  # [R, C, ...]
    recv = jax.lax.all_to_all(send, ctx.axis_name, 0, 0)  # [R_src, C, ...]
    recv = recv.reshape(ctx.num_ranks * capacity, *payload.shape[1:])
    return gather_rows(recv, _recv_flat_rows(handle, capacity))


def _recv_flat_rows(handle: DispatchHandle, capacity: int):
    """For each receive row, its index in the flattened [R_src * C] exchange buffer (or -1)."""
    src = handle.recv_src_rank
    row = jnp.arange(handle.capacity, dtype=jnp.int32)
    j = row - jnp.take(handle.recv_rank_prefix, jnp.maximum(src, 0))
    return jnp.where(src >= 0, src * capacity + j, -1)


def _backward(ctx: RankContext, handle: DispatchHandle, rows, accumulate_dtype, bf16_partials: bool = False):
    """Sum receive rows `rows [N, ...]` back onto their source tokens: `[T, ...]`. As the internode
    kernels sum: per node, its ranks' rows in rank order (the node's partial, rounded to bf16 with
    `bf16_partials`), then the partials in node order."""
    num_tokens, num_ranks = handle.is_token_in_rank.shape
    capacity = min(num_tokens, handle.capacity)
    # Slot (s, j) of the return buffer holds receive row prefix[s] + j when that row exists.
    flat = _recv_flat_rows(handle, capacity)
    inverse = jnp.full((num_ranks * capacity,), -1, jnp.int32)
    inverse = inverse.at[jnp.where(flat >= 0, flat, num_ranks * capacity)].set(
        jnp.arange(handle.capacity, dtype=jnp.int32), mode="drop")
    send = gather_rows(rows, inverse).reshape(num_ranks, capacity, *rows.shape[1:])
    back = jax.lax.all_to_all(send, ctx.axis_name, 0, 0)  # [R_dst, C, ...]
    back = back.reshape(num_ranks * capacity, *rows.shape[1:])
    pos = _send_slots(handle.is_token_in_rank)
    flat_back = jnp.where((pos >= 0) & (pos < capacity), jnp.arange(num_ranks) * capacity + pos, -1)
    # Accumulate one destination at a time: memory stays O(T * H), not O(T * R * H).
    def add_rank(d, acc):
        return acc + gather_rows(back, flat_back[:, d]).astype(accumulate_dtype)

    def add_node(node, acc):
        first = node * ctx.ranks_per_node
        partial = jax.lax.fori_loop(first + 1, first + ctx.ranks_per_node, add_rank, add_rank(first, 0))
        if bf16_partials:
            # reduce_precision, unlike a cast to bf16 and back, survives XLA's excess-precision rewrites.
            partial = jax.lax.reduce_precision(partial, exponent_bits=8, mantissa_bits=7)
        return acc + partial

    return jax.lax.fori_loop(1, ctx.num_nodes, add_node, add_node(0, 0))


def _make_handle(ctx: RankContext, layout: DispatchLayout, num_experts: int, capacity: int,
                 expert_alignment: int) -> DispatchHandle:
    rank = ctx.rank()
    counts = jax.lax.all_gather(layout.num_tokens_per_rank, ctx.axis_name)  # [R_src, R_dst]
    prefix = jnp.cumsum(counts, axis=0, dtype=jnp.int32) - counts  # block start of src on dst
    my_offset_on_dest = prefix[rank]  # [R_dst]
    pos = _send_slots(layout.is_token_in_rank)
    send_row = jnp.where(pos >= 0, my_offset_on_dest[None, :] + pos, -1)

    recv_counts = counts[:, rank]
    recv_rank_prefix = prefix[:, rank]
    num_recv_tokens = jnp.sum(recv_counts, dtype=jnp.int32)
    row = jnp.arange(capacity, dtype=jnp.int32)
    src = jnp.searchsorted(recv_rank_prefix + recv_counts, row, side="right").astype(jnp.int32)
    recv_src_rank = jnp.where(row < num_recv_tokens, src, -1)

    experts_per_rank = num_experts // ctx.num_ranks
    per_expert = jax.lax.all_to_all(layout.num_tokens_per_expert.reshape(ctx.num_ranks, experts_per_rank),
                                    ctx.axis_name, 0, 0)
    per_expert = jnp.sum(per_expert, axis=0, dtype=jnp.int32)
    per_expert = (per_expert + expert_alignment - 1) // expert_alignment * expert_alignment

    handle = DispatchHandle(
        is_token_in_rank=layout.is_token_in_rank, send_row=send_row, recv_src_rank=recv_src_rank,
        recv_src_idx=jnp.full((capacity,), -1, jnp.int32), recv_rank_prefix=recv_rank_prefix,
        num_recv_tokens=num_recv_tokens, num_recv_tokens_per_expert=per_expert)
    token_index = jnp.arange(layout.is_token_in_rank.shape[0], dtype=jnp.int32)
    recv_src_idx = jnp.where(recv_src_rank >= 0, _forward(ctx, handle, token_index), -1)
    return dataclasses.replace(handle, recv_src_idx=recv_src_idx)


def dispatch(ctx: RankContext, config, parts, topk_idx, topk_weights, layout: DispatchLayout,
             num_experts: int, num_worst_tokens: int, expert_alignment: int) -> DispatchResult:
    del config
    handle = _make_handle(ctx, layout, num_experts, num_worst_tokens, expert_alignment)
    recv_parts = tuple(_forward(ctx, handle, p) for p in parts)
    recv_topk_idx = recv_topk_weights = None
    if topk_idx is not None:
        experts_per_rank = num_experts // ctx.num_ranks
        recv_global = _forward(ctx, handle, valid_expert_ids(topk_idx, num_experts))
        local = recv_global - ctx.rank() * experts_per_rank  # relative to this (receiving) rank
        mine = (handle.recv_src_rank[:, None] >= 0) & (recv_global >= 0) & (local >= 0) & (local < experts_per_rank)
        recv_topk_idx = jnp.where(mine, local, -1)
        if topk_weights is not None:
            w = _forward(ctx, handle, topk_weights.astype(jnp.float32))
            recv_topk_weights = jnp.where(recv_topk_idx >= 0, w, 0.0)
    return DispatchResult(recv_parts, recv_topk_idx, recv_topk_weights, handle.num_recv_tokens_per_expert,
                          handle.num_recv_tokens, handle)


def cached_dispatch(ctx: RankContext, config, handle: DispatchHandle, parts, topk_weights=None):
    del config
    recv_parts = tuple(_forward(ctx, handle, p) for p in parts)
    recv_w = None if topk_weights is None else _forward(ctx, handle, topk_weights.astype(jnp.float32))
    return recv_parts, recv_w


def combine(ctx: RankContext, config, handle: DispatchHandle, y, topk_weights, bias, exact_partials: bool):
    """Over several nodes each node's partial of `y` is rounded to bf16 unless `exact_partials`; the
    weights' partials stay f32, as in the internode kernels."""
    del config
    live = (jnp.arange(handle.capacity) < handle.num_recv_tokens)[:, None]
    acc = _backward(ctx, handle, jnp.where(live, y, jnp.zeros((), y.dtype)), jnp.float32,
                    bf16_partials=ctx.num_nodes > 1 and not exact_partials)
    for b in bias:
        acc = acc + b.astype(jnp.float32)
    combined_w = None
    if topk_weights is not None:
        combined_w = _backward(ctx, handle, jnp.where(live, topk_weights.astype(jnp.float32), 0.0),
                               jnp.float32)
    return acc.astype(y.dtype), combined_w
