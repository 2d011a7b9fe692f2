"""The CUDA backends: our kernels as XLA FFI custom calls (see xla_ffi/ and cuda/), one backend per mode.

`make_backends` chooses, once per Buffer, which backend serves each mode on a GPU mesh:
- normal mode: `IntranodeBackend` (gpu/intranode.py) for an axis within one node of up to 8 ranks;
  `InternodeBackend` (gpu/internode.py) for an axis of several nodes when the Buffer has `num_rdma_bytes`;
  otherwise the pure-JAX `ReferenceBackend`, with a warning saying why;
- low-latency mode: `LowLatencyBackend` (gpu/low_latency.py) for a `low_latency_mode` Buffer with
  `num_rdma_bytes`: within one node (and `allow_nvlink_for_low_latency_mode`) on a low-latency area of
  the intranode backend's communication buffers, mapped over CUDA IPC or peer access (any process
  model); across nodes over NVSHMEM (one process per GPU); else the pure-JAX backend (with a warning
  when only the NVSHMEM library is missing).
Every GPU Buffer is watched by `failure_watchdog` until it is destroyed.
"""
from __future__ import annotations

import warnings

from .. import reference
from ..config import MAX_NVL_PEERS
from ..validation import DeepEPError
from . import failure_watchdog
from .library import available, unavailable_reason

__all__ = ["available", "unavailable_reason", "make_backends"]

def _use_reference(buffer, what: str, why: str):
    warnings.warn(f"jax_deepep: {what} use the pure-JAX implementation: {why}")
    return reference.ReferenceBackend(buffer.exact_internode_combine)


def _low_latency_within_node(buffer) -> bool:
    """Whether the low-latency ops run on the intranode backend's buffers: every rank in one node of NVLink
    peers, which DeepEP's allow_nvlink_for_low_latency_mode=False forbids (every row then goes by NVSHMEM put)."""
    return (buffer.low_latency_mode and buffer.num_rdma_bytes > 0 and buffer.allow_nvlink_for_low_latency_mode
            and buffer.ranks_per_node == buffer.num_ranks <= MAX_NVL_PEERS)


def _normal_backend(buffer, keys):
    if buffer.ranks_per_node > MAX_NVL_PEERS:
        return _use_reference(buffer, "normal-mode ops", f"the CUDA kernels take nodes of up to {MAX_NVL_PEERS} "
                                                         f"ranks, this axis has {buffer.ranks_per_node} per node")
    if buffer.ranks_per_node == buffer.num_ranks:
        from .intranode import IntranodeBackend

        return IntranodeBackend.open(buffer.mesh, buffer.axis_name, buffer.num_nvl_bytes, keys,
                                     timeout_s=buffer.timeout_s,
                                     low_latency_bytes=buffer.num_rdma_bytes if _low_latency_within_node(buffer) else 0)
    if buffer.low_latency_mode or buffer.num_rdma_bytes <= 0:
        return _use_reference(buffer, "normal-mode ops", f"the axis spans {buffer.num_ranks // buffer.ranks_per_node} "
                                                         "nodes and the internode kernels need `num_rdma_bytes`")
    from . import nvshmem
    from .internode import InternodeBackend

    if not nvshmem.available():
        return _use_reference(buffer, "internode ops", nvshmem.unavailable_reason())
    return InternodeBackend.open(buffer.mesh, buffer.axis_name, buffer.num_rdma_bytes, buffer.ranks_per_node, keys,
                                 timeout_s=buffer.timeout_s, exact_combine=buffer.exact_internode_combine,
                                 puts_only=buffer.internode_puts_only, num_qps_per_rank=buffer.num_qps_per_rank)


def _low_latency_backend(buffer, keys, normal):
    if not (buffer.low_latency_mode and buffer.num_rdma_bytes > 0):
        return reference.BACKEND  # the ops refuse such a Buffer before reaching a backend
    from . import nvshmem
    from .low_latency import LowLatencyBackend

    if _low_latency_within_node(buffer):
        return LowLatencyBackend.within_node(normal.comm)

    if not nvshmem.available():
        return _use_reference(buffer, "low-latency ops", nvshmem.unavailable_reason())
    # DeepEP's allow_nvlink_for_low_latency_mode=False sends every peer's rows as NVSHMEM puts.
    direct_group = buffer.ranks_per_node if buffer.allow_nvlink_for_low_latency_mode else 1
    return LowLatencyBackend.open(buffer.mesh, buffer.axis_name, buffer.num_rdma_bytes, keys,
                                  timeout_s=buffer.timeout_s, direct_group=direct_group,
                                  num_qps_per_rank=buffer.num_qps_per_rank)


def make_backends(buffer, keys) -> tuple:
    """(normal-mode backend, low-latency backend) of `buffer` on a GPU mesh, both under the Buffer's
    agreed id and key-value namespace `keys` (a `BufferKeys`); on failure, frees what was made before
    raising."""
    normal = _normal_backend(buffer, keys)
    try:
        backends = normal, _low_latency_backend(buffer, keys, normal)
    except BaseException as error:
        # Collective like any destroy, and bounded by the Buffer's timeout where a process is missing.
        try:
            normal.destroy()
        except DeepEPError as cleanup:
            error.add_note(f"jax_deepep: freeing the normal-mode buffers made before failed too: {cleanup}")
        raise
    failure_watchdog.watch(buffer, backends)
    return backends
