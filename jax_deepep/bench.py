"""`python -m jax_deepep.bench`: time `Buffer` dispatch/combine against the JAX-native
formulations in `baselines.py` and against a plain device copy of the same bytes.

    python -m jax_deepep.bench                         # normal mode, T=4096 H=7168 K=8 E=256
    python -m jax_deepep.bench --mode low_latency      # 128 tokens per rank, latency in us
    python -m jax_deepep.bench --mode internode --spawn 2 --ranks-per-node 1   # 2 "nodes" on this host
    python -m jax_deepep.bench --mode moe              # a MoE layer per layout and transport (bench_moe.py)
    python -m jax_deepep.bench --json out.json --png out.png

Ranks are the local devices (R = 1 on one GPU). Internode mode runs one process per GPU over the
job's devices (`jax.distributed`): start it on every host with `--distributed` (the cluster's
launcher gives the coordinator), or let `--spawn N` start N processes here, one per local GPU, or
all on GPU 0 when there are fewer GPUs (then the JAX-native collectives cannot run, and the
processes time-slice the GPU: the times say nothing about speed). Process 0 prints and writes the
results, measured on its own rank. Bandwidth follows DeepEP: all bytes of the
tokens a rank receives (the ones staying on the rank included) over the time; FP8 counts the
1-byte values plus the f32 scales. `vs copy` is that bandwidth over the bandwidth of a plain
device copy of the same bytes (1.0 = as fast as a copy).

Timing: one executable applies the op to several independent random input sets (tokens and
routing) in turn; every op is compiled and warmed up first, then the ops are timed in turns: each
of `--iters` rounds times a batch of back-to-back calls of every op, with `block_until_ready` after
each batch, so that a slow spell of the host falls on every op alike. `time us` is the median over
rounds of the wall time per op (host work included: for ops of tens of microseconds the host's
launches can dominate). With --profile each op runs once more under the profiler: `kernel us` is the sum of
its GPU kernel times (DeepEP's way of timing, and then the time GB/s is computed from), `span us`
the time from its first kernel's start to its last kernel's end (gaps between kernels included).
"""
from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
import traceback
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import baselines, logfmt
from .buffer import Buffer
from .config import FP8_BLOCK
from .fp8 import per_block_cast_to_fp8
from .topology import KV_TIMEOUT_MS, kv_client
from .validation import DeepEPError

AXIS = "ep"


@dataclasses.dataclass(frozen=True)
class Sizes:
    num_ranks: int
    num_tokens: int
    hidden: int
    num_topk: int
    num_experts: int


@dataclasses.dataclass
class Result:
    op: str  # dispatch / combine / copy / ...
    impl: str  # buffer[<backend>], jax:padded, jax:ragged, jax:ring, ceiling
    dtype: str  # bf16 / fp8 / logfmt
    time_us: Optional[float] = None
    latency_us: Optional[float] = None  # one call, host dispatch included
    bytes_per_rank: Optional[float] = None
    gbps: Optional[float] = None
    vs_copy: Optional[float] = None
    device_us: Optional[float] = None  # sum of this op's kernel times in a profile (--profile)
    span_us: Optional[float] = None  # first kernel start to last kernel end in that profile, per op
    kernels: list = dataclasses.field(default_factory=list)  # [(kernel, us)], longest first
    note: str = ""


# ---- plumbing -----------------------------------------------------------------------------------

def per_rank(mesh: Mesh, fn, donate_argnums=()):
    """jit(shard_map(fn)) where every argument leaf has a leading rank axis (stripped inside)
    and every output leaf gets one: handles and scalars cross the boundary as [R, ...]."""
    spec = PartitionSpec(AXIS)

    def body(*shards):
        out = fn(*jax.tree.map(lambda a: a[0], shards))
        return jax.tree.map(lambda a: a[None], out)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec), donate_argnums=donate_argnums)


def _made_on_ranks(make, mesh: Mesh):
    """`make()`'s `[R, ...]` arrays made where their rows live: a host array put onto the mesh would be sent
    between the processes of a job, which JAX allows only after checking that every process holds it."""
    return jax.jit(make, out_shardings=NamedSharding(mesh, PartitionSpec(AXIS)))()


def _normal(key, shape, mesh: Mesh):
    return _made_on_ranks(lambda: jax.random.normal(key, shape, jnp.bfloat16), mesh)


def random_tokens(mesh: Mesh, key, sizes: Sizes, rows: Optional[int] = None):
    rows = sizes.num_tokens if rows is None else rows
    return _normal(key, (sizes.num_ranks, rows, sizes.hidden), mesh)


def _zeros(shape, dtype, mesh: Mesh):
    return _made_on_ranks(lambda: jnp.zeros(shape, dtype), mesh)


def random_routing(mesh: Mesh, key, sizes: Sizes, masked: float = 0.02):
    """DeepEP's test routing: top-k of random scores (distinct experts, uneven loads), with a
    fraction of the entries set to -1; weights random in [0, 1)."""
    def make():
        k_scores, k_mask, k_w = jax.random.split(key, 3)
        scores = jax.random.uniform(k_scores, (sizes.num_ranks, sizes.num_tokens, sizes.num_experts))
        scores = scores + jnp.linspace(0.0, 0.05, sizes.num_experts)  # mildly uneven loads
        _, idx = jax.lax.top_k(scores, sizes.num_topk)
        idx = jnp.where(jax.random.uniform(k_mask, idx.shape) < masked, -1, idx.astype(jnp.int32))
        weights = jax.random.uniform(k_w, idx.shape, jnp.float32)
        return idx, weights

    return _made_on_ranks(make, mesh)


