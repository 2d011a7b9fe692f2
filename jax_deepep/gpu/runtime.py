"""Host side of the CUDA backend: one communication buffer per local device of the mesh.

Each device's rank is its coordinate along the expert-parallel axis; its peers are the devices
that differ from it only along that axis. A peer in this process is mapped with peer access;
a peer in another process through its CUDA IPC handle, swapped via the jax.distributed
key-value store under the Buffer's namespace (`BufferKeys`). The FFI handlers find a device's
buffer by (buffer id, device ordinal).
"""
from __future__ import annotations

import jax
import numpy as np

from ..buffer_keys import BufferKeys
from .library import INTRANODE, load


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


class CommBuffers:
    """The communication buffers of every local device of `mesh` for axis `axis_name`, under the id and
    key-value namespace `keys` of their Buffer."""

    def __init__(self, mesh, axis_name: str, num_bytes: int, keys: BufferKeys, timeout_s: float):
        lib = _lib()
        self.keys = keys
        self.buffer_id = keys.buffer_id
        self.num_bytes = int(num_bytes)
        self.ring_bytes = self.num_bytes - lib.RING_OFFSET
        axis = mesh.axis_names.index(axis_name)
        devices = np.moveaxis(np.asarray(mesh.devices), axis, -1)
        groups = devices.reshape(-1, devices.shape[-1])  # each row: one expert-parallel group, by rank
        me = jax.process_index()
        self._local = []  # (device ordinal, rank, group row)
        for group in groups:
            for rank, device in enumerate(group):
                if device.process_index == me:
                    self._local.append((device.local_hardware_id, rank, group))
        self._destroyed = False
        self._remote_peers = False
        try:
            for ordinal, rank, group in self._local:
                _check(lib.create, "allocating the communication buffer", self.buffer_id, ordinal, rank, len(group),
                       self.num_bytes, timeout_s)
            self._connect()
        except Exception:
            self.destroy()
            raise

    @staticmethod
    def _key(device) -> str:
        return f"device/{device.id}"

    def _connect(self):
        lib = _lib()
        self._remote_peers = any(peer.process_index != jax.process_index()
                                 for _, _, group in self._local for peer in group)
        if self._remote_peers:
            for ordinal, rank, group in self._local:
                handle = _check(lib.ipc_handle, "exporting the IPC handle", self.buffer_id, ordinal)
                self.keys.set(self._key(group[rank]), handle.hex())
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

    def failures(self) -> list:
        """What the first failed kernel on each local device reports (xla_ffi/failure.h); [] if none failed."""
        lib = _lib()
        return [m for m in (lib.failure(self.buffer_id, ordinal) for ordinal, _, _ in self._local) if m]

    def destroy(self):
        """Unmap peers everywhere, wait for every process, then free and delete the IPC handle keys
        (idempotent)."""
        if self._destroyed:
            return
        self._destroyed = True
        lib = _lib()
        for ordinal, _, _ in self._local:
            _check(lib.disconnect, "unmapping peers' buffers", self.buffer_id, ordinal)
        if self._remote_peers:  # a peer process may still have our buffer mapped, or be reading its handle
            self.keys.barrier("destroy")
            for _, rank, group in self._local:
                self.keys.delete(self._key(group[rank]))
        for ordinal, _, _ in self._local:
            _check(lib.destroy, "freeing the communication buffer", self.buffer_id, ordinal)
