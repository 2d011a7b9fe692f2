"""Nodes of a mesh axis: which ranks of the expert-parallel axis share a host (and so NVLink).

A device's host is that of its JAX process. The processes tell each other their hosts while they make a
Buffer (creation.py); `JAX_DEEPEP_HOST_ID` replaces the host name (so tests and containers can play
several hosts on one machine).
"""
from __future__ import annotations

import os
import socket
from typing import Mapping

import numpy as np

from .validation import DeepEPError

KV_TIMEOUT_MS = 120_000


def kv_client():
    """The jax.distributed key-value client, None where jax.distributed is not initialised.

    The one private JAX import of the package: jax.distributed (0.10, 0.11) has initialize, shutdown
    and is_initialized but no public accessor of its client; pyproject bounds jax to the versions tested."""
    from jax._src import distributed

    return distributed.global_state.client


def own_host() -> str:
    """This process's host: `JAX_DEEPEP_HOST_ID`, else the host name."""
    return os.environ.get("JAX_DEEPEP_HOST_ID") or socket.gethostname()


def detect_ranks_per_node(mesh, axis_name: str, hosts: Mapping[int, str]) -> int:
    """How many consecutive ranks of `axis_name` share a host; `hosts`: {process index: its host} of every
    process of the mesh.

    Every line of devices along the axis (one expert-parallel group) must consist of equal blocks
    of consecutive ranks, one block per host, of the same size in every line.
    """
    axis = mesh.axis_names.index(axis_name)
    devices = np.moveaxis(np.asarray(mesh.devices), axis, -1)
    lines = devices.reshape(-1, devices.shape[-1])
    other_axes = [n for n in mesh.axis_names if n != axis_name]
    block = None
    for i, line in enumerate(lines):
        on = [hosts[d.process_index] for d in line]  # the host of each rank of the line
        starts = [r for r in range(len(on)) if r == 0 or on[r] != on[r - 1]]
        sizes = {b - a for a, b in zip(starts, starts[1:] + [len(on)])}
        coords = np.unravel_index(i, devices.shape[:-1])
        where = " at " + ", ".join(f"{n}={int(c)}" for n, c in zip(other_axes, coords)) if other_axes else ""
        if len(starts) != len(set(on)) or len(sizes) != 1:
            raise DeepEPError(f"Buffer: the ranks of axis {axis_name!r}{where} are not equal blocks of consecutive "
                              f"ranks, one per host ({_ranks_by_host(on)}): order the mesh's devices host by "
                              "host (as jax.make_mesh does) or pass `ranks_per_node`")
        size = sizes.pop()
        if block is not None and size != block:
            raise DeepEPError(f"Buffer: along axis {axis_name!r}{where} a host has {size} ranks "
                              f"({_ranks_by_host(on)}) but {block} elsewhere in the mesh: give every host the "
                              "same number of ranks of each expert-parallel group or pass `ranks_per_node`")
        block = size
    return block


def _ranks_by_host(hosts: list[str]) -> str:
    ranks: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        ranks.setdefault(h, []).append(r)
    return "; ".join(f"ranks {rs} on host {h!r}" for h, rs in ranks.items())
