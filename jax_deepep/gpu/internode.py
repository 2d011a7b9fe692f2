"""Internode normal mode on NVSHMEM: `cuda/internode.cu` (in the `_nvshmem_lib` module) as XLA FFI
custom calls, for an expert-parallel axis of several nodes.

A token crosses the network once per destination node and is forwarded over NVLink inside it;
combine returns one partial per (token, node), rounded to bf16 by default or in f32 with
`Buffer(exact_internode_combine=True)`, and rounds their sum once at the source (protocol in
`cuda/internode.cuh`). Results are those of the pure-JAX implementation, row for row. The handle's
`route` is an `InternodeRoute`, which combine reads.

`InternodeBackend.expert_grouped` (`InternodeGroupedOps`) runs the same kernels on expert-grouped
arguments: the final receiver writes each landed token straight to its (token, local expert) rows,
and combine returns each token-level row's f32 sum of its weighted pair rows to the forwarder.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import reference
from ..backend import DispatchResult, RankContext, grouped_dispatch_result
from ..buffer_keys import BufferKeys
from ..config import Config
from ..routing import grouped_routing, valid_expert_ids
from ..sizes import internode_combine_layout, internode_dispatch_layout, internode_rdma_bytes, internode_regions
from ..types import DispatchHandle, DispatchLayout, ExpertGroupedHandle, pytree_dataclass
from ..validation import expect_array, fail
from .ffi_call import ffi_call, optional_operand, optional_result, struct_attribute
from .nvshmem import SymmetricBuffer

# A first expert-grouped dispatch's receive blocks keep (R + 1) * E_l row bases in shared memory
# (cuda/internode.cuh kInternodeMaxGroupedExperts).
MAX_GROUPED_EXPERTS = 4096


def rdma_bytes_hint(num_tokens: int, hidden: int, num_topk: int, num_experts: int, num_ranks: int,
                    ranks_per_node: int = 1, capacity: Optional[int] = None,
                    exact_internode_combine: bool = False, expert_grouped: bool = False) -> int:
    """`num_rdma_bytes` that internode dispatch (bf16 or FP8, with ids and weights) and combine of
    these sizes need, on a Buffer with this `exact_internode_combine` (f32 partials take more);
    `capacity` defaults to dispatch's (R * T). With `expert_grouped`, those of `expert_grouped=True`
    (tokens carry their pair prefixes, combine returns f32 rows; any `capacity`: the token level
    always has R * T rows). One rank per node is the most any node size needs."""
    capacity = num_ranks * num_tokens if capacity is None or expert_grouped else capacity
    dispatch = internode_dispatch_layout(num_tokens, capacity, num_topk, True, True, [hidden * 2], num_experts,
                                         ranks_per_node, num_ranks, has_prefixes=expert_grouped)
    combine = internode_combine_layout(num_tokens, hidden, num_topk, ranks_per_node, num_ranks,
                                       exact_partials=exact_internode_combine, f32_returns=expert_grouped)
    return max(internode_rdma_bytes(dispatch.half_bytes, dispatch.staging_bytes),
               internode_rdma_bytes(combine.half_bytes, combine.staging_bytes))


def _per_token_bytes(a) -> int:
    return int(np.prod(a.shape[1:])) * a.dtype.itemsize


def _check_hidden(hidden: int):
    if hidden % 8:
        fail("combine", f"`y` rows must be a multiple of 16 bytes for the CUDA kernels (hidden size a "
                        f"multiple of 8), got hidden size {hidden}")


def _split_parts(parts) -> tuple:
    """(tokens, FP8 scales or None)."""
    return (parts[0], parts[1]) if len(parts) == 2 else (parts[0], None)


def _received_parts(parts, rows: int) -> tuple:
    """The results of `rows` received rows of `parts`: the rows, and FP8 scales or an absent result."""
    x, scales = _split_parts(parts)
    return (jax.ShapeDtypeStruct((rows,) + x.shape[1:], x.dtype),
            optional_result(None if scales is None else (rows,) + scales.shape[1:],
                            jnp.float32 if scales is None else scales.dtype))


@pytree_dataclass()
class InternodeRoute:
    """What this backend's combine reads besides the shared handle fields."""

    forwarded: jax.Array  # i32[nodes, T]: which ranks of each node kept each token this rank forwarded there


