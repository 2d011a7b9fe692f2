"""The process models of each mode (README, docs/API.md "Process models"), checked on CPU devices.

On a GPU mesh the Buffer picks the CUDA backends; here the mesh's platform is reported as "gpu" and the
compiled modules are replaced by fakes that only record what they were asked, so the backend selection and
the process-model checks run as on GPUs with no device behind them. One process owning the 8 CPU devices
plays a host where one process owns every GPU (JAX's default on one host).
"""
import os
import types

import jax
import numpy as np
import pytest

import jax_deepep as deepep
from jax_deepep.gpu import intranode, nvshmem
from harness import AXIS, fake_cuda_platform, make_mesh


class FakeIntranodeLib:
    """`_intranode_lib`'s buffer calls: records which device made a buffer and which peers it mapped."""
    RING_OFFSET, MAX_CHANNELS, MAX_LOCAL_EXPERTS = 0, 24, 64  # any sizes: no op is traced

    def __init__(self):
        self.created, self.local_peers, self.low_latency_bytes = [], [], set()

    def failure(self, buffer_id, device):
        return ""  # no kernel ran

    def create(self, buffer_id, ordinal, rank, num_ranks, num_bytes, timeout_s, low_latency_bytes):
        self.created.append((ordinal, rank, num_ranks))
        self.low_latency_bytes.add(low_latency_bytes)

    def connect_local(self, buffer_id, ordinal, peer_rank, peer_ordinal):
        self.local_peers.append((ordinal, peer_ordinal))

    def disconnect(self, buffer_id, ordinal):
        pass

    def destroy(self, buffer_id, ordinal):
        pass


@pytest.fixture
def gpu_platform(monkeypatch):
    """The CUDA backend selection on CPU devices, with fake compiled modules; yields the intranode fake."""
    lib = FakeIntranodeLib()
    fake_cuda_platform(monkeypatch, lib)
    monkeypatch.setattr(nvshmem, "available", lambda: True)
    # Never reached by a refused process model: NVSHMEM is joined after the model is checked.
    monkeypatch.setattr(nvshmem, "nvshmem_library", lambda: pytest.fail("NVSHMEM joined"))
    yield lib


def test_normal_intranode_one_process_owning_several_gpus_works(gpu_platform):
    mesh = make_mesh(8)
    with deepep.Buffer(mesh, AXIS) as buffer:
        assert isinstance(buffer.normal_backend, intranode.IntranodeBackend)
    assert sorted(gpu_platform.created) == [(d.local_hardware_id, r, 8) for r, d in enumerate(mesh.devices)]
    # Every device maps each of its 7 peers in this process (peer access, no IPC).
    assert len(gpu_platform.local_peers) == 8 * 7


def test_low_latency_within_one_node_one_process_owning_several_gpus_works(gpu_platform):
    """Low latency within one node runs on the communication buffers' low-latency area, each device
    mapping its peers in this process: no NVSHMEM (the fixture fails any join)."""
    from jax_deepep.gpu import low_latency

    mesh = make_mesh(8)
    with deepep.Buffer(mesh, AXIS, low_latency_mode=True, num_rdma_bytes=1 << 30) as buffer:
        backend = buffer.low_latency_backend
        assert isinstance(backend, low_latency.LowLatencyBackend)
        assert backend.targets == low_latency.NODE_TARGET_PREFIX and backend.num_bytes == 1 << 30
        assert backend.memory is buffer.normal_backend.comm
    assert gpu_platform.low_latency_bytes == {1 << 30}
    assert len(gpu_platform.local_peers) == 8 * 7


@pytest.mark.parametrize("mode, buffer_args", [
    ("internode", dict(num_rdma_bytes=1 << 30, ranks_per_node=4)),
    ("low latency across nodes", dict(low_latency_mode=True, num_rdma_bytes=1 << 30, ranks_per_node=4)),
    ("low latency by NVSHMEM puts", dict(low_latency_mode=True, num_rdma_bytes=1 << 30,
                                         allow_nvlink_for_low_latency_mode=False)),
])
def test_nvshmem_modes_refuse_one_process_owning_several_gpus(gpu_platform, mode, buffer_args):
    with pytest.raises(deepep.DeepEPError, match=r"one GPU of the mesh per process.*Start one process per GPU"):
        deepep.Buffer(make_mesh(8), AXIS, **buffer_args)


def _mesh_of_processes(num_ranks: int):
    """A stand-in mesh over `num_ranks` GPUs, each owned by its own process (process index = rank)."""
    devices = np.array([types.SimpleNamespace(id=r, process_index=r) for r in range(num_ranks)], dtype=object)
    return types.SimpleNamespace(axis_names=(AXIS,), shape={AXIS: num_ranks}, devices=devices)


@pytest.mark.parametrize("process", [0, 5])
def test_nvshmem_modes_take_one_process_per_gpu(monkeypatch, process):
    """Each process finds its one GPU and its rank (the PE it joins NVSHMEM as)."""
    mesh = _mesh_of_processes(8)
    monkeypatch.setattr(jax, "process_index", lambda: process)
    device, rank = nvshmem._own_device_and_rank(mesh, AXIS)
    assert (device.id, rank) == (process, process)


@pytest.mark.parametrize("buffer_args", [
    dict(num_rdma_bytes=1 << 30, ranks_per_node=4),
    dict(low_latency_mode=True, num_rdma_bytes=1 << 30, ranks_per_node=4),
])
def test_num_qps_per_rank_reaches_the_nvshmem_start(gpu_platform, monkeypatch, buffer_args):
    """The Buffer's num_qps_per_rank goes to its symmetric buffer, which sets it for NVSHMEM's start."""
    from jax_deepep.gpu import internode, low_latency

    class Made(Exception):
        pass

    def symmetric_buffer(*args, num_qps_per_rank, **kwargs):
        raise Made(num_qps_per_rank)

    monkeypatch.setattr(internode, "SymmetricBuffer", symmetric_buffer)
    monkeypatch.setattr(low_latency, "SymmetricBuffer", symmetric_buffer)
    with pytest.raises(Made) as made:
        deepep.Buffer(make_mesh(8), AXIS, num_qps_per_rank=7, **buffer_args)
    assert made.value.args == (7,)


def test_nvshmem_start_sets_only_what_the_environment_leaves_unset(monkeypatch):
    """Joining sets the heap size, NVLink multicast off and the IBGDA QPs per peer (none for 0), keeping
    the user's values."""
    assert nvshmem.start_environment(1 << 30, 0) == {"NVSHMEM_SYMMETRIC_SIZE": str(1 << 30),
                                                      "NVSHMEM_DISABLE_NVLS": "1"}
    environment = {"NVSHMEM_SYMMETRIC_SIZE": "5000000000"}  # the user's
    monkeypatch.setattr(os, "environ", environment)
    monkeypatch.setattr(nvshmem.atexit, "register", lambda *args: None)
    seen = {}
    lib = types.SimpleNamespace(pe=lambda: None, unique_id=lambda: b"id",
                                join=lambda uid, rank, num_ranks, ordinal: seen.update(os.environ))
    nvshmem._ensure_pe(lib, 0, 1, 0, nvshmem.start_environment(1 << 30, 24), keys=None)
    assert seen == {"NVSHMEM_SYMMETRIC_SIZE": "5000000000", "NVSHMEM_DISABLE_NVLS": "1",
                    "NVSHMEM_IBGDA_NUM_RC_PER_PE": "24"}
