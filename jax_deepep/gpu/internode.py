"""Internode normal mode on NVSHMEM: `cuda/internode_dispatch.cu` and `cuda/internode_combine.cu` (in the
`_nvshmem_lib` module) as XLA FFI custom calls, for an expert-parallel axis of several nodes.

A token crosses the network once per destination node and is forwarded over NVLink inside it;
combine returns one partial per (token, node), rounded to bf16 by default or in f32 with
`Buffer(exact_internode_combine=True)`, and rounds their sum once at the source (protocol in
`cuda/internode.cuh`). Every hop is a bounded ring per channel, sized by the op's `Config`
(`sizes.internode_*_geometry`), so the symmetric buffer holds rings, not rows. Results are those of
the pure-JAX implementation, row for row. The handle's `route` is an `InternodeRoute`, which combine
reads.

`InternodeBackend.expert_grouped` (`InternodeGroupedOps`) runs the same kernels on expert-grouped
arguments: the final receiver writes each received token straight to its (token, local expert) rows,
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
from ..config import Config, default_combine_config, default_dispatch_config
from ..routing import grouped_routing, valid_expert_ids
from ..sizes import (INTERNODE_MAX_CHANNELS, INTERNODE_MAX_EXPERTS, internode_combine_geometry,
                     internode_dispatch_geometry, internode_node_sizes)
from ..types import DispatchHandle, DispatchLayout, ExpertGroupedHandle, pytree_dataclass
from ..validation import expect_array, fail
from .ffi_call import ffi_call, optional_operand, optional_result, struct_attribute
from .intranode import GroupedKernelOps, _bias_operands, _received_parts, _sm_count, check_resident
from .nvshmem import SymmetricBuffer

# Token counts and ring positions travel in the 16 bits of a signal (cuda/nvshmem_peers.cuh: call_signal;
# cuda/internode.cuh kInternodeMaxTokens): at most this many tokens per rank, and rows through one ring in one call.
MAX_COUNT = 32767


def rdma_bytes_hint(num_tokens: int, hidden: int, num_topk: int, num_experts: int, num_ranks: int,
                    ranks_per_node: Optional[int] = None, capacity: Optional[int] = None,
                    exact_internode_combine: bool = False, expert_grouped: bool = False,
                    config: Optional[Config] = None) -> int:
    """`num_rdma_bytes` that internode dispatch (bf16 or FP8, with ids and weights) and combine of these
    sizes need, on a Buffer with this `exact_internode_combine` (f32 partials take more) and, with
    `expert_grouped`, those of `expert_grouped=True` (rows carry pair prefixes, combine returns f32 rows).
    The ops move rows through bounded rings, so the need is their rings' (`config`'s channels and slots;
    None: the built-in default dispatch and combine configs at `Buffer.num_sms`), whatever `num_tokens`,
    `num_experts` and `capacity` (accepted, and used for no size). `ranks_per_node` None: the most that any
    node size needs."""
    del num_tokens, num_experts, capacity  # the rings' sizes depend on none of them
    from ..buffer import Buffer

    dispatch_config = config or default_dispatch_config(num_ranks, Buffer.num_sms)
    combine_config = config or default_combine_config(num_ranks, Buffer.num_sms)
    node_sizes = internode_node_sizes(num_ranks) if ranks_per_node is None else [ranks_per_node]
    return max(max(internode_dispatch_geometry(num_ranks, per_node, dispatch_config, num_topk, True, True,
                                               [hidden * 2], has_prefixes=expert_grouped).rdma_bytes,
                   internode_combine_geometry(num_ranks, per_node, combine_config, hidden, num_topk,
                                              exact_partials=exact_internode_combine,
                                              f32_returns=expert_grouped).rdma_bytes)
               for per_node in node_sizes)


def _per_token_bytes(a) -> int:
    return int(np.prod(a.shape[1:])) * a.dtype.itemsize


def _split_parts(parts) -> tuple:
    """(tokens, FP8 scales or None)."""
    return (parts[0], parts[1]) if len(parts) == 2 else (parts[0], None)


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

    def __init__(self, symmetric: SymmetricBuffer, ranks_per_node: int, exact_combine: bool,
                 sm_count: Optional[int] = None):
        self.symmetric = symmetric
        self.num_rdma_bytes = symmetric.num_bytes
        self.ranks_per_node = ranks_per_node
        self.exact_combine = exact_combine  # f32 partials, else bf16 (Buffer(exact_internode_combine=))
        self._sm_count = sm_count  # the fewest SMs of this process's devices of the Buffer; None: unknown
        self.expert_grouped = InternodeGroupedOps(self)

    @classmethod
    def open(cls, mesh, axis_name: str, num_rdma_bytes: int, ranks_per_node: int, keys: BufferKeys, *,
             timeout_s: float, exact_combine: bool, puts_only: bool, num_qps_per_rank: int = 0) -> "InternodeBackend":
        """Joins NVSHMEM and allocates the symmetric buffer of the Buffer `keys` names (collective); peers
        within a node are written directly, and so are those of other nodes that NVSHMEM maps here (NVLink
        between nodes, or one GPU), unless `puts_only`; the others get puts over the network. Waits on a peer
        give up after `timeout_s`; combine's partials travel in f32 with `exact_combine`, else in bf16;
        `num_qps_per_rank` as for `SymmetricBuffer`."""
        return cls(SymmetricBuffer(mesh, axis_name, num_rdma_bytes, timeout_s, keys, direct_group=ranks_per_node,
                                   map_other_groups=not puts_only, num_qps_per_rank=num_qps_per_rank),
                   ranks_per_node, exact_combine, _sm_count(mesh))

    def destroy(self):
        """Free the symmetric buffer (collective; idempotent)."""
        self.symmetric.destroy()

    def failures(self) -> list:
        return self.symmetric.failures()

    def traffic(self) -> dict:
        """Rows and bytes this process has sent to other nodes so far, put or written through a mapping
        (synchronises; for tests)."""
        out = self.symmetric.lib.internode_traffic(self.symmetric.buffer_id, self.symmetric.device)
        return dict(zip(("dispatch_rows", "dispatch_bytes", "combine_rows", "combine_bytes"), out))

    def _geometry_attrs(self, op: str, ctx: RankContext, config: Config, num_tokens: int, geometry,
                        grouped: bool = False) -> dict:
        """The attributes every internode call has, for an op of `num_tokens` tokens per rank on `geometry`
        (`sizes.internode_*_geometry` of `config`); refuses a Config the kernels cannot run and a Buffer too
        small for the op."""
        if config.num_channels > INTERNODE_MAX_CHANNELS:
            fail(op, f"`config.num_sms` must be at most {2 * INTERNODE_MAX_CHANNELS} in internode mode, got "
                     f"{config.num_sms}")
        check_resident(op, config, self._sm_count)
        if num_tokens > MAX_COUNT:
            fail(op, f"internode mode serves at most {MAX_COUNT} tokens per rank, got T={num_tokens}")
        rows = ctx.num_nodes * -(-num_tokens // config.num_channels)
        if rows > MAX_COUNT:
            fail(op, f"T={num_tokens} tokens over {config.num_channels} channels (`config.num_sms`="
                     f"{config.num_sms}) and {ctx.num_nodes} nodes put up to {rows} rows through one ring in one "
                     f"call, more than the {MAX_COUNT} its positions can count; use more SMs or fewer tokens")
        need = geometry.rdma_bytes
        if need > self.num_rdma_bytes:
            hint = ", expert_grouped=True" if grouped else ""
            fail(op, f"the Buffer is too small: num_rdma_bytes={self.num_rdma_bytes} but these sizes and this Config "
                     f"need {need} in internode mode (jax_deepep.gpu.internode.rdma_bytes_hint(...{hint}, "
                     "config=) gives it before making the Buffer)")
        return dict(axis_name=ctx.axis_name, buffer_id=np.int64(self.symmetric.buffer_id),
                    ranks_per_node=np.int64(self.ranks_per_node), signals=struct_attribute(geometry.signals),
                    rings=struct_attribute(geometry.rings), layout=struct_attribute(geometry.layout))

    def _dispatch_attrs(self, op: str, ctx: RankContext, config: Config, parts, top_k: int, has_ids: bool,
                        has_weights: bool, num_experts: int, expert_alignment: int, grouped: bool = False) -> dict:
        """The attributes of a dispatch custom call moving `parts` (and K ids, weights and, in a first grouped
        dispatch, prefixes per token) with `config`; refuses what the kernels cannot serve."""
        if has_ids and num_experts > INTERNODE_MAX_EXPERTS:
            fail(op, f"`num_experts` must be at most {INTERNODE_MAX_EXPERTS} in internode mode, got {num_experts}")
        geometry = internode_dispatch_geometry(ctx.num_ranks, self.ranks_per_node, config, top_k, has_ids, has_weights,
                                               [_per_token_bytes(p) for p in parts],
                                               has_prefixes=grouped and has_ids)
        return dict(self._geometry_attrs(op, ctx, config, parts[0].shape[0], geometry, grouped),
                    num_experts=np.int64(num_experts if has_ids else 0), expert_alignment=np.int64(expert_alignment))

    def _token_results(self, ctx: RankContext, num_tokens: int, capacity: int) -> tuple:
        """Results every dispatch has: src_rank, src_idx, send_row, recv_rank_prefix, num_recv."""
        i32 = jnp.int32
        return (jax.ShapeDtypeStruct((capacity,), i32), jax.ShapeDtypeStruct((capacity,), i32),
                jax.ShapeDtypeStruct((num_tokens, ctx.num_ranks), i32), jax.ShapeDtypeStruct((ctx.num_ranks,), i32),
                jax.ShapeDtypeStruct((), i32))

    def _route_results(self, ctx: RankContext, num_tokens: int) -> tuple:
        """The last results of every dispatch: `forwarded` and the call number."""
        return (jax.ShapeDtypeStruct((ctx.num_nodes, num_tokens), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))

    def _dispatch_call(self, ctx: RankContext, config: Config, parts, ids, weights, is_token_in_rank, counts: tuple,
                       num_experts: int, capacity: int, expert_alignment: int, op: str):
        """`counts`: the layout's tokens per rank, and per expert with `ids` (what the kernel notifies)."""
        num_tokens = parts[0].shape[0]
        top_k = ids.shape[1] if ids is not None else (weights.shape[1] if weights is not None else 0)
        attrs = self._dispatch_attrs(op, ctx, config, parts, top_k, ids is not None, weights is not None, num_experts,
                                     expert_alignment)
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
        ids = None if topk_idx is None else valid_expert_ids(topk_idx, num_experts)
        counts = (layout.num_tokens_per_rank,) + ((layout.num_tokens_per_expert,) if ids is not None else ())
        recv_parts, recv_ids, recv_weights, meta = self._dispatch_call(
            ctx, config, parts, ids, topk_weights, layout.is_token_in_rank, counts, num_experts, num_worst_tokens,
            expert_alignment, "dispatch")
        src_rank, src_idx, send_row, recv_rank_prefix, num_recv, per_expert, forwarded = meta
        handle = DispatchHandle(
            is_token_in_rank=layout.is_token_in_rank, send_row=send_row, recv_src_rank=src_rank,
            recv_src_idx=src_idx, recv_rank_prefix=recv_rank_prefix, num_recv_tokens=num_recv,
            num_recv_tokens_per_expert=per_expert, route=InternodeRoute(forwarded))
        return DispatchResult(recv_parts, recv_ids, recv_weights, per_expert, num_recv, handle)

    def cached_dispatch(self, ctx: RankContext, config: Config, handle: DispatchHandle, parts, topk_weights=None):
        _route("dispatch", ctx, handle)
        counts = (jnp.sum(handle.is_token_in_rank, axis=0, dtype=jnp.int32),)
        recv_parts, _, recv_weights, _ = self._dispatch_call(
            ctx, config, parts, None, topk_weights, handle.is_token_in_rank, counts, 0, handle.capacity, 1, "dispatch")
        return recv_parts, recv_weights

    def _combine_args(self, ctx: RankContext, config: Config, handle: DispatchHandle, y, bias, top_k: int,
                      grouped: bool = False):
        """What a combine custom call of token-level routing `handle` takes besides its rows and weights, whose
        combined weights are [T, `top_k`] (0: none): (results, the bias operands, the routing operands,
        attributes). A grouped combine returns f32 rows to the forwarders."""
        route = _route("combine", ctx, handle)
        num_tokens, hidden = handle.is_token_in_rank.shape[0], y.shape[1]
        geometry = internode_combine_geometry(ctx.num_ranks, self.ranks_per_node, config, hidden, top_k,
                                              exact_partials=self.exact_combine, f32_returns=grouped)
        attrs = dict(self._geometry_attrs("combine", ctx, config, num_tokens, geometry, grouped),
                     exact_partials=self.exact_combine)
        results = (jax.ShapeDtypeStruct((num_tokens, hidden), y.dtype),
                   optional_result((num_tokens, top_k) if top_k else None, jnp.float32),
                   jax.ShapeDtypeStruct((1,), jnp.int32))
        biases = _bias_operands(bias)
        routing = (handle.recv_rank_prefix, handle.recv_src_idx, handle.num_recv_tokens, handle.is_token_in_rank,
                   route.forwarded)
        return results, biases, routing, attrs

    def combine(self, ctx: RankContext, config: Config, handle: DispatchHandle, y, topk_weights, bias):
        top_k = topk_weights.shape[1] if topk_weights is not None else 0
        results, biases, routing, attrs = self._combine_args(ctx, config, handle, y, bias, top_k)
        x, weights, _token = ffi_call(
            "jax_deepep_internode_combine", results,
            y, optional_operand(None if topk_weights is None else topk_weights.astype(jnp.float32), jnp.float32),
            *biases, *routing, **attrs)
        return x, (weights if topk_weights is not None else None)


