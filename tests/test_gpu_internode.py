"""GPU tests of the internode kernels (jax_deepep/gpu/internode.py) against the numpy oracle.

Several processes share GPU 0, each one NVSHMEM PE, and `JAX_DEEPEP_RANKS_PER_NODE` makes them
play several nodes: R = 4 as 2 nodes of 2 ranks and as 4 nodes of 1. Ranks of one "node" write
each other's buffers directly; every byte between "nodes" travels as nvshmem puts, as across
hosts. Each process checks its own shard with the intranode tests' checks (tests/normal_checks.py:
random data, FP8, -1 and out-of-range ids, hot routing, capacity overflow, cached dispatch,
combine with weights and biases, gradients, 100 rounds), plus the network traffic: one row per (token,
destination node other than its own) in dispatch, one partial per (token, node) back in combine.
Timeouts are tests/test_gpu_faults.py's.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import gpu_workers
import normal_checks
NUM_RDMA_BYTES = 1 << 30


def _run_workers(num_ranks: int, ranks_per_node: int):
    reason = normal_checks.skip_reason()
    if reason is None:
        from jax_deepep.gpu import nvshmem

        if not nvshmem.available():
            reason = nvshmem.unavailable_reason()
    if reason:
        pytest.skip(reason)
    env = gpu_workers.worker_env(num_ranks, 0.5 / num_ranks)
    env["JAX_DEEPEP_BACKEND"] = "cuda"
    env["JAX_DEEPEP_RANKS_PER_NODE"] = str(ranks_per_node)
    env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    tag = f"_nodes_of{ranks_per_node}"
    gpu_workers.run_workers(__file__, num_ranks, env, tag)


@pytest.mark.gpu
def test_internode_two_nodes_of_two_ranks():
    _run_workers(4, 2)


@pytest.mark.gpu
def test_internode_four_nodes_of_one_rank():
    _run_workers(4, 1)


def expected_traffic(idx, experts: int, num_ranks: int, ranks_per_node: int, rank: int) -> tuple:
    """(dispatch rows, combine rows) this rank puts on the network for routing `idx` [R, T, K]."""
    idx = np.asarray(idx)
    valid = (idx >= 0) & (idx < experts)
    node_of = np.where(valid, idx // (experts // num_ranks) // ranks_per_node, -1)
    nodes = num_ranks // ranks_per_node
    goes = np.stack([(node_of == m).any(axis=2) for m in range(nodes)], axis=-1)  # [R, T, nodes]
    my_node, my_local = rank // ranks_per_node, rank % ranks_per_node
    sent = int(goes[rank].sum() - goes[rank][:, my_node].sum())
    forwarded = sum(int(goes[n * ranks_per_node + my_local][:, my_node].sum()) for n in range(nodes) if n != my_node)
    return sent, forwarded


def check_traffic(w: normal_checks.Worker, seed: int):
    """One dispatch + combine: the rows put on the network are one per (token, other node) each way."""
    from harness import random_bf16, random_topk

    r, tokens, hidden, topk, experts = w.num_ranks, 128, 256, 4, 8 * w.num_ranks
    rng = np.random.default_rng(seed)
    idx = random_topk(rng, r, tokens, topk, experts, "random")
    x = random_bf16(rng, (r, tokens, hidden))
    buffer = w.buffer

    def body(x_, idx_):
        out = buffer.dispatch(x_, topk_idx=idx_, num_experts=experts)
        combined, _ = buffer.combine(out.recv_x, out.handle)
        return combined

    kernels = buffer.normal_backend
    before = kernels.traffic()
    w.run(body, x, idx)
    after = kernels.traffic()
    sent, forwarded = expected_traffic(idx, experts, r, buffer.ranks_per_node, w.rank)
    got = {k: after[k] - before[k] for k in after}
    assert got["dispatch_rows"] == sent, f"dispatch rows {got['dispatch_rows']} != {sent}"
    assert got["combine_rows"] == forwarded, f"combine rows {got['combine_rows']} != {forwarded}"
    row_bytes = 16 + (topk * 4 + 15) // 16 * 16 + hidden * 2  # header, ids (16-byte aligned), bf16 payload
    assert got["dispatch_bytes"] == sent * row_bytes, got
    print(f"traffic: {got}", flush=True)


def check_no_keys_left():
    """Once every process destroyed its Buffer, no key of it is left in the jax.distributed store."""
    from jax._src import distributed

    from harness import buffer_keys_in_store

    distributed.global_state.client.wait_at_barrier("test_gpu_internode/destroyed", 120_000)
    assert not buffer_keys_in_store(), f"keys of a destroyed Buffer left: {buffer_keys_in_store()}"


def worker_main(rank: int, num_ranks: int, port: int) -> int:
    import jax

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_ranks, process_id=rank)
    w = normal_checks.Worker(rank, num_ranks, num_rdma_bytes=NUM_RDMA_BYTES)
    assert w.buffer.normal_backend.mode == "internode", f"the internode kernels are not in use: {w.buffer.normal_backend.mode}"
    rng = np.random.default_rng(1234)  # the same global data in every process
    experts = 16 * num_ranks
    common = dict(tokens=256, hidden=512, topk=8, experts=experts)
    check = normal_checks.check_dispatch
    w.check("dispatch/combine bf16", lambda: check(w, rng, **common))
    w.check("uneven routing (hot experts)", lambda: check(w, rng, kind="hot", **common))
    w.check("out-of-range ids behave like -1", lambda: check(w, rng, kind="out_of_range", **common))
    w.check("fp8 dispatch", lambda: check(w, rng, fp8=True, **common))
    w.check("capacity overflow (rows past N dropped)", lambda: check(w, rng, capacity=96, kind="hot", **common))
    w.check("expert alignment 4, no weights, one bias",
            lambda: check(w, rng, alignment=4, with_weights=False, bias=1, **common))
    w.check("H=7168 bf16, T=1024", lambda: check(w, rng, tokens=1024, hidden=7168, topk=8, experts=experts))
    for name, edge_check in normal_checks.edge_checks(w, rng, experts) + normal_checks.vmap_checks(w, rng):
        w.check(name, edge_check)
    w.check("gradient through a jitted step",
            lambda: normal_checks.check_gradient(w, rng, tokens=256, hidden=512, topk=4, experts=experts))
    w.check("network traffic: one row per (token, node)", lambda: check_traffic(w, 99))
    w.check("pressure: 100 rounds", lambda: normal_checks.check_pressure(w, 4321, 100))
    w.buffer.destroy()
    w.check("no key of the Buffer (the NVSHMEM unique id among them) left in the store", check_no_keys_left)
    print(f"rank {rank}: {len(w.failures)} failures {w.failures} (ranks per node "
          f"{os.environ.get('JAX_DEEPEP_RANKS_PER_NODE')})", flush=True)
    return 1 if w.failures else 0


if __name__ == "__main__":
    a = gpu_workers.worker_args()
    sys.exit(worker_main(a.rank, a.num_ranks, a.port))
