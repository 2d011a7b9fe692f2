"""JAX-native formulations of the expert-parallel exchange: what the bench compares the
`Buffer` ops against. Called per shard, inside `jax.shard_map` over `axis_name`.

Normal mode, three transports, one shared plan:
  * `padded`: one `all_to_all` of fixed-size blocks, `[R, C, H]` with C = min(T, N).
  * `ragged`: one `ragged_all_to_all` of the rows sorted by destination (no padding on the
    wire, received rows land compact), each peer's rows split into many updates so that XLA's
    copy kernel gets enough blocks. Not implemented by XLA:CPU.
  * `ring`:   R - 1 `ppermute`s of one block each (shift k sends to rank + k), which XLA may
    overlap with the gathers of the next block.

What keeps them fast (the naive versions ran 100x slower than a copy): no scatter or sort
touches token rows. The plan is small int32 work (cumulative sums, one scatter of T * R slot
numbers), every movement of rows is a gather (`jnp.take`) of whole rows, the receiver compacts
with one more gather (XLA composes the two where no collective sits between them), and combine
sums its R gathers in one fused f32 expression. `as_words=True` moves rows as uint32 words.
docs/PERFORMANCE.md has the measurements behind each choice.

Receive order is the same as `Buffer.dispatch`: rows ordered by (source rank, source token).
Low-latency mode (`low_latency_dispatch` / `low_latency_combine`) moves only the valid
(token, expert) pairs and writes them into a caller-provided (donated) receive buffer, the way a
decoding loop keeps its buffers.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .routing import valid_expert_ids
from .types import DispatchLayout, pytree_dataclass

TRANSPORTS = ("padded", "ragged", "ring")


def _exclusive_cumsum(a, axis=0):
    return jnp.cumsum(a, axis=axis, dtype=jnp.int32) - a


def _take_rows(a, rows):
    """a[rows]; rows out of range (the padding sentinel) read zeros."""
    return jnp.take(a, rows, axis=0, mode="fill", fill_value=0)


def uint32_view(a):
    """View rows of `a` as uint32 words (XLA's gathers move 4-byte elements faster than 1- or
    2-byte ones) and return the inverse view; rows whose size is no multiple of 4 stay as they are."""
    per_word = 4 // a.dtype.itemsize
    row_elems = int(np.prod(a.shape[1:], dtype=np.int64))
    if a.dtype.itemsize > 4 or a.dtype.itemsize * row_elems % 4:
        return a, lambda w: w
    shape, dtype = a.shape, a.dtype
    flat = a.reshape(shape[0], row_elems // per_word, per_word) if per_word > 1 else a.reshape(shape[0], -1)
    words = jax.lax.bitcast_convert_type(flat, jnp.uint32)

    def restore(w):
        out = jax.lax.bitcast_convert_type(w, dtype)
        return out.reshape(w.shape[0], *shape[1:])

    return words, restore


def _block_of(row, starts):
    """For each entry of `row`, the index of the block (given by ascending `starts`) it lies in."""
    return jnp.sum(row[..., None] >= starts[1:], axis=-1, dtype=jnp.int32)


# ---- normal mode --------------------------------------------------------------------------------

@pytree_dataclass()
class ExchangePlan:
    """Where every row goes, for one rank; pure int32 bookkeeping (no token data).

    C = block capacity = min(T, N). "Sent" counts are clipped to what the receiver can keep.
    """

    send_pos: jax.Array  # [T, R]: slot of token t in its block for rank d, -1 if not sent
    send_table: jax.Array  # [R, C]: source token of slot j of block d, T for an empty slot
    send_counts: jax.Array  # [R]: rows this rank sends to each rank
    offset_on_dest: jax.Array  # [R]: first receive row of this rank's block on each rank
    recv_counts: jax.Array  # [R]: rows received from each source rank
    recv_prefix: jax.Array  # [R]: first receive row of each source rank's block
    recv_block_row: jax.Array  # [N]: index into the received [R_src * C] blocks, or R*C (padding)
    num_recv_tokens: jax.Array  # []: true number of received tokens (may exceed N)


def make_plan(layout: DispatchLayout, axis_name: str, capacity: int) -> ExchangePlan:
    in_rank = layout.is_token_in_rank
    num_tokens, num_ranks = in_rank.shape
    block = min(num_tokens, capacity)
    rank = jax.lax.axis_index(axis_name)
    counts = jax.lax.all_gather(layout.num_tokens_per_rank, axis_name)  # [R_src, R_dst]
    prefix = _exclusive_cumsum(counts, axis=0)  # block start of src on dst
    kept = jnp.clip(capacity - prefix, 0, counts)  # rows past N are dropped by the receiver

    send_counts = kept[rank]
    send_pos = jnp.cumsum(in_rank, axis=0, dtype=jnp.int32) - 1
    send_pos = jnp.where(in_rank & (send_pos < send_counts[None, :]), send_pos, -1)
    # Invert send_pos with a scatter of T * R int32s (a sort of the flags costs 24 us on an H100).
    dest = jnp.broadcast_to(jnp.arange(num_ranks, dtype=jnp.int32), send_pos.shape)
    token = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None], send_pos.shape)
    send_table = jnp.full((num_ranks, block), num_tokens, jnp.int32).at[
        dest, jnp.where(send_pos >= 0, send_pos, block)].set(token, mode="drop", unique_indices=True)

    recv_counts, recv_prefix = kept[:, rank], prefix[:, rank]
    num_recv_tokens = jnp.sum(counts[:, rank], dtype=jnp.int32)
    row = jnp.arange(capacity, dtype=jnp.int32)
    src = _block_of(row, recv_prefix)
    j = row - recv_prefix[src]
    recv_block_row = jnp.where(j < recv_counts[src], src * block + j, num_ranks * block)
    return ExchangePlan(send_pos, send_table, send_counts, prefix[rank], recv_counts, recv_prefix,
                        recv_block_row, num_recv_tokens)


@pytree_dataclass()
class BaselineDispatch:
    recv_parts: tuple  # each [N, ...]: rows [0, num_recv_tokens) valid
    recv_topk_idx: jax.Array  # i32[N, K] local expert ids, -1 elsewhere
    recv_topk_weights: jax.Array  # f32[N, K]
    num_recv_tokens: jax.Array
    plan: ExchangePlan


@pytree_dataclass()
class BaselineCombine:
    combined_x: jax.Array  # bf16 [T, H]
    return_buffer: Optional[jax.Array]  # ragged only: the [R * C, H] rows that came back (donatable)


def _pack_topk(topk_idx, topk_weights):
    """One int32 [T, 2K] payload for ids and weights: a single small exchange."""
    return jnp.concatenate([topk_idx, jax.lax.bitcast_convert_type(topk_weights, jnp.int32)], axis=1)


def _unpack_topk(packed, rank, num_experts: int, num_ranks: int, live):
    top_k = packed.shape[1] // 2
    ids = packed[:, :top_k]
    experts_per_rank = num_experts // num_ranks
    local = ids - rank * experts_per_rank
    mine = live[:, None] & (ids >= 0) & (local >= 0) & (local < experts_per_rank)
    weights = jax.lax.bitcast_convert_type(packed[:, top_k:], jnp.float32)
    return jnp.where(mine, local, -1), jnp.where(mine, weights, 0.0)


def ring_shift(a, axis_name: str, num_ranks: int, shift: int):
    """Rank i's `a` arrives on rank i + shift (cyclic)."""
    return jax.lax.ppermute(a, axis_name, [(i, (i + shift) % num_ranks) for i in range(num_ranks)])


