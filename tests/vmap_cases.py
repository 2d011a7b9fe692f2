"""Per-rank functions of every op, each taking one batch element, for checking that `jax.vmap` over
them is a loop (docs/API.md). test_vmap.py runs them on the pure-JAX backend and compares
numbers; test_gpu_backend_tracing.py traces them on the CUDA backend.

Each case takes `(buffer, x bf16[T, H], topk_idx i32[T, K], topk_weights f32[T, K])` and returns a
tuple of arrays; the low-latency case needs a low-latency Buffer.
"""
import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jax_deepep import fp8

T, H, K, E = 8, 128, 2, 16
M = T  # num_max_dispatch_tokens_per_rank
BATCH = 3


def _received(rows, num_recv_tokens):
    """`rows` with those past `num_recv_tokens` zeroed: docs/API.md leaves them unspecified."""
    valid = jnp.arange(rows.shape[0]) < num_recv_tokens
    return jnp.where(valid.reshape(-1, *([1] * (rows.ndim - 1))), rows, jnp.zeros((), rows.dtype))


def dispatch_bf16(buffer, x, topk_idx, topk_weights):
    out = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=E)
    return (_received(out.recv_x, out.num_recv_tokens), out.recv_topk_idx, out.recv_topk_weights,
            out.num_recv_tokens_per_expert, out.num_recv_tokens)


def dispatch_fp8(buffer, x, topk_idx, topk_weights):
    out = buffer.dispatch(fp8.per_block_cast_to_fp8(x), topk_idx=topk_idx, topk_weights=topk_weights, num_experts=E)
    return (*(_received(a, out.num_recv_tokens) for a in out.recv_x), out.recv_topk_weights)


def cached_dispatch(buffer, x, topk_idx, topk_weights):
    first = buffer.dispatch(x, topk_idx=topk_idx, num_experts=E)
    return (_received(buffer.dispatch(jnp.sin(x), handle=first.handle).recv_x, first.num_recv_tokens),)


def combine(buffer, x, topk_idx, topk_weights):
    out = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=E)
    return buffer.combine(jnp.sin(out.recv_x), out.handle, topk_weights=out.recv_topk_weights)


def low_latency(buffer, x, topk_idx, topk_weights):
    out = buffer.low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank=M, num_experts=E)
    y = fp8.per_block_cast_back(*out.recv_x)
    return out.recv_count, buffer.low_latency_combine(y, topk_idx, topk_weights, out.handle)


def low_latency_hook(buffer, x, topk_idx, topk_weights):
    """As `low_latency`, each op completed by low_latency_recv."""
    pending = buffer.low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank=M, num_experts=E,
                                          return_recv_hook=True)
    out = buffer.low_latency_recv(pending)
    y = fp8.per_block_cast_back(*out.recv_x)
    pending = buffer.low_latency_combine(y, topk_idx, topk_weights, out.handle, return_recv_hook=True)
    return out.recv_count, buffer.low_latency_recv(pending)


@dataclasses.dataclass(frozen=True)
class Case:
    fn: Callable
    # Custom calls the CUDA backend's trace must contain (with the gradient, if any); None: the CUDA
    # backend refuses to map the case.
    targets: Optional[tuple]
    differentiable: bool = True  # the low-latency ops are inference only
    low_latency: bool = False


CASES = {
    "dispatch_bf16": Case(dispatch_bf16, ("jax_deepep_dispatch", "jax_deepep_combine")),
    "dispatch_fp8": Case(dispatch_fp8, ("jax_deepep_dispatch",)),
    "cached_dispatch": Case(cached_dispatch, ("jax_deepep_cached_dispatch", "jax_deepep_combine")),
    "combine": Case(combine, ("jax_deepep_combine", "jax_deepep_cached_dispatch")),
    "low_latency": Case(low_latency, ("jax_deepep_ll_dispatch_send", "jax_deepep_ll_dispatch_recv",
                                      "jax_deepep_ll_combine_send", "jax_deepep_ll_combine_recv"),
                        differentiable=False, low_latency=True),
    "low_latency_hook": Case(low_latency_hook, None, differentiable=False, low_latency=True),
}


def loss(outputs):
    """A scalar of every floating output, nonlinear so that each one's cotangent differs."""
    floats = [a for a in outputs if jnp.issubdtype(a.dtype, jnp.floating)]
    return sum(jnp.sum(jnp.sin(a.astype(jnp.float32))) for a in floats)


def mapped(case: Case, buffer, in_axes=0):
    """`jax.vmap` of the case over the leading axis of its arrays; with the gradient w.r.t. `x` and
    `topk_weights` (and the outputs) where the case is differentiable."""
    return _with_grad(case, jax.vmap(lambda *a: case.fn(buffer, *a), in_axes=in_axes))


def looped(case: Case, buffer, in_axes=0):
    """The same as `mapped`, as a Python loop over the batch."""
    def loop(*args):
        axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)

        def element(b):
            return [a if axis is None else a[b] for a, axis in zip(args, axes)]

        outs = [case.fn(buffer, *element(b)) for b in range(BATCH)]
        return jax.tree.map(lambda *a: jnp.stack(a), *outs)

    return _with_grad(case, loop)


def _with_grad(case: Case, fn):
    if not case.differentiable:
        return fn

    def outputs_and_grad(x, topk_idx, topk_weights):
        grad = jax.grad(lambda x, w: loss(fn(x, topk_idx, w)), argnums=(0, 1))(x, topk_weights)
        return fn(x, topk_idx, topk_weights), grad

    return outputs_and_grad
