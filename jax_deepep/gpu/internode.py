"""Internode normal mode on NVSHMEM: `cuda/internode.cu` (in `libjax_deepep_nvshmem.so`) as XLA FFI
custom calls, for an expert-parallel axis of several nodes.

A token crosses the network once per destination node and is forwarded over NVLink inside it;
combine returns one f32 partial per (token, node) and rounds once at the source (protocol in
`cuda/internode.cuh`). Results are those of the pure-JAX implementation, row for row. The handle's
`route` is an `InternodeRoute`, which combine reads.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import reference
from ..backend import DispatchResult, RankContext
from ..config import Config
from ..routing import valid_expert_ids
from ..types import DispatchHandle, DispatchLayout, pytree_dataclass
from ..validation import fail
from .ffi_call import ffi_call
from .nvshmem import SymmetricBuffer, nvshmem_library


def rdma_bytes_hint(num_tokens: int, hidden: int, num_topk: int, num_experts: int, num_ranks: int,
                    ranks_per_node: int = 1, capacity: Optional[int] = None) -> int:
    """`num_rdma_bytes` that internode dispatch (bf16 or FP8, with ids and weights) and combine of
    these sizes need; `capacity` defaults to dispatch's (R * T). One rank per node is the most any
    node size needs."""
    lib = nvshmem_library()
    capacity = num_ranks * num_tokens if capacity is None else capacity
    dispatch = lib.jax_deepep_internode_dispatch_bytes(num_tokens, capacity, num_topk, True, True, 1, hidden * 2, 0,
                                                       num_experts, ranks_per_node, num_ranks)
    combine = lib.jax_deepep_internode_combine_bytes(num_tokens, capacity, hidden, num_topk, ranks_per_node, num_ranks)
    return int(max(dispatch, combine))


def _per_token_bytes(a) -> int:
    return int(np.prod(a.shape[1:])) * a.dtype.itemsize


@pytree_dataclass()
class InternodeRoute:
    """What this backend's combine reads besides the shared handle fields."""

    forwarded: jax.Array  # i32[nodes, T]: which ranks of each node kept each token this rank forwarded there


def _route(op: str, handle: DispatchHandle) -> InternodeRoute:
    if not isinstance(handle.route, InternodeRoute):
        fail(op, "`handle` was not made by this Buffer's internode kernels (it comes from another backend)")
    return handle.route


