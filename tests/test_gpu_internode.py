"""GPU tests of the internode kernels (jax_deepep/gpu/internode.py) against the numpy oracle.

Several processes share GPU 0, each one NVSHMEM PE, and `JAX_DEEPEP_RANKS_PER_NODE` makes them
play several nodes: R = 4 as 2 nodes of 2 ranks and as 4 nodes of 1. Ranks of one "node" write
each other's buffers directly; between "nodes" every byte travels as nvshmem puts, as across hosts,
on the first Buffer (`internode_puts_only=True`), and through NVSHMEM's mapping of the shared GPU,
as between nodes joined by NVLink, on the second. Each process checks its own shard with the
intranode tests' checks (tests/normal_checks.py: random data, FP8, -1 and out-of-range ids, hot
routing, capacity overflow, cached dispatch, combine with weights and biases, gradients, 100 rounds,
and the expert-grouped layout: its rows, counts, cached dispatch, weighted combine and gradient),
plus rings that wrap many times per call (SMALL_RINGS), back-to-back combines on routing that mostly
stays within nodes, and the traffic between nodes: one row per (token, destination node other than
its own) in dispatch, one partial per (token, node) back in combine, of bf16 or f32, grouped or not.
All of it on a Buffer with the default bf16 partials (the oracle rounds each node's partial to bf16)
that puts; then what the combine's rounding decides, and the dispatch checks whose rows travel
differently (FP8, capacity overflow), again on one with `exact_internode_combine=True` (the oracle
rounds once) that writes through the mapping. Timeouts are tests/test_gpu_faults.py's.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import gpu_workers
import normal_checks
NUM_RDMA_BYTES = 1 << 30
SIZES = dict(tokens=256, hidden=512, topk=8)  # of most checks
# Rings far smaller than a call's rows (two channels of 128 tokens), batches that divide neither them nor
# the windows: every ring wraps and its producer waits for room many times per call, where the default
# Configs' rings hold the other checks' calls whole.
SMALL_RINGS = dict(num_sms=4, num_max_nvl_chunked_send_tokens=5, num_max_nvl_chunked_recv_tokens=24,
                   num_max_rdma_chunked_send_tokens=3, num_max_rdma_chunked_recv_tokens=20)


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


@pytest.mark.parametrize("exact", [False, True])
def test_checks_accept_the_pure_jax_ops(exact):
    """On CPU: the combine checks (plain and expert-grouped) pass on the pure-JAX ops over 2 nodes of 2
    ranks, whose combine rounds as the kernels do (each node's partial to bf16 unless exact), so a GPU
    failure points at the kernels, not at the checks. Four CPU devices of one process; the worker checks rank 0's shard.
    Not the gradient check: inside its program XLA:CPU may drop the bf16 rounding of `y`, which the
    oracle applies (even on one node); nor H = 7168, half a minute here."""
    import jax

    w = normal_checks.Worker(0, 4, devices=jax.devices()[:4], backend="reference", ranks_per_node=2,
                             exact_internode_combine=exact)
    rng = np.random.default_rng(1234)
    checks = (combine_checks(w, rng, 16 * 4, large=False) + grouped_combine_checks(w, rng, 16 * 4, large=False)
              + small_ring_checks(w, rng, 16 * 4))
    for name, check in checks:
        w.check(name, check)
    w.check("pressure: 3 rounds", lambda: normal_checks.check_pressure(w, 4321, 3))
    w.check("back-to-back combines", lambda: check_back_to_back_combines(w, 77))
    assert not w.failures


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


def check_traffic(w: normal_checks.Worker, seed: int, grouped: bool = False):
    """One dispatch + combine (`grouped`: expert-grouped): the rows sent to other nodes (put, or written
    through the mapping) are one per (token, other node) each way; a grouped dispatch's rows also carry
    K weights and K pair prefixes."""
    from harness import random_bf16, random_topk

    r, tokens, hidden, topk, experts = w.num_ranks, 128, 256, 4, 8 * w.num_ranks
    rng = np.random.default_rng(seed)
    idx = random_topk(rng, r, tokens, topk, experts, "random")
    x = random_bf16(rng, (r, tokens, hidden))
    buffer = w.buffer

    def body(x_, idx_):
        out = buffer.dispatch(x_, topk_idx=idx_, num_experts=experts, expert_grouped=grouped)
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
    topk_words = topk * (3 if grouped else 1)  # ids, then a grouped dispatch's weights and prefixes
    row_bytes = 16 + (topk_words * 4 + 15) // 16 * 16 + hidden * 2  # header, ids... (16-byte aligned), bf16 payload
    assert got["dispatch_bytes"] == sent * row_bytes, got
    partial_bytes = hidden * (4 if buffer.exact_internode_combine else 2)  # f32 or bf16 values, no weights
    assert got["combine_bytes"] == forwarded * partial_bytes, got
    print(f"traffic: {got}", flush=True)


def check_back_to_back_combines(w: normal_checks.Worker, seed: int):
    """Four combines of one dispatch in one program, on routing that mostly stays on each source's node: a
    finisher or reducer that expects no rows from a producer may finish a call and start the next before
    that producer has read its head 0 (cuda/internode_rings.cuh: wait_ring_started). Small integers and
    scales of 2^i keep every sum exact: combine i gives 2^i x times the ranks each token went to."""
    import jax.numpy as jnp

    r, per_node, tokens, hidden, topk = w.num_ranks, w.buffer.ranks_per_node, 64, 128, 2
    experts = 4 * r
    per_rank = experts // r
    rng = np.random.default_rng(seed)
    idx = np.empty((r, tokens, topk), np.int32)
    for rank in range(r):
        node = rank // per_node
        idx[rank] = rng.integers(node * per_node * per_rank, (node + 1) * per_node * per_rank, (tokens, topk))
        anywhere = np.arange(tokens) % 16 == rank  # a few tokens may leave the node
        idx[rank, anywhere] = rng.integers(0, experts, (int(anywhere.sum()), topk))
    x = rng.integers(-2, 3, (r, tokens, hidden)).astype(np.float32)
    buffer = w.buffer

    def body(x_, idx_):
        out = buffer.dispatch(x_.astype(jnp.bfloat16), topk_idx=idx_, num_experts=experts)
        return tuple(buffer.combine(out.recv_x * jnp.bfloat16(2.0 ** i), out.handle)[0].astype(jnp.float32)
                     for i in range(4))

    got = w.run(body, x, idx)
    ranks_reached = np.array([len(set(row // per_rank)) for row in idx[w.rank]], np.float32)
    for i, combined in enumerate(got):
        want = x[w.rank] * ranks_reached[:, None] * 2.0 ** i
        bad = np.argwhere(combined != want)
        assert bad.size == 0, f"combine {i}: {len(bad)} values differ, first at {bad[0]}"


def check_no_keys_left():
    """Once every process destroyed its Buffer, no key of it is left in the jax.distributed store."""
    from jax._src import distributed

    from harness import buffer_keys_in_store

    distributed.global_state.client.wait_at_barrier("test_gpu_internode/destroyed", 120_000)
    assert not buffer_keys_in_store(), f"keys of a destroyed Buffer left: {buffer_keys_in_store()}"


def combine_checks(w: normal_checks.Worker, rng, experts: int, large: bool = True) -> list:
    """(name, check) pairs whose results depend on how combine rounds (its partials); `large` adds
    H = 7168 with T = 1024."""
    common = dict(SIZES, experts=experts)
    check = normal_checks.check_dispatch
    checks = [
        ("dispatch/combine bf16", lambda: check(w, rng, **common)),
        ("expert alignment 4, no weights, one bias",
         lambda: check(w, rng, alignment=4, with_weights=False, bias=1, **common)),
    ]
    if large:
        checks.append(("H=7168 bf16, T=1024",
                       lambda: check(w, rng, tokens=1024, hidden=7168, topk=8, experts=experts)))
    return checks


def grouped_combine_checks(w: normal_checks.Worker, rng, experts: int, large: bool = True) -> list:
    """(name, check) pairs of the expert-grouped layout whose results depend on how combine rounds (its
    partials); `large` adds H = 7168 with T = 1024."""
    common = dict(SIZES, experts=experts)
    check = normal_checks.check_grouped
    checks = [
        ("grouped dispatch/combine bf16", lambda: check(w, rng, **common)),
        ("grouped: -1, out-of-range and repeated ids, alignment 4, no weights, one bias",
         lambda: check(w, rng, alignment=4, with_weights=False, bias=1, kind="repeated", **common)),
    ]
    if large:
        checks.append(("grouped: H=7168, T=1024",
                       lambda: check(w, rng, tokens=1024, hidden=7168, topk=8, experts=experts, bias=0)))
    return checks


def small_rings():
    """The Config of SMALL_RINGS."""
    from jax_deepep import Config

    return Config(**SMALL_RINGS)


def small_ring_checks(w: normal_checks.Worker, rng, experts: int) -> list:
    """(name, check) pairs of dispatch, cached dispatch and combine, plain and expert-grouped, through rings
    of SMALL_RINGS."""
    common = dict(SIZES, experts=experts, config=small_rings())
    return [("small rings: dispatch/combine bf16", lambda: normal_checks.check_dispatch(w, rng, **common)),
            ("small rings: grouped dispatch/combine bf16", lambda: normal_checks.check_grouped(w, rng, **common))]


def grouped_dispatch_checks(w: normal_checks.Worker, rng, experts: int) -> list:
    """(name, check) pairs of the rest of the expert-grouped layout: routing, capacity, FP8."""
    common = dict(SIZES, experts=experts)
    check = normal_checks.check_grouped
    return [
        ("grouped: out-of-range ids", lambda: check(w, rng, kind="out_of_range", **common)),
        ("grouped: capacity overflow (rows past N dropped)",
         lambda: check(w, rng, capacity=300, alignment=4, kind="hot", **common)),
        ("grouped: fp8", lambda: check(w, rng, fp8=True, alignment=4, **common)),
    ]


def dispatch_checks(w: normal_checks.Worker, rng, experts: int) -> list:
    """(name, check) pairs of the rest: routing, FP8, capacity, limits, vmap."""
    common = dict(SIZES, experts=experts)
    check = normal_checks.check_dispatch
    return [
        ("uneven routing (hot experts)", lambda: check(w, rng, kind="hot", **common)),
        ("out-of-range ids behave like -1", lambda: check(w, rng, kind="out_of_range", **common)),
        ("fp8 dispatch", lambda: check(w, rng, fp8=True, **common)),
        ("capacity overflow (rows past N dropped)", lambda: check(w, rng, capacity=96, kind="hot", **common)),
        # Two-part rows and dropped rows through rings that wrap: the forwarder counts positions across many
        # windows and refills.
        ("small rings: hot routing, fp8, capacity overflow",
         lambda: check(w, rng, capacity=96, kind="hot", fp8=True, config=small_rings(), **common)),
    ] + normal_checks.edge_checks(w, rng, experts) + normal_checks.vmap_checks(w, rng)


def worker_main(rank: int, num_ranks: int, port: int) -> int:
    import jax

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_ranks, process_id=rank)
    rng = np.random.default_rng(1234)  # the same global data in every process
    experts = 16 * num_ranks
    failures = []
    for exact in (False, True):
        # The processes share one GPU, so NVSHMEM maps every peer: the first Buffer puts to other nodes
        # (the network path), the second writes them through the mapping (NVLink between nodes).
        w = normal_checks.Worker(rank, num_ranks, num_rdma_bytes=NUM_RDMA_BYTES, exact_internode_combine=exact,
                                 internode_puts_only=not exact)
        w.failures = failures  # one report for both Buffers
        mode = w.buffer.normal_backend.mode
        assert mode == "internode", f"the internode kernels are not in use: {mode}"
        checks = [("back-to-back combines, routing mostly within nodes", lambda: check_back_to_back_combines(w, 77))]
        checks += combine_checks(w, rng, experts) + grouped_combine_checks(w, rng, experts) + small_ring_checks(
            w, rng, experts)
        more = dispatch_checks(w, rng, experts) + grouped_dispatch_checks(w, rng, experts)
        # All of them over puts; over the mapping, those whose rows travel differently (two-part FP8 rows,
        # rows dropped past the capacity, rings that wrap).
        checks += more if not exact else [c for c in more if "fp8" in c[0] or "capacity" in c[0]]
        for name, check in checks:
            w.check(f"{name} (exact_internode_combine={exact})", check)
        w.check(f"gradient through a jitted step (exact_internode_combine={exact})",
                lambda: normal_checks.check_gradient(w, rng, tokens=256, hidden=512, topk=4, experts=experts))
        w.check(f"grouped: gradient through a jitted step (exact_internode_combine={exact})",
                lambda: normal_checks.check_grouped_gradient(w, rng, tokens=256, hidden=512, topk=4, experts=experts))
        for grouped in (False, True):
            w.check(f"traffic between nodes: one row per (token, node), grouped={grouped} "
                    f"(exact_internode_combine={exact})", lambda: check_traffic(w, 99, grouped))
        rounds = 20 if exact else 100
        w.check(f"pressure: {rounds} rounds (exact_internode_combine={exact})",
                lambda: normal_checks.check_pressure(w, 4321, rounds))
        w.buffer.destroy()
    w.check("no key of the Buffers (the NVSHMEM unique id among them) left in the store", check_no_keys_left)
    print(f"rank {rank}: {len(failures)} failures {failures} (ranks per node "
          f"{os.environ.get('JAX_DEEPEP_RANKS_PER_NODE')})", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    a = gpu_workers.worker_args()
    sys.exit(worker_main(a.rank, a.num_ranks, a.port))