class Repeated:
    """One executable that applies a per-rank `op(*args, state) -> (out, state)` to each of the
    `reps` input sets in turn, each application after the previous one has finished (an
    optimization barrier joins them), threading `state` through and donating it: ops whose
    output buffers are reused in place (ragged receive buffers) keep them across calls.

    Several applications per executable amortise the host's per-call dispatch (about 60 us on
    an H100), which would otherwise dominate ops of that size. Every application's outputs leave
    the executable: an optimization barrier alone does not keep unused results alive (XLA
    dropped all but the last application of the JAX-native ops when only the last was returned).
    """

    def __init__(self, mesh: Mesh, op, arg_sets: list, state=None):
        def body(arg_sets, state):
            outs, prev = [], None
            for args in arg_sets:
                if prev is not None:
                    prev, args = jax.lax.optimization_barrier((prev, args))
                out, state = op(*args, state)
                outs.append(out)
                prev = out
            return outs, state

        self.reps = len(arg_sets)
        self.arg_sets = arg_sets
        self.state = state
        self.fn = per_rank(mesh, body, donate_argnums=() if state is None else (1,))

    def __call__(self):
        outs, self.state = self.fn(self.arg_sets, self.state)
        return outs


def kept(out):
    """What a layer keeps of a dispatch: the received rows, ids and weights and the handle. The output's
    `num_recv_tokens_per_expert` is the handle's array too, and an executable that returned the same
    array twice would add a device copy for the second one to the op's time."""
    return out.recv_x, out.recv_topk_idx, out.recv_topk_weights, out.handle


def stateless(op):
    """An op without state, in the form `Repeated` takes."""
    return lambda *args: (op(*args[:-1]), args[-1])


def warm_up(call: Repeated, warmup: int):
    """Compile `call` and run it `warmup` times more."""
    for _ in range(1 + warmup):
        jax.block_until_ready(call())


def timed_round(call: Repeated, batch: int) -> tuple:
    """(per-op time of `batch` back-to-back calls, per-op time of one blocked call), in seconds."""
    t0 = time.perf_counter()
    outs = [call() for _ in range(batch)]
    jax.block_until_ready(outs)
    per_op = (time.perf_counter() - t0) / (batch * call.reps)
    del outs
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    return per_op, (time.perf_counter() - t0) / call.reps


def medians_us(rounds: list) -> tuple:
    """(median per-op time, median single-call time) over `timed_round` results, in us."""
    return statistics.median(r[0] for r in rounds) * 1e6, statistics.median(r[1] for r in rounds) * 1e6


def measure(call: Repeated, *, warmup: int, iters: int, batch: int):
    """(median per-op time over batches, median per-op time of single blocked calls), in us."""
    warm_up(call, warmup)
    return medians_us([timed_round(call, batch) for _ in range(iters)])


class Runner:
    """Compiles and warms up ops one after another, then times them in turns (`time_all`), keeps going
    when one fails, and fills in bandwidths."""

    def __init__(self, mesh: Mesh, args):
        self.mesh = mesh
        self.args = args
        self.results: list[Result] = []
        self.timed: list[tuple[Result, Repeated]] = []

    def wanted(self, result: Result) -> bool:
        return not self.args.only or self.args.only in f"{result.op} {result.impl} {result.dtype}"

    def run(self, result: Result, op=None, arg_sets=None, state=None, skip: str = ""):
        """Compile and warm up `op` (in `Repeated`'s form) over `arg_sets` for `time_all`, or record why it
        was skipped."""
        if not self.wanted(result):
            return result
        if skip:
            result.note = skip
        else:
            try:
                call = Repeated(self.mesh, op, arg_sets, state)
                warm_up(call, self.args.warmup)
                self.timed.append((result, call))
            except Exception as e:  # keep the other measurements; the table says what failed
                self._failed(result, e)
        self.results.append(result)
        if jax.process_index() == 0:
            print(f"  {result.op} {result.impl} {result.dtype}: {result.note or 'compiled'}", file=sys.stderr, flush=True)
        return result

    def time_all(self):
        """Time every warmed-up op in turns: each of `iters` rounds times one batch of every op, so that a slow
        spell of the host (wall times of tens of microseconds are mostly host work) falls on all of them alike."""
        if jax.process_index() == 0:
            print(f"timing {len(self.timed)} ops in turns, {self.args.iters} rounds", file=sys.stderr, flush=True)
        rounds = [[] for _ in self.timed]
        for _ in range(self.args.iters):
            for i, (result, call) in enumerate(self.timed):
                try:
                    if rounds[i] is not None:
                        rounds[i].append(timed_round(call, self.args.batch))
                except Exception as e:
                    self._failed(result, e)
                    rounds[i] = None
        kept = [(timed, times) for timed, times in zip(self.timed, rounds) if times is not None]
        self.timed = [timed for timed, _ in kept]
        for (result, _), times in kept:
            result.time_us, result.latency_us = medians_us(times)
        if jax.process_index() == 0:
            for result in self.results:
                print(f"  {result.op} {result.impl} {result.dtype}: {result.time_us and round(result.time_us, 1)} us "
                      f"{result.note}", file=sys.stderr, flush=True)

    def _failed(self, result: Result, e: Exception):
        result.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if self.args.verbose:
            traceback.print_exc()

    def profile(self, path: str):
        """Run each timed op once more under the profiler and record its kernels (per op)."""
        labels = {}
        with jax.profiler.trace(path, create_perfetto_trace=True):
            for i, (result, call) in enumerate(self.timed):
                label = f"bench_op_{i}"
                labels[label] = (result, call.reps)
                with jax.profiler.TraceAnnotation(label):
                    jax.block_until_ready(call())
        for label, (kernels, span) in device_kernels(path, labels).items():
            result, reps = labels[label]
            result.device_us = sum(us for _, us in kernels) / reps
            result.span_us = span / reps
            result.kernels = [(name, us / reps) for name, us in kernels[:8]]

    def fill_bandwidths(self):
        """GB/s from the kernel time where profiled (DeepEP's definition), else the wall time, and
        the ratio to the copy ceiling of the same dtype."""
        for r in self.results:
            t = r.device_us or r.time_us
            if t and r.bytes_per_rank:
                r.gbps = r.bytes_per_rank / (t * 1e-6) / 1e9
        ceiling = {r.dtype: r.gbps for r in self.results if r.op == "copy" and r.gbps}
        for r in self.results:
            if r.gbps and r.op != "copy":
                base = ceiling.get(r.dtype) or ceiling.get("bf16")
                r.vs_copy = r.gbps / base if base else None


