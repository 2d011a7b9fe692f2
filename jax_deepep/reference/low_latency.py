"""Pure-JAX low-latency mode: per-expert receive slots, per shard.

A sender places each (token, k) pair in slot `send_slot[t, k]` of expert e's block of M rows
(pairs for one expert keep token order), exchanges the [E, M, ...] block with one `all_to_all`
(the "send"), and a receiver packs the R source blocks of each local expert back to back (the
"recv"), so rows are ordered by (source rank, source token index).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import logfmt
from ..backend import LowLatencyOptions, RankContext
from ..fp8 import per_block_cast_to_fp8
from ..rounding import round_to
from ..routing import first_occurrences, valid_expert_ids
from .normal import gather_rows


def _expert_slots(idx, num_experts: int):
    """Rank of each valid (t, k) pair among the pairs of the same expert, in (t, k) order."""
    flat = jnp.where(idx >= 0, idx, num_experts).ravel()
    order = jnp.argsort(flat, stable=True)
    sorted_experts = flat[order]
    group_start = jnp.searchsorted(sorted_experts, sorted_experts, side="left")
    rank_in_group = jnp.arange(flat.shape[0]) - group_start
    slots = jnp.zeros_like(flat).at[order].set(rank_in_group.astype(flat.dtype))
    return jnp.where(idx >= 0, slots.reshape(idx.shape), -1).astype(jnp.int32)


def dispatch_send(ctx: RankContext, opts: LowLatencyOptions, x, topk_idx) -> dict:
    num_tokens, top_k = topk_idx.shape
    m, e = opts.num_max_dispatch_tokens_per_rank, opts.num_experts
    idx = first_occurrences(valid_expert_ids(topk_idx, e))  # repeats within a token go nowhere (docs/API.md)
    send_slot = _expert_slots(idx, e)
    # table[e, j]: token in slot j of expert e's block (T when empty).
    token = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None], idx.shape)
    table = jnp.full((e, m), num_tokens, jnp.int32)
    table = table.at[jnp.where(idx >= 0, idx, e), send_slot].set(token, mode="drop")
    parts = (x,)
    if opts.use_fp8:
        parts = per_block_cast_to_fp8(x, round_scale=opts.round_scale, use_ue8m0=opts.use_ue8m0)
    counts = jnp.bincount(jnp.where(idx >= 0, idx, e).ravel(), length=e + 1)[:e].astype(jnp.int32)

    def exchange(a):  # [E, M, ...] -> [R_src, E_l, M, ...]
        a = a.reshape(ctx.num_ranks, e // ctx.num_ranks, *a.shape[1:])
        return jax.lax.all_to_all(a, ctx.axis_name, 0, 0)

    src_token = jnp.where(table < num_tokens, table, -1)
    return {
        "parts": tuple(exchange(gather_rows(p, table.ravel()).reshape(e, m, *p.shape[1:])) for p in parts),
        "src_token": exchange(src_token),
        "counts": exchange(counts),  # [R_src, E_l]
        "send_slot": send_slot,
    }


def dispatch_recv(ctx: RankContext, opts: LowLatencyOptions, transit: dict):
    m = opts.num_max_dispatch_tokens_per_rank
    counts = transit["counts"].T  # [E_l, R_src]
    offsets = jnp.cumsum(counts, axis=1, dtype=jnp.int32) - counts
    recv_count = jnp.sum(counts, axis=1, dtype=jnp.int32)
    layout_range = jnp.stack([offsets, counts], axis=-1)
    rows = jnp.arange(ctx.num_ranks * m, dtype=jnp.int32)
    src = jax.vmap(lambda ends: jnp.searchsorted(ends, rows, side="right"))(offsets + counts)
    src = src.astype(jnp.int32)  # [E_l, R*M]
    valid = rows[None, :] < recv_count[:, None]
    j = rows[None, :] - jnp.take_along_axis(offsets, jnp.minimum(src, ctx.num_ranks - 1), axis=1)
    local = jnp.arange(counts.shape[0], dtype=jnp.int32)[:, None]
    # Flat index into [R_src, E_l, M].
    flat = jnp.where(valid, (src * counts.shape[0] + local) * m + j, -1)

    def compact(a):
        a = a.reshape(-1, *a.shape[3:])
        return gather_rows(a, flat.ravel()).reshape(*flat.shape, *a.shape[1:])

    recv_parts = tuple(compact(p) for p in transit["parts"])
    recv_x = recv_parts[0] if len(recv_parts) == 1 else recv_parts
    recv_src_info = jnp.where(valid, compact(transit["src_token"]), -1)
    return recv_x, recv_count, recv_src_info, layout_range, transit["send_slot"]


def combine_send(ctx: RankContext, y, topk_idx, topk_weights, handle, use_logfmt: bool, zero_copy: bool):
    del zero_copy  # only changes how the CUDA kernels move bytes
    experts_per_rank, rows, hidden = y.shape
    m = handle.num_max_dispatch_tokens_per_rank
    offsets, counts = handle.recv_layout_range[..., 0], handle.recv_layout_range[..., 1]
    # Return block [R_dst, E_l, M]: slot j of (s, l) is receive row offsets[l, s] + j of expert l.
    j = jnp.arange(m, dtype=jnp.int32)
    row = offsets.T[:, :, None] + j  # [R, E_l, M]
    valid = j < counts.T[:, :, None]
    flat = jnp.where(valid, jnp.arange(experts_per_rank)[None, :, None] * rows + row, -1)
    send = gather_rows(y.reshape(-1, hidden), flat.ravel()).reshape(ctx.num_ranks, experts_per_rank, m, hidden)
    if use_logfmt:  # rows to other ranks arrive as the receiver decodes them; this rank's own stay exact
        own = (jnp.arange(ctx.num_ranks) == jax.lax.axis_index(ctx.axis_name))[:, None, None, None]
        send = jnp.where(own, send.astype(jnp.float32), logfmt.round_trip(send))
    back = jax.lax.all_to_all(send, ctx.axis_name, 0, 0)  # [R_dst, E_l, M, H] = [E, M, H]
    return {"back": back.reshape(-1, m, hidden), "topk_idx": topk_idx, "topk_weights": topk_weights,
            "send_slot": handle.send_slot}


def combine_recv(ctx: RankContext, transit: dict):
    del ctx
    num_experts, m, hidden = transit["back"].shape
    back, slot = transit["back"].reshape(num_experts * m, hidden), transit["send_slot"]
    idx = valid_expert_ids(transit["topk_idx"], num_experts)
    sent = (idx >= 0) & (slot >= 0)  # as the kernel: a pair dispatch did not send has no row
    flat = jnp.where(sent, idx * m + slot, -1)  # [T, K]
    w = jnp.where(sent, transit["topk_weights"].astype(jnp.float32), 0.0)

    def add_k(k, acc):
        return acc + w[:, k, None] * gather_rows(back, flat[:, k]).astype(jnp.float32)

    # y is bf16 (docs/API.md); rows that travelled as LogFMT arrive as f32
    return round_to(jax.lax.fori_loop(1, idx.shape[1], add_k, add_k(0, 0)), jnp.bfloat16)
