"""The normal-mode GPU checks shared by tests/test_gpu_intranode.py and tests/test_gpu_internode.py:
a worker that runs the ops of one rank's Buffer on global data and checks its own shard against
the numpy oracle (several processes share the GPU, so no XLA collective may run between them).
"""
from __future__ import annotations

import os
import pathlib
import sys
import time
import traceback

import numpy as np

import gpu_workers

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
AXIS = "ep"
# For a short device run: only the checks whose names contain one of these comma-separated words.
ONLY_CHECKS = [w for w in os.environ.get("JAX_DEEPEP_ONLY_CHECKS", "").split(",") if w]


def skip_reason():
    if not gpu_workers.has_gpu():
        return "needs a CUDA GPU"
    sys.path.insert(0, str(ROOT))
    from jax_deepep import gpu

    if not gpu.available():
        return gpu.unavailable_reason()
    return None


class Worker:
    """One rank: a Buffer over the global mesh, ops run on global data, checks of its own shard.
    `devices` (default: all of the job's) and `backend` (the one the Buffer must have) let a CPU test
    run the checks on the pure-JAX ops, as rank 0 of devices of one process."""

    def __init__(self, rank: int, num_ranks: int, devices=None, backend: str = "cuda", **buffer_kwargs):
        import jax
        from jax.sharding import Mesh

        import jax_deepep as deepep

        self.rank, self.num_ranks = rank, num_ranks
        self.mesh = Mesh(np.array(jax.devices() if devices is None else devices), (AXIS,))
        self.buffer = deepep.Buffer(self.mesh, AXIS, **buffer_kwargs)
        assert self.buffer.backend.name == backend, self.buffer.backend.name
        # Over several nodes combine rounds each node's partial to bf16 unless exact (oracle.combine's model).
        self.bf16_node_partials = None
        if self.buffer.ranks_per_node < num_ranks and not self.buffer.exact_internode_combine:
            self.bf16_node_partials = self.buffer.ranks_per_node
        self.failures = []
        self._compiled = {}

    def compile(self, fn):
        """jit(shard_map(fn)) per shard: arguments and results carry a leading rank axis."""
        import jax
        from jax.sharding import PartitionSpec

        if fn not in self._compiled:
            spec = PartitionSpec(AXIS)

            def body(*shards):
                out = fn(*jax.tree.map(lambda a: a[0], shards))
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

    @staticmethod
    def local(out):
        """This rank's part of a result, as numpy (leading rank axis stripped)."""
        import jax

        return jax.tree.map(lambda a: np.asarray(a.addressable_shards[0].data)[0], out)

    def run(self, fn, *arrays):
        return self.local(self.compile(fn)(*(self.place(a) for a in arrays)))

    def check(self, name, fn):
        if ONLY_CHECKS and not any(word in name for word in ONLY_CHECKS):
            return
        start = time.perf_counter()
        try:
            fn()
            print(f"ok   {name} ({time.perf_counter() - start:.1f} s)", flush=True)  # where a device call's time goes
        except Exception as exc:  # keep going: one device run should report every failure
            self.failures.append(name)
            print(f"FAIL {name}: {exc}", flush=True)
            traceback.print_exc()


def edge_checks(w: Worker, rng, experts: int) -> list:
    """(name, check) pairs of the limits the API (docs/API.md) makes valid, for every normal-mode worker."""
    common = dict(hidden=512, topk=8, experts=experts)
    checks = [("expert alignment 65536", lambda: check_dispatch(w, rng, tokens=64, alignment=65536, **common))]
    # Zero-size receive rows: with several processes sharing the GPU, XLA (jax 0.11.2) crashed compiling
    # these test programs (N = 0 with our kernels, and T = 0, which reaches no kernel: jax_deepep/no_tokens.py),
    # so they run in a job of one process only.
    if w.num_ranks == 1:
        checks += [
            ("no receive rows (N = 0, every row dropped)",
             lambda: check_dispatch(w, rng, tokens=64, capacity=0, **common)),
            ("no tokens (T = 0)", lambda: check_dispatch(w, rng, tokens=0, **common)),
        ]
    return checks


