"""Low-latency mode: the kernels of `cuda/low_latency.cu` as XLA FFI custom calls, over one of two memories:
  - within one node, the low-latency area of the Buffer's communication buffers (`runtime.CommBuffers`),
    every peer mapped over CUDA IPC or peer access: the `_intranode_lib` module's `jax_deepep_ll_node_*`
    targets; one process per GPU or one process owning several GPUs;
  - across nodes (or without NVLink between the ranks), NVSHMEM's symmetric buffer (`nvshmem.py`): the
    `_nvshmem_lib` module's `jax_deepep_ll_*` targets; one process per GPU.

Each op is two custom calls. The send call returns a `token` (int32[1], the op's call number)
that the recv call takes as input: that orders the two calls for XLA and tells the recv kernel
which buffer half to read. A one-rank combine is its receive call alone, with no token: it moves
nothing, and sums the rows of `y` where they are. `sizes` is a zero-size array whose shape carries
the static sizes (E, M, H; and for combine whether rows travel as LogFMT) to the recv call, since
`transit` holds arrays only. Every send gets a `call_site` number of its own, which only keeps XLA
from merging two equal sends (xla_ffi/low_latency_ffi.cc).
"""
from __future__ import annotations

import itertools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..backend import LowLatencyOptions, RankContext
from ..buffer_keys import BufferKeys
from ..routing import valid_expert_ids
from ..sizes import low_latency_layout, low_latency_num_halves
from ..validation import DeepEPError
from .ffi_call import ffi_call, optional_operand, optional_result, struct_attribute
from .nvshmem import SymmetricBuffer


_call_sites = itertools.count(1)


def _static_sizes(*sizes: int):
    return jnp.zeros((0, *sizes), jnp.int8)


NVSHMEM_TARGET_PREFIX = "jax_deepep_ll_"
NODE_TARGET_PREFIX = "jax_deepep_ll_node_"


def _kernel_ids(topk_idx, num_experts: int):
    """Expert ids as the low-latency kernels take them: int32, as given (the kernels skip ids outside
    [0, E) themselves); wider ids are checked before they are narrowed, which could wrap them into range."""
    return topk_idx if topk_idx.dtype == jnp.int32 else valid_expert_ids(topk_idx, num_experts)


