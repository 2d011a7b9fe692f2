"""`python -m jax_deepep.bench`: time `Buffer` dispatch/combine against the JAX-native
formulations in `baselines.py` and against a plain device copy of the same bytes.

    python -m jax_deepep.bench                         # normal mode, T=4096 H=7168 K=8 E=256
    python -m jax_deepep.bench --mode low_latency      # 128 tokens per rank, latency in us
    python -m jax_deepep.bench --json out.json --png out.png

Ranks are the local devices (R = 1 on one GPU). Bandwidth follows DeepEP: all bytes of the
tokens a rank receives (the ones staying on the rank included) over the time; FP8 counts the
1-byte values plus the f32 scales. `vs copy` is that bandwidth over the bandwidth of a plain
device copy of the same bytes (1.0 = as fast as a copy).

Timing: every op is compiled and warmed up first, then timed as batches of back-to-back calls
(host dispatch overlaps device work) with `block_until_ready` after each batch; the reported time
is the median over batches of the per-call time. Inputs rotate over several random sets so that
consecutive calls do not hit the cache with the same data.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import baselines
from .buffer import Buffer
from .config import FP8_BLOCK
from .fp8 import per_block_cast_to_fp8

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
    dtype: str  # bf16 / fp8
    time_us: Optional[float] = None
    latency_us: Optional[float] = None  # one call, host dispatch included
    bytes_per_rank: Optional[float] = None
    gbps: Optional[float] = None
    vs_copy: Optional[float] = None
    device_us: Optional[float] = None  # sum of this op's kernel times in a profile (--profile)
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


def random_tokens(mesh: Mesh, key, sizes: Sizes, rows: Optional[int] = None):
    rows = sizes.num_tokens if rows is None else rows
    return jax.jit(lambda: jax.random.normal(key, (sizes.num_ranks, rows, sizes.hidden), jnp.bfloat16),
                   out_shardings=NamedSharding(mesh, PartitionSpec(AXIS)))()


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

    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    return jax.jit(make, out_shardings=(sharding, sharding))()


def measure(call: Callable[[int], object], *, warmup: int, iters: int, batch: int):
    """(median per-call time over batches, median single-call latency), in us."""
    jax.block_until_ready(call(0))  # compile
    for i in range(warmup):
        jax.block_until_ready(call(i))
    per_call, latency = [], []
    step = 0
    for _ in range(iters):
        t0 = time.perf_counter()
        outs = [call(step + b) for b in range(batch)]
        jax.block_until_ready(outs)
        per_call.append((time.perf_counter() - t0) / batch)
        step += batch
        del outs
        t0 = time.perf_counter()
        jax.block_until_ready(call(step))
        latency.append(time.perf_counter() - t0)
        step += 1
    return statistics.median(per_call) * 1e6, statistics.median(latency) * 1e6


class Runner:
    """Times ops one after another, keeps going when one fails, and fills in bandwidths."""

    def __init__(self, args, only: Optional[str]):
        self.args = args
        self.only = only
        self.results: list[Result] = []
        self.timed_calls: list[tuple[Result, Callable[[int], object]]] = []

    def run(self, result: Result, call: Optional[Callable[[int], object]] = None, skip: str = ""):
        name = f"{result.op} {result.impl} {result.dtype}"
        if self.only and self.only not in name:
            return result
        if skip:
            result.note = skip
        else:
            try:
                result.time_us, result.latency_us = measure(call, warmup=self.args.warmup, iters=self.args.iters,
                                                            batch=self.args.batch)
                self.timed_calls.append((result, call))
            except Exception as e:  # keep the other measurements; the table says what failed
                result.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if self.args.verbose:
                    traceback.print_exc()
        if result.time_us and result.bytes_per_rank:
            result.gbps = result.bytes_per_rank / (result.time_us * 1e-6) / 1e9
        self.results.append(result)
        print(f"  {name}: {result.time_us and round(result.time_us, 1)} us {result.note}", file=sys.stderr,
              flush=True)
        return result

    def profile(self, path: str):
        """Run each timed op once more under the profiler and record its kernels."""
        labels = {}
        with jax.profiler.trace(path, create_perfetto_trace=True):
            for i, (result, call) in enumerate(self.timed_calls):
                label = f"bench_op_{i}"
                labels[label] = result
                with jax.profiler.TraceAnnotation(label):
                    jax.block_until_ready(call(1))
        for label, kernels in device_kernels(path, labels).items():
            result = labels[label]
            result.device_us = sum(us for _, us in kernels)
            result.kernels = kernels[:8]

    def fill_copy_ratios(self):
        ceiling = {r.dtype: r.gbps for r in self.results if r.op == "copy" and r.gbps}
        for r in self.results:
            if r.gbps and r.op != "copy":
                base = ceiling.get(r.dtype) or ceiling.get("bf16")
                r.vs_copy = r.gbps / base if base else None


def device_kernels(path: str, labels) -> dict:
    """{label: [(kernel, us)]}: the GPU kernels that ran inside each annotated region of the
    perfetto trace under `path`, summed per kernel name, longest first."""
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
        for e in events:
            if e.get("ph") == "X" and e.get("pid") in device_pids and start <= e["ts"] <= end:
                per_kernel[e["name"]] = per_kernel.get(e["name"], 0.0) + float(e["dur"])
        out[label] = sorted(per_kernel.items(), key=lambda kv: -kv[1])
    return out


def _rows_diff(a, b, rows):
    """Largest |a - b| over the first `rows[r]` rows of every rank (numpy, f32)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return max(float(np.max(np.abs(a[r, :n] - b[r, :n]), initial=0.0)) for r, n in enumerate(rows))


