"""The process's NVSHMEM set-up, shared by the low-latency and internode backends: the `_nvshmem_lib`
module (cuda/low_latency.cu, cuda/internode_*.cu and their handlers in xla_ffi/), joining NVSHMEM as one
PE per process, and each Buffer's symmetric buffer (`SymmetricBuffer`).

NVSHMEM runs one PE per process, PE = the process's position on the expert-parallel axis; it is
initialised once per process (NVSHMEM cannot be initialised again after finalize) and finalised at
exit, while each Buffer allocates and frees its own symmetric buffer (xla_ffi/nvshmem_runtime.h says
what NVSHMEM allows only once per process). The NVSHMEM unique id travels in the key-value
namespace of the Buffer that joins, and is deleted as soon as every PE has joined (or joining failed).
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import weakref
from typing import Optional

import jax

from ..buffer_keys import BufferKeys
from ..validation import DeepEPError
from .library import NVSHMEM, is_available, load, reason_unavailable
from .teardown import Teardown, release_dropped

_UNIQUE_ID_KEY = "nvshmem_unique_id"
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


# ---- the process's NVSHMEM PE ----------------------------------------------------------------
# False once a destroy went on without a peer, or found this process's CUDA context lost (a kernel
# trapped): nvshmem_finalize, collective, would then wait forever at exit.
_finalize_at_exit = True


def _leave(lib):
    lib.leave(_finalize_at_exit)


def _unique_id(lib, rank: int, num_ranks: int, keys: BufferKeys) -> bytes:
    """PE 0 makes the id; the others read it from the Buffer's namespace in the key-value store."""
    if num_ranks == 1:
        return _check("nvshmemx_get_uniqueid", lib.unique_id)
    if rank == 0:
        uid = _check("nvshmemx_get_uniqueid", lib.unique_id)
        keys.set(_UNIQUE_ID_KEY, uid.hex())
        return uid
    return bytes.fromhex(keys.get(_UNIQUE_ID_KEY))


def start_environment(heap_bytes: int, num_qps_per_rank: int) -> dict:
    """The NVSHMEM variables this process's first NVSHMEM Buffer sets where the environment has none
    (NVSHMEM reads them once, as the process joins): the symmetric heap's size, NVLink multicast off
    (unused, and it can hang hosts), and with `num_qps_per_rank` > 0 that many reliable-connection QPs per
    peer for InfiniBand GPUDirect Async (`NVSHMEM_IBGDA_NUM_RC_PER_PE`; acts only where the process also
    sets `NVSHMEM_IB_ENABLE_IBGDA=1`)."""
    env = {"NVSHMEM_SYMMETRIC_SIZE": str(heap_bytes), "NVSHMEM_DISABLE_NVLS": "1"}
    if num_qps_per_rank > 0:
        env["NVSHMEM_IBGDA_NUM_RC_PER_PE"] = str(num_qps_per_rank)
    return env


def _ensure_pe(lib, rank: int, num_ranks: int, device_ordinal: int, environment: dict, keys: BufferKeys):
    pe = lib.pe()
    if pe is not None:
        if pe != (rank, num_ranks):
            raise DeepEPError(f"Buffer: this process is already NVSHMEM PE {pe[0]} of {pe[1]}; a low-latency "
                              f"Buffer as rank {rank} of {num_ranks} needs a new process")
        return
    for name, value in environment.items():  # what the user set stands
        os.environ.setdefault(name, value)
    try:
        _check("init", lib.join, _unique_id(lib, rank, num_ranks, keys), rank, num_ranks, device_ordinal)
    finally:
        # Joining returns once every PE has joined, so every PE has read the id; a failed join needs it no more.
        if rank == 0 and num_ranks > 1:
            keys.delete(_UNIQUE_ID_KEY)
    atexit.register(_leave, lib)


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
                          "process per GPU (jax.distributed.initialize(..., local_device_ids=[gpu]) or "
                          "CUDA_VISIBLE_DEVICES=gpu in each), or use normal intranode mode, which serves a process "
                          "owning several GPUs.")
    return devices[mine[0]], mine[0]


@dataclasses.dataclass
class _Holdings:
    """What a SymmetricBuffer holds, kept apart from it so that its finalizer can release it."""

    lib: object
    buffer_id: int
    device: int
    num_ranks: int
    keys: BufferKeys
    teardown: Teardown
    attempts: int = 0  # collective destroys tried: each meets at its own barrier
    context_lost: bool = False  # waiting for the kernels met a CUDA error: a trapped kernel's sticky one
    released: bool = False


