"""GPU tests of the low-latency kernels (jax_deepep/gpu/low_latency.py) against the numpy oracle, over both
memories: NVSHMEM, and within one node the communication buffers mapped over CUDA IPC (`node`).

Every check runs in fresh worker processes (this file run as a script), since NVSHMEM lives once
per process: R = 1 in one process, and R = 2 and 4 as processes sharing GPU 0 (NVSHMEM PEs or CUDA
IPC peers, jax.distributed; no XLA collectives between them, so each process compares its own shard
with the oracle computed from the same seeded global data). R = 2 and 4 run again as nodes of one and two
ranks (`direct_group`): rows to a peer on another "node" travel as nvshmem puts, as across hosts,
although all PEs share the GPU; combine puts from the staging buffer, or with `zero_copy` (half
of the variants) straight from y. The R = 1 worker also checks the bench's
size. Timeouts are tests/test_gpu_faults.py's. Timing lives in `python -m jax_deepep.bench --mode low_latency`.
"""
from __future__ import annotations

import os
import pathlib
import sys
import time
import traceback

import numpy as np
import pytest

import gpu_workers

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
AXIS = "ep"
_DIRECT_GROUP_VARIABLE = "JAX_DEEPEP_TEST_DIRECT_GROUP"  # the workers' `direct_group` (0: every peer)
_NODE_VARIABLE = "JAX_DEEPEP_TEST_LOW_LATENCY_NODE"  # "1": the workers use the one-node memory, not NVSHMEM


# ---- the pytest side: launch the workers ------------------------------------------------------
def _skip_reason(node: bool):
    if not gpu_workers.has_gpu():
        return "needs a CUDA GPU"
    sys.path.insert(0, str(ROOT))
    from jax_deepep.gpu import available, nvshmem, unavailable_reason

    if node:  # the one-node memory is the intranode module's
        return None if available() else unavailable_reason()
    return None if nvshmem.available() else nvshmem.unavailable_reason()


def _run_workers(num_ranks: int, direct_group: int = 0, node: bool = False):
    reason = _skip_reason(node)
    if reason:
        pytest.skip(reason)
    env = gpu_workers.worker_env(num_ranks, 0.4 if num_ranks == 1 else 0.6 / num_ranks)
    env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    tag = ""
    if direct_group:
        env[_DIRECT_GROUP_VARIABLE] = str(direct_group)
        tag = f"_direct{direct_group}"
    if node:
        env[_NODE_VARIABLE] = "1"
        tag += "_node"
    gpu_workers.run_workers(__file__, num_ranks, env, tag)


@pytest.mark.gpu
def test_low_latency_one_rank():
    _run_workers(1)


@pytest.mark.gpu
def test_low_latency_two_ranks_on_one_gpu():
    _run_workers(2)


@pytest.mark.gpu
def test_low_latency_four_ranks_on_one_gpu():
    _run_workers(4)


@pytest.mark.gpu
@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_low_latency_within_one_node_over_cuda_ipc(num_ranks):
    _run_workers(num_ranks, node=True)


@pytest.mark.gpu
def test_low_latency_puts_two_nodes_of_one_rank():
    _run_workers(2, direct_group=1)


@pytest.mark.gpu
def test_low_latency_puts_two_nodes_of_two_ranks():
    _run_workers(4, direct_group=2)


