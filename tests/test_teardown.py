"""Tearing a Buffer down (docs/RELIABILITY.md): `destroy()` is idempotent and retryable, releases all it
can before raising one `DeepEPError`, returns within the Buffer's timeout when a peer process never
comes, frees what a failed construction made, and a Buffer dropped without `destroy()` is freed by
its finalizer. No Buffer, made, failed, destroyed or dropped, leaves a key in the key-value store.

The compiled modules and the jax.distributed key-value store are replaced by fakes that record what
they are asked (as in test_process_models.py), so this runs on CPU devices.
"""
import contextlib
import gc
import time
import types

import jax
import numpy as np
import pytest

import jax_deepep as deepep
from jax_deepep import buffer_keys
from jax_deepep.buffer_keys import BufferKeys
from jax_deepep.gpu import internode, nvshmem, runtime
from harness import AXIS, fake_cuda_platform, make_mesh

_TIMEOUT_S = 0.5
_SLACK_S = 5.0  # what a loaded CI machine may add to a wait of _TIMEOUT_S
_ALLOCATE = "jax_deepep/buffer/7/allocate"  # the barrier before the collective nvshmem_malloc
_CONNECTED = "jax_deepep/buffer/7/connected"  # the barrier once every process has read the IPC handles
_OWN_HANDLE = "jax_deepep/buffer/7/device/0"  # the CUDA IPC handle this process publishes


class FakeIntranodeLib:
    """`_intranode_lib`'s buffer calls: records them; `fail` maps a call name to the devices on which it
    raises (once each), `sticky` is what disconnect returns (a trapped context's CUDA error)."""
    RING_OFFSET, MAX_CHANNELS, MAX_LOCAL_EXPERTS = 0, 24, 64

    def __init__(self):
        self.calls, self.fail, self.sticky = [], {}, ""

    def _record(self, name, ordinal):
        self.calls.append((name, ordinal))
        if ordinal in self.fail.get(name, set()):
            self.fail[name].discard(ordinal)
            raise RuntimeError(f"injected {name} failure on device {ordinal}")

    def failure(self, buffer_id, device):
        return ""  # no kernel ran

    def create(self, buffer_id, ordinal, rank, num_ranks, num_bytes, timeout_s, low_latency_bytes):
        self._record("create", ordinal)

    def connect_local(self, buffer_id, ordinal, peer_rank, peer_ordinal):
        self._record("connect_local", ordinal)

    def ipc_handle(self, buffer_id, ordinal):
        return b"handle"

    def connect_ipc(self, buffer_id, ordinal, peer_rank, handle):
        self._record("connect_ipc", ordinal)

    def disconnect(self, buffer_id, ordinal):
        self._record("disconnect", ordinal)
        return self.sticky

    def destroy(self, buffer_id, ordinal):
        self._record("destroy", ordinal)
        return ""

    def freed(self) -> list:
        return sorted(ordinal for name, ordinal in self.calls if name == "destroy")


class FakeNvshmemLib:
    """`_nvshmem_lib`'s buffer calls, as PE 0 of two that joined NVSHMEM already; `sticky` is what retire
    returns (a trapped context's CUDA error)."""

    def __init__(self):
        self.calls, self.sticky, self.peers = [], "", None

    def pe(self):
        return (0, 2)

    def failure(self, buffer_id, device):
        return ""  # no kernel ran

    def create(self, buffer_id, device, num_bytes, timeout_s, direct_group, map_other_groups):
        self.calls.append("create")
        self.peers = {"direct_group": direct_group, "map_other_groups": map_other_groups}

    def retire(self, buffer_id, device):
        self.calls.append("retire")
        return self.sticky

    def release(self, buffer_id, device, collective_free):
        self.calls.append(("release", collective_free))


class FakeStore:
    """The jax.distributed key-value client; `peer_arrives=False`: the other process never reaches a
    barrier (as if it had died), so every barrier times out."""

    def __init__(self, peer_arrives: bool):
        self.peer_arrives, self.keys, self.barriers, self.written = peer_arrives, {}, [], []

    def key_value_set(self, key, value):
        self.keys[key] = value
        self.written.append(key)

    def blocking_key_value_get(self, key, timeout_ms):
        return b"peer handle".hex()

    def key_value_delete(self, key):
        self.keys.pop(key, None)

    def wait_at_barrier(self, barrier_id, timeout_ms, process_ids=None):
        self.barriers.append(barrier_id)
        if not self.peer_arrives:
            time.sleep(timeout_ms / 1000)
            raise jax.errors.JaxRuntimeError(f"DEADLINE_EXCEEDED: Barrier timed out. Id: {barrier_id}; "
                                             "1 task did not reach it")


