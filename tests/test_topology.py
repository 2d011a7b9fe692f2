"""Nodes of the expert-parallel axis: detected from the hosts of the devices' processes (which the
processes tell each other while they make a Buffer: tests/test_creation.py runs that in a job of two),
unless `ranks_per_node` or JAX_DEEPEP_RANKS_PER_NODE says otherwise."""
import types

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import jax_deepep as deepep
from harness import make_mesh
from jax_deepep import creation
from jax_deepep.topology import detect_ranks_per_node

ONE_HOST = {0: "h"}  # the hosts of a job of one process


def _fake_mesh(processes, axis_names=("ep",)):
    """What detect_ranks_per_node reads of a mesh: device i lives in process `processes[i]`."""
    processes = np.asarray(processes)
    devices = np.empty(processes.shape, object)
    for i, p in enumerate(processes.flat):
        devices.flat[i] = types.SimpleNamespace(id=i, process_index=int(p))
    return types.SimpleNamespace(devices=devices, axis_names=axis_names)


@pytest.mark.parametrize("num_ranks", [1, 2, 8])
def test_single_process_is_one_node(num_ranks):
    assert detect_ranks_per_node(make_mesh(num_ranks), "ep", ONE_HOST) == num_ranks
    assert deepep.Buffer(make_mesh(num_ranks), "ep").ranks_per_node == num_ranks


def test_the_handshake_of_a_single_process_gives_its_host(monkeypatch):
    monkeypatch.setenv("JAX_DEEPEP_HOST_ID", "fake-host")
    assert creation.agree(make_mesh(2), {})[1] == {0: "fake-host"}


def test_two_hosts_of_four_ranks():
    mesh = _fake_mesh([0, 0, 1, 1, 2, 2, 3, 3])  # two processes per host, two devices per process
    assert detect_ranks_per_node(mesh, "ep", {0: "a", 1: "a", 2: "b", 3: "b"}) == 4


def test_one_process_per_rank():
    mesh = _fake_mesh(range(8))
    assert detect_ranks_per_node(mesh, "ep", {p: f"h{p // 2}" for p in range(8)}) == 2
    assert detect_ranks_per_node(mesh, "ep", {p: f"h{p}" for p in range(8)}) == 1


def test_interleaved_hosts_are_refused():
    mesh = _fake_mesh([0, 1, 0, 1])
    with pytest.raises(deepep.DeepEPError, match=r"ranks \[0, 2\] on host 'a'; ranks \[1, 3\] on host 'b'.*"
                                                 r"jax.make_mesh.*ranks_per_node"):
        detect_ranks_per_node(mesh, "ep", {0: "a", 1: "b"})


def test_a_host_in_two_blocks_is_refused():
    mesh = _fake_mesh([0, 0, 1, 1, 0, 0])
    with pytest.raises(deepep.DeepEPError, match="consecutive"):
        detect_ranks_per_node(mesh, "ep", {0: "a", 1: "b"})


def test_unequal_blocks_are_refused():
    mesh = _fake_mesh([0, 0, 0, 1])
    with pytest.raises(deepep.DeepEPError, match=r"ranks \[0, 1, 2\] on host 'a'; ranks \[3\] on host 'b'"):
        detect_ranks_per_node(mesh, "ep", {0: "a", 1: "b"})


def test_expert_axis_after_another_axis():
    # (dp=2, ep=4) over four hosts: each ep line is two hosts of two ranks, each dp line two hosts of one.
    mesh = _fake_mesh([[0, 0, 1, 1], [2, 2, 3, 3]], ("dp", "ep"))
    hosts = {0: "a", 1: "b", 2: "c", 3: "d"}
    assert detect_ranks_per_node(mesh, "ep", hosts) == 2
    assert detect_ranks_per_node(mesh, "dp", hosts) == 1


def test_expert_axis_first_of_two():
    # (ep=4, tp=2) with hosts by ep block: both tp lines see two hosts of two ranks.
    mesh = _fake_mesh([[0, 0], [0, 0], [1, 1], [1, 1]], ("ep", "tp"))
    assert detect_ranks_per_node(mesh, "ep", {0: "a", 1: "b"}) == 2


def test_lines_with_different_blocks_are_refused():
    mesh = _fake_mesh([[0, 0, 1, 1], [2, 2, 2, 2]], ("dp", "ep"))
    with pytest.raises(deepep.DeepEPError, match="'ep' at dp=1 a host has 4 ranks.*but 2 elsewhere"):
        detect_ranks_per_node(mesh, "ep", {0: "a", 1: "b", 2: "c"})


def test_real_two_axis_mesh():
    mesh = Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 4), ("dp", "ep"))
    assert detect_ranks_per_node(mesh, "ep", ONE_HOST) == 4
    assert deepep.Buffer(mesh, "ep").ranks_per_node == 4


def test_overrides_win_over_detection(monkeypatch):
    mesh = make_mesh(8)
    monkeypatch.setattr("jax_deepep.buffer.detect_ranks_per_node", lambda *a: pytest.fail("detection ran"))
    assert deepep.Buffer(mesh, "ep", ranks_per_node=2).ranks_per_node == 2
    monkeypatch.setenv("JAX_DEEPEP_RANKS_PER_NODE", "4")
    assert deepep.Buffer(mesh, "ep").ranks_per_node == 4
    assert deepep.Buffer(mesh, "ep", ranks_per_node=2).ranks_per_node == 2  # the argument before the env var
