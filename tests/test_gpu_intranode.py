"""GPU tests of the intranode CUDA kernels (jax_deepep/gpu/intranode.py) against the numpy oracle.

Every check runs in fresh worker processes (this file run as a script, with the checks of
tests/normal_checks.py): R = 1 in one process, and
R = 2 and 4 as that many processes sharing GPU 0 (jax.distributed; the buffers are mapped through
CUDA IPC; no XLA collectives between the processes, so each one compares its own shard with the
oracle computed from the same seeded global data). Timing lives in `python -m jax_deepep.bench`.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

import gpu_workers
from normal_checks import (AXIS, Worker, check_dispatch, check_gradient, check_pressure, edge_checks,
                           grouped_checks, skip_reason, vmap_checks)


# ---- the pytest side: launch the workers ------------------------------------------------------
def _run_workers(num_ranks: int):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    env = gpu_workers.worker_env(num_ranks, 0.5 if num_ranks == 1 else 0.6 / num_ranks)
    env["JAX_DEEPEP_BACKEND"] = "cuda"
    gpu_workers.run_workers(__file__, num_ranks, env)


@pytest.mark.gpu
def test_intranode_one_rank():
    _run_workers(1)


@pytest.mark.gpu
def test_intranode_two_ranks_on_one_gpu():
    _run_workers(2)


@pytest.mark.gpu
def test_intranode_four_ranks_on_one_gpu():
    _run_workers(4)


# ---- the worker side ----------------------------------------------------------------------------
def _all_processes_here(name: str):
    """Wait for every process (the key-value store's barrier: no XLA collective)."""
    import jax

    from jax_deepep.topology import kv_client

    if jax.process_count() > 1:
        kv_client().wait_at_barrier(f"test_gpu_intranode/{name}", 120_000)


def check_destroyed_buffer_program(w: Worker):
    """After destroy(), calling a jitted function or a compiled program of the Buffer fails with an
    error that says so (the handler finds no buffer), nothing hangs, and a new Buffer works."""
    import jax

    import jax_deepep as deepep
    from harness import random_bf16, random_topk

    experts = 2 * w.num_ranks
    rng = np.random.default_rng(77)
    x = w.place(random_bf16(rng, (w.num_ranks, 64, 128)))
    idx = w.place(random_topk(rng, w.num_ranks, 64, 2, experts))
    buffer = w.buffer
    fn = w.compile(lambda x_, i_: buffer.dispatch(x_, topk_idx=i_, num_experts=experts).recv_x)
    compiled = fn.lower(x, idx).compile()
    jax.block_until_ready(compiled(x, idx))
    buffer.destroy()
    _all_processes_here("destroyed/program")
    for call in (fn, compiled):
        try:
            jax.block_until_ready(call(x, idx))
        except Exception as e:
            assert "destroyed" in str(e), e
        else:
            raise AssertionError("a program of a destroyed Buffer ran")
    w.buffer = deepep.Buffer(w.mesh, AXIS)
    check_pressure(w, 99, 3)


def check_recreate(w: Worker, times: int):
    """Destroy and re-create the Buffer `times` times: device memory comes back every time (the GPU
    is shared by every process, so each measurement waits for all of them), and no key of a destroyed
    Buffer stays in the jax.distributed store."""
    import jax

    import jax_deepep as deepep
    from harness import buffer_keys_in_store, random_bf16, random_topk
    from jax_deepep.gpu import runtime

    ordinal = jax.local_devices()[0].local_hardware_id
    w.buffer.destroy()
    _all_processes_here("recreate/before")
    before = runtime.device_free_bytes(ordinal)
    _all_processes_here("recreate/measured")
    for i in range(times):
        w.buffer = deepep.Buffer(w.mesh, AXIS)
        rng = np.random.default_rng(1000 + i)
        x = random_bf16(rng, (w.num_ranks, 64, 128))
        idx = random_topk(rng, w.num_ranks, 64, 2, 2 * w.num_ranks)
        w.run(lambda x_, i_: w.buffer.dispatch(x_, topk_idx=i_, num_experts=2 * w.num_ranks).num_recv_tokens, x, idx)
        w.buffer.destroy()
    _all_processes_here("recreate/after")
    after = runtime.device_free_bytes(ordinal)
    leaked = before - after
    try:
        assert leaked < 64 << 20, f"{leaked} bytes of device memory not returned after {times} re-creations"
        if jax.process_count() > 1:
            assert not buffer_keys_in_store(), f"keys of destroyed Buffers left: {buffer_keys_in_store()}"
    finally:  # collective: the other processes must not wait for this one's Buffer
        # Every process has looked at the store before any starts the next Buffer's handshake,
        # whose records a slower process would otherwise find.
        _all_processes_here("recreate/checked")
        w.buffer = deepep.Buffer(w.mesh, AXIS)


def worker_main(rank: int, num_ranks: int, port: int) -> int:
    import jax

    if num_ranks > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_ranks, process_id=rank)
    w = Worker(rank, num_ranks)
    rng = np.random.default_rng(1234)  # the same global data in every process
    experts = 16 * num_ranks
    common = dict(tokens=256, hidden=512, topk=8, experts=experts)
    w.check("dispatch/combine bf16", lambda: check_dispatch(w, rng, **common))
    w.check("uneven routing (hot experts)", lambda: check_dispatch(w, rng, kind="hot", **common))
    w.check("out-of-range ids behave like -1", lambda: check_dispatch(w, rng, kind="out_of_range", **common))
    w.check("fp8 dispatch", lambda: check_dispatch(w, rng, fp8=True, **common))
    w.check("capacity overflow (rows past N dropped)",
            lambda: check_dispatch(w, rng, capacity=96, kind="hot", **common))
    w.check("expert alignment 4, no weights, one bias",
            lambda: check_dispatch(w, rng, alignment=4, with_weights=False, bias=1, **common))
    w.check("H=7168 bf16, T=1024", lambda: check_dispatch(w, rng, tokens=1024, hidden=7168, topk=8, experts=experts))
    for name, edge_check in edge_checks(w, rng, experts) + vmap_checks(w, rng) + grouped_checks(w, rng, experts):
        w.check(name, edge_check)
    w.check("gradient through a jitted step", lambda: check_gradient(w, rng, tokens=256, hidden=512, topk=4,
                                                                      experts=experts))
    w.check("pressure: 200 rounds", lambda: check_pressure(w, 4321, 200))
    w.check("a program of a destroyed Buffer", lambda: check_destroyed_buffer_program(w))
    w.check("destroy/re-create 20 times", lambda: check_recreate(w, 20))
    if w.buffer.failure():
        w.failures.append("kernel failure")
        print(f"FAIL {w.buffer.failure()}")
    w.buffer.destroy()
    print(f"rank {rank}: {len(w.failures)} failures {w.failures}", flush=True)
    return 1 if w.failures else 0


if __name__ == "__main__":
    a = gpu_workers.worker_args()
    sys.exit(worker_main(a.rank, a.num_ranks, a.port))