def device_kernels(path: str, labels) -> dict:
    """{label: ([(kernel, us)], span us)}: the GPU kernels that ran inside each annotated region
    of the perfetto trace under `path`, summed per kernel name, longest first, and the time from
    the first kernel's start to the last one's end (idle gaps between kernels included)."""
    import glob
    import gzip

    files = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        return {}
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and "GPU" in str(e.get("args", {}).get("name", ""))}
    windows = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events
               if e.get("ph") == "X" and e.get("name") in labels}
    out = {}
    for label, (start, end) in windows.items():
        per_kernel: dict = {}
        first, last = float("inf"), 0.0
        for e in events:
            if e.get("ph") == "X" and e.get("pid") in device_pids and start <= e["ts"] <= end:
                per_kernel[e["name"]] = per_kernel.get(e["name"], 0.0) + float(e["dur"])
                first, last = min(first, float(e["ts"])), max(last, float(e["ts"]) + float(e["dur"]))
        out[label] = (sorted(per_kernel.items(), key=lambda kv: -kv[1]), max(last - first, 0.0))
    return out


def local_ranks(a) -> np.ndarray:
    """The ranks of a per-rank array `[R, ...]` that this process holds, in rank order (numpy)."""
    shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def _mean_over_processes(name: str, value: float) -> float:
    """The mean of `value` over the job's processes (through the jax.distributed key-value store:
    processes sharing a GPU cannot run XLA collectives)."""
    if jax.process_count() == 1:
        return value
    client = kv_client()
    client.key_value_set(f"jax_deepep/bench/{name}/{jax.process_index()}", repr(value))
    return statistics.mean(float(client.blocking_key_value_get(f"jax_deepep/bench/{name}/{i}", KV_TIMEOUT_MS))
                           for i in range(jax.process_count()))


def _rows_diff(a, b, rows):
    """Largest |a - b| over the first `rows[r]` rows of every local rank (numpy, f32)."""
    a, b = local_ranks(a).astype(np.float32), local_ranks(b).astype(np.float32)
    return max(float(np.max(np.abs(a[r, :n] - b[r, :n]), initial=0.0)) for r, n in enumerate(rows))


# ---- normal mode --------------------------------------------------------------------------------

def _input_sets(mesh: Mesh, sizes: Sizes, args):
    """`args.rotations` independent (x, topk_idx, topk_weights) sets: fresh tokens and routing
    per set, so that no work is shared (or cached) between the repetitions of an op."""
    keys = jax.random.split(jax.random.PRNGKey(args.seed), 2 * args.rotations)
    return [(random_tokens(mesh, keys[2 * i], sizes), *random_routing(mesh, keys[2 * i + 1], sizes))
            for i in range(args.rotations)]


def _configs(sizes: Sizes) -> list:
    """The dispatch and combine configs the ops will use (tuned ones included)."""
    R, H = sizes.num_ranks, sizes.hidden
    return [Buffer.get_dispatch_config(R, hidden=H, dtype=d) for d in ("bf16", "fp8")] + \
        [Buffer.get_combine_config(R, hidden=H)]


def _nvl_bytes(sizes: Sizes, row_bytes: int = 2) -> int:
    """`num_nvl_bytes` for the configs the ops will use on rows of `row_bytes` bytes per channel (bf16 rows;
    4 where the expert-grouped combine moves f32 partial rows)."""
    return max(c.get_nvl_buffer_size_hint(sizes.hidden * row_bytes, sizes.num_ranks) for c in _configs(sizes))


def _normal_buffer(mesh: Mesh, sizes: Sizes, args, row_bytes: int = 2) -> Buffer:
    """The Buffer of normal mode, and of internode mode (`num_rdma_bytes` sized for the bench's
    dispatch and combine; nodes of `--ranks-per-node` ranks, else as detected; combine's partials in
    f32 with `--exact-internode-combine`, else bf16); its rings hold rows of `row_bytes` per channel."""
    R, H = sizes.num_ranks, sizes.hidden
    nvl_bytes = _nvl_bytes(sizes, row_bytes)
    if args.mode != "internode":
        return Buffer(mesh, AXIS, num_nvl_bytes=nvl_bytes)
    rdma_bytes = 1 << 20  # what the pure-JAX implementation gets (it ignores it)
    if mesh.devices.flat[0].platform == "gpu":
        from .gpu import internode

        try:
            rdma_bytes = max(internode.rdma_bytes_hint(sizes.num_tokens, H, sizes.num_topk, sizes.num_experts, R,
                                                       exact_internode_combine=args.exact_internode_combine, config=c)
                             for c in _configs(sizes))
        except DeepEPError as e:  # no NVSHMEM library: the Buffer warns and runs pure JAX
            print(f"internode kernels unavailable: {e}", file=sys.stderr)
    return Buffer(mesh, AXIS, num_nvl_bytes=nvl_bytes, num_rdma_bytes=rdma_bytes, ranks_per_node=args.ranks_per_node,
                  exact_internode_combine=args.exact_internode_combine, internode_puts_only=args.internode_puts_only)


