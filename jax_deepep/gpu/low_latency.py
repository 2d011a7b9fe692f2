"""Low-latency mode on NVSHMEM: the `_nvshmem_lib` module (cuda/low_latency.cu, xla_ffi/) as XLA
FFI custom calls, and the process's NVSHMEM set-up, which the internode kernels (`internode.py`,
same library) share.

`LowLatencyKernels` owns one Buffer's symmetric memory and provides the four low-latency Backend
methods (see `jax_deepep.backend.Backend`). NVSHMEM runs one PE per process, PE = the process's
position on the expert-parallel axis; it is initialised once per process (NVSHMEM cannot be
initialised again after finalize) and finalised at exit, while each Buffer allocates and frees
its own symmetric buffer.

Each op is two custom calls. The send call returns a `token` (int32[1], the op's call number)
that the recv call takes as input: that orders the two calls for XLA and tells the recv kernel
which buffer half to read. `sizes` is a zero-size array whose shape carries the static sizes
(E, M, H) to the recv call, since `transit` holds arrays only.
"""
from __future__ import annotations

import atexit
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..backend import LowLatencyOptions, RankContext
from ..config import FP8_BLOCK
from ..reference.normal import valid_expert_ids
from ..topology import KV_TIMEOUT_MS, kv_client
from ..validation import DeepEPError
from .ffi_call import ffi_call, optional_result
from .library import NVSHMEM, is_available, load, reason_unavailable
from .runtime import next_buffer_id

_UNIQUE_ID_KEY = "jax_deepep/nvshmem_unique_id"
_DEFAULT_TIMEOUT_S = 20.0
_HEAP_MARGIN_BYTES = 256 << 20


def available() -> bool:
    return is_available(NVSHMEM)


def unavailable_reason() -> str:
    return reason_unavailable(NVSHMEM)


def nvshmem_library():
    """The `_nvshmem_lib` extension module."""
    try:
        return load(NVSHMEM)
    except RuntimeError:
        raise DeepEPError("jax_deepep NVSHMEM kernels (low-latency and internode) unavailable: "
                          + unavailable_reason()) from None


def _check(what: str, call, *args):
    """call(*args), its RuntimeError as a DeepEPError naming `what`."""
    try:
        return call(*args)
    except RuntimeError as e:
        raise DeepEPError(f"jax_deepep NVSHMEM {what} failed: {e}") from None


def timeout_flag() -> int:
    """Nonzero once an NVSHMEM kernel of this process gave up waiting for a peer (1 dispatch, 2 combine)."""
    return nvshmem_library().timeout_flag() if available() else 0


# ---- the process's NVSHMEM PE ----------------------------------------------------------------
def _unique_id(lib, rank: int, num_ranks: int) -> bytes:
    """PE 0 makes the id; the others read it from the jax.distributed key-value store."""
    if num_ranks == 1:
        return _check("nvshmemx_get_uniqueid", lib.unique_id)
    client = kv_client()
    if client is None:
        raise DeepEPError("Buffer: a low-latency Buffer over several processes needs jax.distributed.initialize() "
                          "first (its key-value store carries the NVSHMEM unique id)")
    if rank == 0:
        uid = _check("nvshmemx_get_uniqueid", lib.unique_id)
        client.key_value_set(_UNIQUE_ID_KEY, uid.hex())
        return uid
    return bytes.fromhex(client.blocking_key_value_get(_UNIQUE_ID_KEY, KV_TIMEOUT_MS))


def _ensure_pe(lib, rank: int, num_ranks: int, device_ordinal: int, heap_bytes: int):
    pe = lib.pe()
    if pe is not None:
        if pe != (rank, num_ranks):
            raise DeepEPError(f"Buffer: this process is already NVSHMEM PE {pe[0]} of {pe[1]}; a low-latency "
                              f"Buffer as rank {rank} of {num_ranks} needs a new process")
        return
    # The symmetric heap is sized once, at init, from the first Buffer unless the user chose a size.
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(heap_bytes))
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")  # NVLink multicast is unused and can hang hosts
    _check("init", lib.join, _unique_id(lib, rank, num_ranks), rank, num_ranks, device_ordinal)
    atexit.register(lib.leave)