@pytest.fixture
def intranode_lib(monkeypatch):
    """Buffers on the 8 CPU devices get the intranode CUDA backend, over a fake `_intranode_lib`."""
    lib = FakeIntranodeLib()
    fake_cuda_platform(monkeypatch, lib)
    return lib


def _two_process_mesh():
    """A stand-in mesh of two ranks, each a GPU of its own process; this process (0) owns rank 0."""
    devices = np.array([types.SimpleNamespace(id=r, process_index=r, local_hardware_id=0) for r in range(2)],
                       dtype=object)
    return types.SimpleNamespace(axis_names=(AXIS,), shape={AXIS: 2}, devices=devices)


@pytest.fixture
def store(monkeypatch):
    """Make a FakeStore the job's key-value store, as process 0 of two."""
    def make(peer_arrives: bool) -> BufferKeys:
        client = FakeStore(peer_arrives)
        monkeypatch.setattr(buffer_keys, "kv_client", lambda: client)
        monkeypatch.setattr(jax, "process_index", lambda: 0)
        return BufferKeys(7, (0, 1), client)
    return make


def _destroy_within_the_timeout(resource, message: str):
    """`resource.destroy()` raises a DeepEPError matching `message`, about _TIMEOUT_S after it began."""
    start = time.monotonic()
    with pytest.raises(deepep.DeepEPError, match=message):
        resource.destroy()
    assert time.monotonic() - start < _TIMEOUT_S + _SLACK_S


# ---- destroy --------------------------------------------------------------------------------------
def test_destroy_frees_each_device_once(intranode_lib):
    buffer = deepep.Buffer(make_mesh(8), AXIS)
    buffer.destroy()
    buffer.destroy()
    assert intranode_lib.freed() == list(range(8))
    assert buffer.is_destroyed


def test_a_failed_destroy_frees_the_rest_and_a_retry_only_what_failed(intranode_lib):
    buffer = deepep.Buffer(make_mesh(8), AXIS)
    intranode_lib.fail = {"destroy": {3, 5}}
    with pytest.raises(deepep.DeepEPError, match=r"freeing the buffer on device 3: injected destroy failure.*"
                                                 r"freeing the buffer on device 5: .*may be called again"):
        buffer.destroy()
    assert buffer.is_destroyed
    with pytest.raises(deepep.DeepEPError, match="this Buffer was destroyed"):
        buffer._context("dispatch")
    intranode_lib.calls.clear()
    buffer.destroy()  # the retry
    assert intranode_lib.calls == [("destroy", 3), ("destroy", 5)]
    intranode_lib.calls.clear()
    buffer.destroy()
    assert intranode_lib.calls == []


def test_a_trapped_context_still_frees_everything_and_says_so(intranode_lib):
    buffer = deepep.Buffer(make_mesh(4), AXIS)
    intranode_lib.sticky = "cudaDeviceSynchronize: unspecified launch failure"
    with pytest.raises(deepep.DeepEPError, match="unmapping the peers' buffers on device 0: cudaDeviceSynchronize: "
                                                 "unspecified launch failure"):
        buffer.destroy()
    assert intranode_lib.freed() == list(range(4))
    intranode_lib.calls.clear()
    buffer.destroy()  # released: nothing to retry
    assert intranode_lib.calls == []


def _comm_buffers(keys: BufferKeys) -> runtime.CommBuffers:
    return runtime.CommBuffers(_two_process_mesh(), AXIS, 1 << 20, keys, timeout_s=_TIMEOUT_S)


def test_destroy_with_a_peer_process_that_never_comes_returns_within_the_timeout(intranode_lib, store):
    keys = store(peer_arrives=True)
    comm = _comm_buffers(keys)
    keys.client.peer_arrives = False  # the peer dies after the Buffer was made
    _destroy_within_the_timeout(comm, r"not every process of Buffer 7 \(processes \[0, 1\]\) reached `destroy/1` "
                                      r"within 0.5 s.*taken as gone: this process freed its buffers anyway")
    assert intranode_lib.freed() == [0]
    comm.destroy()  # everything local is released: nothing left to do
    assert keys.client.barriers == [_CONNECTED, "jax_deepep/buffer/7/destroy/1"]