def _route(op: str, ctx: RankContext, handle: DispatchHandle) -> InternodeRoute:
    if not isinstance(handle.route, InternodeRoute):
        fail(op, "`handle` was not made by this Buffer's internode kernels (it comes from another backend)")
    expect_array(op, "handle.route.forwarded", handle.route.forwarded, ndim=2, dtypes=(jnp.int32,),
                 shape=(ctx.num_nodes, handle.is_token_in_rank.shape[0]))
    return handle.route


class InternodeBackend:
    """Normal mode across nodes over NVSHMEM: the `NormalBackend` methods on one Buffer's symmetric buffer."""

    name = "cuda"
    mode = "internode"

    def __init__(self, symmetric: SymmetricBuffer, ranks_per_node: int, exact_combine: bool):
        self.symmetric = symmetric
        self.num_rdma_bytes = symmetric.num_bytes
        self.ranks_per_node = ranks_per_node
        self.exact_combine = exact_combine  # f32 partials, else bf16 (Buffer(exact_internode_combine=))
        self._dispatch_region, self._combine_region = internode_regions(symmetric.num_bytes)
        self.expert_grouped = InternodeGroupedOps(self)

    @classmethod
    def open(cls, mesh, axis_name: str, num_rdma_bytes: int, ranks_per_node: int, keys: BufferKeys, *,
             timeout_s: float, exact_combine: bool) -> "InternodeBackend":
        """Joins NVSHMEM and allocates the symmetric buffer of the Buffer `keys` names (collective); peers
        within a node are written directly, the others over the network; waits on a peer give up after
        `timeout_s`; combine's partials travel in f32 with `exact_combine`, else in bf16."""
        return cls(SymmetricBuffer(mesh, axis_name, num_rdma_bytes, timeout_s, keys, direct_group=ranks_per_node),
                   ranks_per_node, exact_combine)

    def destroy(self):
        """Free the symmetric buffer (collective; idempotent)."""
        self.symmetric.destroy()

    def failures(self) -> list:
        return self.symmetric.failures()

    def traffic(self) -> dict:
        """Rows and bytes this process has put on the network so far (synchronises; for tests)."""
        out = self.symmetric.lib.internode_traffic(self.symmetric.buffer_id, self.symmetric.device)
        return dict(zip(("dispatch_rows", "dispatch_bytes", "combine_rows", "combine_bytes"), out))

    def _fits(self, op: str, layout, grouped: bool = False):
        need = internode_rdma_bytes(layout.half_bytes, layout.staging_bytes)
        if need > self.num_rdma_bytes:
            hint = ", expert_grouped=True" if grouped else ""
            fail(op, f"the Buffer is too small: num_rdma_bytes={self.num_rdma_bytes} but these sizes need {need} "
                     f"in internode mode (jax_deepep.gpu.internode.rdma_bytes_hint(...{hint}) gives it before "
                     "making the Buffer)")

    def _dispatch_attrs(self, op: str, ctx: RankContext, parts, top_k: int, has_ids: bool, has_weights: bool,
                        num_experts: int, capacity: int, expert_alignment: int, grouped: bool = False) -> dict:
        """The attributes of a dispatch custom call moving `parts` (and K ids, weights and, in a first grouped
        dispatch, prefixes per token) into `capacity` token-level rows; refuses a Buffer too small for it."""
        layout = internode_dispatch_layout(parts[0].shape[0], capacity, top_k, has_ids, has_weights,
                                           [_per_token_bytes(p) for p in parts], num_experts if has_ids else 0,
                                           self.ranks_per_node, ctx.num_ranks, has_prefixes=grouped and has_ids)
        self._fits(op, layout, grouped)
        return dict(axis_name=ctx.axis_name, buffer_id=np.int64(self.symmetric.buffer_id),
                    num_experts=np.int64(num_experts if has_ids else 0),
                    ranks_per_node=np.int64(self.ranks_per_node), expert_alignment=np.int64(expert_alignment),
                    region=struct_attribute(self._dispatch_region), layout=struct_attribute(layout))

    def _token_results(self, ctx: RankContext, num_tokens: int, capacity: int) -> tuple:
        """Results every dispatch has: src_rank, src_idx, send_row, recv_rank_prefix, num_recv."""
        i32 = jnp.int32
        return (jax.ShapeDtypeStruct((capacity,), i32), jax.ShapeDtypeStruct((capacity,), i32),
                jax.ShapeDtypeStruct((num_tokens, ctx.num_ranks), i32), jax.ShapeDtypeStruct((ctx.num_ranks,), i32),
                jax.ShapeDtypeStruct((), i32))

    def _route_results(self, ctx: RankContext, num_tokens: int) -> tuple:
        """The last results of every dispatch: `forwarded` and the call number."""
        return (jax.ShapeDtypeStruct((ctx.num_nodes, num_tokens), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))

    def _dispatch_call(self, ctx: RankContext, parts, ids, weights, is_token_in_rank, counts: tuple,
                       num_experts: int, capacity: int, expert_alignment: int, op: str):
        """`counts`: the layout's tokens per rank, and per expert with `ids` (what the kernel notifies)."""
        num_tokens = parts[0].shape[0]
        top_k = ids.shape[1] if ids is not None else (weights.shape[1] if weights is not None else 0)
        attrs = self._dispatch_attrs(op, ctx, parts, top_k, ids is not None, weights is not None, num_experts,
                                     capacity, expert_alignment)
        r, i32, f32 = ctx.num_ranks, jnp.int32, jnp.float32
        x, scales = _split_parts(parts)
        experts_per_rank = num_experts // r if ids is not None else 0
        tokens_per_rank, tokens_per_expert = counts if ids is not None else (counts[0], None)

        out = ffi_call(
            "jax_deepep_internode_dispatch",
            (*_received_parts(parts, capacity),
             optional_result((capacity, top_k) if ids is not None else None, i32),
             optional_result((capacity, top_k) if weights is not None else None, f32),
             *self._token_results(ctx, num_tokens, capacity),
             optional_result((experts_per_rank,) if ids is not None else None, i32),
             *self._route_results(ctx, num_tokens)),
            x, optional_operand(scales, f32), optional_operand(ids, i32),
            optional_operand(None if weights is None else weights.astype(f32), f32),
            is_token_in_rank, tokens_per_rank, optional_operand(tokens_per_expert, i32), **attrs)
        recv_x, recv_scales, recv_ids, recv_weights, *meta, _token = out
        recv_parts = (recv_x,) if scales is None else (recv_x, recv_scales)
        return (recv_parts, recv_ids if ids is not None else None, recv_weights if weights is not None else None,
                meta)

    def get_dispatch_layout(self, ctx: RankContext, topk_idx, num_experts: int) -> DispatchLayout:
        # A local computation with no traffic: the pure-JAX one serves (it also counts tokens per node).
        return reference.BACKEND.get_dispatch_layout(ctx, topk_idx, num_experts)

    def dispatch(self, ctx: RankContext, config: Config, parts, topk_idx, topk_weights, layout: DispatchLayout,
                 num_experts: int, num_worst_tokens: int, expert_alignment: int) -> DispatchResult:
        del config  # the internode kernels take no launch configuration yet
        ids = None if topk_idx is None else valid_expert_ids(topk_idx, num_experts)
        counts = (layout.num_tokens_per_rank,) + ((layout.num_tokens_per_expert,) if ids is not None else ())
        recv_parts, recv_ids, recv_weights, meta = self._dispatch_call(
            ctx, parts, ids, topk_weights, layout.is_token_in_rank, counts, num_experts, num_worst_tokens,
            expert_alignment, "dispatch")
        src_rank, src_idx, send_row, recv_rank_prefix, num_recv, per_expert, forwarded = meta
        handle = DispatchHandle(
            is_token_in_rank=layout.is_token_in_rank, send_row=send_row, recv_src_rank=src_rank,
            recv_src_idx=src_idx, recv_rank_prefix=recv_rank_prefix, num_recv_tokens=num_recv,
            num_recv_tokens_per_expert=per_expert, route=InternodeRoute(forwarded))
        return DispatchResult(recv_parts, recv_ids, recv_weights, per_expert, num_recv, handle)

    def cached_dispatch(self, ctx: RankContext, config: Config, handle: DispatchHandle, parts, topk_weights=None):
        del config
        _route("dispatch", ctx, handle)
        counts = (jnp.sum(handle.is_token_in_rank, axis=0, dtype=jnp.int32),)
        recv_parts, _, recv_weights, _ = self._dispatch_call(
            ctx, parts, None, topk_weights, handle.is_token_in_rank, counts, 0, handle.capacity, 1, "dispatch")
        return recv_parts, recv_weights

    def _combine_args(self, ctx: RankContext, handle: DispatchHandle, y, bias, top_k: int, grouped: bool = False):
        """What a combine custom call of token-level routing `handle` takes besides its rows and weights, whose
        combined weights are [T, `top_k`] (0: none): (results, the bias operands, the routing operands,
        attributes). A grouped combine returns f32 rows to the forwarders."""
        route = _route("combine", ctx, handle)
        num_tokens, hidden = handle.is_token_in_rank.shape[0], y.shape[1]
        _check_hidden(hidden)
        layout = internode_combine_layout(num_tokens, hidden, top_k, self.ranks_per_node, ctx.num_ranks,
                                          exact_partials=self.exact_combine, f32_returns=grouped)
        self._fits("combine", layout, grouped)
        results = (jax.ShapeDtypeStruct((num_tokens, hidden), y.dtype),
                   optional_result((num_tokens, top_k) if top_k else None, jnp.float32),
                   jax.ShapeDtypeStruct((1,), jnp.int32))
        biases = [optional_operand(b, jnp.bfloat16) for b in (list(bias) + [None, None])[:2]]
        routing = (handle.recv_src_rank, handle.recv_src_idx, handle.num_recv_tokens, handle.is_token_in_rank,
                   route.forwarded)
        attrs = dict(axis_name=ctx.axis_name, buffer_id=np.int64(self.symmetric.buffer_id),
                     ranks_per_node=np.int64(self.ranks_per_node), exact_partials=self.exact_combine,
                     region=struct_attribute(self._combine_region), layout=struct_attribute(layout))
        return results, biases, routing, attrs

    def combine(self, ctx: RankContext, config: Config, handle: DispatchHandle, y, topk_weights, bias):
        del config
        top_k = topk_weights.shape[1] if topk_weights is not None else 0
        results, biases, routing, attrs = self._combine_args(ctx, handle, y, bias, top_k)
        x, weights, _token = ffi_call(
            "jax_deepep_internode_combine", results,
            y, optional_operand(None if topk_weights is None else topk_weights.astype(jnp.float32), jnp.float32),
            *biases, *routing, **attrs)
        return x, (weights if topk_weights is not None else None)