def bench_normal(runner: Runner, mesh: Mesh, sizes: Sizes, args) -> list:
    """Normal mode, and internode mode (the same ops on a Buffer over several nodes, then on an
    intranode Buffer of the same ranks: `_intranode_reference`)."""
    R, E, H = sizes.num_ranks, sizes.num_experts, sizes.hidden
    sets = _input_sets(mesh, sizes, args)
    to_fp8 = per_rank(mesh, lambda x: per_block_cast_to_fp8(x))
    fp8_xs = [to_fp8(x) for x, _, _ in sets]

    buffer = _normal_buffer(mesh, sizes, args)
    impl = f"buffer[{buffer.backend.name}]"
    if args.mode == "internode":
        print(f"{R // buffer.ranks_per_node} nodes of {buffer.ranks_per_node} ranks", file=sys.stderr)

    layout_fn = per_rank(mesh, lambda idx: buffer.get_dispatch_layout(idx, E))
    layouts = [layout_fn(idx) for _, idx, _ in sets]
    dispatch_fn = per_rank(mesh, lambda x, idx, w, lay: buffer.dispatch(x, topk_idx=idx, topk_weights=w, layout=lay))
    firsts = [dispatch_fn(x, idx, w, lay) for (x, idx, w), lay in zip(sets, layouts)]
    recv_rows = np.stack([local_ranks(f.num_recv_tokens).reshape(-1) for f in firsts])  # [sets, local ranks]
    rows = _mean_over_processes("received_rows", float(np.mean(recv_rows)))  # the ceilings' shapes: one for all
    capacity = firsts[0].recv_x.shape[1]
    bf16_bytes = rows * H * 2
    fp8_bytes = rows * (H + H // FP8_BLOCK * 4)
    print(f"received tokens per rank: {recv_rows.tolist()} (capacity {capacity})", file=sys.stderr)
    keys = jax.random.split(jax.random.PRNGKey(args.seed + 1), len(sets) + 1)
    ys = [random_tokens(mesh, k, sizes, rows=capacity) for k in keys[:-1]]
    handles = [f.handle for f in firsts]

    # Ceilings: a device copy of the received bytes, a row gather of them, a peer copy.
    copy_rows = max(int(round(rows)), 1)
    srcs = [random_tokens(mesh, k, sizes, rows=copy_rows) for k in keys[:-1]]
    fp8_srcs = [per_rank(mesh, lambda a: a.astype(jnp.float8_e4m3fn))(a) for a in srcs]
    perm = per_rank(mesh, lambda key: jax.random.permutation(key[0], copy_rows))(jax.random.split(keys[-1], R)[:, None])
    runner.run(Result("copy", "ceiling", "bf16", bytes_per_rank=bf16_bytes, note="device copy of the received bytes"),
               stateless(jnp.copy), [(a,) for a in srcs])
    runner.run(Result("copy", "ceiling", "fp8", bytes_per_rank=rows * H, note="device copy of the received FP8 values"),
               stateless(jnp.copy), [(a,) for a in fp8_srcs])
    for as_words in (False, True):
        runner.run(Result("gather", "ceiling" + ("/u32" if as_words else ""), "bf16", bytes_per_rank=bf16_bytes,
                          note="jnp.take of the received rows in a random order"
                               + (", as uint32 words" if as_words else "")),
                   stateless(lambda a, p, w=as_words: _gather_rows(a, p, w)), [(a, perm) for a in srcs])
    no_collectives = "processes share a GPU: no XLA collectives" if args.shared_gpu else ""
    if R > 1:
        runner.run(Result("peer_copy", "ceiling", "bf16", bytes_per_rank=bf16_bytes,
                          note="ppermute of the received bytes to the next rank"),
                   stateless(lambda a: baselines.ring_shift(a, AXIS, R, 1)), [(a,) for a in srcs], skip=no_collectives)

    runner.run(Result("layout", impl, "-"), stateless(lambda idx: buffer.get_dispatch_layout(idx, E)),
               [(idx,) for _, idx, _ in sets])
    dispatch_op = stateless(lambda x, idx, w, lay: kept(buffer.dispatch(x, topk_idx=idx, topk_weights=w, layout=lay)))
    runner.run(Result("dispatch", impl, "bf16", bytes_per_rank=bf16_bytes), dispatch_op,
               [(x, idx, w, lay) for (x, idx, w), lay in zip(sets, layouts)])
    runner.run(Result("dispatch", impl, "fp8", bytes_per_rank=fp8_bytes), dispatch_op,
               [(xf, idx, w, lay) for (_, idx, w), lay, xf in zip(sets, layouts, fp8_xs)])
    combine_fn = per_rank(mesh, lambda y, h: buffer.combine(y, h)[0])
    runner.run(Result("combine", impl, "bf16", bytes_per_rank=bf16_bytes),
               stateless(lambda y, h: buffer.combine(y, h)[0]), list(zip(ys, handles)))

    on_cpu = mesh.devices.flat[0].platform == "cpu"
    for transport in baselines.TRANSPORTS:
        for as_words in (False, True):
            name = f"jax:{transport}" + ("/u32" if as_words else "")
            skip = no_collectives or ("XLA:CPU has no ragged-all-to-all" if transport == "ragged" and on_cpu else "")
            if not any(runner.wanted(Result(op, name, dt)) for op, dt in
                       (("dispatch", "bf16"), ("dispatch", "fp8"), ("combine", "bf16"))):
                continue
            ragged = transport == "ragged"

            def dispatch_op(x, idx, w, lay, buffers, transport=transport, as_words=as_words):
                out = baselines.dispatch(transport, x, idx, w, lay, axis_name=AXIS, num_experts=E,
                                         capacity=capacity, recv_buffers=buffers, as_words=as_words)
                if buffers is None:
                    return out, None
                return dataclasses.replace(out, recv_parts=()), out.recv_parts  # the rows live in the state

            def combine_op(y, plan, back, transport=transport, as_words=as_words):
                out = baselines.combine(transport, y, plan, axis_name=AXIS, return_buffer=back, as_words=as_words)
                return out.combined_x, out.return_buffer

            single = per_rank(mesh, lambda *a: dispatch_op(*a, None)[0])
            plans = [] if skip else [single(x, idx, w, lay).plan for (x, idx, w), lay in zip(sets, layouts)]
            if not skip and args.check:
                skip = _check_baseline(single, per_rank(mesh, lambda y, p: combine_op(y, p, None)[0]),
                                       firsts[0], combine_fn(ys[0], handles[0]), sets[0], layouts[0], ys[0],
                                       recv_rows[0])

            ragged = ragged and not skip
            x_buffers = (_zeros(firsts[0].recv_x.shape, jnp.bfloat16, mesh),) if ragged else None
            fp8_buffers = tuple(_zeros(a.shape, a.dtype, mesh) for a in to_fp8(firsts[0].recv_x)) if ragged else None
            runner.run(Result("dispatch", name, "bf16", bytes_per_rank=bf16_bytes), dispatch_op,
                       [(x, idx, w, lay) for (x, idx, w), lay in zip(sets, layouts)], x_buffers, skip)
            runner.run(Result("dispatch", name, "fp8", bytes_per_rank=fp8_bytes), dispatch_op,
                       [(xf, idx, w, lay) for (_, idx, w), lay, xf in zip(sets, layouts, fp8_xs)], fp8_buffers, skip)
            back = _zeros((R, R * min(sizes.num_tokens, capacity), H), jnp.bfloat16, mesh) if ragged else None
            runner.run(Result("combine", name, "bf16", bytes_per_rank=bf16_bytes), combine_op, list(zip(ys, plans)),
                       back, skip)
    if args.mode == "internode":
        return [buffer, *_intranode_reference(runner, mesh, sizes, args, sets, bf16_bytes)]
    return [buffer]


INTRANODE_REFERENCE = "intranode"  # the suffix of the reference rows' impl


def _intranode_reference(runner: Runner, mesh: Mesh, sizes: Sizes, args, sets, bf16_bytes: float) -> list:
    """Internode mode's same-run reference: bf16 dispatch and combine on an intranode Buffer of the same
    ranks and inputs, whose times `main` records in the JSON's `meta` (`intranode_dispatch_us`,
    `intranode_combine_us`), so the internode cost is a ratio from one run. On CPU both Buffers run
    the pure-JAX ops. Returns the Buffer, or none where ranks cannot share one (several hosts)."""
    try:
        buffer = Buffer(mesh, AXIS, num_nvl_bytes=_nvl_bytes(sizes))
    except Exception as e:  # the internode figures stand without their reference
        print(f"no intranode reference: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        return []
    impl, E = f"buffer[{buffer.backend.name}]/{INTRANODE_REFERENCE}", sizes.num_experts
    layouts = [per_rank(mesh, lambda idx: buffer.get_dispatch_layout(idx, E))(idx) for _, idx, _ in sets]

    def dispatch(x, idx, w, lay):
        return buffer.dispatch(x, topk_idx=idx, topk_weights=w, layout=lay)

    inputs = [(x, idx, w, lay) for (x, idx, w), lay in zip(sets, layouts)]
    runner.run(Result("dispatch", impl, "bf16", bytes_per_rank=bf16_bytes), stateless(lambda *a: kept(dispatch(*a))),
               inputs)
    handles = [per_rank(mesh, dispatch)(*a).handle for a in inputs]
    capacity = handles[0].recv_src_idx.shape[1]
    keys = jax.random.split(jax.random.PRNGKey(args.seed + 2), len(sets))
    ys = [random_tokens(mesh, k, sizes, rows=capacity) for k in keys]
    runner.run(Result("combine", impl, "bf16", bytes_per_rank=bf16_bytes),
               stateless(lambda y, h: buffer.combine(y, h)[0]), list(zip(ys, handles)))
    return [buffer]


def _intranode_reference_meta(results) -> dict:
    """`intranode_dispatch_us` and `intranode_combine_us` from `_intranode_reference`'s rows (None if not run)."""
    times = {r.op: r.time_us for r in results if r.impl.endswith("/" + INTRANODE_REFERENCE)}
    return {f"intranode_{op}_us": times.get(op) for op in ("dispatch", "combine")}


def _gather_rows(a, rows, as_words: bool):
    if not as_words:
        return jnp.take(a, rows, axis=0, mode="fill", fill_value=0)
    words, restore = baselines.uint32_view(a)
    return restore(jnp.take(words, rows, axis=0, mode="fill", fill_value=0))


def _check_baseline(dispatch_fn, combine_fn, ours, combined, inputs, layout, y, recv_rows) -> str:
    """Empty string when the baseline gives the Buffer's rows and combined result, else why not."""
    theirs = dispatch_fn(*inputs, layout)
    errors = []
    if not np.array_equal(local_ranks(ours.num_recv_tokens).ravel(), local_ranks(theirs.num_recv_tokens).ravel()):
        errors.append("num_recv_tokens")
    if _rows_diff(ours.recv_x, theirs.recv_parts[0], recv_rows) != 0.0:
        errors.append("recv_x")
    if _rows_diff(ours.recv_topk_idx, theirs.recv_topk_idx, recv_rows) != 0.0:
        errors.append("recv_topk_idx")
    if _rows_diff(ours.recv_topk_weights, theirs.recv_topk_weights, recv_rows) != 0.0:
        errors.append("recv_topk_weights")
    base_combined = combine_fn(y, theirs.plan)
    scale = float(np.max(np.abs(local_ranks(combined).astype(np.float32)), initial=1.0))
    if _rows_diff(combined, base_combined, [combined.shape[1]] * len(recv_rows)) > 1e-2 * scale:
        errors.append("combine")
    return f"mismatch vs Buffer: {', '.join(errors)}" if errors else ""


# ---- low-latency mode ---------------------------------------------------------------------------

def bench_low_latency(runner: Runner, mesh: Mesh, sizes: Sizes, args):
    R, E, M, H = sizes.num_ranks, sizes.num_experts, sizes.num_tokens, sizes.hidden
    sets = _input_sets(mesh, sizes, args)
    # (token, expert) pairs sent per rank, averaged over the job: it sets the copy ceiling's shape, and
    # processes compiling different shapes for one program wait on each other forever
    local_pairs = [np.mean(np.sum(local_ranks(idx) >= 0, axis=(1, 2))) for _, idx, _ in sets]
    num_pairs = _mean_over_processes("sent_pairs", float(np.mean(local_pairs)))
    bf16_bytes = num_pairs * H * 2
    fp8_bytes = num_pairs * (H + H // FP8_BLOCK * 4)

    rdma_bytes = Buffer.get_low_latency_rdma_size_hint(M, H, R, E)
    buffers = [Buffer(mesh, AXIS, num_rdma_bytes=rdma_bytes, low_latency_mode=True)]
    if getattr(buffers[0].backend, "transport", None) == "node" and _nvshmem_available():
        # The same ops with every row as an NVSHMEM put (as between nodes), for the transports' ratio.
        buffers.append(Buffer(mesh, AXIS, num_rdma_bytes=rdma_bytes, low_latency_mode=True,
                              allow_nvlink_for_low_latency_mode=False))

    keys = jax.random.split(jax.random.PRNGKey(args.seed + 1), len(sets))
    srcs = [random_tokens(mesh, k, sizes, rows=max(int(num_pairs), 1)) for k in keys]
    runner.run(Result("copy", "ceiling", "bf16", bytes_per_rank=bf16_bytes,
                      note="device copy of the received (token, expert) rows"),
               stateless(jnp.copy), [(a,) for a in srcs])
    firsts = ys = None
    for buffer in buffers:
        transport = getattr(buffer.backend, "transport", None)  # the CUDA kernels' memory: "node" or "nvshmem"
        impl = f"buffer[{buffer.backend.name}{'/' + transport if transport else ''}]"

        def ll_dispatch(x, idx, use_fp8, buffer=buffer):
            return buffer.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=M, num_experts=E,
                                               use_fp8=use_fp8)

        def ll_kept(x, idx, use_fp8):
            # The rows and the handle, which holds the counts and layout: the output's own copies of
            # those arrays, returned a second time, would add device copies to the op's time (see kept).
            out = ll_dispatch(x, idx, use_fp8)
            return out.recv_x, out.handle

        outs = [per_rank(mesh, lambda x, i: ll_dispatch(x, i, False))(x, idx) for x, idx, _ in sets]
        if firsts is None:
            firsts = outs
            ys = [_normal(k, outs[0].recv_x.shape, mesh) for k in keys]
        for use_fp8 in (False, True):
            runner.run(Result("ll_dispatch", impl, "fp8" if use_fp8 else "bf16",
                              bytes_per_rank=fp8_bytes if use_fp8 else bf16_bytes),
                       stateless(lambda x, i, f=use_fp8: ll_kept(x, i, f)), [(x, idx) for x, idx, _ in sets])
        runner.run(Result("ll_combine", impl, "bf16", bytes_per_rank=bf16_bytes),
                   stateless(lambda y, i, w, h, buffer=buffer: buffer.low_latency_combine(y, i, w, h)),
                   [(y, idx, w, f.handle) for y, (_, idx, w), f in zip(ys, sets, outs)])
        # LogFMT-10: rows scaled below 1 so that their groups are encoded; bytes as the rows travel
        small = [(y.astype(jnp.float32) / 16).astype(y.dtype) for y in ys]
        logfmt_bytes = num_pairs * float(np.mean(local_ranks(jax.jit(logfmt.row_bytes)(small[0]))))
        runner.run(Result("ll_combine", impl, "logfmt", bytes_per_rank=logfmt_bytes,
                          note="y / 16: every 128-channel group encoded"),
                   stateless(lambda y, i, w, h, buffer=buffer: buffer.low_latency_combine(y, i, w, h, use_logfmt=True)),
                   [(y, idx, w, f.handle) for y, (_, idx, w), f in zip(small, sets, outs)])

    def base_dispatch(x, idx, buf):
        out = baselines.low_latency_dispatch(x, idx, buf, axis_name=AXIS, num_experts=E)
        return out.plan, out.recv_x  # the rows live in the (donated) state

    def empty_buffer():
        return _zeros(firsts[0].recv_x.shape, jnp.bfloat16, mesh)

    if args.shared_gpu:  # the JAX-native formulations are XLA collectives, which processes sharing a GPU lack
        for op in ("ll_dispatch", "ll_combine"):
            runner.run(Result(op, "jax:padded", "bf16", bytes_per_rank=bf16_bytes),
                       skip="processes share a GPU: no XLA collectives")
        return buffers
    single = per_rank(mesh, base_dispatch)
    outs = [single(x, idx, empty_buffer()) for x, idx, _ in sets]
    check = ""
    if args.check:
        for (plan, recv_x), first in zip(outs, firsts):
            counts = local_ranks(first.recv_count)
            ours, theirs = local_ranks(first.recv_x).astype(np.float32), local_ranks(recv_x).astype(np.float32)
            same = np.array_equal(counts, local_ranks(plan.recv_count)) and all(
                np.array_equal(ours[r, e, :counts[r, e]], theirs[r, e, :counts[r, e]])
                for r in range(counts.shape[0]) for e in range(counts.shape[1]))
            check = check or ("" if same else "mismatch vs Buffer")
    runner.run(Result("ll_dispatch", "jax:padded", "bf16", bytes_per_rank=bf16_bytes,
                      note=check or "in place into a donated receive buffer"),
               base_dispatch, [(x, idx) for x, idx, _ in sets], empty_buffer(), check)
    runner.run(Result("ll_combine", "jax:padded", "bf16", bytes_per_rank=bf16_bytes),
               stateless(lambda y, w, p: baselines.low_latency_combine(y, w, p, axis_name=AXIS)),
               [(y, w, plan) for y, (_, _, w), (plan, _) in zip(ys, sets, outs)], None, check)
    return buffers


def _nvshmem_available() -> bool:
    from .gpu import nvshmem

    return nvshmem.available()


# ---- output -------------------------------------------------------------------------------------

def _fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def kernel_label(name: str) -> str:
    """A profiled kernel's function name, for the printed breakdown (the JSON keeps the whole name): from
    a demangled name (`ns::(anonymous namespace)::fn(args)`), or from a mangled one, which the profile
    gives for the kernels of a relocatable-device-code build (`__nv_static_..._ZN...<len>fn...`)."""
    match = re.search(r"(\w+)(?:<[^()]*>)?\(", name) or re.search(r"\d+([a-z][a-z_]*_kernel)", name)
    return match.group(1) if match else name[:40]


def table(results) -> str:
    lines = [f"{'op':<12} {'impl':<26} {'dtype':<5} {'time us':>9} {'kernel us':>9} {'span us':>9} {'GB/s':>8} "
             f"{'vs copy':>8}  note", "-" * 106]
    for r in results:
        lines.append(f"{r.op:<12} {r.impl:<26} {r.dtype:<5} {_fmt(r.time_us):>9} {_fmt(r.device_us):>9} "
                     f"{_fmt(r.span_us):>9} "
                     f"{_fmt(r.gbps):>8} {_fmt(r.vs_copy, 3):>8}  {r.note}")
    return "\n".join(lines)


def plot(results, path: str, title: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no chart written to {path}", file=sys.stderr)
        return
    timed = [r for r in results if r.time_us]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(timed) + 1.5))
    ax.barh([f"{r.op} {r.impl} {r.dtype}" for r in timed], [r.time_us for r in timed])
    ax.set_xscale("log")
    ax.set_xlabel("time per call (us, log scale)")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _num_sms(value: str, device) -> int:
    if value == "max":
        count = getattr(device, "core_count", None)
        if not count:
            raise SystemExit(f"--num-sms max: {device.platform} devices report no SM count")
        return count // 2 * 2
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"--num-sms: a number or 'max', got {value!r}") from None