# ---- the key-value store ----------------------------------------------------------------------------
def test_the_ipc_handles_are_deleted_once_every_process_has_mapped_its_peers(intranode_lib, store):
    keys = store(peer_arrives=True)
    comm = _comm_buffers(keys)
    assert keys.client.written == [_OWN_HANDLE] and keys.client.barriers == [_CONNECTED]
    assert not keys.client.keys  # right after creation
    comm.destroy()
    assert not keys.client.keys


def test_a_peer_that_does_not_connect_fails_the_creation_within_the_timeout(intranode_lib, store):
    keys = store(peer_arrives=False)
    start = time.monotonic()
    with pytest.raises(deepep.DeepEPError, match=r"Buffer: mapping the peers' buffers over CUDA IPC: not every "
                                                 r"process of Buffer 7 \(processes \[0, 1\]\) reached `connected` "
                                                 r"within 0.5 s"):
        _comm_buffers(keys)
    assert time.monotonic() - start < _TIMEOUT_S + _SLACK_S
    assert intranode_lib.freed() == [0] and ("disconnect", 0) in intranode_lib.calls
    assert keys.client.written == [_OWN_HANDLE] and not keys.client.keys


def test_a_failed_creation_deletes_the_handles_it_published(intranode_lib, store):
    keys = store(peer_arrives=True)
    intranode_lib.fail = {"connect_ipc": {0}}
    with pytest.raises(RuntimeError, match="opening a peer's IPC handle failed: injected connect_ipc failure"):
        _comm_buffers(keys)
    assert intranode_lib.freed() == [0]
    assert keys.client.written == [_OWN_HANDLE] and not keys.client.keys


def test_a_dropped_buffer_leaves_no_keys(intranode_lib, store):
    keys = store(peer_arrives=True)
    comm = _comm_buffers(keys)
    with pytest.warns(ResourceWarning, match="dropped without destroy"):
        del comm
        gc.collect()
    assert intranode_lib.freed() == [0] and not keys.client.keys
    assert keys.client.barriers == [_CONNECTED]  # the finalizer waits on no peer


class FakeNvshmemJoin:
    """`_nvshmem_lib`'s joining, as PE 0 of two before it joined; `fails`: joining raises."""

    def __init__(self, fails: bool):
        self.fails = fails

    def pe(self):
        return None

    def unique_id(self):
        return b"unique id"

    def join(self, unique_id, rank, num_ranks, device_ordinal):
        if self.fails:
            raise RuntimeError("injected nvshmemx_init_attr failure")


@pytest.mark.parametrize("fails", [False, True], ids=["joined", "failed"])
def test_the_nvshmem_unique_id_is_deleted_after_joining(monkeypatch, store, fails):
    keys = store(peer_arrives=True)
    monkeypatch.setattr(nvshmem.atexit, "register", lambda *args: None)
    environment = nvshmem.start_environment(1 << 20, 24)
    for name in environment:  # so that joining changes no environment
        monkeypatch.setenv(name, "1")
    with pytest.raises(deepep.DeepEPError, match="init failed") if fails else contextlib.nullcontext():
        nvshmem._ensure_pe(FakeNvshmemJoin(fails), 0, 2, 0, environment, keys)
    assert keys.client.written == ["jax_deepep/buffer/7/nvshmem_unique_id"] and not keys.client.keys


# ---- NVSHMEM --------------------------------------------------------------------------------------
def _symmetric_buffer(monkeypatch, keys: BufferKeys):
    lib = FakeNvshmemLib()
    monkeypatch.setattr(nvshmem, "nvshmem_library", lambda: lib)
    monkeypatch.setattr(nvshmem, "_finalize_at_exit", True)
    return nvshmem.SymmetricBuffer(_two_process_mesh(), AXIS, 1 << 20, _TIMEOUT_S, keys), lib


@pytest.mark.parametrize("puts_only", [False, True])
def test_internode_maps_the_other_nodes_unless_puts_only(monkeypatch, store, puts_only):
    """The internode backend makes its node NVSHMEM's direct group and has the other nodes mapped too
    (written like the own node where NVSHMEM maps them), unless the Buffer asked for puts only."""
    lib = FakeNvshmemLib()
    monkeypatch.setattr(nvshmem, "nvshmem_library", lambda: lib)
    monkeypatch.setattr(nvshmem, "_finalize_at_exit", True)
    backend = internode.InternodeBackend.open(_two_process_mesh(), AXIS, 1 << 20, 1, store(peer_arrives=True),
                                              timeout_s=_TIMEOUT_S, exact_combine=False, puts_only=puts_only)
    assert lib.peers == {"direct_group": 1, "map_other_groups": not puts_only}
    backend.destroy()