def _forward_padded(plan: ExchangePlan, part, axis_name: str, buffer):
    num_ranks, block = plan.send_table.shape
    send = _take_rows(part, plan.send_table.reshape(-1)).reshape(num_ranks, block, *part.shape[1:])
    recv = jax.lax.all_to_all(send, axis_name, 0, 0).reshape(num_ranks * block, *part.shape[1:])
    return _take_rows(recv, plan.recv_block_row)


def _forward_ring(plan: ExchangePlan, part, axis_name: str, buffer):
    num_ranks, block = plan.send_table.shape
    rank = jax.lax.axis_index(axis_name)
    received = []
    for shift in range(num_ranks):  # block k comes from rank - k
        dest = (rank + shift) % num_ranks
        blk = _take_rows(part, jax.lax.dynamic_index_in_dim(plan.send_table, dest, keepdims=False))
        received.append(ring_shift(blk, axis_name, num_ranks, shift) if shift else blk)
    stacked = jnp.concatenate(received, axis=0)
    # Receive row in source-rank order -> position in the shift order.
    src, j = plan.recv_block_row // block, plan.recv_block_row % block
    shift_row = jnp.where(src < num_ranks, ((rank - src) % num_ranks) * block + j, num_ranks * block)
    return _take_rows(stacked, shift_row)


# XLA's one-shot ragged-all-to-all kernel runs one 128-thread block per update: a single update
# per peer copies 58 MB in 22 ms on an H100. Splitting every peer's rows into chunks gives it
# about this many blocks in all.
RAGGED_UPDATES = 1024


