"""The normal-mode GPU checks shared by tests/test_gpu_intranode.py and tests/test_gpu_internode.py:
a worker that runs the ops of one rank's Buffer on global data and checks its own shard against
the numpy oracle (several processes share the GPU, so no XLA collective may run between them).
"""
from __future__ import annotations

import pathlib
import sys
import traceback

import numpy as np

import gpu_workers

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
AXIS = "ep"


def skip_reason():
    if not gpu_workers.has_gpu():
        return "needs a CUDA GPU"
    sys.path.insert(0, str(ROOT))
    from jax_deepep import gpu

    if not gpu.available():
        return gpu.unavailable_reason()
    return None


class Worker:
    """One rank: a Buffer over the global mesh, ops run on global data, checks of its own shard."""

    def __init__(self, rank: int, num_ranks: int, devices=None, **buffer_kwargs):
        """Over the job's GPUs with a CUDA-backed Buffer; or, given `devices` (this process's own
        CPU devices), a runner of pure-JAX programs on the same global data, without a Buffer."""
        import jax
        from jax.sharding import Mesh

        import jax_deepep as deepep

        self.rank, self.num_ranks = rank, num_ranks
        self.mesh = Mesh(np.array(jax.devices() if devices is None else devices), (AXIS,))
        self.buffer = None
        if devices is None:
            self.buffer = deepep.Buffer(self.mesh, AXIS, **buffer_kwargs)
            assert self.buffer.backend.name == "cuda", self.buffer.backend.name
        self.failures = []
        self._compiled = {}

    def compile(self, fn):
        """jit(shard_map(fn)) per shard: arguments and results carry a leading rank axis."""
        import jax
        from jax.sharding import PartitionSpec

        if fn not in self._compiled:
            spec = PartitionSpec(AXIS)

            def body(*shards):
                out = fn(*(s[0] for s in shards))
                return jax.tree.map(lambda a: a[None], out)

            self._compiled[fn] = jax.jit(jax.shard_map(body, mesh=self.mesh, in_specs=spec, out_specs=spec,
                                                       check_vma=False))
        return self._compiled[fn]

    def place(self, a):
        """A global `[R, ...]` numpy array as an array sharded over the ranks."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, NamedSharding(self.mesh, PartitionSpec(AXIS)),
                                            lambda i: a[i])

    def local(self, out):
        """This rank's part of a result, as numpy (leading rank axis stripped)."""
        import jax

        mine = self.mesh.devices.flat[self.rank]
        return jax.tree.map(lambda a: np.asarray(next(s.data for s in a.addressable_shards if s.device == mine))[0],
                            out)

    def run(self, fn, *arrays):
        return self.local(self.compile(fn)(*(self.place(a) for a in arrays)))

    def check(self, name, fn):
        try:
            fn()
            print(f"ok   {name}", flush=True)
        except Exception as exc:  # keep going: one device run should report every failure
            self.failures.append(name)
            print(f"FAIL {name}: {exc}", flush=True)
            traceback.print_exc()