def test_nvshmem_destroy_frees_collectively_once_every_process_is_there(monkeypatch, store):
    symmetric, lib = _symmetric_buffer(monkeypatch, store(peer_arrives=True))
    symmetric.destroy()
    symmetric.destroy()
    assert lib.calls == ["create", "retire", ("release", True)]
    assert nvshmem._finalize_at_exit


def test_nvshmem_destroy_with_a_dead_peer_skips_the_collective_free_within_the_timeout(monkeypatch, store):
    keys = store(peer_arrives=True)
    symmetric, lib = _symmetric_buffer(monkeypatch, keys)
    keys.client.peer_arrives = False  # the peer dies after the Buffer was made
    _destroy_within_the_timeout(symmetric, r"within 0.5 s.*collective free was skipped \(a peer process that did not "
                                           r"come is taken as gone.*NVSHMEM symmetric memory stays allocated until it "
                                           r"exits")
    assert lib.calls == ["create", "retire", ("release", False)]
    assert not nvshmem._finalize_at_exit  # nvshmem_finalize would wait for the dead peer at exit
    symmetric.destroy()
    assert len(lib.calls) == 3


def test_nvshmem_allocation_without_a_peer_fails_within_the_timeout(monkeypatch, store):
    """nvshmem_malloc is collective with no timeout: the PEs meet at a bounded barrier first."""
    start = time.monotonic()
    with pytest.raises(deepep.DeepEPError, match=r"reached `allocate` within 0.5 s"):
        _symmetric_buffer(monkeypatch, store(peer_arrives=False))
    assert time.monotonic() - start < _TIMEOUT_S + _SLACK_S


def test_nvshmem_destroy_after_a_trap_joins_no_collective(monkeypatch, store):
    keys = store(peer_arrives=True)
    symmetric, lib = _symmetric_buffer(monkeypatch, keys)
    lib.sticky = "waiting for the kernels on the symmetric buffer: unspecified launch failure"
    with pytest.raises(deepep.DeepEPError, match=r"unspecified launch failure.*collective free was skipped"):
        symmetric.destroy()
    assert lib.calls == ["create", "retire", ("release", False)] and keys.client.barriers == [_ALLOCATE]
    assert not nvshmem._finalize_at_exit


# ---- construction and the finalizer ---------------------------------------------------------------
def test_a_failed_construction_frees_what_it_made(intranode_lib):
    intranode_lib.fail = {"connect_local": {2}}
    with pytest.raises(RuntimeError, match="injected connect_local failure on device 2"):
        deepep.Buffer(make_mesh(4), AXIS)
    assert intranode_lib.freed() == list(range(4))


def test_a_failed_second_backend_frees_the_first(intranode_lib, monkeypatch):
    """The low-latency backend fails after the normal-mode buffers were made: they are freed. (Low latency
    by NVSHMEM puts, which refuses a process owning several GPUs.)"""
    monkeypatch.setattr(nvshmem, "available", lambda: True)
    with pytest.raises(deepep.DeepEPError, match="one GPU of the mesh per process"):
        deepep.Buffer(make_mesh(4), AXIS, low_latency_mode=True, num_rdma_bytes=1 << 30,
                      allow_nvlink_for_low_latency_mode=False)
    assert intranode_lib.freed() == list(range(4))


def test_a_dropped_buffer_is_freed_by_its_finalizer(intranode_lib):
    buffer = deepep.Buffer(make_mesh(4), AXIS)
    with pytest.warns(ResourceWarning, match="dropped without destroy"):
        del buffer
        gc.collect()
    assert intranode_lib.freed() == list(range(4))


def test_a_dropped_nvshmem_buffer_frees_what_is_local_without_waiting_for_peers(monkeypatch, store):
    keys = store(peer_arrives=True)
    symmetric, lib = _symmetric_buffer(monkeypatch, keys)
    keys.client.peer_arrives = False
    with pytest.warns(ResourceWarning, match="dropped without destroy"), pytest.warns(RuntimeWarning, match="stays"):
        del symmetric
        gc.collect()
    assert lib.calls == ["create", "retire", ("release", False)] and keys.client.barriers == [_ALLOCATE]
    assert nvshmem._finalize_at_exit  # nobody is known to be missing


def test_a_destroyed_buffer_leaves_nothing_to_its_finalizer(intranode_lib):
    buffer = deepep.Buffer(make_mesh(4), AXIS)
    buffer.destroy()
    intranode_lib.calls.clear()
    del buffer
    gc.collect()
    assert intranode_lib.calls == []