class InternodeBackend:
    """Normal mode across nodes over NVSHMEM: the `NormalBackend` methods on one Buffer's symmetric buffer."""

    name = "cuda"
    mode = "internode"

    def __init__(self, symmetric: SymmetricBuffer, ranks_per_node: int):
        self.symmetric = symmetric
        self._lib = symmetric.lib
        self.num_rdma_bytes = symmetric.num_bytes
        self.ranks_per_node = ranks_per_node

    @classmethod
    def open(cls, mesh, axis_name: str, num_rdma_bytes: int, ranks_per_node: int) -> "InternodeBackend":
        """Joins NVSHMEM and allocates the symmetric buffer (collective); peers within a node are written
        directly, the others over the network."""
        return cls(SymmetricBuffer(mesh, axis_name, num_rdma_bytes, direct_group=ranks_per_node), ranks_per_node)

    def destroy(self):
        """Free the symmetric buffer (collective; idempotent)."""
        self.symmetric.destroy()

    def traffic(self) -> dict:
        """Rows and bytes this process has put on the network so far (synchronises; for tests)."""
        out = (ctypes.c_uint64 * 4)()
        if self._lib.jax_deepep_internode_traffic(out) != 0:
            raise RuntimeError(self._lib.jax_deepep_nvshmem_last_error().decode())
        return {"dispatch_rows": out[0], "dispatch_bytes": out[1], "combine_rows": out[2], "combine_bytes": out[3]}

    def _fits(self, op: str, need: int):
        if need > self.num_rdma_bytes:
            fail(op, f"the Buffer is too small: num_rdma_bytes={self.num_rdma_bytes} but these sizes need {need} "
                     "in internode mode (jax_deepep.gpu.internode.rdma_bytes_hint gives it before making the Buffer)")

    def _dispatch_call(self, ctx: RankContext, parts, ids, weights, is_token_in_rank, counts: tuple,
                       num_experts: int, capacity: int, expert_alignment: int, op: str):
        """`counts`: the layout's tokens per rank, and per expert with `ids` (what the kernel notifies)."""
        num_tokens = parts[0].shape[0]
        top_k = ids.shape[1] if ids is not None else (weights.shape[1] if weights is not None else 0)
        sizes = [_per_token_bytes(p) for p in parts] + [0]
        self._fits(op, self._lib.jax_deepep_internode_dispatch_bytes(
            num_tokens, capacity, top_k, ids is not None, weights is not None, len(parts), sizes[0], sizes[1],
            num_experts if ids is not None else 0, self.ranks_per_node, ctx.num_ranks))
        r, i32 = ctx.num_ranks, jnp.int32
        results = [jax.ShapeDtypeStruct((capacity,) + p.shape[1:], p.dtype) for p in parts]
        args = list(parts)
        if ids is not None:
            args.append(ids)
            results.append(jax.ShapeDtypeStruct((capacity, top_k), i32))
        if weights is not None:
            args.append(weights.astype(jnp.float32))
            results.append(jax.ShapeDtypeStruct((capacity, top_k), jnp.float32))
        args += [is_token_in_rank, *counts]
        experts_per_rank = num_experts // r if ids is not None else 0
        results += [jax.ShapeDtypeStruct((capacity,), i32), jax.ShapeDtypeStruct((capacity,), i32),
                    jax.ShapeDtypeStruct((num_tokens, r), i32), jax.ShapeDtypeStruct((r,), i32),
                    jax.ShapeDtypeStruct((), i32), jax.ShapeDtypeStruct((experts_per_rank,), i32),
                    jax.ShapeDtypeStruct((ctx.num_nodes, num_tokens), i32), jax.ShapeDtypeStruct((1,), i32)]
        out = list(ffi_call("jax_deepep_internode_dispatch", tuple(results), *args, axis_name=ctx.axis_name,
                            num_parts=np.int64(len(parts)), has_ids=ids is not None, has_weights=weights is not None,
                            num_experts=np.int64(num_experts if ids is not None else 0),
                            ranks_per_node=np.int64(self.ranks_per_node),
                            expert_alignment=np.int64(expert_alignment)))
        recv_parts = tuple(out[:len(parts)])
        rest = out[len(parts):]
        recv_ids = rest.pop(0) if ids is not None else None
        recv_weights = rest.pop(0) if weights is not None else None
        return recv_parts, recv_ids, recv_weights, rest[:-1]

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
        _route("dispatch", handle)
        counts = (jnp.sum(handle.is_token_in_rank, axis=0, dtype=jnp.int32),)
        recv_parts, _, recv_weights, _ = self._dispatch_call(
            ctx, parts, None, topk_weights, handle.is_token_in_rank, counts, 0, handle.capacity, 1, "dispatch")
        return recv_parts, recv_weights

    def combine(self, ctx: RankContext, config: Config, handle: DispatchHandle, y, topk_weights, bias):
        del config
        route = _route("combine", handle)
        num_tokens, hidden = handle.is_token_in_rank.shape[0], y.shape[1]
        if hidden % 8:
            fail("combine", f"`y` rows must be a multiple of 16 bytes for the CUDA kernels (hidden size a "
                            f"multiple of 8), got hidden size {hidden}")
        top_k = topk_weights.shape[1] if topk_weights is not None else 0
        self._fits("combine", self._lib.jax_deepep_internode_combine_bytes(
            num_tokens, handle.capacity, hidden, top_k, self.ranks_per_node, ctx.num_ranks))
        args = [y] + ([topk_weights.astype(jnp.float32)] if topk_weights is not None else []) + list(bias)
        args += [handle.recv_src_rank, handle.recv_src_idx, handle.num_recv_tokens, handle.is_token_in_rank,
                 route.forwarded]
        results = [jax.ShapeDtypeStruct((num_tokens, hidden), y.dtype)]
        if topk_weights is not None:
            results.append(jax.ShapeDtypeStruct((num_tokens, top_k), jnp.float32))
        results.append(jax.ShapeDtypeStruct((1,), jnp.int32))
        out = ffi_call("jax_deepep_internode_combine", tuple(results), *args, axis_name=ctx.axis_name,
                       has_weights=topk_weights is not None, num_bias=np.int64(len(bias)),
                       ranks_per_node=np.int64(self.ranks_per_node))
        return out[0], (out[1] if topk_weights is not None else None)
