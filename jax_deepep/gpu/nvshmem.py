"""The process's NVSHMEM set-up, shared by the low-latency and internode backends: loading
`libjax_deepep_nvshmem.so` (cuda/low_latency.cu, cuda/internode.cu and their handlers in xla_ffi/),
joining NVSHMEM as one PE per process, and each Buffer's symmetric buffer (`SymmetricBuffer`).

NVSHMEM runs one PE per process, PE = the process's position on the expert-parallel axis; it is
initialised once per process (NVSHMEM cannot be initialised again after finalize) and finalised at
exit, while each Buffer allocates and frees its own symmetric buffer.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import os
import pathlib
from typing import Optional

import jax

from ..topology import KV_TIMEOUT_MS, kv_client
from ..validation import DeepEPError
from .library import candidates

LIBRARY_NAME = "libjax_deepep_nvshmem.so"
_HOST_LIBRARY = "libnvshmem_host.so.3"
_UNIQUE_ID_KEY = "jax_deepep/nvshmem_unique_id"
_DEFAULT_TIMEOUT_S = 20.0
_HEAP_MARGIN_BYTES = 256 << 20
_TARGETS = ("jax_deepep_ll_dispatch_send", "jax_deepep_ll_dispatch_recv_bf16", "jax_deepep_ll_dispatch_recv_fp8",
            "jax_deepep_ll_combine_send", "jax_deepep_ll_combine_recv", "jax_deepep_internode_dispatch",
            "jax_deepep_internode_combine")


def nvshmem_dir() -> Optional[pathlib.Path]:
    """The folder of the nvidia-nvshmem-cu13 package (include/, lib/), or None."""
    try:
        import nvidia.nvshmem as package
    except ImportError:
        return None
    for path in package.__path__:
        if (pathlib.Path(path) / "lib" / _HOST_LIBRARY).exists():
            return pathlib.Path(path)
    return None


def library_path() -> Optional[pathlib.Path]:
    """Where the built `libjax_deepep_nvshmem.so` is (without loading it), or None."""
    return next((p for p in candidates(LIBRARY_NAME, "JAX_DEEPEP_NVSHMEM_LIBRARY") if p.exists()), None)


@functools.lru_cache(maxsize=None)
def _load():
    """(ctypes library with its FFI targets registered, None) or (None, reason)."""
    path = library_path()
    if path is None:
        return None, f"{LIBRARY_NAME} was not built (needs nvcc and nvidia-nvshmem-cu13 at install time)"
    nv = nvshmem_dir()
    if nv is None:
        return None, "NVSHMEM is missing: pip install nvidia-nvshmem-cu13"
    try:
        # The library links libnvshmem_host.so.3 by soname only: load it from the package first.
        ctypes.CDLL(str(nv / "lib" / _HOST_LIBRARY), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return None, f"{path} failed to load: {e}"
    lib.jax_deepep_nvshmem_get_unique_id.argtypes = [ctypes.c_void_p]
    lib.jax_deepep_nvshmem_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.jax_deepep_nvshmem_alloc.argtypes = [ctypes.c_uint64, ctypes.c_double, ctypes.c_int]
    lib.jax_deepep_nvshmem_last_error.restype = ctypes.c_char_p
    lib.jax_deepep_internode_traffic.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
    lib.jax_deepep_internode_dispatch_bytes.restype = ctypes.c_uint64
    lib.jax_deepep_internode_combine_bytes.restype = ctypes.c_uint64
    for name in _TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="CUDA")
    return lib, None


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1] or ""


def nvshmem_library():
    lib, reason = _load()
    if lib is None:
        raise DeepEPError(f"jax_deepep NVSHMEM kernels (low-latency and internode) unavailable: {reason}")
    return lib


def _check(lib, status: int, what: str):
    if status != 0:
        raise DeepEPError(f"jax_deepep NVSHMEM {what} failed: {lib.jax_deepep_nvshmem_last_error().decode()}")


def timeout_flag() -> int:
    """Nonzero once a low-latency kernel of this process gave up waiting for a peer (1 dispatch, 2 combine)."""
    lib, _ = _load()
    return lib.jax_deepep_nvshmem_timeout_flag() if lib is not None else 0


# ---- the process's NVSHMEM PE ----------------------------------------------------------------
_pe: Optional[tuple] = None  # (rank, num_ranks) once NVSHMEM is up


def _unique_id(lib, rank: int, num_ranks: int) -> ctypes.Array:
    """PE 0 makes the id; the others read it from the jax.distributed key-value store."""
    size = lib.jax_deepep_nvshmem_unique_id_size()
    buf = ctypes.create_string_buffer(size)
    if num_ranks == 1:
        _check(lib, lib.jax_deepep_nvshmem_get_unique_id(buf), "nvshmemx_get_uniqueid")
        return buf
    client = kv_client()
    if client is None:
        raise DeepEPError("Buffer: a low-latency Buffer over several processes needs jax.distributed.initialize() "
                          "first (its key-value store carries the NVSHMEM unique id)")
    if rank == 0:
        _check(lib, lib.jax_deepep_nvshmem_get_unique_id(buf), "nvshmemx_get_uniqueid")
        client.key_value_set(_UNIQUE_ID_KEY, buf.raw.hex())
    else:
        buf.raw = bytes.fromhex(client.blocking_key_value_get(_UNIQUE_ID_KEY, KV_TIMEOUT_MS))
    return buf


def _ensure_pe(lib, rank: int, num_ranks: int, device_ordinal: int, heap_bytes: int):
    global _pe
    if _pe is not None:
        if _pe != (rank, num_ranks):
            raise DeepEPError(f"Buffer: this process is already NVSHMEM PE {_pe[0]} of {_pe[1]}; a low-latency "
                              f"Buffer as rank {rank} of {num_ranks} needs a new process")
        return
    # The symmetric heap is sized once, at init, from the first Buffer unless the user chose a size.
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(heap_bytes))
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")  # NVLink multicast is unused and can hang hosts
    uid = _unique_id(lib, rank, num_ranks)
    _check(lib, lib.jax_deepep_nvshmem_init(uid, rank, num_ranks, device_ordinal), "init")
    _pe = (rank, num_ranks)
    atexit.register(lib.jax_deepep_nvshmem_finalize)


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


class SymmetricBuffer:
    """One Buffer's NVSHMEM symmetric buffer (collective to make and to free).

    Making it joins NVSHMEM first (once per process). `direct_group`: peers in this rank's group of
    that many consecutive ranks are written with loads/stores where NVSHMEM maps them (NVLink, or the
    same GPU); the others get nvshmem puts. By default every peer may be direct.
    """

    def __init__(self, mesh, axis_name: str, num_rdma_bytes: int, timeout_s: Optional[float] = None, *,
                 direct_group: Optional[int] = None):
        lib = nvshmem_library()
        device, rank = _own_device_and_rank(mesh, axis_name)
        num_ranks = int(mesh.shape[axis_name])
        direct_group = num_ranks if direct_group is None else direct_group
        if direct_group < 1 or num_ranks % direct_group:
            raise DeepEPError(f"Buffer: the direct-peer group must divide the number of ranks ({num_ranks}), "
                              f"got {direct_group}")
        if timeout_s is None:
            timeout_s = float(os.environ.get("JAX_DEEPEP_TIMEOUT_S", _DEFAULT_TIMEOUT_S))
        if not 0 < timeout_s < 1e9:
            raise DeepEPError(f"Buffer: the NVSHMEM kernels' timeout must be in (0, 1e9) seconds, got {timeout_s} "
                              "(JAX_DEEPEP_TIMEOUT_S)")
        _ensure_pe(lib, rank, num_ranks, device.local_hardware_id, num_rdma_bytes * 3 // 2 + _HEAP_MARGIN_BYTES)
        _check(lib, lib.jax_deepep_nvshmem_alloc(num_rdma_bytes, timeout_s, direct_group),
               "symmetric buffer allocation")
        self.lib, self.rank, self.num_ranks, self.num_bytes = lib, rank, num_ranks, num_rdma_bytes
        self._live = True

    def destroy(self):
        """Free the symmetric buffer (collective; idempotent)."""
        if self._live:
            self._live = False
            _check(self.lib, self.lib.jax_deepep_nvshmem_free(), "free")
