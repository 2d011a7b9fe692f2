"""Named pytrees returned by the ops (docs/API.md, "Result types").

Every structure that crosses `jax.jit` / `jax.shard_map` / `custom_vjp` boundaries is a
registered dataclass: its array fields are pytree leaves, its static fields are aux data.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import jax

Array = jax.Array
# A bf16 array, or the FP8 pair (float8_e4m3fn values, f32 per-128-channel scales).
Tokens = Union[Array, tuple]


def pytree_dataclass(*, static=()):
    """Register a frozen dataclass as a pytree; `static` names non-array fields."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        fields = [f.name for f in dataclasses.fields(cls)]
        return jax.tree_util.register_dataclass(
            cls,
            data_fields=[f for f in fields if f not in static],
            meta_fields=[f for f in fields if f in static],
        )

    return wrap


@pytree_dataclass()
class DispatchLayout:
    """Where this rank's tokens go (output of `get_dispatch_layout`)."""

    num_tokens_per_rank: Array  # i32[R]: tokens sent to each rank
    num_tokens_per_rdma_rank: Optional[Array]  # i32[R // ranks_per_node] or None (one node)
    num_tokens_per_expert: Array  # i32[E]: (token, k) pairs routed to each expert
    is_token_in_rank: Array  # bool[T, R]


@pytree_dataclass()
class DispatchHandle:
    """Everything `combine` and a cached `dispatch` need to replay one routing (N = `capacity`).

    Sender side (this rank's T tokens) and receiver side (this rank's N receive rows).
    """

    is_token_in_rank: Array  # bool[T, R]
    send_row: Array  # i32[T, R]: row of token t in rank d's receive buffer, -1 if not sent
    recv_src_rank: Array  # i32[N]: source rank of each receive row, -1 for padding
    recv_src_idx: Array  # i32[N]: source token index of each receive row, -1 for padding
    recv_rank_prefix: Array  # i32[R]: first receive row of each source rank's block
    num_recv_tokens: Array  # i32[]: true number of received tokens (may exceed N)
    num_recv_tokens_per_expert: Array  # i32[E_l], aligned, as the first dispatch reported it
    # What only the backend that made the handle needs, as that backend's own pytree dataclass
    # (`gpu.intranode.IntranodeRoute`, `gpu.internode.InternodeRoute`); None for the pure-JAX backend.
    # A backend refuses a handle whose `route` is not its own.
    route: Any = None

    @property
    def capacity(self) -> int:
        """N, the number of receive rows."""
        return self.recv_src_idx.shape[0]


@pytree_dataclass()
class ExpertGroupedHandle:
    """Everything `combine` and a cached `dispatch` need to replay one expert-grouped dispatch
    (`dispatch(..., expert_grouped=True)`; N = `capacity` grouped rows, one per (token, local expert)
    pair, grouped by local expert and padded to `expert_alignment`).

    `tokens` is the token-level routing the pairs were cut from, with room for every token (R * T rows:
    nothing is dropped at that level). `weight` is what `combine` multiplies each row by: it is
    differentiable, so the gradient of a combine reaches the dispatch's `topk_weights` through it.
    """

    tokens: DispatchHandle  # token-level routing, capacity R * T
    token_row: Array  # i32[N]: token-level receive row each grouped row copies, -1 for padding
    pair_row: Array  # i32[R * T, K]: grouped row of (token-level row j, its k-th expert), -1 for none
    weight: Array  # f32[N]: the pair's weight (1 without `topk_weights`), 0 for padding
    num_recv_tokens: Array  # i32[]: grouped rows needed (padding included; may exceed N)
    num_recv_tokens_per_expert: Array  # i32[E_l]: padded group sizes held within the N rows

    @property
    def capacity(self) -> int:
        """N, the number of grouped rows."""
        return self.token_row.shape[0]

    @property
    def is_token_in_rank(self) -> Array:
        return self.tokens.is_token_in_rank

    def with_unit_weights(self) -> "ExpertGroupedHandle":
        """This handle with weight 1 on every pair: its `combine` is the unweighted sum over a token's
        pairs, the transpose of the dispatch (what a custom gradient of the dispatch needs)."""
        return dataclasses.replace(self, weight=(self.token_row >= 0).astype(self.weight.dtype))


@pytree_dataclass()
class DispatchOutput:
    """Result of `dispatch`: the received rows (ordered by source rank, then source token; rows past
    `num_recv_tokens` unspecified), their local expert ids and weights, the counts, and the handle.

    With `expert_grouped=True` a row per (token, local expert) pair instead, grouped by local expert:
    `recv_topk_idx` and `recv_topk_weights` are then [N] (the row's expert and pair weight) and the
    handle an `ExpertGroupedHandle` (docs/API.md, "Expert-grouped dispatch")."""

    recv_x: Tokens  # [N, H] (or FP8 pair)
    recv_topk_idx: Optional[Array]  # i32[N, K], local expert ids, -1 elsewhere (grouped: i32[N])
    recv_topk_weights: Optional[Array]  # f32[N, K], 0 where recv_topk_idx == -1 (grouped: f32[N])
    num_recv_tokens_per_expert: Array  # i32[E_l], rounded up to expert_alignment
    num_recv_tokens: Array  # i32[]
    handle: Union[DispatchHandle, ExpertGroupedHandle]


@pytree_dataclass(static=("num_max_dispatch_tokens_per_rank", "num_experts"))
class LowLatencyHandle:
    """What `low_latency_combine` needs to send expert outputs back."""

    recv_src_info: Array  # i32[E_l, R*M]
    recv_layout_range: Array  # i32[E_l, R, 2]: (offset, count) per source rank
    recv_count: Array  # i32[E_l]
    send_slot: Array  # i32[T, K]: row of (t, k) inside its expert's block on the destination
    num_max_dispatch_tokens_per_rank: int
    num_experts: int


@pytree_dataclass(static=("pending", "options"))
class LowLatencyDispatchOutput:
    """Low-latency dispatch result.

    With `return_recv_hook=True` the op returns this with `pending=True`: the sends are issued
    and `buffer.low_latency_recv(out)` returns the completed output. `transit` carries the
    backend's in-flight state between the two calls and is empty once complete.
    """

    recv_x: Any  # bf16 [E_l, R*M, H] or (fp8, scales)
    recv_count: Optional[Array]
    recv_src_info: Optional[Array]
    recv_layout_range: Optional[Array]
    handle: Optional[LowLatencyHandle]
    transit: dict = dataclasses.field(default_factory=dict)
    pending: bool = False
    options: Any = None  # the LowLatencyOptions a pending dispatch completes with


@pytree_dataclass()
class PendingLowLatencyCombine:
    """Result of `low_latency_combine(..., return_recv_hook=True)`; complete it with
    `buffer.low_latency_recv(pending)`."""

    transit: dict
