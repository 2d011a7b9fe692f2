"""Internode normal mode on NVSHMEM: `cuda/internode.cu` (in the `_nvshmem_lib` module) as XLA FFI
custom calls, for an expert-parallel axis of several nodes.

A token crosses the network once per destination node and is forwarded over NVLink inside it;
combine returns one partial per (token, node), rounded to bf16 by default or in f32 with
`Buffer(exact_internode_combine=True)`, and rounds their sum once at the source (protocol in
`cuda/internode.cuh`). Results are those of the pure-JAX implementation, row for row. The handle's
`route` is an `InternodeRoute`, which combine reads.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import reference
from ..backend import DispatchResult, RankContext
from ..buffer_keys import BufferKeys
from ..config import Config
from ..routing import valid_expert_ids
from ..sizes import internode_combine_layout, internode_dispatch_layout, internode_rdma_bytes, internode_regions
from ..types import DispatchHandle, DispatchLayout, pytree_dataclass
from ..validation import expect_array, fail
from .ffi_call import ffi_call, optional_operand, optional_result, struct_attribute
from .nvshmem import SymmetricBuffer


def rdma_bytes_hint(num_tokens: int, hidden: int, num_topk: int, num_experts: int, num_ranks: int,
                    ranks_per_node: int = 1, capacity: Optional[int] = None,
                    exact_internode_combine: bool = False) -> int:
    """`num_rdma_bytes` that internode dispatch (bf16 or FP8, with ids and weights) and combine of
    these sizes need, on a Buffer with this `exact_internode_combine` (f32 partials take more);
    `capacity` defaults to dispatch's (R * T). One rank per node is the most any node size needs."""
    capacity = num_ranks * num_tokens if capacity is None else capacity
    dispatch = internode_dispatch_layout(num_tokens, capacity, num_topk, True, True, [hidden * 2], num_experts,
                                         ranks_per_node, num_ranks)
    combine = internode_combine_layout(num_tokens, hidden, num_topk, ranks_per_node, num_ranks,
                                       exact_partials=exact_internode_combine)
    return max(internode_rdma_bytes(dispatch.half_bytes, dispatch.staging_bytes),
               internode_rdma_bytes(combine.half_bytes, combine.staging_bytes))


