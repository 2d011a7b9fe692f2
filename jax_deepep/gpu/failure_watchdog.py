"""Ending a process whose trapped kernel XLA never reports (docs/RELIABILITY.md, "The watchdog").

A kernel that gives up on a peer traps, and the process's next synchronisation with the device is
meant to raise. One kind of wait never does: `jax.block_until_ready` (and a transfer to the host)
waits for a host function that XLA enqueues behind the op (`cuLaunchHostFunc`), and CUDA never runs
host functions once the context has failed. If the trap comes after that function was enqueued, the
wait would last for ever. So one thread per process reads the failure records of its live GPU
Buffers every `POLL_S`; once a record holds a failure and the program has not called the Buffer's
`destroy()` within its `timeout_s`, the thread prints the failure and ends the process with
`EXIT_CODE`. The process could not go on anyway: its CUDA context is lost.

The process that hosts the jax.distributed service (process 0) waits `HOST_GRACE` times as long: its
end takes the service with it, and jax.distributed aborts every process still connected, so its peers
get the time to raise their own failures and leave (a peer's teardown waits up to `timeout_s` for it).
"""
from __future__ import annotations

import os
import sys
import threading
import time
import weakref

POLL_S = 0.1
HOST_GRACE = 3
EXIT_CODE = 70  # EX_SOFTWARE: what a job launcher sees from a process that this thread ended

_lock = threading.Lock()
# [weak references to a Buffer and to its backends (their finalizers must run when the Buffer is
#  dropped), time a failure was first seen or None]
_watched: list = []
_thread = None


def watch(buffer, backends):
    """Watch the failure records of `backends` (a GPU Buffer's) until `buffer` is destroyed or dropped."""
    global _thread
    with _lock:
        _watched.append([weakref.ref(buffer), [weakref.ref(b) for b in backends], None])
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="jax_deepep failure watchdog", daemon=True)
            _thread.start()


def _check(entry, now: float):
    """None to keep watching `entry`, "drop" when its Buffer is gone, or the message to end the process with."""
    buffer, backends = entry[0](), [b() for b in entry[1]]
    if buffer is None or None in backends or buffer.is_destroyed:  # destroy() began: the failure is taken up
        return "drop"
    failures = [f for backend in backends for f in backend.failures()]
    if not failures:
        return None
    if entry[2] is None:
        entry[2] = now
    hosting = _hosts_distributed_service()
    if now - entry[2] < buffer.timeout_s * (HOST_GRACE if hosting else 1):
        return None
    waited = f" ({HOST_GRACE} times that here: this process hosts the jax.distributed service)" if hosting else ""
    return (f"{failures[0]}\njax_deepep: destroy() was not called within timeout_s={buffer.timeout_s:g} s{waited} (a "
            "wait such as jax.block_until_ready never returns once the CUDA context has trapped); ending the process "
            f"with exit code {EXIT_CODE} (docs/RELIABILITY.md)")


def _hosts_distributed_service() -> bool:
    import jax

    return jax.distributed.is_initialized() and jax.process_index() == 0


def _run():
    global _thread
    while True:
        with _lock:
            if not _watched:
                _thread = None  # under the lock: a later watch() starts a new thread
                return
            entries = list(_watched)
        now = time.monotonic()
        for entry in entries:
            verdict = _check(entry, now)
            if verdict == "drop":
                with _lock:
                    _watched.remove(entry)
            elif verdict is not None:
                _end_process(verdict)
        time.sleep(POLL_S)


def _end_process(message: str):
    sys.stdout.flush()
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(EXIT_CODE)