class InternodeGroupedOps:
    """The expert-grouped dispatch, cached dispatch and combine (`reference.expert_grouped.ExpertGroupedOps`
    has their contract) on the internode kernels: one custom call each, whose final receivers write each
    token straight to its grouped rows; the handle's token-level routing has room for every token."""

    def __init__(self, backend: InternodeBackend):
        self.backend = backend

    def dispatch(self, ctx: RankContext, config: Config, parts, topk_idx, topk_weights, layout: DispatchLayout,
                 num_experts: int, num_worst_tokens: int, expert_alignment: int) -> DispatchResult:
        del config
        op = "dispatch"
        if num_experts > MAX_GROUPED_EXPERTS:
            fail(op, f"expert_grouped=True serves at most {MAX_GROUPED_EXPERTS} experts on the CUDA internode "
                     f"backend, got num_experts={num_experts}")
        n, num_tokens, r = num_worst_tokens, parts[0].shape[0], ctx.num_ranks
        rows, top_k = r * num_tokens, topk_idx.shape[1]
        backend = self.backend
        attrs = backend._dispatch_attrs(op, ctx, parts, top_k, True, True, num_experts, rows, expert_alignment,
                                        grouped=True)
        ids, prefix, per_expert = grouped_routing(topk_idx, num_experts)
        weights = jnp.ones(ids.shape, jnp.float32) if topk_weights is None else topk_weights.astype(jnp.float32)
        x, scales = _split_parts(parts)
        i32, f32 = jnp.int32, jnp.float32
        (recv_x, recv_scales, expert, weight, token_row, pair_row, src_rank, src_idx, send_row, recv_rank_prefix,
         num_recv, token_per_expert, num_rows, held, forwarded, _token) = ffi_call(
            "jax_deepep_internode_grouped_dispatch",
            (*_received_parts(parts, n), jax.ShapeDtypeStruct((n,), i32), jax.ShapeDtypeStruct((n,), f32),
             jax.ShapeDtypeStruct((n,), i32), jax.ShapeDtypeStruct((rows, top_k), i32),
             *backend._token_results(ctx, num_tokens, rows), jax.ShapeDtypeStruct((num_experts // r,), i32),
             jax.ShapeDtypeStruct((), i32), jax.ShapeDtypeStruct((num_experts // r,), i32),
             *backend._route_results(ctx, num_tokens)),
            x, optional_operand(scales, f32), ids, weights, prefix, layout.is_token_in_rank,
            layout.num_tokens_per_rank, per_expert, **attrs)
        tokens = DispatchHandle(
            is_token_in_rank=layout.is_token_in_rank, send_row=send_row, recv_src_rank=src_rank,
            recv_src_idx=src_idx, recv_rank_prefix=recv_rank_prefix, num_recv_tokens=num_recv,
            num_recv_tokens_per_expert=token_per_expert, route=InternodeRoute(forwarded))
        recv_parts = (recv_x,) if scales is None else (recv_x, recv_scales)
        return grouped_dispatch_result(tokens, recv_parts, expert, weight, token_row, pair_row, num_rows, held,
                                       topk_weights is not None)

    def cached_dispatch(self, ctx: RankContext, config: Config, handle: ExpertGroupedHandle, parts,
                        topk_weights=None):
        """Returns (grouped rows, f32[N] pair weights from `topk_weights [T, K]` or None)."""
        del config
        tokens, backend = handle.tokens, self.backend
        _route("dispatch", ctx, tokens)
        n, num_tokens, top_k = handle.capacity, parts[0].shape[0], handle.pair_row.shape[1]
        has_weights = topk_weights is not None
        attrs = backend._dispatch_attrs("dispatch", ctx, parts, top_k if has_weights else 0, False, has_weights, 0,
                                        tokens.capacity, 1, grouped=True)
        x, scales = _split_parts(parts)
        f32 = jnp.float32
        recv_x, recv_scales, recv_weight, *_scratch = ffi_call(
            "jax_deepep_internode_grouped_cached_dispatch",
            (*_received_parts(parts, n), optional_result((n,) if has_weights else None, f32),
             *backend._token_results(ctx, num_tokens, tokens.capacity), *backend._route_results(ctx, num_tokens)),
            x, optional_operand(scales, f32), optional_operand(topk_weights.astype(f32) if has_weights else None, f32),
            tokens.is_token_in_rank, jnp.sum(tokens.is_token_in_rank, axis=0, dtype=jnp.int32), handle.pair_row,
            handle.token_row, **attrs)
        recv_parts = (recv_x,) if scales is None else (recv_x, recv_scales)
        return recv_parts, (recv_weight if has_weights else None)

    def combine(self, ctx: RankContext, config: Config, handle: ExpertGroupedHandle, y, topk_weights, bias,
                row_weights=None):
        """(bf16 [T, H]: per token, the sum over its pairs of row_weights[row] * y[row] (unweighted without
        `row_weights`) plus `bias`, in f32, each node's partial rounded to bf16 unless the Buffer combines
        exactly, the sum rounded once; f32 [T, K] or None: for each (t, k) the `topk_weights [N]` of its
        pair's row)."""
        del config
        f32 = jnp.float32
        top_k = handle.pair_row.shape[1] if topk_weights is not None else 0
        results, biases, routing, attrs = self.backend._combine_args(ctx, handle.tokens, y, bias, top_k, grouped=True)
        x, weights, _token = ffi_call(
            "jax_deepep_internode_grouped_combine", results,
            y, optional_operand(None if row_weights is None else row_weights.astype(f32), f32),
            optional_operand(None if topk_weights is None else topk_weights.astype(f32), f32), *biases, *routing,
            handle.pair_row, **attrs)
        return x, (weights if topk_weights is not None else None)