def test_checks_accept_the_pure_jax_ops(monkeypatch):
    """On CPU: the worker's checks pass with the pure-JAX backend in place of the kernels, so a GPU
    failure points at the kernels, not at this file. Two ranks as two CPU devices of one process;
    the worker checks rank 0's shard."""
    import jax

    from jax_deepep.gpu.low_latency import LowLatencyBackend
    from jax_deepep.reference import ReferenceBackend

    monkeypatch.setattr(LowLatencyBackend, "open",
                        staticmethod(lambda mesh, axis_name, num_rdma_bytes, keys, **_: ReferenceBackend()))
    worker = Worker(0, 2, 0, devices=jax.devices()[:2])
    rng = np.random.default_rng(0)
    for variant in VARIANTS:
        data = make_data(rng, 2, ROUNDS["t"], ROUNDS["h"], ROUNDS["k"], ROUNDS["e"], ROUNDS["m"],
                         "repeated" if variant[3] else "hot")
        check_dispatch_combine(worker, f"pure JAX, fp8/round/ue8m0/hook/zero_copy={variant}", data, ROUNDS["m"],
                               ROUNDS["e"], *variant)
    two_pairs_per_program(worker, seed=0)
    logfmt_rounds(worker, seed=0)
    assert not worker.failures


# ---- the worker side ----------------------------------------------------------------------------
class Worker:
    """One rank: builds the kernels object, runs dispatch + combine on global data, checks its shard."""

    def __init__(self, rank: int, num_ranks: int, num_rdma_bytes: int, devices=None, direct_group=None,
                 node: bool = False):
        import jax
        from jax.sharding import Mesh

        from jax_deepep import creation
        from jax_deepep.buffer import resolve_timeout_s
        from jax_deepep.gpu import runtime
        from jax_deepep.gpu.low_latency import LowLatencyBackend

        self.rank, self.num_ranks = rank, num_ranks
        self.mesh = Mesh(np.array(jax.devices() if devices is None else devices), (AXIS,))

        def open_kernels():
            keys, _ = creation.agree(self.mesh, {"num_rdma_bytes": num_rdma_bytes, "direct_group": direct_group,
                                                 "node": node})
            if node:  # rings of no use here: the communication buffer's header, then the low-latency area
                comm = runtime.CommBuffers(self.mesh, AXIS, 1 << 20, keys, timeout_s=resolve_timeout_s(None),
                                           low_latency_bytes=num_rdma_bytes)
                return LowLatencyBackend.within_node(comm)
            return LowLatencyBackend.open(self.mesh, AXIS, num_rdma_bytes, keys, timeout_s=resolve_timeout_s(None),
                                          direct_group=direct_group)

        self._open_kernels = open_kernels
        self.kernels = open_kernels()
        self.failures = []
        self._compiled = {}

    def reopen(self):
        """Fresh kernels (a Buffer serves one low-latency size): destroy these, open new ones (collective)."""
        self.kernels.destroy()
        self.kernels = self._open_kernels()
        self._compiled = {}

    def _function(self, m, e, use_fp8, round_scale, use_ue8m0, hook, zero_copy, pairs, use_logfmt):
        key = (m, e, use_fp8, round_scale, use_ue8m0, hook, zero_copy, pairs, use_logfmt)
        if key in self._compiled:
            return self._compiled[key]
        import jax
        from jax.sharding import PartitionSpec

        from jax_deepep import low_latency as ops
        from jax_deepep.backend import RankContext

        ctx = RankContext(AXIS, self.num_ranks, self.num_ranks)
        kernels = self.kernels

        def pair(x, idx, w, y):
            out = ops.low_latency_dispatch(kernels, ctx, x[0], idx[0], num_max_dispatch_tokens_per_rank=m,
                                           num_experts=e, use_fp8=use_fp8, round_scale=round_scale,
                                           use_ue8m0=use_ue8m0, return_recv_hook=hook)
            if hook:
                out = ops.low_latency_recv(kernels, ctx, out)
            combined = ops.low_latency_combine(kernels, ctx, y[0], idx[0], w[0], out.handle, zero_copy=zero_copy,
                                               use_logfmt=use_logfmt, return_recv_hook=hook)
            if hook:
                combined = ops.low_latency_recv(kernels, ctx, combined)
            recv = out.recv_x if isinstance(out.recv_x, tuple) else (out.recv_x,)
            return jax.tree.map(lambda a: a[None], (recv, out.recv_count, out.recv_src_info, out.recv_layout_range,
                                                    combined))

        def body(*arrays):  # `pairs` independent dispatch + combine pairs in one program
            return tuple(pair(*arrays[4 * i:4 * i + 4]) for i in range(pairs))

        spec = PartitionSpec(AXIS)
        fn = jax.jit(jax.shard_map(body, mesh=self.mesh, in_specs=spec, out_specs=spec, check_vma=False))
        self._compiled[key] = fn
        return fn

    def _global(self, a):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, NamedSharding(self.mesh, PartitionSpec(AXIS)),
                                            lambda index: a[index])

    def run(self, data, m, e, use_fp8, round_scale, use_ue8m0, hook, zero_copy, use_logfmt=False):
        return self.run_pairs([data], m, e, use_fp8, round_scale, use_ue8m0, hook, zero_copy, use_logfmt)[0]

    def run_pairs(self, datas, m, e, use_fp8, round_scale, use_ue8m0, hook, zero_copy, use_logfmt=False):
        """Runs one program with a dispatch + combine pair per data set; this rank's results per pair."""
        import jax

        fn = self._function(m, e, use_fp8, round_scale, use_ue8m0, hook, zero_copy, len(datas), use_logfmt)
        out = fn(*(self._global(a) for data in datas for a in data))
        return [jax.tree.map(lambda a: np.asarray(a.addressable_shards[0].data)[0], o) for o in out]

    def check(self, name, fn):
        start = time.perf_counter()
        try:
            fn()
            print(f"ok   {name} ({time.perf_counter() - start:.1f} s)")  # where a device call's time goes
        except Exception as exc:  # keep going: one device run should report every failure
            self.failures.append(name)
            print(f"FAIL {name}: {exc}")
            traceback.print_exc()