# ---- normal mode --------------------------------------------------------------------------------

def bench_normal(runner: Runner, mesh: Mesh, sizes: Sizes, args):
    R, E = sizes.num_ranks, sizes.num_experts
    keys = jax.random.split(jax.random.PRNGKey(args.seed), args.rotations + 2)
    xs = [random_tokens(mesh, keys[i], sizes) for i in range(args.rotations)]
    topk_idx, topk_weights = random_routing(mesh, keys[-1], sizes)
    to_fp8 = per_rank(mesh, lambda x: per_block_cast_to_fp8(x))
    xs_fp8 = [to_fp8(x) for x in xs]

    config = Buffer.get_dispatch_config(R)
    nvl_bytes = max(config.get_nvl_buffer_size_hint(sizes.hidden * 2, R),
                    Buffer.get_combine_config(R).get_nvl_buffer_size_hint(sizes.hidden * 2, R))
    buffer = Buffer(mesh, AXIS, num_nvl_bytes=nvl_bytes)
    impl = f"buffer[{buffer.backend.name}]"

    layout_fn = per_rank(mesh, lambda idx: buffer.get_dispatch_layout(idx, E))
    layout = layout_fn(topk_idx)
    dispatch_fn = per_rank(mesh, lambda x, idx, w, lay: buffer.dispatch(x, topk_idx=idx, topk_weights=w, layout=lay))
    first = dispatch_fn(xs[0], topk_idx, topk_weights, layout)
    recv_rows = np.asarray(first.num_recv_tokens).reshape(R)
    rows = float(np.mean(recv_rows))
    capacity = first.recv_x.shape[1]
    bf16_bytes = rows * sizes.hidden * 2
    fp8_bytes = rows * (sizes.hidden + sizes.hidden // FP8_BLOCK * 4)
    print(f"received tokens per rank: {recv_rows.tolist()} (capacity {capacity})", file=sys.stderr)
    ys = [random_tokens(mesh, keys[i], sizes, rows=capacity) for i in range(args.rotations)]
    n = args.rotations

    # Ceilings: one device copy of the received bytes (and a peer copy when there are peers).
    copy_rows = max(int(round(rows)), 1)
    src = random_tokens(mesh, keys[0], sizes, rows=copy_rows)
    srcs = [src, random_tokens(mesh, keys[1], sizes, rows=copy_rows)]
    copy_fn = per_rank(mesh, jnp.copy)
    runner.run(Result("copy", "ceiling", "bf16", bytes_per_rank=bf16_bytes,
                      note="device copy of the received bytes"), lambda i: copy_fn(srcs[i % 2]))
    perm = per_rank(mesh, lambda key: jax.random.permutation(key[0], copy_rows))(
        jax.random.split(keys[-2], R)[:, None])
    gather_fn = per_rank(mesh, lambda a, rows: jnp.take(a, rows, axis=0, mode="fill", fill_value=0))
    runner.run(Result("gather", "ceiling", "bf16", bytes_per_rank=bf16_bytes,
                      note="jnp.take of the received rows in a random order"),
               lambda i: gather_fn(srcs[i % 2], perm))
    fp8_src = [per_rank(mesh, lambda a: a.astype(jnp.float8_e4m3fn))(s) for s in srcs]
    runner.run(Result("copy", "ceiling", "fp8", bytes_per_rank=rows * sizes.hidden,
                      note="device copy of the received FP8 values"), lambda i: copy_fn(fp8_src[i % 2]))
    if R > 1:
        peer_fn = per_rank(mesh, lambda a: jax.lax.ppermute(a, AXIS, [(i, (i + 1) % R) for i in range(R)]))
        runner.run(Result("peer_copy", "ceiling", "bf16", bytes_per_rank=bf16_bytes,
                          note="ppermute of the received bytes to the next rank"), lambda i: peer_fn(srcs[i % 2]))

    runner.run(Result("layout", impl, "-"), lambda i: layout_fn(topk_idx))
    runner.run(Result("dispatch", impl, "bf16", bytes_per_rank=bf16_bytes),
               lambda i: dispatch_fn(xs[i % n], topk_idx, topk_weights, layout))
    runner.run(Result("dispatch", impl, "fp8", bytes_per_rank=fp8_bytes),
               lambda i: dispatch_fn(xs_fp8[i % n], topk_idx, topk_weights, layout))
    handle = first.handle
    combine_fn = per_rank(mesh, lambda y, h: buffer.combine(y, h)[0])
    runner.run(Result("combine", impl, "bf16", bytes_per_rank=bf16_bytes),
               lambda i: combine_fn(ys[i % n], handle))

    on_cpu = mesh.devices.flat[0].platform == "cpu"
    for transport in baselines.TRANSPORTS:
        name = f"jax:{transport}"
        skip = "XLA:CPU has no ragged-all-to-all" if transport == "ragged" and on_cpu else ""

        def dispatch_base(x, idx, w, lay, transport=transport):
            return baselines.dispatch(transport, x, idx, w, lay, axis_name=AXIS, num_experts=E, capacity=capacity)

        def combine_base(y, plan, transport=transport):
            return baselines.combine(transport, y, plan, axis_name=AXIS)

        base_dispatch = per_rank(mesh, dispatch_base)
        base_combine = per_rank(mesh, combine_base)
        if not skip and args.check:
            skip = _check_baseline(base_dispatch, base_combine, dispatch_fn, combine_fn, xs[0], topk_idx,
                                   topk_weights, layout, ys[0], handle, recv_rows)
        runner.run(Result("dispatch", name, "bf16", bytes_per_rank=bf16_bytes),
                   lambda i, f=base_dispatch: f(xs[i % n], topk_idx, topk_weights, layout), skip)
        runner.run(Result("dispatch", name, "fp8", bytes_per_rank=fp8_bytes),
                   lambda i, f=base_dispatch: f(xs_fp8[i % n], topk_idx, topk_weights, layout), skip)
        plan = None if skip else base_dispatch(xs[0], topk_idx, topk_weights, layout).plan
        runner.run(Result("combine", name, "bf16", bytes_per_rank=bf16_bytes),
                   lambda i, f=base_combine: f(ys[i % n], plan), skip)
    buffer.destroy()


def _check_baseline(base_dispatch, base_combine, dispatch_fn, combine_fn, x, idx, w, layout, y, handle,
                    recv_rows) -> str:
    """Empty string when the baseline gives the Buffer's rows and combined result, else why not."""
    ours, theirs = dispatch_fn(x, idx, w, layout), base_dispatch(x, idx, w, layout)
    errors = []
    if not np.array_equal(np.asarray(ours.num_recv_tokens).ravel(), np.asarray(theirs.num_recv_tokens).ravel()):
        errors.append("num_recv_tokens")
    if _rows_diff(ours.recv_x, theirs.recv_parts[0], recv_rows) != 0.0:
        errors.append("recv_x")
    if _rows_diff(ours.recv_topk_idx, theirs.recv_topk_idx, recv_rows) != 0.0:
        errors.append("recv_topk_idx")
    if _rows_diff(ours.recv_topk_weights, theirs.recv_topk_weights, recv_rows) != 0.0:
        errors.append("recv_topk_weights")
    combined = combine_fn(y, handle)
    base_combined = base_combine(y, theirs.plan)
    scale = float(np.max(np.abs(np.asarray(combined, np.float32)), initial=1.0))
    if _rows_diff(combined, base_combined, [combined.shape[1]] * combined.shape[0]) > 1e-2 * scale:
        errors.append("combine")
    return f"mismatch vs Buffer: {', '.join(errors)}" if errors else ""


# ---- low-latency mode ---------------------------------------------------------------------------

def bench_low_latency(runner: Runner, mesh: Mesh, sizes: Sizes, args):
    R, E, M = sizes.num_ranks, sizes.num_experts, sizes.num_tokens
    keys = jax.random.split(jax.random.PRNGKey(args.seed), args.rotations + 2)
    xs = [random_tokens(mesh, keys[i], sizes) for i in range(args.rotations)]
    topk_idx, topk_weights = random_routing(mesh, keys[-1], sizes)
    n = args.rotations
    num_pairs = float(np.sum(np.asarray(topk_idx) >= 0)) / R  # (token, expert) pairs sent per rank
    bf16_bytes = num_pairs * sizes.hidden * 2
    fp8_bytes = num_pairs * (sizes.hidden + sizes.hidden // FP8_BLOCK * 4)

    rdma_bytes = Buffer.get_low_latency_rdma_size_hint(M, sizes.hidden, R, E)
    buffer = Buffer(mesh, AXIS, num_rdma_bytes=rdma_bytes, low_latency_mode=True)
    impl = f"buffer[{buffer.backend.name}]"

    copy_src = [random_tokens(mesh, keys[i], sizes, rows=max(int(num_pairs), 1)) for i in range(2)]
    copy_fn = per_rank(mesh, jnp.copy)
    runner.run(Result("copy", "ceiling", "bf16", bytes_per_rank=bf16_bytes,
                      note="device copy of the received (token, expert) rows"), lambda i: copy_fn(copy_src[i % 2]))

    def ll_dispatch(use_fp8):
        return per_rank(mesh, lambda x, idx: buffer.low_latency_dispatch(
            x, idx, num_max_dispatch_tokens_per_rank=M, num_experts=E, use_fp8=use_fp8))

    bf16_dispatch = ll_dispatch(False)
    first = bf16_dispatch(xs[0], topk_idx)
    runner.run(Result("ll_dispatch", impl, "bf16", bytes_per_rank=bf16_bytes),
               lambda i: bf16_dispatch(xs[i % n], topk_idx))
    fp8_dispatch = ll_dispatch(True)
    runner.run(Result("ll_dispatch", impl, "fp8", bytes_per_rank=fp8_bytes),
               lambda i: fp8_dispatch(xs[i % n], topk_idx))
    ys = [jax.random.normal(keys[i], first.recv_x.shape, jnp.bfloat16) for i in range(n)]
    ys = [jax.device_put(y, NamedSharding(mesh, PartitionSpec(AXIS))) for y in ys]
    ll_combine = per_rank(mesh, lambda y, idx, w, h: buffer.low_latency_combine(y, idx, w, h))
    runner.run(Result("ll_combine", impl, "bf16", bytes_per_rank=bf16_bytes),
               lambda i: ll_combine(ys[i % n], topk_idx, topk_weights, first.handle))

    base_dispatch_fn = per_rank(mesh, lambda x, idx, buf: baselines.low_latency_dispatch(
        x, idx, buf, axis_name=AXIS, num_experts=E), donate_argnums=(2,))
    state = {"buf": jnp.zeros_like(first.recv_x)}

    def base_dispatch(i):
        """The receive buffer is donated, so the caller keeps (and waits on) the plan only; it comes
        from the same executable as the rows."""
        out = base_dispatch_fn(xs[i % n], topk_idx, state["buf"])
        state["buf"] = out.recv_x
        return out

    check = ""
    if args.check:
        out = base_dispatch(0)
        counts = np.asarray(first.recv_count)
        mismatch = not np.array_equal(counts, np.asarray(out.plan.recv_count))
        ours, theirs = np.asarray(first.recv_x, np.float32), np.asarray(out.recv_x, np.float32)
        for r in range(R):
            for e in range(counts.shape[1]):
                mismatch |= not np.array_equal(ours[r, e, :counts[r, e]], theirs[r, e, :counts[r, e]])
        check = "mismatch vs Buffer" if mismatch else ""
    runner.run(Result("ll_dispatch", "jax:padded", "bf16", bytes_per_rank=bf16_bytes,
                      note="in place into a donated receive buffer"), lambda i: base_dispatch(i).plan, check)
    plan = base_dispatch(0).plan
    base_combine = per_rank(mesh, lambda y, w, p: baselines.low_latency_combine(y, w, p, axis_name=AXIS))
    runner.run(Result("ll_combine", "jax:padded", "bf16", bytes_per_rank=bf16_bytes),
               lambda i: base_combine(ys[i % n], topk_weights, plan), check)
    buffer.destroy()


# ---- output -------------------------------------------------------------------------------------

def _fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def table(results) -> str:
    lines = [f"{'op':<12} {'impl':<20} {'dtype':<5} {'time us':>9} {'GB/s':>8} {'vs copy':>8}  note",
             "-" * 80]
    for r in results:
        lines.append(f"{r.op:<12} {r.impl:<20} {r.dtype:<5} {_fmt(r.time_us):>9} {_fmt(r.gbps):>8} "
                     f"{_fmt(r.vs_copy, 3):>8}  {r.note}")
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jax_deepep.bench", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("normal", "low_latency"), default="normal")
    p.add_argument("--num-tokens", type=int, default=None, help="tokens per rank (4096; 128 in low_latency)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-topk", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--num-ranks", type=int, default=None, help="devices to use (default: all local devices)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20, help="timed batches (the median is reported)")
    p.add_argument("--batch", type=int, default=10, help="back-to-back calls per timed batch")
    p.add_argument("--rotations", type=int, default=4, help="random input sets cycled through")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="time only ops whose 'op impl dtype' contains this")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip checking the baselines against the Buffer's results")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--png", default=None, help="write a bar chart here (needs matplotlib)")
    p.add_argument("--profile", default=None,
                   help="profile each op once more into this folder and report its kernels (GPU)")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    devices = jax.local_devices()
    num_ranks = args.num_ranks or len(devices)
    if num_ranks > len(devices):
        raise SystemExit(f"--num-ranks {num_ranks}: only {len(devices)} local devices")
    num_tokens = args.num_tokens or (128 if args.mode == "low_latency" else 4096)
    sizes = Sizes(num_ranks, num_tokens, args.hidden, args.num_topk, args.num_experts)
    mesh = Mesh(np.array(devices[:num_ranks]), (AXIS,))
    print(f"jax {jax.__version__}, {num_ranks} x {devices[0].device_kind}, {args.mode} mode, {sizes}",
          file=sys.stderr)
    runner = Runner(args, args.only)
    (bench_low_latency if args.mode == "low_latency" else bench_normal)(runner, mesh, sizes, args)
    runner.fill_copy_ratios()
    if args.profile:
        try:
            runner.profile(args.profile)
        except Exception as e:  # the timings stand without the kernel breakdown
            print(f"profiling failed: {type(e).__name__}: {e}", file=sys.stderr)
        for r in runner.results:
            if r.kernels:
                print(f"{r.op} {r.impl} {r.dtype}: device {r.device_us:.1f} us = "
                      + ", ".join(f"{name[:40]} {us:.1f}" for name, us in r.kernels))
    print(table(runner.results))
    meta = {"mode": args.mode, "sizes": dataclasses.asdict(sizes), "device": devices[0].device_kind,
            "platform": devices[0].platform, "jax": jax.__version__, "python": platform.python_version(),
            "timing": {"warmup": args.warmup, "iters": args.iters, "batch": args.batch,
                       "rotations": args.rotations},
            "command": "python -m jax_deepep.bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": [dataclasses.asdict(r) for r in runner.results]}, f, indent=1)
    if args.png:
        plot(runner.results, args.png, f"{args.mode}: {sizes} on {devices[0].device_kind}")
    return runner.results


if __name__ == "__main__":
    main()