def _own_device_and_rank(mesh, axis_name: str):
    """This process's one device in `mesh` and its index on `axis_name`."""
    others = [name for name in mesh.axis_names if name != axis_name and mesh.shape[name] != 1]
    if others:
        raise DeepEPError(f"Buffer: NVSHMEM (low-latency or internode mode) needs a mesh whose only non-trivial "
                          f"axis is {axis_name!r} (one NVSHMEM PE per rank), got axes {dict(mesh.shape)}")
    devices = list(mesh.devices.reshape(-1))
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    if len(mine) != 1:
        raise DeepEPError(f"Buffer: NVSHMEM (low-latency or internode mode) needs exactly one GPU of the mesh per "
                          f"process (one PE per process); process {jax.process_index()} owns {len(mine)}. Start one "
                          "process per GPU.")
    return devices[mine[0]], mine[0]


# ---- the ops ---------------------------------------------------------------------------------
def _static_sizes(*sizes: int):
    return jnp.zeros((0, *sizes), jnp.int8)


class SymmetricBuffer:
    """One Buffer's NVSHMEM symmetric buffer; joins NVSHMEM first (once per process).

    `direct_group`: peers in this rank's group of that many consecutive ranks are written with
    loads/stores where NVSHMEM maps them (NVLink, or the same GPU); the others get nvshmem puts.
    By default every peer may be direct."""

    def __init__(self, mesh, axis_name: str, num_rdma_bytes: int, timeout_s: Optional[float] = None, *,
                 direct_group: Optional[int] = None):
        self.lib = nvshmem_library()
        device, self.rank = _own_device_and_rank(mesh, axis_name)
        self.num_ranks = int(mesh.shape[axis_name])
        self.num_bytes = int(num_rdma_bytes)
        direct_group = self.num_ranks if direct_group is None else direct_group
        if direct_group < 1 or self.num_ranks % direct_group:
            raise DeepEPError(f"Buffer: the direct-peer group must divide the number of ranks ({self.num_ranks}), "
                              f"got {direct_group}")
        if timeout_s is None:
            timeout_s = float(os.environ.get("JAX_DEEPEP_TIMEOUT_S", _DEFAULT_TIMEOUT_S))
        if not 0 < timeout_s < 1e9:
            raise DeepEPError(f"Buffer: the NVSHMEM kernels' timeout must be in (0, 1e9) seconds, got {timeout_s} "
                              "(JAX_DEEPEP_TIMEOUT_S)")
        self.device = device.local_hardware_id
        _ensure_pe(self.lib, self.rank, self.num_ranks, self.device, self.num_bytes * 3 // 2 + _HEAP_MARGIN_BYTES)
        self.buffer_id = next_buffer_id()
        _check("symmetric buffer allocation", self.lib.create, self.buffer_id, self.device, self.num_bytes,
               timeout_s, direct_group)
        self._live = True

    def destroy(self):
        """Free the symmetric buffer (collective; idempotent)."""
        if self._live:
            self._live = False
            _check("free", self.lib.destroy, self.buffer_id, self.device)


class LowLatencyKernels:
    """The low-latency Backend methods of one Buffer, on NVSHMEM."""

    def __init__(self, mesh, axis_name: str, num_rdma_bytes: int, timeout_s: Optional[float] = None, *,
                 direct_group: Optional[int] = None):
        """`direct_group`: see `SymmetricBuffer`; a Buffer passes its `ranks_per_node`, or 1
        without `allow_nvlink_for_low_latency_mode`."""
        self.buffer = SymmetricBuffer(mesh, axis_name, num_rdma_bytes, timeout_s, direct_group=direct_group)

    def destroy(self):
        """Free the symmetric buffer (collective; idempotent)."""
        self.buffer.destroy()

    def _sizes(self, ctx: RankContext, num_max_dispatch_tokens_per_rank: int, num_experts: int) -> dict:
        """The `sizes` attribute every low-latency custom call takes."""
        return dict(buffer_id=np.int64(self.buffer.buffer_id), num_ranks=np.int64(ctx.num_ranks),
                    num_max_dispatch_tokens_per_rank=np.int64(num_max_dispatch_tokens_per_rank),
                    num_experts=np.int64(num_experts))

    def low_latency_dispatch_send(self, ctx: RankContext, opts: LowLatencyOptions, x, topk_idx) -> dict:
        idx = valid_expert_ids(topk_idx, opts.num_experts)
        send_slot, token = ffi_call(
            "jax_deepep_ll_dispatch_send",
            (jax.ShapeDtypeStruct(idx.shape, jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)),
            x, idx, axis_name=ctx.axis_name,
            sizes=self._sizes(ctx, opts.num_max_dispatch_tokens_per_rank, opts.num_experts),
            use_fp8=bool(opts.use_fp8), round_scale=bool(opts.round_scale or opts.use_ue8m0))
        sizes = _static_sizes(opts.num_experts, opts.num_max_dispatch_tokens_per_rank, x.shape[1])
        return {"token": token, "send_slot": send_slot, "sizes": sizes}

    def low_latency_dispatch_recv(self, ctx: RankContext, opts: LowLatencyOptions, transit: dict) -> tuple:
        num_experts, m, hidden = transit["sizes"].shape[1:]
        experts_per_rank, rows = num_experts // ctx.num_ranks, ctx.num_ranks * m
        if not opts.use_fp8:
            recv_x = jax.ShapeDtypeStruct((experts_per_rank, rows, hidden), jnp.bfloat16)
            scales = optional_result(None, jnp.float32)
        elif opts.use_ue8m0:
            recv_x = jax.ShapeDtypeStruct((experts_per_rank, rows, hidden), jnp.float8_e4m3fn)
            scales = jax.ShapeDtypeStruct((experts_per_rank, rows, hidden // (4 * FP8_BLOCK)), jnp.int32)
        else:
            recv_x = jax.ShapeDtypeStruct((experts_per_rank, rows, hidden), jnp.float8_e4m3fn)
            scales = jax.ShapeDtypeStruct((experts_per_rank, rows, hidden // FP8_BLOCK), jnp.float32)
        x, x_scales, recv_count, recv_src_info, layout_range = ffi_call(
            "jax_deepep_ll_dispatch_recv",
            (recv_x, scales, jax.ShapeDtypeStruct((experts_per_rank,), jnp.int32),
             jax.ShapeDtypeStruct((experts_per_rank, rows), jnp.int32),
             jax.ShapeDtypeStruct((experts_per_rank, ctx.num_ranks, 2), jnp.int32)),
            transit["token"], axis_name=ctx.axis_name, sizes=self._sizes(ctx, m, num_experts),
            use_ue8m0=bool(opts.use_ue8m0))
        recv = (x, x_scales) if opts.use_fp8 else x
        return recv, recv_count, recv_src_info, layout_range, transit["send_slot"]

    def low_latency_combine_send(self, ctx: RankContext, y, topk_idx, topk_weights, handle, use_logfmt: bool,
                                 zero_copy: bool) -> dict:
        del use_logfmt  # bf16 rows always travel as they are
        m, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.num_experts
        token = ffi_call(
            "jax_deepep_ll_combine_send", jax.ShapeDtypeStruct((1,), jnp.int32),
            y, handle.recv_layout_range, axis_name=ctx.axis_name, sizes=self._sizes(ctx, m, num_experts),
            zero_copy=bool(zero_copy))
        return {"token": token, "y": y, "recv_layout_range": handle.recv_layout_range,
                "topk_idx": valid_expert_ids(topk_idx, num_experts),
                "topk_weights": topk_weights.astype(jnp.float32), "send_slot": handle.send_slot,
                "sizes": _static_sizes(num_experts, m, y.shape[2])}

    def low_latency_combine_recv(self, ctx: RankContext, transit: dict):
        num_experts, m, hidden = transit["sizes"].shape[1:]
        num_tokens = transit["topk_idx"].shape[0]
        return ffi_call(
            "jax_deepep_ll_combine_recv", jax.ShapeDtypeStruct((num_tokens, hidden), jnp.bfloat16),
            transit["token"], transit["y"], transit["recv_layout_range"], transit["topk_idx"],
            transit["topk_weights"], transit["send_slot"],
            axis_name=ctx.axis_name, sizes=self._sizes(ctx, m, num_experts))
