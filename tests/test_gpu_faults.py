"""Fault injection on the GPU (docs/RELIABILITY.md): every mode, two ranks as two processes sharing GPU 0.

Each scenario is one job of fresh processes, because a kernel that gives up traps and takes its
process's CUDA context with it:
  - ok: a peer late by less than the timeout (the result is exact), 100 dispatch/combine pairs in one
    `lax.fori_loop` (1000 in low-latency mode: decode steps; exact), and 100 create/destroy cycles (free
    device memory drifts by at most 1 MiB per cycle, measured once every process is between cycles);
    in low-latency mode also a send that must wait for a late peer's receipt of an earlier call
    received out of order (exact), and three equal dispatches sent before any is received, on a buffer
    of four halves, run twice with rank 1 late (exact);
  - late: rank 1 never takes part: rank 0 raises within timeout + 10 s, `Buffer.failure()` names the op,
    both ranks and "timed out", and `destroy()` returns within timeout + 10 s;
  - killed: rank 1 is SIGKILLed just before the op: the same for rank 0, then a new job (fresh) works;
  - mismatch: rank 0 dispatches while rank 1 combines: both raise naming both ops; intranode at once, the
    NVSHMEM modes (separate signals per op) after the timeout;
  - in_flight (low latency): three dispatches sent before any is received, on a buffer of two halves:
    both ranks raise at once, saying that more sends are in flight than the buffer has halves;
  - shapes: rank 1 dispatches with other shapes (low latency: another `num_max_dispatch_tokens_per_rank`;
    internode: half the tokens): both raise, naming the op and saying that the shapes differ; internode as a
    mismatch met at the peer's first signal, naming both ranks (its signals lie where shapes do not move them);
  - grouped (internode): rank 0 dispatches while rank 1 dispatches expert-grouped: both raise, each at its
    peer's first signal, naming both ops.
Internode mode writes the other "node" through NVSHMEM's mapping of the shared GPU; `internode_puts` runs
the late and mismatch scenarios again on a Buffer that puts instead (`internode_puts_only=True`, the
network path), whose signals travel as puts.
Workers check themselves; a worker's exit code says whether its checks passed. A failing rank whose wait
for its trapped op never returns (XLA waits for a host function that CUDA does not run after a trap) is
ended by the failure watchdog instead, with exit code 70 and the failure printed: the test accepts that
and checks what was printed (rank 0, which hosts the jax.distributed service, is ended last: the
watchdog gives it three timeouts, so the peers' own checks end first).
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import gpu_workers
import normal_checks

TIMEOUT_S = 3.0  # the Buffer's timeout in the failing scenarios
OK_TIMEOUT_S = 8.0  # ... and in the scenario whose peer is late by less
LATE_S = 2.0  # how late the peer is in the ok scenario
BOUND_S = 10.0  # the spec's slack over the timeout
# low_latency: within one node over CUDA IPC; low_latency_nvshmem: every row by NVSHMEM put (as across nodes).
MODES = ("intranode", "low_latency", "low_latency_nvshmem", "internode")
SIGNAL_MODES = MODES + ("internode_puts",)  # the scenarios that exercise each transport's signals
NUM_RANKS = 2
T, H, K, M = 64, 256, 2, 64
EXPERTS = 4 * NUM_RANKS
_SCENARIO = "JAX_DEEPEP_TEST_FAULT"
_MODE = "JAX_DEEPEP_TEST_FAULT_MODE"


# The ranks whose op fails in each failing scenario. Such a rank may instead be ended by the failure
# watchdog (jax_deepep/gpu/failure_watchdog.py) when XLA's wait for the trapped op never returns: then
# its output must hold the watchdog's line and what the worker expected the failure to say.
FAILING_RANKS = {"late": (0,), "killed": (0,), "mismatch": (0, 1), "in_flight": (0, 1), "shapes": (0, 1),
                 "grouped": (0, 1)}
_EXPECT = "expected failure: "  # a worker prints this, then the strings joined by " | "


def _run(mode: str, scenario: str, exit_codes=None):
    reason = normal_checks.skip_reason()
    if reason is None and mode in ("low_latency_nvshmem", "internode", "internode_puts"):
        from jax_deepep.gpu import nvshmem

        if not nvshmem.available():
            reason = nvshmem.unavailable_reason()
    if reason:
        pytest.skip(reason)
    env = gpu_workers.worker_env(NUM_RANKS, 0.4 / NUM_RANKS)
    env.update({_SCENARIO: scenario, _MODE: mode, "JAX_DEEPEP_BACKEND": "cuda",
                "JAX_DEEPEP_TIMEOUT_S": str(OK_TIMEOUT_S if scenario == "ok" else TIMEOUT_S)})
    if mode.startswith("internode"):
        env["JAX_DEEPEP_RANKS_PER_NODE"] = "1"
    # The ranks of some scenarios compile different programs; XLA's autotuning, sharded over the processes
    # by default, would wait for ever for the peer's share of a program that the peer never compiles.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_shard_autotuning=false").strip()
    env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    from jax_deepep.gpu.failure_watchdog import EXIT_CODE

    codes = list(exit_codes or [0] * NUM_RANKS)
    for r in FAILING_RANKS.get(scenario, ()):
        codes[r] = {codes[r], EXIT_CODE}
    got, outputs = gpu_workers.run_workers(__file__, NUM_RANKS, env, f"_{mode}_{scenario}", timeout_s=180,
                                           exit_codes=codes)
    for code, out in zip(got, outputs):
        if code == EXIT_CODE:
            assert _EXPECT in out and "destroy() was not called within timeout_s" in out, out[-2000:]
            expected = out.split(_EXPECT, 1)[1].splitlines()[0].split(" | ")
            assert all(e in out.split(_EXPECT, 1)[1] for e in expected), (expected, out[-2000:])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_late_peer_within_timeout_loops_and_cycles(mode):
    _run(mode, "ok")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", SIGNAL_MODES)
def test_peer_late_past_timeout(mode):
    _run(mode, "late")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_killed_peer_then_a_new_job_works(mode):
    _run(mode, "killed", exit_codes=[0, -signal.SIGKILL])
    _run(mode, "fresh")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", SIGNAL_MODES)
def test_mismatched_ops(mode):
    _run(mode, "mismatch")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["low_latency", "low_latency_nvshmem"])
def test_more_low_latency_sends_in_flight_than_halves(mode):
    _run(mode, "in_flight")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["low_latency", "low_latency_nvshmem", "internode"])
def test_op_with_other_shapes_on_a_peer(mode):
    _run(mode, "shapes")


@pytest.mark.gpu
def test_internode_grouped_dispatch_against_a_plain_one():
    _run("internode", "grouped")


# ---- the workers ----------------------------------------------------------------------------------
def _make_buffer(mode: str, halves: int = 2, **kwargs):
    import jax
    from jax.sharding import Mesh

    import jax_deepep as deepep
    from jax_deepep.config import low_latency_rdma_size_hint

    mesh = Mesh(np.array(jax.devices()), (normal_checks.AXIS,))
    if mode.startswith("low_latency"):  # the hint holds two halves
        kwargs.update(low_latency_mode=True,
                      num_rdma_bytes=low_latency_rdma_size_hint(M, H, NUM_RANKS, EXPERTS) * halves // 2,
                      allow_nvlink_for_low_latency_mode=mode == "low_latency")
    elif mode.startswith("internode"):
        kwargs.update(num_rdma_bytes=256 << 20, internode_puts_only=mode == "internode_puts")
    buffer = deepep.Buffer(mesh, normal_checks.AXIS, **kwargs)
    assert mode.startswith(buffer.backend.mode), f"backend {buffer.backend.mode}, expected {mode}"
    return buffer


class FaultWorker(normal_checks.Worker):
    """A rank with the mode's round trip: dispatch then combine, whose result is the input again."""

    def __init__(self, rank: int, mode: str):
        import jax
        from jax.sharding import Mesh

        self.rank, self.num_ranks, self.mode = rank, NUM_RANKS, mode
        self.mesh = Mesh(np.array(jax.devices()), (normal_checks.AXIS,))
        self.buffer = _make_buffer(mode)
        self.failures, self._compiled = [], {}
        rng = np.random.default_rng(5)
        from harness import random_bf16

        # Two distinct experts per token (so both fit the low-latency weights of 1/2), on random ranks.
        idx = np.stack([rng.permutation(EXPERTS)[:K] for _ in range(NUM_RANKS * T)]).astype(np.int32)
        self.idx = idx.reshape(NUM_RANKS, T, K)
        self.x = random_bf16(rng, (NUM_RANKS, T, H))
        # Normal combine sums the copies of a token on every rank that received it: 1 or 2 of them.
        ranks = self.idx // (EXPERTS // NUM_RANKS)
        self.copies = (1 + (ranks[..., 0] != ranks[..., 1])).astype(np.float32)[..., None]
        self.weights = np.full((NUM_RANKS, T, K), 0.5, np.float32)

    def round_trip(self, x, idx, copies, weights):
        """The value of x after dispatch and combine, turned back into x exactly (per shard)."""
        import jax.numpy as jnp

        b = self.buffer
        if self.mode.startswith("low_latency"):
            ll = b.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=M, num_experts=EXPERTS,
                                        use_fp8=False)
            return b.low_latency_combine(ll.recv_x, idx, weights, ll.handle)
        out = b.dispatch(x, topk_idx=idx, num_experts=EXPERTS)
        combined, _ = b.combine(out.recv_x, out.handle)
        return (combined.astype(jnp.float32) / copies).astype(jnp.bfloat16)

    def args(self):
        return [self.place(a) for a in (self.x, self.idx, self.copies, self.weights)]

    def three_in_flight(self, x, idx, copies, weights):
        """Three equal low-latency dispatches, all sent before any is received (an optimization barrier
        orders them so), each then combined: three times x."""
        from jax import lax

        b = self.buffer
        sends = [b.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=M, num_experts=EXPERTS,
                                        use_fp8=False, return_recv_hook=True) for _ in range(3)]
        sends = lax.optimization_barrier(sends)
        outs = [b.low_latency_recv(s) for s in sends]
        return [b.low_latency_combine(o.recv_x, idx, weights, o.handle) for o in outs]

    def compiled(self, fn):
        return self.compile(fn).lower(*self.args()).compile()

    def expect_exact(self, got, what):
        normal_checks.same_values(self.local(got), self.x[self.rank], what)


