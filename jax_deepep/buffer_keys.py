"""One Buffer's keys in the jax.distributed key-value store, all under `jax_deepep/buffer/<id>/`.

<id> is the Buffer id its processes agreed on when it was made (creation.py): it also names the
Buffer's state in the FFI registries, so it is unique in every process. A key's writer deletes it
while the Buffer is made, once every reader is known to have read it (the CUDA IPC handles after
the `connected` barrier, the NVSHMEM unique id once every PE has joined), or at once when making it
fails; so a Buffer, whether destroyed or dropped, leaves no key behind (barriers are no keys).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from .topology import KV_TIMEOUT_MS, kv_client
from .validation import DeepEPError

_MAX_TIMEOUT_MS = 2**31 - 1  # about 24 days; fits whatever integer the store takes


@dataclasses.dataclass(frozen=True)
class BufferKeys:
    """The key-value namespace of Buffer `buffer_id`, made over the devices of `processes` (sorted).

    `client` is the jax.distributed key-value client, None in a job of one process (nothing to swap)."""

    buffer_id: int
    processes: tuple
    client: object = None

    @property
    def prefix(self) -> str:
        return f"jax_deepep/buffer/{self.buffer_id}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def set(self, name: str, value: str):
        self.client.key_value_set(self.key(name), value)

    def get(self, name: str) -> str:
        """The value under `name`, waiting up to KV_TIMEOUT_MS for a peer to set it."""
        return self.client.blocking_key_value_get(self.key(name), KV_TIMEOUT_MS)

    def barrier(self, name: str, timeout_s: Optional[float] = None):
        """Wait until every process of this Buffer reaches the barrier `name`, `timeout_s` seconds at most
        (None: KV_TIMEOUT_MS); DeepEPError when one does not come in time (each name meets once)."""
        timeout_ms = KV_TIMEOUT_MS if timeout_s is None else min(max(int(timeout_s * 1000), 1), _MAX_TIMEOUT_MS)
        try:
            self.client.wait_at_barrier(self.key(name), timeout_ms, process_ids=list(self.processes))
        except jax.errors.JaxRuntimeError as e:
            raise DeepEPError(f"not every process of Buffer {self.buffer_id} (processes {list(self.processes)}) "
                              f"reached `{name}` within {timeout_ms / 1000:g} s: {e}") from None

    def delete(self, name: str):
        """Remove `name` (and any key under it). A store that is gone (jax.distributed shut down, or
        initialised again) took the key with it, so there is nothing to delete then."""
        if self.client is not None and kv_client() is self.client:
            self.client.key_value_delete(self.key(name))