def _ragged_exchange(operand, output, send_start, send_counts, offset_on_dest, recv_counts, axis_name):
    """`ragged_all_to_all` with each peer's rows split into U contiguous chunks (U updates per
    peer); chunk u of a block of n rows covers rows [u * ceil(n / U), ...)."""
    num_ranks = send_counts.shape[0]
    updates = max(1, min(RAGGED_UPDATES // num_ranks, operand.shape[0]))
    u = jnp.arange(updates, dtype=jnp.int32)

    def chunks(counts):
        size = (counts + updates - 1) // updates
        start = u[None, :] * size[:, None]
        return start, jnp.clip(counts[:, None] - start, 0, size[:, None])

    send_off, send_sizes = chunks(send_counts)
    _, recv_sizes = chunks(recv_counts)  # the sender splits the same count the same way
    return jax.lax.ragged_all_to_all(
        operand, output, (send_start[:, None] + send_off).reshape(-1), send_sizes.reshape(-1),
        (offset_on_dest[:, None] + send_off).reshape(-1), recv_sizes.reshape(-1), axis_name=axis_name)


def _sorted_send_rows(plan: ExchangePlan):
    """[R * C] source tokens sorted by destination, blocks back to back (T past the end)."""
    num_ranks, block = plan.send_table.shape
    starts = _exclusive_cumsum(plan.send_counts)
    p = jnp.arange(num_ranks * block, dtype=jnp.int32)
    dest = _block_of(p, starts)
    j = p - starts[dest]
    token = plan.send_table[dest, jnp.minimum(j, block - 1)]
    return jnp.where(j < plan.send_counts[dest], token, plan.send_pos.shape[0]), starts


def _forward_ragged(plan: ExchangePlan, part, axis_name: str, buffer):
    rows, starts = _sorted_send_rows(plan)
    operand = _take_rows(part, rows)
    if buffer is None:
        buffer = jnp.zeros((plan.recv_block_row.shape[0], *part.shape[1:]), part.dtype)
    return _ragged_exchange(operand, buffer, starts, plan.send_counts, plan.offset_on_dest, plan.recv_counts,
                            axis_name)


_FORWARD = {"padded": _forward_padded, "ragged": _forward_ragged, "ring": _forward_ring}


def _move(move, payload, buffer, as_words: bool):
    """Run `move(payload, buffer)` on the rows viewed as uint32 words when `as_words`."""
    if not as_words:
        return move(payload, buffer)
    words, restore = uint32_view(payload)
    return restore(move(words, None if buffer is None else uint32_view(buffer)[0]))


def dispatch(transport: str, x, topk_idx, topk_weights, layout: DispatchLayout, *, axis_name: str,
             num_experts: int, capacity: Optional[int] = None, recv_buffers: Optional[tuple] = None,
             as_words: bool = False) -> BaselineDispatch:
    """Dispatch `x` (bf16 [T, H] or an (fp8, scales) pair) with `transport`; rows ordered by
    (source rank, source token), as `Buffer.dispatch`.

    `recv_buffers` (ragged only): arrays shaped like `recv_parts` that the exchange writes into;
    donating the previous call's `recv_parts` saves zero-filling the receive rows every call.
    `as_words`: move rows as uint32 words instead of their own dtype.
    """
    parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if recv_buffers is not None and transport != "ragged":
        raise ValueError(f"recv_buffers is for the ragged transport only, not {transport!r}")
    buffers = tuple(recv_buffers) if recv_buffers is not None else (None,) * len(parts)
    num_tokens, num_ranks = layout.is_token_in_rank.shape
    capacity = num_ranks * num_tokens if capacity is None else capacity
    plan = make_plan(layout, axis_name, capacity)
    forward = _FORWARD[transport]

    def move(payload, buffer):
        return forward(plan, payload, axis_name, buffer)

    idx = valid_expert_ids(topk_idx, num_experts)
    packed_topk = _pack_topk(idx, topk_weights.astype(jnp.float32))
    recv = tuple(_move(move, p, b, as_words) for p, b in zip((*parts, packed_topk), (*buffers, None)))
    live = jnp.arange(capacity) < jnp.minimum(plan.num_recv_tokens, capacity)
    recv_idx, recv_w = _unpack_topk(recv[-1], jax.lax.axis_index(axis_name), num_experts, num_ranks, live)
    return BaselineDispatch(recv[:-1], recv_idx, recv_w, plan.num_recv_tokens, plan)


def _return_table(plan: ExchangePlan):
    """[R, C]: receive row that goes back in slot j of the block for rank d (N if none)."""
    num_ranks, block = plan.send_table.shape
    j = jnp.arange(block, dtype=jnp.int32)
    rows = plan.recv_prefix[:, None] + j[None, :]
    return jnp.where(j[None, :] < plan.recv_counts[:, None], rows, plan.recv_block_row.shape[0])


def _sum_blocks(blocks, plan: ExchangePlan, block_of_rank):
    """sum over d of blocks[block_of_rank(d) rows][send_pos[:, d]] in f32: one fused pass."""
    num_ranks, block = plan.send_table.shape
    total = None
    for d in range(num_ranks):
        pos = plan.send_pos[:, d]
        row = jnp.where(pos >= 0, block_of_rank(d) * block + pos, blocks.shape[0])
        term = _take_rows(blocks, row).astype(jnp.float32)
        total = term if total is None else total + term
    return total


def _return_padded(plan: ExchangePlan, y, axis_name: str, buffer):
    num_ranks, block = plan.send_table.shape
    send = _take_rows(y, _return_table(plan).reshape(-1)).reshape(num_ranks, block, *y.shape[1:])
    return jax.lax.all_to_all(send, axis_name, 0, 0).reshape(num_ranks * block, *y.shape[1:])


def _return_ring(plan: ExchangePlan, y, axis_name: str, buffer):
    """Blocks in shift order: block k comes back from rank - k."""
    num_ranks, block = plan.send_table.shape
    rank = jax.lax.axis_index(axis_name)
    table = _return_table(plan)
    received = []
    for shift in range(num_ranks):
        blk = _take_rows(y, jax.lax.dynamic_index_in_dim(table, (rank + shift) % num_ranks, keepdims=False))
        received.append(ring_shift(blk, axis_name, num_ranks, shift) if shift else blk)
    return jnp.concatenate(received, axis=0)


def _return_ragged(plan: ExchangePlan, y, axis_name: str, buffer):
    num_ranks, block = plan.send_table.shape
    if buffer is None:
        buffer = jnp.zeros((num_ranks * block, *y.shape[1:]), y.dtype)
    # The return buffer holds the block of expert rank r at r * C: this rank's block lands at rank * C.
    offsets = jnp.full((num_ranks,), jax.lax.axis_index(axis_name) * block, jnp.int32)
    return _ragged_exchange(y, buffer, plan.recv_prefix, plan.recv_counts, offsets, plan.send_counts, axis_name)


_RETURN = {"padded": _return_padded, "ragged": _return_ragged, "ring": _return_ring}


def combine(transport: str, y, plan: ExchangePlan, *, axis_name: str, return_buffer=None,
            as_words: bool = False) -> BaselineCombine:
    """combined[t] = sum over ranks d that received token t of y_d[its row], in f32, once to bf16.

    `return_buffer` (ragged only): the previous call's `return_buffer`, to donate.
    """
    if return_buffer is not None and transport != "ragged":
        raise ValueError(f"return_buffer is for the ragged transport only, not {transport!r}")
    num_ranks = plan.send_table.shape[0]
    # Only rows below min(num_recv_tokens, N) are ever read: no masking pass over y.
    back = _move(lambda payload, buffer: _RETURN[transport](plan, payload, axis_name, buffer), y,
                 return_buffer, as_words)
    if transport == "ring":
        rank = jax.lax.axis_index(axis_name)
        combined = _sum_blocks(back, plan, lambda d: (rank - d) % num_ranks)
    else:
        combined = _sum_blocks(back, plan, lambda d: d)
    return BaselineCombine(combined.astype(y.dtype), back if transport == "ragged" else None)


# ---- low-latency mode ---------------------------------------------------------------------------

@pytree_dataclass()
class LowLatencyPlan:
    """Bookkeeping of one low-latency dispatch, reused by its combine.

    P = T * K: most (token, expert) pairs one rank can send to one rank.
    """

    recv_expert: jax.Array  # [R_src, P]: local expert of each received pair slot (E_l if empty)
    recv_row: jax.Array  # [R_src, P]: its row in that expert's [R * M] block
    send_flat: jax.Array  # [T, K]: slot of pair (t, k) in the [R_dst * P] send blocks, R*P if none
    recv_count: jax.Array  # i32 [E_l]
    recv_layout_range: jax.Array  # i32 [E_l, R, 2]: (offset, count) per source rank


@pytree_dataclass()
class BaselineLowLatencyDispatch:
    recv_x: jax.Array  # bf16 [E_l, R * M, H]; rows past recv_count keep the buffer's old data
    plan: LowLatencyPlan


def _pairs_by_expert(idx, num_experts: int):
    """Stable order of the (t, k) pairs by expert (invalid last), and each pair's sorted position."""
    flat = jnp.where(idx >= 0, idx, num_experts).reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    position = jnp.argsort(order).astype(jnp.int32).reshape(idx.shape)
    return order, position


def low_latency_dispatch(x, topk_idx, recv_buffer, *, axis_name: str,
                         num_experts: int) -> BaselineLowLatencyDispatch:
    """BF16 low-latency dispatch into `recv_buffer` (bf16 [E_l, R * M, H]; donate it to `jax.jit`
    so that only the valid rows are written, in place)."""
    num_tokens, top_k = topk_idx.shape
    num_local = recv_buffer.shape[0]
    num_ranks = num_experts // num_local
    pairs = num_tokens * top_k
    idx = valid_expert_ids(topk_idx, num_experts)
    order, position = _pairs_by_expert(idx, num_experts)

    per_expert = jnp.bincount(jnp.where(idx >= 0, idx, num_experts).reshape(-1),
                              length=num_experts + 1)[:num_experts].astype(jnp.int32)
    per_rank_expert = per_expert.reshape(num_ranks, num_local)
    rank_start = _exclusive_cumsum(jnp.sum(per_rank_expert, axis=1, dtype=jnp.int32))  # in sorted order
    rank_count = jnp.sum(per_rank_expert, axis=1, dtype=jnp.int32)

    # Send block d, slot j = sorted pair rank_start[d] + j (pairs of one rank are contiguous).
    j = jnp.arange(pairs, dtype=jnp.int32)
    sorted_pos = rank_start[:, None] + j[None, :]
    src_token = order[jnp.minimum(sorted_pos, order.shape[0] - 1)] // top_k
    src_token = jnp.where(j[None, :] < rank_count[:, None], src_token, num_tokens)
    send = _take_rows(x, src_token.reshape(-1)).reshape(num_ranks, pairs, x.shape[1])
    recv = jax.lax.all_to_all(send, axis_name, 0, 0)  # [R_src, P, H], by (local expert, token)
    counts = jax.lax.all_to_all(per_rank_expert, axis_name, 0, 0)  # [R_src, E_l]

    offsets = _exclusive_cumsum(counts, axis=0)  # [R_src, E_l]: row of src's first pair per expert
    starts_in_block = _exclusive_cumsum(counts, axis=1)  # [R_src, E_l]
    expert = jax.vmap(_block_of)(jnp.broadcast_to(j, (num_ranks, pairs)), starts_in_block)
    k_in_expert = j[None, :] - jnp.take_along_axis(starts_in_block, expert, axis=1)
    valid = j[None, :] < jnp.sum(counts, axis=1, dtype=jnp.int32)[:, None]
    recv_expert = jnp.where(valid, expert, num_local)
    recv_row = jnp.take_along_axis(offsets, expert, axis=1) + k_in_expert
    recv_x = recv_buffer.at[recv_expert.reshape(-1), recv_row.reshape(-1)].set(
        recv.reshape(-1, x.shape[1]), mode="drop", unique_indices=True)

    sent = idx >= 0
    dest = jnp.where(sent, idx // num_local, 0)
    send_flat = jnp.where(sent, dest * pairs + position - rank_start[dest], num_ranks * pairs)
    recv_count = jnp.sum(counts, axis=0, dtype=jnp.int32)
    layout_range = jnp.stack([offsets.T, counts.T], axis=-1)
    return BaselineLowLatencyDispatch(
        recv_x, LowLatencyPlan(recv_expert, recv_row, send_flat, recv_count, layout_range))


def low_latency_combine(y, topk_weights, plan: LowLatencyPlan, *, axis_name: str):
    """combined[t] = sum_k w[t, k] * y[expert's row of (t, k)], in f32, once to bf16."""
    num_ranks, pairs = plan.recv_expert.shape
    weights = jnp.where(plan.send_flat < num_ranks * pairs, topk_weights.astype(jnp.float32), 0.0)
    hidden = y.shape[-1]
    flat = plan.recv_expert * y.shape[1] + plan.recv_row  # past the end where the slot is empty
    send = _take_rows(y.reshape(-1, hidden), flat.reshape(-1)).reshape(num_ranks, pairs, hidden)
    back = jax.lax.all_to_all(send, axis_name, 0, 0).reshape(num_ranks * pairs, hidden)
    total = None
    for k in range(plan.send_flat.shape[1]):
        term = weights[:, k, None] * _take_rows(back, plan.send_flat[:, k]).astype(jnp.float32)
        total = term if total is None else total + term
    return total.astype(y.dtype)