def _barrier(name: str, timeout_s: float = 120):
    from jax_deepep.topology import kv_client

    kv_client().wait_at_barrier(f"test_gpu_faults/{name}", int(timeout_s * 1000))


def scenario_ok(w: FaultWorker):
    import jax
    from jax import lax

    step = w.compiled(w.round_trip)

    def late_peer():
        if w.rank == 1:
            time.sleep(LATE_S)
        w.expect_exact(step(*w.args()), "round trip with a peer late by less than the timeout")

    steps = 1000 if w.mode.startswith("low_latency") else 100  # low latency: a decode loop

    def loop_of_steps():
        def body(x, idx, copies, weights):
            return lax.fori_loop(0, steps, lambda _, v: w.round_trip(v, idx, copies, weights), x)

        w.expect_exact(w.compiled(body)(*w.args()), f"{steps} round trips in one fori_loop")

    def late_receipt():
        # Two halves, each op a program of its own: sends 1 and 2; rank 1 receives 2, then (late) 1, rank 0
        # receives 1 then 2; then send 3, which reuses call 1's half: rank 0's waits for rank 1's receipt
        # of call 1 (a receipt per half: one per op kind would say 2 and let it through, and would make
        # rank 1's receive of call 1 look like a second one).
        b = w.buffer
        send = w.compile(lambda x, idx: b.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=M,
                                                               num_experts=EXPERTS, use_fp8=False,
                                                               return_recv_hook=True))
        receive = w.compile(b.low_latency_recv)
        combine = w.compile(lambda out, idx, weights: b.low_latency_combine(out.recv_x, idx, weights, out.handle))
        xs = [(w.x.astype(np.float32) * 2.0**i).astype(w.x.dtype) for i in range(3)]  # exact in bf16
        idx, weights = w.place(w.idx), w.place(w.weights)
        pending = [send(w.place(x), idx) for x in xs[:2]]
        jax.block_until_ready(pending)
        _barrier("late receipt: two sent")
        if w.rank == 1:
            second = jax.block_until_ready(receive(pending[1]))
            time.sleep(LATE_S)
            outs = [receive(pending[0]), second]
        else:
            outs = [receive(pending[0]), receive(pending[1])]
        outs.append(receive(send(w.place(xs[2]), idx)))
        for i, out in enumerate(outs):
            normal_checks.same_values(w.local(combine(out, idx, weights)), xs[i][w.rank], f"call {i + 1}")

    def three_in_flight():
        # Run twice, rank 1 late to both: rank 0's second sends reuse the halves of its first, and wait for
        # rank 1's receipts of them.
        w.buffer.destroy()
        w.buffer = _make_buffer(w.mode, halves=4)  # three in flight need more than two (B is 2, 4 or 8)
        run = w.compiled(w.three_in_flight)
        _barrier("three in flight compiled")
        if w.rank == 1:
            time.sleep(LATE_S)
        results = [run(*w.args()), run(*w.args())]
        for r, result in enumerate(results):
            for i, got in enumerate(result):
                w.expect_exact(got, f"run {r}, dispatch {i} of three in flight")

    def cycles_of_100():
        from jax_deepep.gpu import runtime

        ordinal = jax.local_devices()[0].local_hardware_id
        w.buffer.destroy()
        free = []
        for cycle in range(100):
            _make_buffer(w.mode).destroy()
            _barrier(f"cycle/{cycle}")  # every process is between cycles
            if cycle in (0, 99):
                free.append(runtime.device_free_bytes(ordinal))
            _barrier(f"cycle/{cycle}/measured")
        drift = free[0] - free[1]
        assert drift <= 99 << 20, f"{drift} bytes of device memory not returned over 99 cycles"
        print(f"create/destroy drift over 99 cycles: {drift} bytes", flush=True)
        w.buffer = _make_buffer(w.mode)

    w.check("a peer late by less than the timeout", late_peer)
    w.check(f"{steps} round trips in one fori_loop", loop_of_steps)
    if w.mode.startswith("low_latency"):
        w.check("a send that waits for a late peer's receipt", late_receipt)
        w.check("three dispatches in flight on four halves, twice, rank 1 late", three_in_flight)
    w.check("100 create/destroy cycles", cycles_of_100)
    w.buffer.destroy()
    return 1 if w.failures else 0


