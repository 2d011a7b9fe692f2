"""Host side of the CUDA backend: one communication buffer per local device of the mesh.

Each device's rank is its coordinate along the expert-parallel axis; its peers are the devices
that differ from it only along that axis. A peer in this process is mapped with peer access;
a peer in another process through its CUDA IPC handle, swapped via the jax.distributed
key-value store under the Buffer's namespace (`BufferKeys`) and deleted once every process has
mapped its peers' buffers, so a Buffer holds no key after creation. The FFI handlers find a
device's buffer by (buffer id, device ordinal).
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Optional

import jax
import numpy as np

from ..buffer_keys import BufferKeys
from ..validation import DeepEPError
from .library import INTRANODE, load
from .teardown import Teardown, release_dropped


def _lib():
    return load(INTRANODE)


def device_free_bytes(ordinal: int) -> int:
    """Free memory of a local device, as the CUDA driver reports it."""
    return int(_lib().device_free_bytes(ordinal))


def _check(call, what: str, *args):
    """call(*args), its RuntimeError prefixed with `what`."""
    try:
        return call(*args)
    except RuntimeError as e:
        raise RuntimeError(f"jax_deepep: {what} failed: {e}") from None


@dataclasses.dataclass
class _Holdings:
    """What a CommBuffers holds, kept apart from it so that its finalizer can release it."""

    buffer_id: int
    ordinals: list  # the local devices with a buffer
    keys: BufferKeys
    teardown: Teardown
    attempts: int = 0  # collective destroys tried: each meets at its own barrier
    released: bool = False


def _release(held: _Holdings, wait_s: Optional[float]):
    """Unmap the peers' buffers on every local device, wait up to `wait_s` seconds (None: not at all)
    until every process has, then free the buffers. Goes on past failures and raises them together;
    a later call retries only what failed."""
    if held.released:
        return
    lib, teardown = _lib(), held.teardown
    for ordinal in held.ordinals:
        teardown.run(f"unmapping the peers' buffers on device {ordinal}", lib.disconnect, held.buffer_id, ordinal)
    if wait_s is not None:  # a peer process frees its buffer only once ours no longer maps it
        held.attempts += 1
        if not teardown.run("waiting for every process to unmap the buffers", held.keys.barrier,
                            f"destroy/{held.attempts}", wait_s):
            teardown.problems.append("a peer process that did not come is taken as gone: this process freed its "
                                     "buffers anyway")
    done = [teardown.run(f"freeing the buffer on device {ordinal}", lib.destroy, held.buffer_id, ordinal)
            for ordinal in held.ordinals]
    held.released = all(done)
    teardown.raise_problems()


class CommBuffers:
    """The communication buffers of every local device of `mesh` for axis `axis_name`, under the id and
    key-value namespace `keys` of their Buffer; `timeout_s` bounds the waits for the other processes at
    creation and in `destroy()`. With `low_latency_bytes`, each buffer also has a low-latency area of
    that many bytes of halves, for the low-latency kernels within one node (xla_ffi/runtime.h). Dropped
    without `destroy()`, they are freed at garbage collection or exit (with no waiting on peers: a peer
    process that still maps them must be gone or done with them)."""

    def __init__(self, mesh, axis_name: str, num_bytes: int, keys: BufferKeys, *, timeout_s: float,
                 low_latency_bytes: int = 0):
        lib = _lib()
        self.keys = keys
        self.buffer_id = keys.buffer_id
        self.num_bytes = int(num_bytes)
        self.low_latency_bytes = int(low_latency_bytes)
        self.ring_bytes = self.num_bytes - lib.RING_OFFSET
        self.timeout_s = timeout_s
        axis = mesh.axis_names.index(axis_name)
        devices = np.moveaxis(np.asarray(mesh.devices), axis, -1)
        groups = devices.reshape(-1, devices.shape[-1])  # each row: one expert-parallel group, by rank
        me = jax.process_index()
        self._local = []  # (device ordinal, rank, group row)
        for group in groups:
            for rank, device in enumerate(group):
                if device.process_index == me:
                    self._local.append((device.local_hardware_id, rank, group))
        # Every process computes this alike, so all of them, or none, meet at the barriers.
        self._across_processes = any(len({d.process_index for d in group}) > 1 for group in groups)
        self._held = _Holdings(self.buffer_id, [], keys,
                               Teardown(f"Buffer {self.buffer_id}: releasing the communication buffers"))
        self._finalizer = weakref.finalize(self, release_dropped, f"Buffer {self.buffer_id}'s communication buffers",
                                           _release, self._held, None)
        published = []  # this process's IPC handle keys, deleted once read (or once creation failed)
        try:
            for ordinal, rank, group in self._local:
                _check(lib.create, "allocating the communication buffer", self.buffer_id, ordinal, rank, len(group),
                       self.num_bytes, timeout_s, self.low_latency_bytes)
                self._held.ordinals.append(ordinal)
            self._connect(published)
        except Exception as error:
            # The other processes may not be here to meet: free what this one made, without waiting.
            try:
                _release(self._held, None)
            except DeepEPError as cleanup:
                error.add_note(f"jax_deepep: freeing the buffers made so far failed too: {cleanup}")
            self._finalizer.detach()
            raise
        finally:
            for name in published:
                keys.delete(name)

    @staticmethod
    def _key(device) -> str:
        return f"device/{device.id}"

    def _connect(self, published: list):
        """Map the peers' buffers on every local device. Across processes the IPC handles travel through
        the store (the keys this process sets are added to `published`), and the processes then meet,
        so that every handle has been read when this returns."""
        lib = _lib()
        if self._across_processes:
            for ordinal, rank, group in self._local:
                handle = _check(lib.ipc_handle, "exporting the IPC handle", self.buffer_id, ordinal)
                published.append(self._key(group[rank]))
                self.keys.set(published[-1], handle.hex())
        for ordinal, rank, group in self._local:
            for peer_rank, peer in enumerate(group):
                if peer_rank == rank:
                    continue
                if peer.process_index == jax.process_index():
                    _check(lib.connect_local, "mapping a peer's buffer (peer access)", self.buffer_id, ordinal,
                           peer_rank, peer.local_hardware_id)
                else:
                    hex_handle = self.keys.get(self._key(peer))
                    _check(lib.connect_ipc, "opening a peer's IPC handle", self.buffer_id, ordinal, peer_rank,
                           bytes.fromhex(hex_handle))
        if self._across_processes:
            try:
                self.keys.barrier("connected", self.timeout_s)
            except DeepEPError as e:
                raise DeepEPError(f"Buffer: mapping the peers' buffers over CUDA IPC: {e}") from None

    def failures(self) -> list:
        """What the first failed kernel on each local device reports (xla_ffi/failure.h); [] if none failed."""
        lib = _lib()
        return [m for m in (lib.failure(self.buffer_id, ordinal) for ordinal, _, _ in self._local) if m]

    def destroy(self):
        """Unmap the peers' buffers, wait (up to `timeout_s`) until every process has, then free the
        buffers. Collective; idempotent. Everything that can be released is, even after a failure,
        which is then raised as one DeepEPError; calling it again retries what failed."""
        _release(self._held, self.timeout_s if self._across_processes else None)
        if self._held.released:
            self._finalizer.detach()