def same_values(got, want, what):
    """Exact equality (payloads are random normals: no NaNs)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    differ = got.astype(np.float64) != want.astype(np.float64)
    if differ.any():
        raise AssertionError(f"{what}: {int(differ.sum())} elements differ, "
                             f"first at {np.argwhere(differ)[:3].tolist()}")


def check_dispatch(w: Worker, rng, *, tokens, hidden, topk, experts, kind="random", fp8=False, capacity=None,
                   alignment=1, with_weights=True, combine=True, cached=True, bias=2):
    """One dispatch (+ cached dispatch, + combine) on fresh random data, checked against the oracle."""
    import jax.numpy as jnp
    import ml_dtypes

    import oracle
    from harness import random_bf16, random_topk, random_weights
    from jax_deepep import fp8 as fp8_ops

    r, d = w.num_ranks, w.rank
    idx = random_topk(rng, r, tokens, topk, experts, kind)
    x = random_bf16(rng, (r, tokens, hidden))
    weights = random_weights(rng, (r, tokens, topk))
    n = capacity or r * tokens
    y_scale = random_bf16(rng, (r, n, hidden))
    biases = [random_bf16(rng, (r, tokens, hidden)) for _ in range(bias)]
    if fp8:
        q, s = fp8_ops.per_block_cast_to_fp8(jnp.asarray(x))
        parts = [np.asarray(q), np.asarray(s)]
    else:
        parts = [x]
    buffer = w.buffer

    num_parts = len(parts)

    def body(*args):
        parts_, (idx_, weights_, y_), bias_ = args[:num_parts], args[num_parts:num_parts + 3], args[num_parts + 3:]
        tokens_in = tuple(parts_) if fp8 else parts_[0]
        layout = buffer.get_dispatch_layout(idx_, experts)
        out = buffer.dispatch(tokens_in, topk_idx=idx_, topk_weights=weights_ if with_weights else None,
                              layout=layout, num_worst_tokens=capacity, expert_alignment=alignment)
        result = {"layout": layout, "recv_x": out.recv_x, "recv_topk_idx": out.recv_topk_idx,
                  "recv_topk_weights": out.recv_topk_weights, "per_expert": out.num_recv_tokens_per_expert,
                  "num_recv": out.num_recv_tokens, "src_idx": out.handle.recv_src_idx,
                  "src_rank": out.handle.recv_src_rank}
        if cached:
            result["cached_x"] = buffer.dispatch(tokens_in, handle=out.handle).recv_x
        if combine:
            live = (jnp.arange(out.handle.capacity) < out.num_recv_tokens)[:, None]
            rows = out.recv_x[0].astype(jnp.float32) * out.recv_x[1].repeat(128, axis=1) if fp8 \
                else out.recv_x.astype(jnp.float32)
            yy = jnp.where(live, rows * y_.astype(jnp.float32), 0.0).astype(jnp.bfloat16)
            ww = out.recv_topk_weights if with_weights else None
            result["combined"] = buffer.combine(yy, out.handle, topk_weights=ww, bias=tuple(bias_) or None)
            result["y"] = yy
        return result

    got = w.run(body, *parts, idx, weights, y_scale, *biases)

    want_layout = oracle.layout(idx[d], experts, r)
    same_values(got["layout"].num_tokens_per_rank, want_layout.num_tokens_per_rank.astype(np.int32),
                "num_tokens_per_rank")
    same_values(got["layout"].num_tokens_per_expert, want_layout.num_tokens_per_expert.astype(np.int32),
          "num_tokens_per_expert")
    same_values(got["layout"].is_token_in_rank, want_layout.is_token_in_rank, "is_token_in_rank")

    everyone = oracle.dispatch(parts, idx, weights if with_weights else None, experts, n, alignment)
    mine = everyone[d]
    kept = mine.received.num_kept
    assert int(got["num_recv"]) == mine.received.num_recv_tokens, "num_recv_tokens"
    same_values(got["per_expert"], mine.num_recv_tokens_per_expert.astype(np.int32), "num_recv_tokens_per_expert")
    recv = got["recv_x"] if fp8 else (got["recv_x"],)
    for i, (g, want) in enumerate(zip(recv, mine.recv_parts)):
        same_values(np.asarray(g)[:kept], np.asarray(want)[:kept], f"recv part {i}")
        if cached:
            cached_part = got["cached_x"][i] if fp8 else got["cached_x"]
            same_values(np.asarray(cached_part)[:kept], np.asarray(want)[:kept], f"cached recv part {i}")
    same_values(got["recv_topk_idx"], mine.recv_topk_idx.astype(np.int32), "recv_topk_idx")
    if with_weights:
        same_values(got["recv_topk_weights"], mine.recv_topk_weights, "recv_topk_weights")
    src_rank = np.full(n, -1, np.int32)
    src_idx = np.full(n, -1, np.int32)
    src_rank[:kept] = mine.received.src_rank[:kept]
    src_idx[:kept] = mine.received.src_token[:kept]
    same_values(got["src_rank"], src_rank, "recv_src_rank")
    same_values(got["src_idx"], src_idx, "recv_src_idx")
    if combine:
        # Every rank's y is needed for the oracle: rebuild it from the oracle's receive rows.
        ys = []
        for s, other in enumerate(everyone):
            k = other.received.num_kept
            rows = other.recv_parts[0].astype(np.float32)
            if fp8:
                rows = rows * np.repeat(other.recv_parts[1], 128, axis=1)
            yy = np.zeros((n, hidden), np.float32)
            yy[:k] = rows[:k] * y_scale[s, :k].astype(np.float32)
            ys.append(yy.astype(ml_dtypes.bfloat16))
        ys = np.stack(ys)
        same_values(got["y"][:kept], ys[d][:kept], "combine input y (rebuilt)")
        exact = oracle.combine(ys, everyone, tokens, [b for b in biases])[d]
        combined_x, combined_w = got["combined"]
        oracle.assert_rounded_once(combined_x, exact, np.abs(exact) + 1.0)
        if with_weights:
            wrows = np.stack([o.recv_topk_weights for o in everyone])
            exact_w = oracle.combine(wrows, everyone, tokens)[d]
            np.testing.assert_allclose(combined_w, exact_w, rtol=1e-6, atol=1e-6)


def check_pressure(w: Worker, seed: int, rounds: int):
    """`rounds` dispatch + combine rounds, fresh routing and data each round, one compiled step."""

    import oracle
    from harness import random_bf16, random_topk

    r, d, tokens, hidden, topk, experts = w.num_ranks, w.rank, 128, 256, 4, 8 * w.num_ranks
    buffer = w.buffer

    def body(x_, idx_):
        out = buffer.dispatch(x_, topk_idx=idx_, num_experts=experts)
        combined, _ = buffer.combine(out.recv_x, out.handle)
        return out.recv_x, out.num_recv_tokens, combined

    for i in range(rounds):
        rng = np.random.default_rng(seed + i)
        idx = random_topk(rng, r, tokens, topk, experts, "hot" if i % 3 == 0 else "random")
        x = random_bf16(rng, (r, tokens, hidden))
        recv_x, num_recv, combined = w.run(body, x, idx)
        everyone = oracle.dispatch([x], idx, None, experts, r * tokens)
        kept = everyone[d].received.num_kept
        assert int(num_recv) == everyone[d].received.num_recv_tokens, f"round {i}: num_recv_tokens"
        same_values(recv_x[:kept], everyone[d].recv_parts[0][:kept], f"round {i}: recv_x")
        exact = oracle.combine(np.stack([o.recv_parts[0] for o in everyone]), everyone, tokens)[d]
        oracle.assert_rounded_once(combined, exact, np.abs(exact) + 1.0)


def check_gradient(w: Worker, rng, *, tokens, hidden, topk, experts):
    """Gradients of a jitted dispatch -> scale -> combine step match the pure-JAX ops run on this
    process's own CPU devices (one per rank; gpu_workers.worker_env provides them) on the same
    global data: the custom VJPs run the kernels (combine for dispatch, cached dispatch for combine)."""
    import jax
    import jax.numpy as jnp

    import jax_deepep as deepep
    from harness import random_bf16, random_topk, random_weights

    r = w.num_ranks
    idx = random_topk(rng, r, tokens, topk, experts, "hot")
    idx[:, ::7, 0] = -1
    x = random_bf16(rng, (r, tokens, hidden))
    weights = random_weights(rng, (r, tokens, topk))
    g = random_bf16(rng, (r, tokens, hidden)).astype(np.float32)

    def step(ops):
        def loss(x_, w_, idx_, g_):
            out = ops.dispatch(x_, topk_idx=idx_, topk_weights=w_, num_experts=experts)
            scale = jnp.sum(out.recv_topk_weights, axis=1, keepdims=True)
            y = (out.recv_x.astype(jnp.float32) * scale).astype(jnp.bfloat16)
            combined, _ = ops.combine(y, out.handle, topk_weights=out.recv_topk_weights)
            return jnp.sum(combined.astype(jnp.float32) * g_)

        def body(x_, w_, idx_, g_):
            value, grads = jax.value_and_grad(loss, argnums=(0, 1))(x_, w_, idx_, g_)
            return value, grads[0], grads[1]

        return body

    class Reference:  # the pure-JAX ops with the Buffer's call signature
        def dispatch(self, x_, **kw):
            return deepep.reference.dispatch(x_, axis_name=AXIS, **kw)

        def combine(self, y_, handle, **kw):
            return deepep.reference.combine(y_, handle, axis_name=AXIS, **kw)

    reference = Worker(w.rank, r, devices=jax.local_devices(backend="cpu")[:r])
    got = w.run(step(w.buffer), x, weights, idx, g)
    want = reference.run(step(Reference()), x, weights, idx, g)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
    # Sums of several ranks' terms may be added in another order than on the CPU: within a bf16 ulp.
    np.testing.assert_allclose(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32), rtol=2 ** -7,
                               atol=1e-6, err_msg="grad x")
    np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=1e-5, err_msg="grad topk_weights")