def _op_name(mode: str) -> str:
    return {"intranode": "dispatch", "internode": "internode dispatch",
            "internode_puts": "internode dispatch"}.get(mode, "low_latency_dispatch")


def _expect_failure(w: FaultWorker, run, *, within_s: float, contains):
    """`run()` raises within `within_s`, then Buffer.failure() holds every string of `contains`, and
    destroy() returns (or raises DeepEPError) within timeout + BOUND_S."""
    import jax

    from jax_deepep import DeepEPError

    print(_EXPECT + " | ".join(contains), flush=True)
    start = time.time()
    try:
        jax.block_until_ready(run())
        raised = None
    except Exception as e:  # XLA's error for the trapped context, or the handler's
        raised = e
    took = time.time() - start
    assert raised is not None, f"no error after {took:.1f} s"
    print(f"raised after {took:.1f} s: {type(raised).__name__}: {str(raised)[:300]}", flush=True)
    assert took < within_s, f"raised after {took:.1f} s, more than {within_s} s"
    failure = w.buffer.failure()
    print(f"Buffer.failure(): {failure}", flush=True)
    assert failure is not None and all(s in failure for s in contains), f"failure {failure!r} lacks {contains}"
    start = time.time()
    try:
        w.buffer.destroy()
    except DeepEPError as e:
        print(f"destroy raised DeepEPError: {e}", flush=True)
    took = time.time() - start
    print(f"destroy took {took:.1f} s", flush=True)
    assert took < TIMEOUT_S + BOUND_S, f"destroy took {took:.1f} s"


