"""Making a Buffer across processes: one handshake that checks that every process passed the same
arguments and agrees on the Buffer's id (docs/API.md).

Every process of the mesh publishes its arguments under `jax_deepep/creation/<group>/<n>/<process>`
(the n-th Buffer made over that group of processes: processes make their Buffers in the same order,
as with any collective) and reads those of the others; the lowest process adds a fresh id from a
counter in the store. All of them compare the same records, so on any difference every process
raises the same `DeepEPError`. The last process to finish reading deletes the records.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from typing import Optional

import jax

from .buffer_keys import BufferKeys
from .topology import KV_TIMEOUT_MS, kv_client
from .validation import DeepEPError

_ID_COUNTER_KEY = "jax_deepep/buffer_ids"
_MAX_VALUE_CHARS = 200
# Without jax.distributed there is one process, whose own counter makes its ids unique.
_local_ids = itertools.count(1)
# {processes: how many Buffers this process made over exactly them}: the n of the next handshake.
_creations: dict[tuple, int] = {}


def processes_of(mesh) -> tuple:
    """The processes owning the devices of `mesh`, sorted."""
    return tuple(sorted({d.process_index for d in mesh.devices.flat}))


def _processes_text(processes: list[int]) -> str:
    return f"process {processes[0]}" if len(processes) == 1 else f"processes {processes}"


def _value_text(value) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS] + "..."


def describe_mismatch(arguments: dict[int, dict]) -> Optional[str]:
    """None when every process ({process index: its arguments}) passed the same arguments, else a
    message naming each argument that differs and which processes passed what."""
    names = dict.fromkeys(name for args in arguments.values() for name in args)
    differences = []
    for name in names:
        by_value: dict[str, tuple] = {}  # {canonical JSON of a value: (value, processes that passed it)}
        for process in sorted(arguments):
            value = arguments[process].get(name)
            by_value.setdefault(json.dumps(value, sort_keys=True), (value, []))[1].append(process)
        if len(by_value) > 1:
            passed = ", ".join(f"{_processes_text(ps)} passed {_value_text(v)}" for v, ps in by_value.values())
            differences.append(f"`{name}` differs ({passed})")
    if not differences:
        return None
    return "Buffer: every process must create it with the same arguments, but " + "; ".join(differences)


def agree(mesh, arguments: dict) -> BufferKeys:
    """The key-value namespace (and id) of a new Buffer over `mesh`, made with `arguments` (a JSON-able
    dict); collective over the processes of `mesh`. Raises `DeepEPError` on every process when the
    processes passed different arguments."""
    processes = processes_of(mesh)
    client = kv_client()
    if len(processes) == 1:
        buffer_id = next(_local_ids) if client is None else client.key_value_increment(_ID_COUNTER_KEY, 1)
        return BufferKeys(buffer_id, processes, client)
    if client is None:
        raise DeepEPError(f"Buffer: the mesh spans processes {list(processes)} but jax.distributed is not "
                          "initialised: call jax.distributed.initialize() first")
    records = _exchange(client, processes, arguments)
    mismatch = describe_mismatch({p: record["arguments"] for p, record in records.items()})
    if mismatch:
        raise DeepEPError(mismatch)
    return BufferKeys(records[processes[0]]["buffer_id"], processes, client)


def _exchange(client, processes: tuple, arguments: dict) -> dict[int, dict]:
    """{process: its record} for every process of this creation; the lowest one's record holds the id."""
    sequence = _creations.get(processes, 0)
    group = hashlib.sha1(",".join(map(str, processes)).encode()).hexdigest()[:16]
    rendezvous = f"jax_deepep/creation/{group}/{sequence}"
    me = jax.process_index()
    record = {"arguments": arguments}
    if me == processes[0]:
        record["buffer_id"] = client.key_value_increment(_ID_COUNTER_KEY, 1)
    text = json.dumps(record)
    client.key_value_set(f"{rendezvous}/{me}", text)
    records = {me: json.loads(text)}
    for process in processes:
        if process == me:
            continue
        try:
            records[process] = json.loads(client.blocking_key_value_get(f"{rendezvous}/{process}", KV_TIMEOUT_MS))
        except jax.errors.JaxRuntimeError as e:
            # This creation never happened: withdraw, and keep `sequence` for the next try to meet at.
            client.key_value_delete(f"{rendezvous}/{me}")
            raise DeepEPError(f"Buffer: process {process} did not create this Buffer within "
                              f"{KV_TIMEOUT_MS // 1000} s (every process of the mesh must create it, and its "
                              f"Buffers in the same order): {e}") from None
    _creations[processes] = sequence + 1
    if client.key_value_increment(f"{rendezvous}/read", 1) == len(processes):
        client.key_value_delete(rendezvous)  # everyone has read every record
    return records
