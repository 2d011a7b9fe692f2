"""Making a Buffer across processes: one handshake that checks that every process passed the same
arguments, tells each its peers' hosts, and agrees on the Buffer's id (docs/API.md).

Every process of the mesh publishes its arguments and host under
`jax_deepep/creation/<group>/<n>/<process>` (the n-th Buffer made over that group of processes:
processes make their Buffers in the same order, as with any collective) and reads those of the
others. All of them compare the same records, so on any difference every process raises the same
`DeepEPError`. The last process to finish reading deletes the records, so nothing of the handshake
stays in the store. The id follows from the group and n alone (`_buffer_id`): no counter in the store.
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional

import jax

from .buffer_keys import BufferKeys
from .topology import KV_TIMEOUT_MS, kv_client, own_host
from .validation import DeepEPError

_MAX_VALUE_CHARS = 200
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


def agree(mesh, arguments: dict) -> tuple[BufferKeys, dict[int, str]]:
    """(the key-value namespace and id of a new Buffer over `mesh`, {process: its host}), the Buffer made
    with `arguments` (a JSON-able dict); collective over the processes of `mesh`. Raises `DeepEPError`
    on every process when the processes passed different arguments."""
    processes = processes_of(mesh)
    client = kv_client()
    sequence = _creations.get(processes, 0)
    if len(processes) == 1:
        _creations[processes] = sequence + 1
        return BufferKeys(_buffer_id(processes, sequence), processes, client), {processes[0]: own_host()}
    if client is None:
        raise DeepEPError(f"Buffer: the mesh spans processes {list(processes)} but jax.distributed is not "
                          "initialised: call jax.distributed.initialize() first")
    records = _exchange(client, processes, sequence, arguments)
    mismatch = describe_mismatch({p: record["arguments"] for p, record in records.items()})
    if mismatch:
        raise DeepEPError(mismatch)
    hosts = {p: record["host"] for p, record in records.items()}
    return BufferKeys(_buffer_id(processes, sequence), processes, client), hosts


def _buffer_id(processes: tuple, sequence: int) -> int:
    """The id of the `sequence`-th Buffer made over `processes`: the same in each of them, and 48 bits of
    a hash of both, so no two Buffers of a process share it (it keys their state in the FFI registries and
    their namespace in the store) and no counter has to live in the store."""
    digest = hashlib.sha1(f"{','.join(map(str, processes))}/{sequence}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def _exchange(client, processes: tuple, sequence: int, arguments: dict) -> dict[int, dict]:
    """{process: its record (arguments and host)} for every process of creation `sequence` over them."""
    group = hashlib.sha1(",".join(map(str, processes)).encode()).hexdigest()[:16]
    rendezvous = f"jax_deepep/creation/{group}/{sequence}"
    me = jax.process_index()
    text = json.dumps({"arguments": arguments, "host": own_host()})
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
