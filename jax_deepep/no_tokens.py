"""The backend of calls with no tokens (T = 0), normal and low-latency mode.

T is a static shape, the same on every rank of the axis, so with T = 0 no rank sends anything and
every result is known without a custom call or a collective: no received rows, zero counts, empty
combines. The ops (normal.py, low_latency.py) hand such calls to this backend whatever the Buffer's
backends are, so neither the kernels nor the XLA collectives are ever asked to move nothing (XLA's
Shardy partitioner fails to compile some programs whose collectives move zero-size arrays).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .backend import DispatchResult, LowLatencyOptions, RankContext
from .reference.expert_grouped import ExpertGroupedOps
from .types import DispatchHandle, DispatchLayout
from .varying import mark_varying


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class NoTokensTransit:
    """What a low-latency send with no tokens hands its receive: its inputs, whose shapes make the
    results (and which tell low_latency.py that this backend, not the Buffer's, receives it)."""
    inputs: dict


class NoTokensBackend:
    name = "no_tokens"
    mode = "no_tokens"

    def __init__(self):
        self.expert_grouped = ExpertGroupedOps(self)

    def destroy(self):
        pass

    def get_dispatch_layout(self, ctx: RankContext, topk_idx, num_experts: int) -> DispatchLayout:
        r, i32 = ctx.num_ranks, jnp.int32
        per_node = jnp.zeros((ctx.num_nodes,), i32) if ctx.num_nodes > 1 else None
        layout = DispatchLayout(jnp.zeros((r,), i32), per_node, jnp.zeros((num_experts,), i32),
                                jnp.zeros((0, r), jnp.bool_))
        return mark_varying(layout, ctx.axis_name, topk_idx)

    def dispatch(self, ctx: RankContext, config, parts, topk_idx, topk_weights, layout: DispatchLayout,
                 num_experts: int, num_worst_tokens: int, expert_alignment: int) -> DispatchResult:
        n, r, i32 = num_worst_tokens, ctx.num_ranks, jnp.int32
        handle = DispatchHandle(
            is_token_in_rank=layout.is_token_in_rank, send_row=jnp.zeros((0, r), i32),
            recv_src_rank=jnp.full((n,), -1, i32), recv_src_idx=jnp.full((n,), -1, i32),
            recv_rank_prefix=jnp.zeros((r,), i32), num_recv_tokens=jnp.zeros((), i32),
            num_recv_tokens_per_expert=jnp.zeros((num_experts // r,), i32))
        recv_topk_idx = None if topk_idx is None else jnp.full((n, topk_idx.shape[1]), -1, i32)
        recv_topk_weights = None if topk_weights is None else jnp.zeros((n, topk_weights.shape[1]), jnp.float32)
        recv_parts, recv_topk_idx, recv_topk_weights, handle = mark_varying(
            (self._rows(parts, n), recv_topk_idx, recv_topk_weights, handle), ctx.axis_name, parts, topk_idx,
            topk_weights, layout)
        return DispatchResult(recv_parts, recv_topk_idx, recv_topk_weights, handle.num_recv_tokens_per_expert,
                              handle.num_recv_tokens, handle)

    def cached_dispatch(self, ctx: RankContext, config, handle: DispatchHandle, parts, topk_weights=None):
        n = handle.capacity
        weights = None if topk_weights is None else jnp.zeros((n, topk_weights.shape[1]), jnp.float32)
        return mark_varying((self._rows(parts, n), weights), ctx.axis_name, parts, topk_weights, handle)

    def combine(self, ctx: RankContext, config, handle: DispatchHandle, y, topk_weights, bias):
        weights = None if topk_weights is None else jnp.zeros((0, topk_weights.shape[1]), jnp.float32)
        return mark_varying((jnp.zeros((0, y.shape[1]), y.dtype), weights), ctx.axis_name, y, topk_weights, handle)

    def low_latency_dispatch_send(self, ctx: RankContext, opts: LowLatencyOptions, x, topk_idx) -> NoTokensTransit:
        return NoTokensTransit({"x": x, "topk_idx": topk_idx})

    def low_latency_dispatch_recv(self, ctx: RankContext, opts: LowLatencyOptions, transit: NoTokensTransit):
        x, topk_idx = transit.inputs["x"], transit.inputs["topk_idx"]
        r, i32 = ctx.num_ranks, jnp.int32
        parts = tuple(jnp.zeros(p.shape, p.dtype) for p in opts.recv_x_parts(r, x.shape[1]))
        rows = parts[0].shape[:2]
        out = (parts if len(parts) == 2 else parts[0], jnp.zeros(rows[:1], i32), jnp.full(rows, -1, i32),
               jnp.zeros(rows[:1] + (r, 2), i32), jnp.zeros(topk_idx.shape, i32))
        return mark_varying(out, ctx.axis_name, x, topk_idx)

    def low_latency_combine_send(self, ctx: RankContext, y, topk_idx, topk_weights, handle, use_logfmt: bool,
                                 zero_copy: bool) -> NoTokensTransit:
        return NoTokensTransit({"y": y, "topk_idx": topk_idx, "topk_weights": topk_weights, "handle": handle})

    def low_latency_combine_recv(self, ctx: RankContext, transit: NoTokensTransit):
        y = transit.inputs["y"]
        return mark_varying(jnp.zeros((0, y.shape[2]), y.dtype), ctx.axis_name, transit.inputs)

    @staticmethod
    def _rows(parts, n: int) -> tuple:
        return tuple(jnp.zeros((n,) + p.shape[1:], p.dtype) for p in parts)


NO_TOKENS = NoTokensBackend()


def serving(backend, num_tokens: int):
    """The backend that serves a call on `num_tokens` tokens per rank: this one when there are none."""
    return NO_TOKENS if num_tokens == 0 else backend
