"""Expert-grouped normal mode in pure JAX, on top of a token-level backend (docs/API.md,
"Expert-grouped dispatch").

The tokens travel once, as in a plain dispatch with room for all of them (R * T rows); the receiver
then cuts one row per (token, local expert) pair out of them, grouped by local expert. Combine weights
the pair rows in f32, sums them per token-level row and sends those f32 rows back through the token
combine, so every token's sum is rounded to bf16 once. The token-level backend must move rows of any
dtype exactly (the pure-JAX backend and the no-tokens backend do); the CUDA kernels will write the
grouped rows directly instead.
"""
from __future__ import annotations

import jax.numpy as jnp

from ..backend import DispatchResult, RankContext, grouped_dispatch_result
from ..types import DispatchLayout, ExpertGroupedHandle
from .normal import gather_rows


def _first_occurrence(ids):
    """bool[M, K]: ids[j, k] >= 0 and no earlier k' of row j names the same id (a token that names an
    expert twice makes one pair)."""
    k = ids.shape[1]
    same = ids[:, :, None] == ids[:, None, :]  # [M, K, K']
    earlier = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]  # [K, K']: k' < k
    return (ids >= 0) & ~jnp.any(same & earlier[None], axis=2)


def _group_rows(recv_topk_idx, num_local_experts: int, capacity: int, expert_alignment: int):
    """The grouped layout of token-level receive rows whose local expert ids are `recv_topk_idx [M, K]`.

    Returns (token_row i32[N], pair_row i32[M, K], expert i32[N], rows needed, held group sizes i32[E_l]).
    """
    num_rows = recv_topk_idx.shape[0]
    experts = jnp.arange(num_local_experts, dtype=jnp.int32)
    is_pair = jnp.any(recv_topk_idx[:, :, None] == experts, axis=1)  # [M, E_l]
    counts = jnp.sum(is_pair, axis=0, dtype=jnp.int32)
    padded = (counts + expert_alignment - 1) // expert_alignment * expert_alignment
    ends = jnp.cumsum(padded, dtype=jnp.int32)
    starts = ends - padded
    rank_in_group = jnp.cumsum(is_pair, axis=0, dtype=jnp.int32) - 1
    pair_of_expert = jnp.where(is_pair, starts + rank_in_group, -1)  # [M, E_l]: grouped row, maybe >= N
    # Grouped row of each (j, k): its expert's entry of row j (repeats of an expert share its row).
    pair_row = jnp.take_along_axis(pair_of_expert, jnp.maximum(recv_topk_idx, 0), axis=1)
    pair_row = jnp.where((recv_topk_idx >= 0) & (pair_row < capacity), pair_row, -1)
    # The only scatter moves int32 token-level rows: each pair's row index into its grouped slot.
    token = jnp.broadcast_to(jnp.arange(num_rows, dtype=jnp.int32)[:, None], pair_of_expert.shape)
    token_row = jnp.full((capacity,), -1, jnp.int32).at[
        jnp.where(pair_of_expert >= 0, pair_of_expert, capacity)].set(token, mode="drop")
    row = jnp.arange(capacity, dtype=jnp.int32)
    expert = jnp.searchsorted(ends, row, side="right").astype(jnp.int32)
    expert = jnp.where(token_row >= 0, expert, -1)
    held = jnp.clip(capacity - starts, 0, padded)
    return token_row, pair_row, expert, ends[-1], held


def _pair_weights(pair_row, token_row, recv_topk_weights):
    """f32[N]: each grouped row's weight, the sum over the k that name its expert (repeats add up)."""
    row = jnp.arange(token_row.shape[0], dtype=jnp.int32)
    # [N, K]: the k of the row's token that land on this row.
    own = (gather_rows(pair_row, token_row) == row[:, None]) & (token_row >= 0)[:, None]
    return jnp.sum(jnp.where(own, gather_rows(recv_topk_weights, token_row), 0.0), axis=1)


class ExpertGroupedOps:
    """The expert-grouped dispatch, cached dispatch and combine of a token-level backend `tokens`
    (any object with the `NormalBackend` methods `dispatch`, `cached_dispatch` and `combine`)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def dispatch(self, ctx: RankContext, config, parts, topk_idx, topk_weights, layout: DispatchLayout,
                 num_experts: int, num_worst_tokens: int, expert_alignment: int) -> DispatchResult:
        num_tokens, top_k = topk_idx.shape
        all_tokens = ctx.num_ranks * num_tokens
        weights = jnp.ones((num_tokens, top_k), jnp.float32) if topk_weights is None else topk_weights
        sent = self.tokens.dispatch(ctx, config, parts, topk_idx, weights, layout, num_experts, all_tokens, 1)
        token_row, pair_row, expert, num_rows, held = _group_rows(
            sent.recv_topk_idx, num_experts // ctx.num_ranks, num_worst_tokens, expert_alignment)
        weight = _pair_weights(pair_row, token_row, sent.recv_topk_weights)
        recv_parts = tuple(gather_rows(p, token_row) for p in sent.recv_parts)
        return grouped_dispatch_result(sent.handle, recv_parts, expert, weight, token_row, pair_row, num_rows, held,
                                       topk_weights is not None)

    def cached_dispatch(self, ctx: RankContext, config, handle: ExpertGroupedHandle, parts, topk_weights=None):
        """Returns (grouped rows, f32[N] pair weights from `topk_weights [T, K]` or None)."""
        token_parts, token_weights = self.tokens.cached_dispatch(ctx, config, handle.tokens, parts, topk_weights)
        recv_parts = tuple(gather_rows(p, handle.token_row) for p in token_parts)
        if token_weights is None:
            return recv_parts, None
        return recv_parts, _pair_weights(handle.pair_row, handle.token_row, token_weights)

    def combine(self, ctx: RankContext, config, handle: ExpertGroupedHandle, y, topk_weights, bias,
                row_weights=None):
        """(bf16 [T, H]: per token, the sum over its pairs of row_weights[row] * y[row] (unweighted when
        `row_weights` is None, which makes it the transpose of `dispatch`) plus `bias`, in f32 and
        rounded once; f32 [T, K] or None: for each (t, k) the `topk_weights [N]` of its pair's row)."""
        rows = jnp.where(_first_occurrence(handle.pair_row), handle.pair_row, -1)  # [M, K]
        scaled = y.astype(jnp.float32)
        if row_weights is not None:
            scaled = scaled * row_weights[:, None]
        # One k at a time: memory stays O(M * H), not O(M * K * H).
        per_token = sum(gather_rows(scaled, rows[:, k]) for k in range(rows.shape[1]))  # [M, H]
        token_weights = None if topk_weights is None else gather_rows(topk_weights, handle.pair_row)
        combined, combined_weights = self.tokens.combine(ctx, config, handle.tokens, per_token, token_weights,
                                                         bias)
        return combined.astype(y.dtype), combined_weights