def _release(held: _Holdings, wait_s: Optional[float]):
    """Wait for this PE's kernels, then, if every PE arrives within `wait_s` seconds (None: no waiting,
    so no collective free beside a lone PE), free the symmetric memory collectively; free what is
    local in any case. Goes on past failures and raises them together; a later call retries what
    failed."""
    global _finalize_at_exit
    if held.released:
        return
    teardown = held.teardown
    retired = "waiting for this process's kernels on the buffer"
    if not teardown.run(retired, held.lib.retire, held.buffer_id, held.device):
        teardown.raise_problems()  # a handler may still hold it: freeing anything is not safe yet
    if any(problem.startswith(retired) for problem in teardown.problems):
        held.context_lost = True
        _finalize_at_exit = False
    # A PE whose CUDA context is lost takes part in no collective (nor nvshmem_finalize at exit).
    collective = not held.context_lost and held.num_ranks == 1
    if not held.context_lost and held.num_ranks > 1 and wait_s is not None:
        held.attempts += 1
        # nvshmem_free waits for every PE with no timeout: first make sure that they are all here.
        collective = teardown.run("waiting for every process to reach destroy", held.keys.barrier,
                                  f"destroy/{held.attempts}", wait_s)
    held.released = teardown.run("freeing the buffer", held.lib.release, held.buffer_id, held.device, collective)
    if not collective and held.num_ranks > 1:
        if wait_s is None:
            why = "freeing it is collective, and a dropped Buffer waits for no peer"
        else:
            why = "a peer process that did not come is taken as gone, or this process's CUDA context is lost"
            _finalize_at_exit = False  # nvshmem_finalize would wait for that peer at exit
        teardown.problems.append(f"the collective free was skipped ({why}): this process's NVSHMEM symmetric "
                                 "memory stays allocated until it exits")
    teardown.raise_problems()


class SymmetricBuffer:
    """One Buffer's NVSHMEM symmetric buffer (collective to make and to free).

    Making it joins NVSHMEM first (once per process); it takes the agreed id of its Buffer (`keys`).
    Every wait of its kernels on a peer gives up after `timeout_s` seconds (the Buffer's, from
    `buffer.resolve_timeout_s`), and so does `destroy()`'s wait for the other PEs. `direct_group`:
    peers in this rank's group of that many consecutive ranks are written with loads/stores where
    NVSHMEM maps them (NVLink, or the same GPU); the others get nvshmem puts. By default every peer
    may be direct. `map_other_groups`: peers outside the group are written through the mapping too,
    where NVSHMEM gives one (the group then only says which ranks form a node). `num_qps_per_rank`: the
    Buffer's, for the process's NVSHMEM start (`start_environment`). Dropped without
    `destroy()`, what is local is freed at garbage collection or exit; the symmetric memory
    (collective) stays until the process leaves NVSHMEM.
    """

    def __init__(self, mesh, axis_name: str, num_rdma_bytes: int, timeout_s: float, keys: BufferKeys, *,
                 direct_group: Optional[int] = None, map_other_groups: bool = False, num_qps_per_rank: int = 0):
        # The process model first: a process owning several GPUs is refused before NVSHMEM is loaded.
        device, self.rank = _own_device_and_rank(mesh, axis_name)
        self.lib = nvshmem_library()
        self.num_ranks = int(mesh.shape[axis_name])
        self.num_bytes = int(num_rdma_bytes)
        self.timeout_s = timeout_s
        direct_group = self.num_ranks if direct_group is None else direct_group
        if direct_group < 1 or self.num_ranks % direct_group:
            raise DeepEPError(f"Buffer: the direct-peer group must divide the number of ranks ({self.num_ranks}), "
                              f"got {direct_group}")
        self.device = device.local_hardware_id
        _ensure_pe(self.lib, self.rank, self.num_ranks, self.device,
                   start_environment(self.num_bytes * 3 // 2 + _HEAP_MARGIN_BYTES, num_qps_per_rank), keys)
        self.buffer_id = keys.buffer_id
        if self.num_ranks > 1:  # nvshmem_malloc is collective with no timeout: meet every PE first, bounded
            keys.barrier("allocate", timeout_s)
        _check("symmetric buffer allocation", self.lib.create, self.buffer_id, self.device, self.num_bytes,
               timeout_s, direct_group, map_other_groups)
        self._held = _Holdings(self.lib, self.buffer_id, self.device, self.num_ranks, keys,
                               Teardown(f"Buffer {self.buffer_id}: releasing the NVSHMEM symmetric buffer"))
        self._finalizer = weakref.finalize(self, release_dropped, f"Buffer {self.buffer_id}'s NVSHMEM buffer",
                                           _release, self._held, None)

    def failures(self) -> list:
        """What the first failed kernel of this buffer reports (xla_ffi/failure.h); [] if none failed."""
        message = self.lib.failure(self.buffer_id, self.device)  # "" once destroyed
        return [message] if message else []

    def destroy(self):
        """Free the symmetric buffer: collective, with every PE met first for at most `timeout_s`; a PE
        that does not come is taken as gone, and then only what is local is freed. Idempotent;
        everything that can be released is, even after a failure, which is then raised as one
        DeepEPError; calling it again retries what failed."""
        _release(self._held, self.timeout_s)
        if self._held.released:
            self._finalizer.detach()
