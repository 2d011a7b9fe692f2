"""Host side of the CUDA backend: one communication buffer per local device of the mesh.

Each device's rank is its coordinate along the expert-parallel axis; its peers are the devices
that differ from it only along that axis. A peer in this process is mapped with peer access;
a peer in another process through its CUDA IPC handle, swapped via the jax.distributed
key-value store. The FFI handlers find a device's buffer by (buffer id, device ordinal).
"""
from __future__ import annotations

import ctypes
import itertools

import jax
import numpy as np

from ..topology import KV_TIMEOUT_MS, kv_client
from .library import library

_buffer_ids = itertools.count(1)  # every process creates its Buffers in the same order


def _lib():
    lib = library()
    if not getattr(lib, "_jax_deepep_typed", False):
        c = ctypes
        for name, args, res in (
                ("jax_deepep_create", [c.c_int64, c.c_int, c.c_int, c.c_int, c.c_size_t], c.c_int),
                ("jax_deepep_ipc_handle", [c.c_int64, c.c_int, c.c_char_p], c.c_int),
                ("jax_deepep_connect_ipc", [c.c_int64, c.c_int, c.c_int, c.c_char_p], c.c_int),
                ("jax_deepep_connect_local", [c.c_int64, c.c_int, c.c_int, c.c_int], c.c_int),
                ("jax_deepep_disconnect", [c.c_int64, c.c_int], c.c_int),
                ("jax_deepep_destroy", [c.c_int64, c.c_int], c.c_int),
                ("jax_deepep_error_code", [c.c_int64, c.c_int], c.c_int),
                ("jax_deepep_device_free_bytes", [c.c_int], c.c_size_t),
                ("jax_deepep_last_error", [], c.c_char_p),
                ("jax_deepep_ring_offset", [], c.c_size_t),
                ("jax_deepep_ipc_handle_size", [], c.c_int),
                ("jax_deepep_max_ranks", [], c.c_int),
                ("jax_deepep_max_channels", [], c.c_int),
                ("jax_deepep_max_local_experts", [], c.c_int),
                ("jax_deepep_dispatch_slot_bytes", [c.c_int, c.c_int, c.c_int, c.c_int], c.c_int),
                ("jax_deepep_combine_slot_bytes", [c.c_int, c.c_int], c.c_int)):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        lib._jax_deepep_typed = True
    return lib


def device_free_bytes(ordinal: int) -> int:
    """Free memory of a local device, as the CUDA driver reports it."""
    return int(_lib().jax_deepep_device_free_bytes(ordinal))


def _check(status: int, what: str):
    if status != 0:
        raise RuntimeError(f"jax_deepep: {what} failed: {_lib().jax_deepep_last_error().decode()}")


class CommBuffers:
    """The communication buffers of every local device of `mesh` for axis `axis_name`."""

    def __init__(self, mesh, axis_name: str, num_bytes: int):
        lib = _lib()
        self.buffer_id = next(_buffer_ids)
        self.num_bytes = int(num_bytes)
        self.ring_bytes = self.num_bytes - int(lib.jax_deepep_ring_offset())
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
                _check(lib.jax_deepep_create(self.buffer_id, ordinal, rank, len(group), self.num_bytes),
                       "allocating the communication buffer")
            self._connect()
        except Exception:
            self.destroy()
            raise

    def _key(self, device) -> str:
        return f"jax_deepep/buffer/{self.buffer_id}/device/{device.id}"

    def _connect(self):
        lib = _lib()
        self._remote_peers = any(peer.process_index != jax.process_index()
                                 for _, _, group in self._local for peer in group)
        if self._remote_peers:
            client = kv_client()
            if client is None:
                raise RuntimeError("jax_deepep: the mesh spans several processes but jax.distributed is not "
                                   "initialised")
            size = int(lib.jax_deepep_ipc_handle_size())
            for ordinal, rank, group in self._local:
                handle = ctypes.create_string_buffer(size)
                _check(lib.jax_deepep_ipc_handle(self.buffer_id, ordinal, handle), "exporting the IPC handle")
                client.key_value_set(self._key(group[rank]), handle.raw.hex())
        for ordinal, rank, group in self._local:
            for peer_rank, peer in enumerate(group):
                if peer_rank == rank:
                    continue
                if peer.process_index == jax.process_index():
                    _check(lib.jax_deepep_connect_local(self.buffer_id, ordinal, peer_rank, peer.local_hardware_id),
                           "mapping a peer's buffer (peer access)")
                else:
                    hex_handle = kv_client().blocking_key_value_get(self._key(peer), KV_TIMEOUT_MS)
                    _check(lib.jax_deepep_connect_ipc(self.buffer_id, ordinal, peer_rank, bytes.fromhex(hex_handle)),
                           "opening a peer's IPC handle")

    def error_codes(self) -> dict:
        """{device ordinal: first kernel error code} for devices whose kernels gave up waiting."""
        lib = _lib()
        codes = {ordinal: int(lib.jax_deepep_error_code(self.buffer_id, ordinal)) for ordinal, _, _ in self._local}
        return {k: v for k, v in codes.items() if v}

    def destroy(self):
        """Unmap peers everywhere, wait for every process, then free (idempotent)."""
        if self._destroyed:
            return
        self._destroyed = True
        lib = _lib()
        for ordinal, _, _ in self._local:
            _check(lib.jax_deepep_disconnect(self.buffer_id, ordinal), "unmapping peers' buffers")
        if self._remote_peers:  # a peer process may still have our buffer mapped
            kv_client().wait_at_barrier(f"jax_deepep/buffer/{self.buffer_id}/destroy", KV_TIMEOUT_MS)
        for ordinal, _, _ in self._local:
            _check(lib.jax_deepep_destroy(self.buffer_id, ordinal), "freeing the communication buffer")