def scenario_peer_gone(w: FaultWorker, killed: bool):
    step = w.compiled(w.round_trip)  # every process compiles: XLA shares autotuning results in a job
    _barrier("compiled")
    from jax_deepep.topology import kv_client

    if w.rank == 1:
        if killed:
            os.kill(os.getpid(), signal.SIGKILL)
        try:  # alive, taking part in nothing, until rank 0 is done (or was ended by the failure watchdog)
            kv_client().blocking_key_value_get("test_gpu_faults/rank 0 done", 120_000)
        except Exception as e:  # noqa: BLE001 - rank 0, which holds the key-value store, is gone
            print(f"rank 0 is gone: {str(e)[:200]}", flush=True)
        return 0
    w.check("the op without its peer raises, names the op, destroy returns",
            lambda: _expect_failure(w, lambda: step(*w.args()), within_s=TIMEOUT_S + BOUND_S,
                                    contains=("timed out", _op_name(w.mode), "rank 0", "rank 1")))
    kv_client().key_value_set("test_gpu_faults/rank 0 done", "1")
    return 1 if w.failures else 0


def scenario_fresh(w: FaultWorker):
    """After a job whose peer was killed, a new job works."""
    w.check("a round trip in a new job", lambda: w.expect_exact(w.compiled(w.round_trip)(*w.args()), "round trip"))
    w.buffer.destroy()
    return 1 if w.failures else 0