def _bench_moe(runner: Runner, mesh: Mesh, sizes: Sizes, args):
    from .bench_moe import bench_moe  # it builds on this module's plumbing

    return [bench_moe(runner, mesh, sizes, args)]


# What each --mode runs (internode: the normal-mode ops on a Buffer over several nodes); each returns
# the Buffers it made.
_BENCHES = {"normal": bench_normal, "low_latency": bench_low_latency, "internode": bench_normal, "moe": _bench_moe}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jax_deepep.bench", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=tuple(_BENCHES), default="normal")
    p.add_argument("--num-tokens", type=int, default=None, help="tokens per rank (4096; 128 in low_latency)")
    p.add_argument("--hidden", type=int, default=None, help="7168; 2048 in moe")
    p.add_argument("--num-topk", type=int, default=None, help="8; 2 in moe")
    p.add_argument("--num-experts", type=int, default=None, help="256; 8 per rank in moe")
    p.add_argument("--num-ranks", type=int, default=None, help="devices to use (default: all local devices)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20, help="timed rounds, each a batch of every op (the median is reported)")
    p.add_argument("--batch", type=int, default=5, help="back-to-back executables per timed batch")
    p.add_argument("--rotations", type=int, default=None,
                   help="independent input sets, each run once per executable (4; 8 in low_latency)")
    p.add_argument("--num-sms", default=None,
                   help="SMs of the normal-mode kernels: a number, or 'max' for all of the device's (even) "
                        "(Buffer.set_num_sms; default: Buffer.num_sms)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="time only ops whose 'op impl dtype' contains this")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip checking the baselines against the Buffer's results")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--png", default=None, help="write a bar chart here (needs matplotlib)")
    p.add_argument("--profile", default=None,
                   help="profile each op once more into this folder and report its kernels (GPU)")
    p.add_argument("--verbose", action="store_true")
    jobs = p.add_argument_group("several processes (internode mode)")
    jobs.add_argument("--ranks-per-node", type=int, default=None,
                      help="ranks per node (default: the processes' hosts decide; Buffer(ranks_per_node=))")
    jobs.add_argument("--exact-internode-combine", action="store_true",
                      help="combine's partials in f32, not bf16 (Buffer(exact_internode_combine=True))")
    jobs.add_argument("--internode-puts-only", action="store_true",
                      help="nvshmem puts to every other node, even where NVSHMEM maps it "
                           "(Buffer(internode_puts_only=True))")
    jobs.add_argument("--spawn", type=int, default=0,
                      help="start this many processes here, one per local GPU (all on GPU 0 when there are fewer)")
    jobs.add_argument("--distributed", action="store_true",
                      help="jax.distributed.initialize() from the cluster's launcher environment")
    jobs.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (with the two flags below)")
    jobs.add_argument("--num-processes", type=int, default=None)
    jobs.add_argument("--process-id", type=int, default=None)
    jobs.add_argument("--local-device", type=int, default=None, help="this process's local GPU (with --coordinator)")
    jobs.add_argument("--shared-gpu", action="store_true", help=argparse.SUPPRESS)  # set by --spawn
    p.add_argument("--moe-ffn", type=int, default=1024, help="width of each expert's SwiGLU (--mode moe)")
    return p.parse_args(argv)


def _local_gpus() -> int:
    """GPUs this bench may use on this host, without initialising JAX here (the spawned processes need the
    memory); none where JAX_PLATFORMS leaves CUDA out."""
    import shutil
    import subprocess

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if (platforms and not {"cuda", "gpu"} & set(platforms.split(","))) or not shutil.which("nvidia-smi"):
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return sum(line.startswith("GPU ") for line in listing.splitlines())


def spawn(args, argv) -> int:
    """Run this bench as `args.spawn` processes of one jax.distributed job on this host."""
    import socket
    import subprocess

    n, gpus = args.spawn, _local_gpus()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = list(sys.argv[1:] if argv is None else argv)
    at = argv.index("--spawn")
    del argv[at:at + 2]
    shared = 0 < gpus < n
    env = dict(os.environ)
    if shared:  # every process on GPU 0, each with a slice of its memory
        env.update(CUDA_VISIBLE_DEVICES=env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
                   XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.8 / n:.2f}")
    elif not gpus:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-m", "jax_deepep.bench", *argv, "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", str(n), "--process-id", str(i),
                               "--local-device", str(0 if shared or not gpus else i)]
                              + (["--shared-gpu"] if shared else []), env=env) for i in range(n)]
    # A job's processes outlive a SIGTERM (JAX's preemption notifier takes it; they print their stacks),
    # so when this one is stopped it ends them: a process left running keeps its GPU, and MPS cannot
    # shut down under it.
    def stop(*_):
        for p in procs:
            p.send_signal(signal.SIGTERM)
        sys.exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    try:
        return max(p.wait() for p in procs)
    finally:
        for p in procs:
            try:
                p.wait(timeout=5)  # time to print its stacks
            except subprocess.TimeoutExpired:
                p.kill()