def vmap_checks(w: Worker, rng) -> list:
    """(name, check) pairs: `jax.vmap` over each normal-mode op (tests/vmap_cases.py), under `jax.grad`
    where it applies, gives exactly what a Python loop over the batch gives, on the kernels."""
    import jax

    import vmap_cases
    from harness import random_bf16, random_topk, random_weights

    def check(case):
        batch, r = vmap_cases.BATCH, w.num_ranks
        x = random_bf16(rng, (r, batch, vmap_cases.T, vmap_cases.H))
        idx = random_topk(rng, r * batch, vmap_cases.T, vmap_cases.K, vmap_cases.E).reshape(
            r, batch, vmap_cases.T, vmap_cases.K)
        weights = random_weights(rng, (r, batch, vmap_cases.T, vmap_cases.K))
        got = w.run(vmap_cases.mapped(case, w.buffer), x, idx, weights)
        want = w.run(vmap_cases.looped(case, w.buffer), x, idx, weights)
        for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
            same_values(a, b, f"output {i}")

    return [(f"vmap is a loop: {name}", lambda case=case: check(case))
            for name, case in sorted(vmap_cases.CASES.items()) if not case.low_latency]


def _value_and_grads(loss):
    """A per-rank function (x, topk_weights, topk_idx, cotangent) -> (loss, grad x, grad topk_weights)."""
    import jax

    def body(x_, w_, idx_, g_):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(x_, w_, idx_, g_)
        return value, grads[0], grads[1]

    return body


