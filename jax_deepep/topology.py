"""Nodes of a mesh axis: which ranks of the expert-parallel axis share a host (and so NVLink).

A device's host is that of its JAX process. Every process publishes its host name once in the
jax.distributed key-value store and reads those of the others; `JAX_DEEPEP_HOST_ID` replaces the
host name (so tests and containers can play several hosts on one machine).
"""
from __future__ import annotations

import os
import socket
from typing import Callable, Iterable

import jax
import numpy as np

from .validation import DeepEPError

KV_TIMEOUT_MS = 120_000

# (the key-value client they came from, {process index: host}); this process's own entry is
# only there once it was published, as setting an existing key fails.
_known_hosts: tuple = (None, {})


def kv_client():
    """The jax.distributed key-value client, None where jax.distributed is not initialised.

    The one private JAX import of the package: jax.distributed (0.10, 0.11) has initialize, shutdown
    and is_initialized but no public accessor of its client; pyproject bounds jax to the versions tested."""
    from jax._src import distributed

    return distributed.global_state.client


def _own_host() -> str:
    return os.environ.get("JAX_DEEPEP_HOST_ID") or socket.gethostname()


def host_of_processes(process_indices: Iterable[int]) -> dict[int, str]:
    """{process index: host identity} for the given JAX processes (collective: every process calls it)."""
    global _known_hosts
    process_indices = list(process_indices)
    if jax.process_count() == 1:
        return {p: _own_host() for p in process_indices}
    client = kv_client()
    if client is None:
        raise DeepEPError("Buffer: the job has several processes but jax.distributed is not initialised, so the "
                          "hosts of the mesh's devices are unknown: call jax.distributed.initialize() first or "
                          "pass `ranks_per_node`")
    if _known_hosts[0] is not client:  # a new store (jax.distributed initialised again) has none of our keys
        _known_hosts = (client, {})
    hosts = _known_hosts[1]
    me = jax.process_index()
    if me not in hosts:
        hosts[me] = _own_host()
        client.key_value_set(_host_key(me), hosts[me])
    for p in process_indices:
        if p not in hosts:
            hosts[p] = client.blocking_key_value_get(_host_key(p), KV_TIMEOUT_MS)
    return {p: hosts[p] for p in process_indices}


def _host_key(process_index: int) -> str:
    return f"jax_deepep/host/{process_index}"


def detect_ranks_per_node(mesh, axis_name: str,
                          host_of: Callable[[list[int]], dict[int, str]] = host_of_processes) -> int:
    """How many consecutive ranks of `axis_name` share a host.

    Every line of devices along the axis (one expert-parallel group) must consist of equal blocks
    of consecutive ranks, one block per host, of the same size in every line.
    """
    axis = mesh.axis_names.index(axis_name)
    devices = np.moveaxis(np.asarray(mesh.devices), axis, -1)
    lines = devices.reshape(-1, devices.shape[-1])
    host = host_of(sorted({d.process_index for d in lines.flat}))
    other_axes = [n for n in mesh.axis_names if n != axis_name]
    block = None
    for i, line in enumerate(lines):
        hosts = [host[d.process_index] for d in line]
        starts = [r for r in range(len(hosts)) if r == 0 or hosts[r] != hosts[r - 1]]
        sizes = {b - a for a, b in zip(starts, starts[1:] + [len(hosts)])}
        coords = np.unravel_index(i, devices.shape[:-1])
        where = " at " + ", ".join(f"{n}={int(c)}" for n, c in zip(other_axes, coords)) if other_axes else ""
        if len(starts) != len(set(hosts)) or len(sizes) != 1:
            raise DeepEPError(f"Buffer: the ranks of axis {axis_name!r}{where} are not equal blocks of consecutive "
                              f"ranks, one per host ({_ranks_by_host(hosts)}): order the mesh's devices host by "
                              "host (as jax.make_mesh does) or pass `ranks_per_node`")
        size = sizes.pop()
        if block is not None and size != block:
            raise DeepEPError(f"Buffer: along axis {axis_name!r}{where} a host has {size} ranks "
                              f"({_ranks_by_host(hosts)}) but {block} elsewhere in the mesh: give every host the "
                              "same number of ranks of each expert-parallel group or pass `ranks_per_node`")
        block = size
    return block


def _ranks_by_host(hosts: list[str]) -> str:
    ranks: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        ranks.setdefault(h, []).append(r)
    return "; ".join(f"ranks {rs} on host {h!r}" for h, rs in ranks.items())