def _per_token_bytes(a) -> int:
    return int(np.prod(a.shape[1:])) * a.dtype.itemsize


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
    expert_grouped = None  # the ops refuse `expert_grouped=True` until the kernels write grouped rows

    def __init__(self, symmetric: SymmetricBuffer, ranks_per_node: int, exact_combine: bool):
        self.symmetric = symmetric
        self.num_rdma_bytes = symmetric.num_bytes
        self.ranks_per_node = ranks_per_node
        self.exact_combine = exact_combine  # f32 partials, else bf16 (Buffer(exact_internode_combine=))
        self._dispatch_region, self._combine_region = internode_regions(symmetric.num_bytes)

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

    def _fits(self, op: str, half_bytes: int, staging_bytes: int):
        need = internode_rdma_bytes(half_bytes, staging_bytes)
        if need > self.num_rdma_bytes:
            fail(op, f"the Buffer is too small: num_rdma_bytes={self.num_rdma_bytes} but these sizes need {need} "
                     "in internode mode (jax_deepep.gpu.internode.rdma_bytes_hint gives it before making the Buffer)")

    def _dispatch_call(self, ctx: RankContext, parts, ids, weights, is_token_in_rank, counts: tuple,
                       num_experts: int, capacity: int, expert_alignment: int, op: str):
        """`counts`: the layout's tokens per rank, and per expert with `ids` (what the kernel notifies)."""
        num_tokens = parts[0].shape[0]
        top_k = ids.shape[1] if ids is not None else (weights.shape[1] if weights is not None else 0)
        layout = internode_dispatch_layout(num_tokens, capacity, top_k, ids is not None, weights is not None,
                                           [_per_token_bytes(p) for p in parts],
                                           num_experts if ids is not None else 0, self.ranks_per_node, ctx.num_ranks)
        self._fits(op, layout.half_bytes, layout.staging_bytes)
        r, i32, f32 = ctx.num_ranks, jnp.int32, jnp.float32
        x, scales = (parts[0], parts[1]) if len(parts) == 2 else (parts[0], None)
        experts_per_rank = num_experts // r if ids is not None else 0
        tokens_per_rank, tokens_per_expert = counts if ids is not None else (counts[0], None)

        out = ffi_call(
            "jax_deepep_internode_dispatch",
            (jax.ShapeDtypeStruct((capacity,) + x.shape[1:], x.dtype),
             optional_result(None if scales is None else (capacity,) + scales.shape[1:],
                             f32 if scales is None else scales.dtype),
             optional_result((capacity, top_k) if ids is not None else None, i32),
             optional_result((capacity, top_k) if weights is not None else None, f32),
             jax.ShapeDtypeStruct((capacity,), i32), jax.ShapeDtypeStruct((capacity,), i32),
             jax.ShapeDtypeStruct((num_tokens, r), i32), jax.ShapeDtypeStruct((r,), i32),
             jax.ShapeDtypeStruct((), i32), optional_result((experts_per_rank,) if ids is not None else None, i32),
             jax.ShapeDtypeStruct((ctx.num_nodes, num_tokens), i32), jax.ShapeDtypeStruct((1,), i32)),
            x, optional_operand(scales, f32), optional_operand(ids, i32),
            optional_operand(None if weights is None else weights.astype(f32), f32),
            is_token_in_rank, tokens_per_rank, optional_operand(tokens_per_expert, i32),
            axis_name=ctx.axis_name, buffer_id=np.int64(self.symmetric.buffer_id),
            num_experts=np.int64(num_experts if ids is not None else 0),
            ranks_per_node=np.int64(self.ranks_per_node), expert_alignment=np.int64(expert_alignment),
            region=struct_attribute(self._dispatch_region), layout=struct_attribute(layout))
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

    def combine(self, ctx: RankContext, config: Config, handle: DispatchHandle, y, topk_weights, bias):
        del config
        route = _route("combine", ctx, handle)
        num_tokens, hidden = handle.is_token_in_rank.shape[0], y.shape[1]
        if hidden % 8:
            fail("combine", f"`y` rows must be a multiple of 16 bytes for the CUDA kernels (hidden size a "
                            f"multiple of 8), got hidden size {hidden}")
        top_k = topk_weights.shape[1] if topk_weights is not None else 0
        layout = internode_combine_layout(num_tokens, hidden, top_k, self.ranks_per_node, ctx.num_ranks,
                                          exact_partials=self.exact_combine)
        self._fits("combine", layout.half_bytes, layout.staging_bytes)
        f32, bf16 = jnp.float32, jnp.bfloat16
        biases = [optional_operand(b, bf16) for b in (list(bias) + [None, None])[:2]]
        x, weights, _token = ffi_call(
            "jax_deepep_internode_combine",
            (jax.ShapeDtypeStruct((num_tokens, hidden), y.dtype),
             optional_result((num_tokens, top_k) if topk_weights is not None else None, f32),
             jax.ShapeDtypeStruct((1,), jnp.int32)),
            y, optional_operand(None if topk_weights is None else topk_weights.astype(f32), f32), *biases,
            handle.recv_src_rank, handle.recv_src_idx, handle.num_recv_tokens, handle.is_token_in_rank,
            route.forwarded, axis_name=ctx.axis_name, buffer_id=np.int64(self.symmetric.buffer_id),
            ranks_per_node=np.int64(self.ranks_per_node), exact_partials=self.exact_combine,
            region=struct_attribute(self._combine_region), layout=struct_attribute(layout))
        return x, (weights if topk_weights is not None else None)