class InternodeGroupedOps(GroupedKernelOps):
    """Expert-grouped ops on the internode kernels (InternodeBackend)."""

    def dispatch(self, ctx: RankContext, config: Config, parts, topk_idx, topk_weights, layout: DispatchLayout,
                 num_experts: int, num_worst_tokens: int, expert_alignment: int) -> DispatchResult:
        op = "dispatch"
        n, num_tokens, r = num_worst_tokens, parts[0].shape[0], ctx.num_ranks
        rows, top_k = r * num_tokens, topk_idx.shape[1]
        backend = self.backend
        attrs = backend._dispatch_attrs(op, ctx, config, parts, top_k, True, True, num_experts, expert_alignment,
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
        tokens, backend = handle.tokens, self.backend
        _route("dispatch", ctx, tokens)
        n, num_tokens, top_k = handle.capacity, parts[0].shape[0], handle.pair_row.shape[1]
        has_weights = topk_weights is not None
        attrs = backend._dispatch_attrs("dispatch", ctx, config, parts, top_k if has_weights else 0, False,
                                        has_weights, 0, 1, grouped=True)
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
        f32 = jnp.float32
        top_k = handle.pair_row.shape[1] if topk_weights is not None else 0
        results, biases, routing, attrs = self.backend._combine_args(ctx, config, handle.tokens, y, bias, top_k,
                                                                     grouped=True)
        x, weights, _token = ffi_call(
            "jax_deepep_internode_grouped_combine", results,
            y, optional_operand(None if row_weights is None else row_weights.astype(f32), f32),
            optional_operand(None if topk_weights is None else topk_weights.astype(f32), f32), *biases, *routing,
            handle.pair_row, **attrs)
        return x, (weights if topk_weights is not None else None)