def same_values(got, want, what):
    """Exact equality (payloads are random normals: no NaNs)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    differ = got.astype(np.float64) != want.astype(np.float64)
    if differ.any():
        raise AssertionError(f"{what}: {int(differ.sum())} elements differ, "
                             f"first at {np.argwhere(differ)[:3].tolist()}")


def check_dispatch(w: Worker, rng, *, tokens, hidden, topk, experts, kind="random", fp8=False, capacity=None,
                   alignment=1, with_weights=True, combine=True, cached=True, bias=2, config=None):
    """One dispatch (+ cached dispatch, + combine) on fresh random data, checked against the oracle; every op
    with `config` (None: the default)."""
    import jax.numpy as jnp
    import ml_dtypes

    import oracle
    from harness import random_bf16, random_topk, random_weights
    from jax_deepep import fp8 as fp8_ops

    r, d = w.num_ranks, w.rank
    idx = random_topk(rng, r, tokens, topk, experts, kind)
    x = random_bf16(rng, (r, tokens, hidden))
    weights = random_weights(rng, (r, tokens, topk))
    n = r * tokens if capacity is None else capacity
    y_scale = random_bf16(rng, (r, n, hidden))
    biases = [random_bf16(rng, (r, tokens, hidden)) for _ in range(bias)]
    if fp8:
        q, s = fp8_ops.per_block_cast_to_fp8(jnp.asarray(x))
        parts = [np.asarray(q), np.asarray(s)]
    else:
        parts = [x]
    buffer = w.buffer

    num_parts = len(parts)

    def body(anchor, *args):
        parts_, (idx_, weights_, y_), bias_ = args[:num_parts], args[num_parts:num_parts + 3], args[num_parts + 3:]
        tokens_in = tuple(parts_) if fp8 else parts_[0]
        layout = buffer.get_dispatch_layout(idx_, experts)
        out = buffer.dispatch(tokens_in, topk_idx=idx_, topk_weights=weights_ if with_weights else None,
                              layout=layout, num_worst_tokens=capacity, expert_alignment=alignment, config=config)
        result = {"layout": layout, "recv_x": out.recv_x, "recv_topk_idx": out.recv_topk_idx,
                  "recv_topk_weights": out.recv_topk_weights, "per_expert": out.num_recv_tokens_per_expert,
                  "num_recv": out.num_recv_tokens, "src_idx": out.handle.recv_src_idx,
                  "src_rank": out.handle.recv_src_rank, "anchor": anchor}
        if cached:
            result["cached_x"] = buffer.dispatch(tokens_in, handle=out.handle, config=config).recv_x
        if combine:
            live = (jnp.arange(out.handle.capacity) < out.num_recv_tokens)[:, None]
            rows = out.recv_x[0].astype(jnp.float32) * out.recv_x[1].repeat(128, axis=1) if fp8 \
                else out.recv_x.astype(jnp.float32)
            yy = jnp.where(live, rows * y_.astype(jnp.float32), 0.0).astype(jnp.bfloat16)
            ww = out.recv_topk_weights if with_weights else None
            result["combined"] = buffer.combine(yy, out.handle, topk_weights=ww, bias=tuple(bias_) or None,
                                                config=config)
            result["y"] = yy
        return result

    # The leading operand, returned as it is, is never empty: XLA cannot lower a shard_map whose used operands
    # are all empty (T = 0).
    got = w.run(body, np.zeros((r, 1), np.int32), *parts, idx, weights, y_scale, *biases)

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
        exact = oracle.combine(ys, everyone, tokens, [b for b in biases], w.bf16_node_partials)[d]
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
        exact = oracle.combine(np.stack([o.recv_parts[0] for o in everyone]), everyone, tokens,
                               bf16_node_partials=w.bf16_node_partials)[d]
        oracle.assert_rounded_once(combined, exact, np.abs(exact) + 1.0)


def check_gradient(w: Worker, rng, *, tokens, hidden, topk, experts):
    """Value and gradients (x, topk_weights) of a jitted dispatch -> scale -> combine step against
    the numpy oracle: the custom VJPs run the kernels (combine for dispatch, cached dispatch for
    combine), and their results are those of the chain rule with bf16 rounding where the arrays are bf16."""
    import jax.numpy as jnp
    import ml_dtypes

    import oracle
    from harness import random_bf16, random_topk, random_weights

    r, d = w.num_ranks, w.rank
    idx = random_topk(rng, r, tokens, topk, experts, "hot")
    idx[:, ::7, 0] = -1
    x = random_bf16(rng, (r, tokens, hidden))
    # Multiples of 1/64: every order of summing a token's weights gives the same f32 scale, so the
    # oracle rounds the same products to bf16 as the program.
    weights = np.round(random_weights(rng, (r, tokens, topk)) * 64) / 64
    g = random_bf16(rng, (r, tokens, hidden)).astype(np.float32)
    buffer = w.buffer

    def loss(x_, w_, idx_, g_):
        out = buffer.dispatch(x_, topk_idx=idx_, topk_weights=w_, num_experts=experts)
        scale = jnp.sum(out.recv_topk_weights, axis=1, keepdims=True)
        y = (out.recv_x.astype(jnp.float32) * scale).astype(jnp.bfloat16)
        combined, _ = buffer.combine(y, out.handle, topk_weights=out.recv_topk_weights)
        return jnp.sum(combined.astype(jnp.float32) * g_)

    value, grad_x, grad_w = w.run(_value_and_grads(loss), x, weights, idx, g)

    bf16 = ml_dtypes.bfloat16
    everyone = oracle.dispatch([x], idx, weights, experts, r * tokens)
    ys, d_recv_x, d_recv_w = [], [], []
    for o in everyone:
        kept = o.received.num_kept
        src = (o.received.src_rank[:kept], o.received.src_token[:kept])
        rows = o.recv_parts[0][:kept].astype(np.float32)
        scale = o.recv_topk_weights[:kept].sum(axis=1, keepdims=True, dtype=np.float32)
        g_rows = g[src]  # combine's cotangent, dispatched back to the rows (cached dispatch)
        pad = [(0, r * tokens - kept), (0, 0)]
        ys.append(np.pad((rows * scale).astype(bf16), pad))
        d_recv_x.append(np.pad((g_rows * scale).astype(bf16), pad))
        d_scale = np.sum(g_rows * rows, axis=1, keepdims=True)
        d_recv_w.append(np.pad(np.where(o.recv_topk_idx[:kept] >= 0, d_scale, 0.0), pad))
    partials = w.bf16_node_partials  # combine's partials, also in dispatch's gradient (a combine)
    combined = oracle.combine(np.stack(ys), everyone, tokens, bf16_node_partials=partials)[d]
    combined = combined.astype(np.float32).astype(bf16)
    want_value = float(np.sum(combined.astype(np.float64) * g[d]))
    # Sums in another order than the oracle's may round a rare element to the other bf16 neighbour.
    np.testing.assert_allclose(value, want_value, rtol=1e-3, err_msg="loss")
    exact_x = oracle.combine(np.stack(d_recv_x), everyone, tokens, bf16_node_partials=partials)[d]
    terms = oracle.combine(np.abs(np.stack(d_recv_x).astype(np.float32)), everyone, tokens)[d]
    oracle.assert_rounded_once(grad_x, exact_x, terms + 1.0)
    exact_w = oracle.combine(np.stack(d_recv_w), everyone, tokens)[d]
    np.testing.assert_allclose(grad_w, exact_w, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(exact_w))),
                               err_msg="grad topk_weights")


def _grouped_node_partials(rows, dispatched: list, topk_idx, num_experts: int, source: int, ranks_per_node: int):
    """f32 [nodes, T, H]: each node's partial of rank `source`'s tokens in the expert-grouped combine, as
    the pure-JAX backend sums it: per token, each rank's f32 sum (0, then pair weight * row for its pairs
    in the order of their first k, each product and sum rounded to f32), those added in rank order."""
    import oracle

    idx = oracle.valid_ids(topk_idx, num_experts)[source]
    num_tokens, top_k = idx.shape
    experts_per_rank = num_experts // len(dispatched)
    rows = np.asarray(rows).astype(np.float32)
    out = np.zeros((len(dispatched) // ranks_per_node, num_tokens, rows.shape[-1]), np.float32)
    for d, result in enumerate(dispatched):
        row_of = {pair: i for i, pair in enumerate(result.pairs) if pair is not None}
        for t in range(num_tokens):
            partial = np.zeros(rows.shape[-1], np.float32)
            for k in range(top_k):
                e = idx[t, k]
                if e < 0 or e // experts_per_rank != d or e in idx[t, :k]:
                    continue
                i = row_of.get((source, t, int(e - d * experts_per_rank)))
                if i is not None:
                    partial = partial + np.float32(result.recv_topk_weights[i]) * rows[d, i]
            out[d // ranks_per_node, t] = out[d // ranks_per_node, t] + partial
    return out


def _rounded_node_partials(partials, w: Worker):
    """The node partials as combine sends them: rounded to bf16 over several nodes unless exact."""
    import ml_dtypes

    return partials if w.bf16_node_partials is None else partials.astype(ml_dtypes.bfloat16).astype(np.float32)


def check_grouped(w: Worker, rng, *, tokens, hidden, topk, experts, kind="random", fp8=False, capacity=None,
                  alignment=1, with_weights=True, bias=2, config=None):
    """An expert-grouped dispatch, a cached dispatch with its handle and a weighted combine on fresh random
    data: the rows, ids, weights and counts exactly as the oracle's (padding rows zero), the combine rounded
    exactly as the pure-JAX backend rounds it (and within half a bf16 ulp of the exact sum). Every op with
    `config` (None: the default)."""
    import jax.numpy as jnp
    import ml_dtypes

    import oracle
    from harness import random_bf16, random_topk, random_weights
    from jax_deepep import fp8 as fp8_ops

    r, d = w.num_ranks, w.rank
    idx = random_topk(rng, r, tokens, topk, experts, kind)
    x = random_bf16(rng, (r, tokens, hidden))
    weights = random_weights(rng, (r, tokens, topk))
    parts = [x]
    if fp8:
        q, s = fp8_ops.per_block_cast_to_fp8(jnp.asarray(x))
        parts = [np.asarray(q), np.asarray(s)]
    if capacity is None:  # the op's default: room for every pair and each group's padding
        capacity = r * tokens * min(topk, experts // r) + (experts // r) * (alignment - 1)
    everyone = oracle.grouped_dispatch(parts, idx, weights if with_weights else None, experts, capacity, alignment)
    y = random_bf16(rng, (r, capacity, hidden))
    row_weights = random_weights(rng, (r, capacity))
    biases = [random_bf16(rng, (r, tokens, hidden)) for _ in range(bias)]
    buffer, num_parts = w.buffer, len(parts)

    def body(*args):
        parts_, (idx_, weights_, y_, rw_), bias_ = args[:num_parts], args[num_parts:num_parts + 4], args[num_parts + 4:]
        tokens_in = tuple(parts_) if fp8 else parts_[0]
        out = buffer.dispatch(tokens_in, topk_idx=idx_, topk_weights=weights_ if with_weights else None,
                              num_experts=experts, num_worst_tokens=capacity, expert_alignment=alignment,
                              expert_grouped=True, config=config)
        combined = buffer.combine(y_, out.handle, topk_weights=rw_, bias=tuple(bias_) or None, config=config)
        return {"recv_x": out.recv_x, "recv_topk_idx": out.recv_topk_idx, "recv_topk_weights": out.recv_topk_weights,
                "weight": out.handle.weight, "per_expert": out.num_recv_tokens_per_expert,
                "num_recv": out.num_recv_tokens,
                "cached_x": buffer.dispatch(tokens_in, handle=out.handle, config=config).recv_x,
                "combined": combined}

    got = w.run(body, *parts, idx, weights, y, row_weights, *biases)
    mine = everyone[d]
    assert int(got["num_recv"]) == mine.num_recv_tokens, f"num_recv_tokens {int(got['num_recv'])}"
    same_values(got["per_expert"], mine.num_recv_tokens_per_expert.astype(np.int32), "num_recv_tokens_per_expert")
    recv = got["recv_x"] if fp8 else (got["recv_x"],)
    cached = got["cached_x"] if fp8 else (got["cached_x"],)
    for i, want in enumerate(mine.recv_parts):
        same_values(recv[i], want, f"recv part {i}")
        same_values(cached[i], want, f"cached recv part {i}")
    same_values(got["recv_topk_idx"], mine.recv_topk_idx.astype(np.int32), "recv_topk_idx")
    same_values(got["weight"], mine.recv_topk_weights, "handle.weight")
    if with_weights:
        same_values(got["recv_topk_weights"], mine.recv_topk_weights, "recv_topk_weights")
    else:
        assert got["recv_topk_weights"] is None
    combined_x, combined_w = got["combined"]
    # The combine weights each row by the handle's pair weight (1 without topk_weights); the node partials
    # are added in node order, then the biases, and the sum rounded to bf16 once.
    partials = _rounded_node_partials(_grouped_node_partials(y, everyone, idx, experts, d, buffer.ranks_per_node), w)
    rounded = np.zeros(partials.shape[1:], np.float32)
    for term in list(partials) + [np.asarray(b[d]).astype(np.float32) for b in biases]:
        rounded = rounded + term
    same_values(combined_x, rounded.astype(ml_dtypes.bfloat16), "combined_x (the pure-JAX rounding)")
    if w.bf16_node_partials is None:
        exact = oracle.grouped_combine(y, everyone, tokens, biases)[d]
    else:  # the node partials as sent, summed exactly
        exact = np.sum(partials.astype(np.float64), axis=0) + sum(np.asarray(b[d], np.float64) for b in biases)
    oracle.assert_rounded_once(combined_x, exact, np.abs(exact) + 1.0)
    want_w = oracle.grouped_combined_weights(row_weights, everyone, idx, experts)[d]
    same_values(combined_w, want_w.astype(np.float32), "combined_topk_weights")


def check_grouped_gradient(w: Worker, rng, *, tokens, hidden, topk, experts):
    """Value and gradients (x, topk_weights) of a jitted expert-grouped dispatch -> combine step (rows
    unchanged: combined[t] = sum over t's pairs of weight * x[t]) against the chain rule: the grouped
    custom VJPs run the grouped kernels (combine for dispatch, cached dispatch for combine)."""
    import jax.numpy as jnp
    import ml_dtypes

    import oracle
    from harness import random_bf16, random_topk, random_weights

    r, d = w.num_ranks, w.rank
    idx = random_topk(rng, r, tokens, topk, experts, "repeated")
    x = random_bf16(rng, (r, tokens, hidden))
    weights = np.round(random_weights(rng, (r, tokens, topk)) * 64) / 64  # sums exact in any order
    g = random_bf16(rng, (r, tokens, hidden)).astype(np.float32)
    buffer = w.buffer

    def loss(x_, w_, idx_, g_):
        out = buffer.dispatch(x_, topk_idx=idx_, topk_weights=w_, num_experts=experts, expert_grouped=True)
        combined, _ = buffer.combine(out.recv_x, out.handle)
        return jnp.sum(combined.astype(jnp.float32) * g_)

    value, grad_x, grad_w = w.run(_value_and_grads(loss), x, weights, idx, g)
    bf16 = ml_dtypes.bfloat16
    ids = oracle.valid_ids(idx, experts)[d]
    valid = ids >= 0
    xs, gs = x[d].astype(np.float64), g[d].astype(np.float64)
    ranks_per_node = buffer.ranks_per_node
    nodes = (r // ranks_per_node, tokens, hidden)
    combined = np.zeros(nodes)  # per node, the sum over each token's pairs there of pair weight * x[t]
    exact_x = np.zeros(nodes)  # per node, the sum over its pairs there of bf16(g[t] * pair weight)
    for t in range(tokens):
        for e in set(ids[t][valid[t]].tolist()):
            node = e // (experts // r) // ranks_per_node
            pair_weight = np.float32(np.sum(weights[d, t][ids[t] == e]))
            combined[node, t] += pair_weight * xs[t]
            exact_x[node, t] += (gs[t] * pair_weight).astype(np.float32).astype(bf16).astype(np.float64)
    # Sums of a few such terms are exact in f32: each node's partial as combine sends it, summed exactly.
    combined = np.sum(_rounded_node_partials(combined.astype(np.float32), w).astype(np.float64), axis=0)
    exact_x = np.sum(_rounded_node_partials(exact_x.astype(np.float32), w).astype(np.float64), axis=0)
    want_value = np.sum(combined.astype(np.float32).astype(bf16).astype(np.float64) * gs)
    np.testing.assert_allclose(value, want_value, rtol=1e-3, err_msg="loss")
    oracle.assert_rounded_once(grad_x, exact_x, np.abs(exact_x) + 1.0)
    exact_w = np.where(valid, np.sum(gs * xs, axis=1)[:, None], 0.0)
    np.testing.assert_allclose(grad_w, exact_w, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(exact_w)) + 1e-30),
                               err_msg="grad topk_weights")


def grouped_checks(w: Worker, rng, experts: int) -> list:
    """(name, check) pairs of the expert-grouped layout (docs/API.md, "Expert-grouped dispatch")."""
    common = dict(tokens=256, hidden=512, topk=8, experts=experts)
    return [
        ("grouped dispatch/combine bf16", lambda: check_grouped(w, rng, **common)),
        ("grouped: -1, out-of-range and repeated ids",
         lambda: check_grouped(w, rng, kind="repeated", **common)),
        ("grouped: out-of-range ids", lambda: check_grouped(w, rng, kind="out_of_range", **common)),
        ("grouped: alignment 4, no weights, one bias",
         lambda: check_grouped(w, rng, alignment=4, with_weights=False, bias=1, kind="repeated", **common)),
        ("grouped: capacity overflow (rows past N dropped)",
         lambda: check_grouped(w, rng, capacity=300, alignment=4, kind="hot", **common)),
        ("grouped: fp8", lambda: check_grouped(w, rng, fp8=True, alignment=4, **common)),
        ("grouped: H=7168, T=1024",
         lambda: check_grouped(w, rng, tokens=1024, hidden=7168, topk=8, experts=experts, bias=0)),
        ("grouped: gradient through a jitted step",
         lambda: check_grouped_gradient(w, rng, tokens=256, hidden=512, topk=4, experts=experts)),
    ]