class LowLatencyBackend:
    """The four low-latency methods of `jax_deepep.backend.LowLatencyBackend` on one Buffer's memory:
    `memory` (a `SymmetricBuffer`, or the `CommBuffers` of a Buffer within one node: its `buffer_id`,
    `destroy()` and `failures()`) holding `num_bytes` of halves, driven through the custom calls named
    `targets` + op."""

    name = "cuda"
    mode = "low_latency"

    def __init__(self, memory, num_bytes: int, targets: str):
        self.memory = memory
        self.num_bytes = int(num_bytes)
        self.targets = targets
        # (M, H, E) of the first op traced: where the halves lie depends on them, and calls of other
        # sizes would overlap the halves of calls still in flight, so the Buffer serves only these.
        self.served = None

    @classmethod
    def open(cls, mesh, axis_name: str, num_rdma_bytes: int, keys: BufferKeys, *, timeout_s: float,
             direct_group: Optional[int] = None, num_qps_per_rank: int = 0):
        """Over NVSHMEM: joins NVSHMEM and allocates the symmetric buffer of the Buffer `keys` names
        (collective); `timeout_s`, `direct_group` and `num_qps_per_rank` as for `SymmetricBuffer` (a Buffer
        passes its `ranks_per_node`, or 1 without `allow_nvlink_for_low_latency_mode`, and its own QPs)."""
        symmetric = SymmetricBuffer(mesh, axis_name, num_rdma_bytes, timeout_s, keys, direct_group=direct_group,
                                    num_qps_per_rank=num_qps_per_rank)
        return cls(symmetric, num_rdma_bytes, NVSHMEM_TARGET_PREFIX)

    @classmethod
    def within_node(cls, comm):
        """Within one node: on the low-latency area of `comm` (`runtime.CommBuffers` made with
        `low_latency_bytes`), which the Buffer's normal-mode backend shares."""
        return cls(comm, comm.low_latency_bytes, NODE_TARGET_PREFIX)

    @property
    def transport(self) -> str:
        """"node" (CUDA IPC or peer access within one node) or "nvshmem"."""
        return "node" if self.targets == NODE_TARGET_PREFIX else "nvshmem"

    def destroy(self):
        """Free the memory (collective; idempotent: a shared `CommBuffers` is freed once)."""
        self.memory.destroy()

    def failures(self) -> list:
        return self.memory.failures()

    def _sizes(self, ctx: RankContext, num_max_dispatch_tokens_per_rank: int, num_experts: int, hidden: int) -> dict:
        """The `sizes` and `layout` attributes every low-latency custom call takes: the Buffer, the
        static sizes, the layout of a buffer half and how many halves the buffer holds."""
        m = num_max_dispatch_tokens_per_rank
        if self.served is None:
            self.served = (m, hidden, num_experts)
        elif self.served != (m, hidden, num_experts):
            raise DeepEPError(
                "low-latency ops: a Buffer's low-latency kernels serve one (num_max_dispatch_tokens_per_rank, "
                f"hidden, num_experts), first {self.served}, got {(m, hidden, num_experts)}: the calls' buffer halves "
                "would overlap. Make one Buffer per size (docs/LOW_LATENCY.md)")
        layout = low_latency_layout(m, hidden, num_experts)
        sizes = dict(buffer_id=np.int64(self.memory.buffer_id), num_ranks=np.int64(ctx.num_ranks),
                     num_max_dispatch_tokens_per_rank=np.int64(m), num_experts=np.int64(num_experts),
                     num_halves=np.int64(low_latency_num_halves(self.num_bytes, layout)))
        return dict(sizes=sizes, layout=struct_attribute(layout))

    def low_latency_dispatch_send(self, ctx: RankContext, opts: LowLatencyOptions, x, topk_idx) -> dict:
        idx = _kernel_ids(topk_idx, opts.num_experts)  # the kernel also sends a token's repeats nowhere
        row_bytes = low_latency_layout(opts.num_max_dispatch_tokens_per_rank, x.shape[1],
                                       opts.num_experts).dispatch_row_bytes
        # FP8 with other ranks: scratch for each token's row, cast once before it goes to its experts (with
        # one rank the receive casts each token once as it packs its rows: cuda/low_latency.cu).
        has_cast_rows = opts.use_fp8 and ctx.num_ranks > 1
        cast_rows = optional_result((x.shape[0], row_bytes) if has_cast_rows else None, jnp.uint8)
        send_slot, token, cast = ffi_call(
            self.targets + "dispatch_send",
            (jax.ShapeDtypeStruct(idx.shape, jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32), cast_rows),
            x, idx, axis_name=ctx.axis_name,
            **self._sizes(ctx, opts.num_max_dispatch_tokens_per_rank, opts.num_experts, x.shape[1]),
            use_fp8=bool(opts.use_fp8), round_scale=opts.power_of_two_scales,
            call_site=np.int64(next(_call_sites)))
        sizes = _static_sizes(opts.num_experts, opts.num_max_dispatch_tokens_per_rank, x.shape[1])
        # x, the ids, the slots and the cast rows go on to the receive, which reads this rank's own rows there
        # (cuda/low_latency.cu).
        # (none: None, an absent operand made in the receive: a (0,) operand crossing programs crashed the GPU compile)
        return {"token": token, "x": x, "topk_idx": idx, "cast_rows": cast if has_cast_rows else None,
                "send_slot": send_slot, "sizes": sizes}

    def low_latency_dispatch_recv(self, ctx: RankContext, opts: LowLatencyOptions, transit: dict) -> tuple:
        num_experts, m, hidden = transit["sizes"].shape[1:]
        experts_per_rank, rows = num_experts // ctx.num_ranks, ctx.num_ranks * m
        recv_x, *scales = opts.recv_x_parts(ctx.num_ranks, hidden)
        scales = scales[0] if scales else optional_result(None, jnp.float32)
        x, x_scales, recv_count, recv_src_info, layout_range = ffi_call(
            self.targets + "dispatch_recv",
            (recv_x, scales, jax.ShapeDtypeStruct((experts_per_rank,), jnp.int32),
             jax.ShapeDtypeStruct((experts_per_rank, rows), jnp.int32),
             jax.ShapeDtypeStruct((experts_per_rank, ctx.num_ranks, 2), jnp.int32)),
            transit["token"], transit["x"], transit["topk_idx"], transit["send_slot"],
            optional_operand(transit["cast_rows"], jnp.uint8), axis_name=ctx.axis_name,
            **self._sizes(ctx, m, num_experts, hidden), use_ue8m0=bool(opts.use_ue8m0),
            round_scale=opts.power_of_two_scales)
        recv = (x, x_scales) if opts.use_fp8 else x
        return recv, recv_count, recv_src_info, layout_range, transit["send_slot"]

    def low_latency_combine_send(self, ctx: RankContext, y, topk_idx, topk_weights, handle, use_logfmt: bool,
                                 zero_copy: bool) -> dict:
        m, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.num_experts
        token = None  # one rank sends nothing: its receive sums the rows of y alone, numbering no call
        if ctx.num_ranks > 1:
            token = ffi_call(
                self.targets + "combine_send", jax.ShapeDtypeStruct((1,), jnp.int32),
                y, handle.recv_layout_range, axis_name=ctx.axis_name, zero_copy=bool(zero_copy),
                use_logfmt=bool(use_logfmt), call_site=np.int64(next(_call_sites)),
                **self._sizes(ctx, m, num_experts, y.shape[2]))
        return {"token": token, "y": y, "recv_layout_range": handle.recv_layout_range,
                "topk_idx": _kernel_ids(topk_idx, num_experts),
                "topk_weights": topk_weights.astype(jnp.float32), "send_slot": handle.send_slot,
                "sizes": _static_sizes(num_experts, m, y.shape[2], int(use_logfmt))}

    def low_latency_combine_recv(self, ctx: RankContext, transit: dict):
        num_experts, m, hidden, use_logfmt = transit["sizes"].shape[1:]
        num_tokens = transit["topk_idx"].shape[0]
        return ffi_call(
            self.targets + "combine_recv", jax.ShapeDtypeStruct((num_tokens, hidden), jnp.bfloat16),
            optional_operand(transit["token"], jnp.int32), transit["y"], transit["recv_layout_range"],
            transit["topk_idx"], transit["topk_weights"], transit["send_slot"],
            axis_name=ctx.axis_name, use_logfmt=bool(use_logfmt), **self._sizes(ctx, m, num_experts, hidden))