def make_data(rng, num_ranks, t, h, k, e, m, kind):
    from harness import random_bf16, random_topk, random_weights

    idx = random_topk(rng, num_ranks, t, k, e, kind)
    x = random_bf16(rng, (num_ranks, t, h))
    w = random_weights(rng, (num_ranks, t, k))
    y = random_bf16(rng, (num_ranks, e // num_ranks, num_ranks * m, h))
    return x, idx, w, y


def check_dispatch_combine(worker, name, data, m, e, use_fp8, round_scale, use_ue8m0, hook, zero_copy, result=None,
                           use_logfmt=False):
    """Checks `result` (this rank's outputs for `data`; run here when None) against the oracle; with
    `use_logfmt` the combine against the oracle's LogFMT-10 decoding of the rows from other ranks."""
    import oracle

    x, idx, w, y = data
    d = worker.rank
    if result is None:
        result = worker.run(data, m, e, use_fp8, round_scale, use_ue8m0, hook, zero_copy, use_logfmt)
    recv, count, src_info, layout_range, combined = result
    received = oracle.low_latency_receive(idx, e)
    mine = received[d]

    def layout():
        np.testing.assert_array_equal(count, mine.recv_count, "recv_count")
        np.testing.assert_array_equal(layout_range, mine.recv_layout_range, "recv_layout_range")
        for local, rows in enumerate(mine.rows):
            n = len(rows)
            np.testing.assert_array_equal(src_info[local, :n], rows[:, 1], f"recv_src_info of expert {local}")
            assert np.all(src_info[local, n:] == -1), f"recv_src_info padding of expert {local}"

    def payload():
        for local, rows in enumerate(mine.rows):
            n = len(rows)
            if n == 0:
                continue
            sent = np.asarray(x)[rows[:, 0], rows[:, 1]]
            if not use_fp8:
                np.testing.assert_array_equal(recv[0][local, :n].view(np.uint16), sent.view(np.uint16),
                                              f"bf16 rows of expert {local}")
                continue
            q_ref, s_ref = oracle.fp8_cast(sent, round_scale=round_scale or use_ue8m0)
            q, scales = recv[0][local, :n], recv[1][local, :n]
            if use_ue8m0:
                np.testing.assert_array_equal(scales, oracle.pack_ue8m0(s_ref), f"UE8M0 scales of expert {local}")
                scales = oracle.unpack_ue8m0(scales)
            else:  # the kernel and the oracle compute amax * f32(1 / 448) alike; allow one ulp
                np.testing.assert_allclose(scales, s_ref, rtol=2.5e-7, atol=0, err_msg=f"scales of expert {local}")
            # A scale one ulp off can move a value sitting on a rounding boundary by one FP8 step.
            mismatched = int(np.sum(q.view(np.uint8) != q_ref.view(np.uint8)))
            assert mismatched <= q.size // 200, f"{mismatched} FP8 values of expert {local} differ from the oracle's"
            if mismatched:
                print(f"note: {mismatched} of {q.size} FP8 values of expert {local} one step off the oracle's")
            back = oracle.fp8_dequant(q, scales)
            exact = sent.astype(np.float32)
            err = np.linalg.norm(back - exact) / max(np.linalg.norm(exact), 1e-30)
            assert err < (0.08 if round_scale or use_ue8m0 else 0.05), f"FP8 round trip error {err:.4f}"

    def combine():
        exact = (oracle.low_latency_logfmt_combine if use_logfmt else oracle.low_latency_combine)(
            y, w, received, x.shape[1])[d]
        terms = oracle.low_latency_combine(np.abs(np.asarray(y, np.float64)), np.abs(w), received, x.shape[1])[d]
        oracle.assert_rounded_once(combined, exact, terms)

    worker.check(f"{name}: counts, layout ranges, source info", layout)
    worker.check(f"{name}: received payload", payload)
    worker.check(f"{name}: combine", combine)


VARIANTS = (  # (use_fp8, round_scale, use_ue8m0, return_recv_hook, zero_copy)
    (False, False, False, False, False),
    (True, False, False, True, True),
    (True, True, False, False, True),
    (True, True, True, True, False),
)
BIG = dict(t=128, h=7168, k=8, e=32, m=128)
ROUNDS = dict(t=40, h=512, k=6, e=16, m=48)
BENCH = dict(t=128, h=7168, k=8, e=288, m=128)


def correctness(worker, seed):
    n = worker.num_ranks
    for i, variant in enumerate(VARIANTS):
        rng = np.random.default_rng(seed + i)
        kind = ("random", "hot", "out_of_range", "random")[i]
        data = make_data(rng, n, BIG["t"], BIG["h"], BIG["k"], BIG["e"], BIG["m"], kind)
        check_dispatch_combine(worker, f"R={n} T=128 H=7168 {kind} fp8/round/ue8m0/hook/zero_copy={variant}", data,
                               BIG["m"], BIG["e"], *variant)
    # LogFMT at H = 7168, where the combine receive splits each token's channels over several blocks
    x, idx, w, y = make_data(np.random.default_rng(seed + 10), n, BIG["t"], BIG["h"], BIG["k"], BIG["e"], BIG["m"],
                             "repeated")
    y = (np.asarray(y, np.float32) / 16).astype(y.dtype)
    check_dispatch_combine(worker, f"R={n} T=128 H=7168 repeated logfmt", (x, idx, w, y), BIG["m"], BIG["e"],
                           False, False, False, True, False, use_logfmt=True)
    worker.reopen()  # the rounds' size
    start = time.time()
    failures_before = len(worker.failures)
    for r in range(100):  # back to back, fresh data each round, the variants in turn
        rng = np.random.default_rng(seed + 1000 + r)
        kind = ("random", "hot", "out_of_range", "repeated")[r % 4]
        data = make_data(rng, n, ROUNDS["t"], ROUNDS["h"], ROUNDS["k"], ROUNDS["e"], ROUNDS["m"], kind)
        check_dispatch_combine(worker, f"round {r} {kind}", data, ROUNDS["m"], ROUNDS["e"],
                               *VARIANTS[r % len(VARIANTS)])
        if len(worker.failures) > failures_before + 6:
            print("too many failures, stopping the rounds")
            break
    print(f"100 rounds in {time.time() - start:.1f} s")
    two_pairs_per_program(worker, seed)
    logfmt_rounds(worker, seed)


def two_pairs_per_program(worker, seed):
    """Two independent dispatch + combine pairs in one program, as two MoE layers would be, five
    times: XLA may interleave their sends and receives, which the two buffer halves must allow."""
    n = worker.num_ranks
    for r in range(5):
        rng = np.random.default_rng(seed + 2000 + r)
        variant = VARIANTS[r % len(VARIANTS)]
        datas = [make_data(rng, n, ROUNDS["t"], ROUNDS["h"], ROUNDS["k"], ROUNDS["e"], ROUNDS["m"], kind)
                 for kind in ("random", "hot")]
        results = worker.run_pairs(datas, ROUNDS["m"], ROUNDS["e"], *variant)
        for i, (data, result) in enumerate(zip(datas, results)):
            check_dispatch_combine(worker, f"two pairs per program, round {r}, pair {i}", data, ROUNDS["m"],
                                   ROUNDS["e"], *variant, result=result)


def logfmt_rounds(worker, seed):
    """use_logfmt=True: rows to other ranks travel as LogFMT-10 (y scaled below 1, so that most groups are
    encoded; one round in four keeps y as drawn, mostly bf16 groups), with and without the recv hook and
    zero_copy: the combine is the oracle's decoded rows summed and rounded once."""
    n = worker.num_ranks
    for r in range(8):
        rng = np.random.default_rng(seed + 3000 + r)
        kind = ("random", "hot", "out_of_range", "repeated")[r % 4]
        x, idx, w, y = make_data(rng, n, ROUNDS["t"], ROUNDS["h"], ROUNDS["k"], ROUNDS["e"], ROUNDS["m"], kind)
        if r % 4:
            y = (np.asarray(y, np.float32) * 2.0 ** -(3 * r)).astype(y.dtype)
        check_dispatch_combine(worker, f"logfmt round {r} {kind}", (x, idx, w, y), ROUNDS["m"], ROUNDS["e"],
                               False, False, False, r % 2 == 1, r % 4 >= 2, use_logfmt=True)


def bench_size(worker):
    """The bench's size (T = 128, H = 7168, top-8, E = 288) on one rank, FP8 dispatch + combine."""
    rng = np.random.default_rng(7)
    data = make_data(rng, 1, BENCH["t"], BENCH["h"], BENCH["k"], BENCH["e"], BENCH["m"], "random")
    check_dispatch_combine(worker, "bench size: fp8 dispatch + combine", data, BENCH["m"], BENCH["e"],
                           True, False, False, False, False)


def worker_main(args):
    import jax

    if args.num_ranks > 1:
        jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_ranks, args.rank)
    from jax_deepep.config import low_latency_rdma_size_hint

    sizes = [BIG, ROUNDS] + ([BENCH] if args.num_ranks == 1 else [])
    num_rdma_bytes = max(low_latency_rdma_size_hint(s["m"], s["h"], args.num_ranks, s["e"]) for s in sizes)
    worker = Worker(args.rank, args.num_ranks, num_rdma_bytes,
                    direct_group=int(os.environ.get(_DIRECT_GROUP_VARIABLE, 0)) or None,
                    node=os.environ.get(_NODE_VARIABLE) == "1")
    worker.check("correctness", lambda: correctness(worker, seed=1234))
    if args.num_ranks == 1:
        worker.reopen()
        bench_size(worker)
    worker.kernels.destroy()
    print(f"rank {args.rank}: {len(worker.failures)} failures: {worker.failures}")
    return 1 if worker.failures else 0


if __name__ == "__main__":
    sys.exit(worker_main(gpu_workers.worker_args()))
