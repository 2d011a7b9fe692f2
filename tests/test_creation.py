"""Buffer creation across processes (docs/API.md, jax_deepep/creation.py): every process must pass
the same arguments, the processes agree on the Buffer's id and learn each other's hosts, and a destroyed
or dropped Buffer leaves no key at all in the jax.distributed store.

The job of two processes runs on CPU (one device each, this file run as a script); each process writes
what it saw to a JSON file that the pytest side compares.
"""
from __future__ import annotations

import gc
import json
import os
import pathlib
import time

import pytest

import gpu_workers
import jax_deepep as deepep
from harness import buffer_keys_in_store, make_mesh
from jax_deepep import creation

_JOB_TIMEOUT_S = 90


# ---- without processes --------------------------------------------------------------------------
def test_equal_arguments_are_no_mismatch():
    args = {"num_nvl_bytes": 1 << 20, "low_latency_mode": False, "mesh.device_ids": [0, 1]}
    assert creation.describe_mismatch({0: args, 1: dict(args), 2: dict(args)}) is None


def test_the_mismatch_names_each_differing_argument_and_who_passed_what():
    base = {"axis_name": "ep", "num_nvl_bytes": 1 << 20, "low_latency_mode": False, "timeout_s": 100.0}
    message = creation.describe_mismatch({0: base, 1: dict(base, num_nvl_bytes=2 << 20),
                                          2: dict(base, low_latency_mode=True), 3: dict(base)})
    assert message.startswith("Buffer: every process must create it with the same arguments")
    assert ("`num_nvl_bytes` differs (processes [0, 2, 3] passed 1048576, process 1 passed 2097152)"
            in message), message
    assert "`low_latency_mode` differs (processes [0, 1, 3] passed False, process 2 passed True)" in message
    assert "axis_name" not in message and "timeout_s" not in message


def test_an_argument_only_one_process_passed_differs():
    message = creation.describe_mismatch({0: {"a": 1}, 1: {"a": 1, "b": [0, 1]}})
    assert message.endswith("`b` differs (process 0 passed None, process 1 passed [0, 1])")


def test_a_long_value_is_cut_short():
    message = creation.describe_mismatch({0: {"mesh.device_ids": list(range(1000))}, 1: {"mesh.device_ids": []}})
    assert "..." in message and len(message) < 600


def test_buffers_of_one_process_get_fresh_ids():
    mesh = make_mesh(2)
    first, second = deepep.Buffer(mesh, "ep"), deepep.Buffer(mesh, "ep")
    assert second.buffer_id != first.buffer_id
    assert creation._buffer_id((0,), 0) != creation._buffer_id((0, 1), 0)  # other processes, other ids
    assert first.keys.prefix == f"jax_deepep/buffer/{first.buffer_id}"
    assert creation.processes_of(mesh) == (0,)


# ---- a job of two processes ---------------------------------------------------------------------
def test_two_processes_agree_on_ids_and_hosts_refuse_different_sizes_and_leave_no_keys(tmp_path):
    env = gpu_workers.worker_env(2, 0.1)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               CREATION_OUT=str(tmp_path))
    gpu_workers.run_workers(__file__, 2, env, timeout_s=_JOB_TIMEOUT_S)
    seen = [json.loads((tmp_path / f"{p}.json").read_text()) for p in range(2)]
    assert seen[0]["ids"] == seen[1]["ids"], seen
    assert len(set(seen[0]["ids"])) == 3, seen  # every Buffer its own id
    assert [seen[0]["peer"], seen[1]["peer"]] == ["1", "0"]
    assert [seen[0]["ranks_per_node"], seen[1]["ranks_per_node"]] == [1, 1]  # each its own host
    for process in range(2):
        message = seen[process]["mismatch"]
        assert message and "`num_nvl_bytes` differs (process 0 passed 1048576, process 1 passed 2097152)" in message
        assert seen[process]["mismatch_s"] < 10
        assert not seen[process]["keys"], seen[process]["keys"]


def _worker():
    """Three Buffers with a refused one between them, destroyed (the first twice), and one dropped; then
    the store's keys."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from jax_deepep.topology import KV_TIMEOUT_MS, kv_client

    args = gpu_workers.worker_args()
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_ranks, args.rank)
    os.environ["JAX_DEEPEP_HOST_ID"] = f"host-{args.rank}"  # two "hosts", told through the handshake
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    first, second = deepep.Buffer(mesh, "ep"), deepep.Buffer(mesh, "ep")
    seen = {"ids": [first.buffer_id, second.buffer_id], "mismatch": None, "ranks_per_node": first.ranks_per_node}
    start = time.monotonic()
    with pytest.raises(deepep.DeepEPError) as refused:
        deepep.Buffer(mesh, "ep", num_nvl_bytes=(1 << 20) * (args.rank + 1))
    seen.update(mismatch=str(refused.value), mismatch_s=time.monotonic() - start)
    third = deepep.Buffer(mesh, "ep", num_nvl_bytes=1 << 20)  # the processes still meet after a refusal
    seen["ids"].append(third.buffer_id)
    # As the CUDA backends swap handles: set, read the peer's, wait for each other, delete.
    third.keys.set(f"device/{args.rank}", str(args.rank))
    seen["peer"] = third.keys.get(f"device/{1 - args.rank}")
    third.keys.barrier("connected")
    third.keys.delete(f"device/{args.rank}")
    dropped = deepep.Buffer(mesh, "ep")
    del dropped
    gc.collect()
    for buffer in (first, second, third, first):
        buffer.destroy()
    client = kv_client()
    client.wait_at_barrier("test_creation/destroyed", KV_TIMEOUT_MS)
    seen["keys"] = buffer_keys_in_store()
    pathlib.Path(os.environ["CREATION_OUT"], f"{args.rank}.json").write_text(json.dumps(seen))
    jax.distributed.shutdown()


if __name__ == "__main__":
    _worker()