def scenario_mismatch(w: FaultWorker):
    import jax

    b = w.buffer
    if w.mode.startswith("low_latency"):
        def first(x, idx, copies, weights):
            return b.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=M, num_experts=EXPERTS,
                                          use_fp8=False)

        def second(ll, idx, weights):
            return b.low_latency_combine(ll.recv_x, idx, weights, ll.handle)

        def second_args(out, args):
            return out, args[1], args[3]
    else:
        def first(x, idx, copies, weights):
            return b.dispatch(x, topk_idx=idx, num_experts=EXPERTS)

        def second(out):
            return b.combine(out.recv_x, out.handle)[0]

        def second_args(out, args):
            return (out,)
    args = w.args()
    dispatch = w.compiled(first)
    out = dispatch(*args)  # a valid handle for the combine
    combine = w.compile(second).lower(*second_args(out, args)).compile()
    jax.block_until_ready(combine(*second_args(out, args)))  # both programs have run once: no cold start below
    out = jax.block_until_ready(dispatch(*args))
    _barrier("both programs ran")
    run = (lambda: dispatch(*args)) if w.rank == 0 else (lambda: combine(*second_args(out, args)))
    if w.mode == "intranode":  # the op barrier compares signatures: both ranks fail at once, naming both ops
        mine, theirs = ("dispatch", "combine") if w.rank == 0 else ("combine", "dispatch")
        contains = (f"{mine} on rank {w.rank} met {theirs} on rank {1 - w.rank}",)
        within = TIMEOUT_S  # before any wait could time out
    else:  # each op has its own signals: both time out, naming the op the peer started instead
        ops = {"low_latency": ("low_latency_dispatch", "low_latency_combine"),
               "low_latency_nvshmem": ("low_latency_dispatch", "low_latency_combine"),
               "internode": ("internode dispatch", "internode combine"),
               "internode_puts": ("internode dispatch", "internode combine")}[w.mode]
        theirs = ops[1] if w.rank == 0 else ops[0]
        contains = ("timed out", f"rank {w.rank}", f"rank {1 - w.rank} last started {theirs}")
        within = TIMEOUT_S + BOUND_S
    w.check("rank 0 dispatches while rank 1 combines: an error",
            lambda: _expect_failure(w, run, within_s=within, contains=contains))
    return 1 if w.failures else 0


def scenario_in_flight(w: FaultWorker):
    """Three sends before the first receive on two halves: the third send fails at once on every rank.
    The message, not the time, shows it was not a timeout: a trapped kernel's error once took 4.4 s
    to reach JAX with two processes on one GPU under MPS (benchmarks/LOG.md, session 35)."""
    run = w.compiled(w.three_in_flight)
    w.check("three low-latency dispatches in flight on two halves: an error",
            lambda: _expect_failure(w, lambda: run(*w.args()), within_s=TIMEOUT_S + BOUND_S,
                                    contains=("low_latency_dispatch", f"rank {w.rank}", "in flight",
                                              "2 halves")))
    return 1 if w.failures else 0