def main(argv=None):
    args = parse_args(argv)
    if args.spawn:
        status = spawn(args, argv)
        if status:
            raise SystemExit(f"a bench process failed (exit {status})")
        return None
    if args.coordinator:
        local = None if args.local_device is None else [args.local_device]
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id, local_device_ids=local)
        # Where a stopped process was waiting: its Python stacks on stderr, then JAX's handler.
        faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    elif args.distributed:
        jax.distributed.initialize()
    devices = jax.devices() if jax.process_count() > 1 else jax.local_devices()
    num_ranks = args.num_ranks or len(devices)
    if num_ranks > len(devices) or (jax.process_count() > 1 and num_ranks != len(devices)):
        raise SystemExit(f"--num-ranks {num_ranks}: {len(devices)} devices (a job of several processes uses all)")
    num_tokens = args.num_tokens or (128 if args.mode == "low_latency" else 4096)
    args.rotations = args.rotations or (8 if args.mode == "low_latency" else 4)
    # The MoE layer's default is a small one: XLA:GPU (jax 0.11.2) computes ragged_dot as a dense matmul
    # over every local expert (rows x local experts x H in memory: 112 GiB at E = 256, H = 7168).
    moe = args.mode == "moe"
    sizes = Sizes(num_ranks, num_tokens, args.hidden or (2048 if moe else 7168), args.num_topk or (2 if moe else 8),
                  args.num_experts or (8 * num_ranks if moe else 256))
    mesh = Mesh(np.array(devices[:num_ranks]), (AXIS,))
    print(f"jax {jax.__version__}, {num_ranks} x {devices[0].device_kind}, {args.mode} mode, {sizes}",
          file=sys.stderr)
    if args.num_sms:
        Buffer.set_num_sms(_num_sms(args.num_sms, devices[0]))
    runner = Runner(mesh, args)
    # The Buffers outlive the profile, which runs their ops once more.
    buffers = _BENCHES[args.mode](runner, mesh, sizes, args)
    runner.time_all()
    leader = jax.process_index() == 0
    if args.profile:
        # Every process runs the profiled ops (internode ops wait for their peers), each into its own folder.
        path = args.profile if jax.process_count() == 1 else os.path.join(args.profile, f"process{jax.process_index()}")
        try:
            runner.profile(path)
        except Exception as e:  # the timings stand without the kernel breakdown
            print(f"profiling failed: {type(e).__name__}: {e}", file=sys.stderr)
        for r in runner.results:
            if r.kernels and leader:
                print(f"{r.op} {r.impl} {r.dtype}: device {r.device_us:.1f} us = "
                      + ", ".join(f"{kernel_label(name)} {us:.1f}" for name, us in r.kernels))
    runner.fill_bandwidths()
    jax.effects_barrier()
    for buffer in buffers:
        buffer.destroy()
    if not leader:
        return runner.results
    print(table(runner.results))
    meta = {"mode": args.mode, "sizes": dataclasses.asdict(sizes), "device": devices[0].device_kind,
            "platform": devices[0].platform, "jax": jax.__version__, "python": platform.python_version(),
            "num_sms": Buffer.num_sms, "processes": jax.process_count(), "shared_gpu": args.shared_gpu,
            "ranks_per_node": buffers[0].ranks_per_node,
            "timing": {"warmup": args.warmup, "iters": args.iters, "batch": args.batch, "rotations": args.rotations},
            "command": "python -m jax_deepep.bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.mode == "internode":
        meta.update(_intranode_reference_meta(runner.results))
        meta["internode_partials"] = "f32" if buffers[0].exact_internode_combine else "bf16"
        meta["internode_puts_only"] = buffers[0].internode_puts_only
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": [dataclasses.asdict(r) for r in runner.results]}, f, indent=1)
    if args.png:
        plot(runner.results, args.png, f"{args.mode} mode, R={sizes.num_ranks} T={sizes.num_tokens} H={sizes.hidden} "
                                        f"K={sizes.num_topk} E={sizes.num_experts}, {devices[0].device_kind}")
    return runner.results


if __name__ == "__main__":
    main()