def scenario_shapes(w: FaultWorker):
    """Rank 1 dispatches with other shapes than rank 0 (both fit the buffer). Low latency: half the
    `num_max_dispatch_tokens_per_rank`; internode: half the tokens."""
    b = w.buffer
    if w.mode == "internode":
        t = T if w.rank == 0 else T // 2

        def dispatch(x, idx, copies, weights):
            return b.dispatch(x[:t], topk_idx=idx[:t], num_experts=EXPERTS).recv_x

        # Each rank's first wait on its peer reads a signal of the peer's call, with its signature: "met",
        # not "timed out" (the bound leaves room for the programs' cold start, which cannot be warmed here).
        contains = (f"internode dispatch on rank {w.rank} met internode dispatch on rank {1 - w.rank}", "shapes")
    else:
        m = M if w.rank == 0 else M // 2

        def dispatch(x, idx, copies, weights):
            if w.rank == 0:  # only its own experts: its rows never land in rank 1's buffer (its signals land
                # far above the halves rank 1 uses)
                idx = idx % (EXPERTS // NUM_RANKS)
            return b.low_latency_dispatch(x[:m], idx[:m], num_max_dispatch_tokens_per_rank=m, num_experts=EXPERTS,
                                          use_fp8=False).recv_x

        contains = ("low_latency_dispatch", f"rank {w.rank}", "shapes")
    run = w.compiled(dispatch)
    _barrier("compiled")
    w.check("one dispatch with other shapes on each rank: an error",
            lambda: _expect_failure(w, lambda: run(*w.args()), within_s=TIMEOUT_S + BOUND_S, contains=contains))
    return 1 if w.failures else 0


def scenario_grouped(w: FaultWorker):
    """Internode: rank 1 dispatches expert-grouped while rank 0 dispatches plain rows, from the same tokens and
    routing: each rank's first wait on its peer reads a signal whose signature names the other op ("met", not
    "timed out"; the bound as in scenario_shapes)."""
    b = w.buffer
    grouped = w.rank == 1

    def dispatch(x, idx, copies, weights):
        return b.dispatch(x, topk_idx=idx, num_experts=EXPERTS, expert_grouped=grouped).recv_x

    run = w.compiled(dispatch)
    _barrier("compiled")
    ops = ["internode dispatch", "internode expert-grouped dispatch"]
    mine, theirs = ops[::-1] if grouped else ops
    w.check("an expert-grouped dispatch against a plain one: an error",
            lambda: _expect_failure(w, lambda: run(*w.args()), within_s=TIMEOUT_S + BOUND_S,
                                    contains=(f"{mine} on rank {w.rank} met {theirs} on rank {1 - w.rank}",)))
    return 1 if w.failures else 0


def worker_main(rank: int, num_ranks: int, port: int) -> int:
    import jax

    # A dead peer must not make jax.distributed end the survivor before its checks are done.
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_ranks, process_id=rank,
                               heartbeat_timeout_seconds=300)
    scenario, mode = os.environ[_SCENARIO], os.environ[_MODE]
    w = FaultWorker(rank, mode)
    if scenario == "ok":
        code = scenario_ok(w)
    elif scenario == "fresh":
        code = scenario_fresh(w)
    elif scenario in ("late", "killed"):
        code = scenario_peer_gone(w, killed=scenario == "killed")
    elif scenario == "in_flight":
        code = scenario_in_flight(w)
    elif scenario == "shapes":
        code = scenario_shapes(w)
    elif scenario == "grouped":
        code = scenario_grouped(w)
    else:
        code = scenario_mismatch(w)
    print(f"rank {rank}: {scenario} {mode}: {len(w.failures)} failures {w.failures}", flush=True)
    if scenario in ("ok", "fresh") and not w.failures:
        # A process that leaves the job first makes jax.distributed terminate the others: leave together.
        _barrier("end", 60)
    elif scenario in FAILING_RANKS and scenario != "killed":
        _leave(rank)
    return code


def _leave(rank: int):
    """Leave together with the peers that are still there (one ended by the failure watchdog never comes).
    Rank 0 leaves last: it hosts the jax.distributed service, and a peer whose client still talks to it
    when it goes is aborted by that client (exit -6)."""
    from jax_deepep.topology import kv_client

    kv_client().key_value_set(f"test_gpu_faults/left/{rank}", str(os.getpid()))
    if rank != 0:
        return
    for peer in range(1, NUM_RANKS):
        try:
            pid = int(kv_client().blocking_key_value_get(f"test_gpu_faults/left/{peer}",
                                                         int((TIMEOUT_S + BOUND_S) * 1000)))
        except Exception as e:  # noqa: BLE001 - the peer is gone, or the store with it
            print(f"rank {peer} did not leave with us: {str(e)[:200]}", flush=True)
            continue
        deadline = time.monotonic() + 30
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _running(pid: int) -> bool:
    """Process `pid` (of this host: the workers share one GPU) has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    a = gpu_workers.worker_args()
    # os._exit: a peer that died or trapped must not make jax.distributed's shutdown wait for it.
    os._exit(worker_main(a.rank, a.num_ranks, a.port))
