"""The names the ops leave in a trace (docs/API.md): every op's named scope in the HLO op
metadata, and checkpoint names that a `jax.checkpoint` policy can save or recompute."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_deepep as deepep
from harness import AXIS, make_mesh, random_bf16, random_topk, random_weights, run_per_rank

R, T, H, K, E = 4, 8, 128, 2, 8
OPS = ("get_dispatch_layout", "dispatch", "combine", "low_latency_dispatch", "low_latency_combine",
       "low_latency_recv")


def _every_op(buffer, x, topk_idx, topk_weights):
    layout = buffer.get_dispatch_layout(topk_idx, E)
    out = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, layout=layout)
    combined, _ = buffer.combine(out.recv_x, out.handle)
    pending = buffer.low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank=T, num_experts=E,
                                          use_fp8=False, return_recv_hook=True)
    received = buffer.low_latency_recv(pending)
    return combined, buffer.low_latency_combine(received.recv_x, topk_idx, topk_weights, received.handle)


def test_hlo_metadata_names_every_op():
    mesh = make_mesh(R)
    buffer = deepep.Buffer(mesh, AXIS, low_latency_mode=True, num_rdma_bytes=1 << 30)
    fn = jax.jit(jax.shard_map(lambda *a: _every_op(buffer, *a), mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
    args = (jax.ShapeDtypeStruct((R * T, H), jnp.bfloat16), jax.ShapeDtypeStruct((R * T, K), jnp.int32),
            jax.ShapeDtypeStruct((R * T, K), jnp.float32))
    hlo = fn.lower(*args).as_text(debug_info=True)
    for op in OPS:
        assert f"deepep/{op}/" in hlo, op


def _layer(buffer):
    def layer(x, topk_idx, topk_weights):
        out = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=E)
        y = jnp.sin(out.recv_x.astype(jnp.float32)).astype(jnp.bfloat16)
        combined, _ = buffer.combine(y, out.handle)
        return jnp.sin(combined.astype(jnp.float32))

    return layer


def _grad_under(policy, buffer):
    layer = jax.checkpoint(_layer(buffer), policy=policy)

    def per_rank(x, topk_idx, topk_weights):
        return jax.grad(lambda x, w: jnp.sum(layer(x, topk_idx, w)), argnums=(0, 1))(x, topk_weights)

    return per_rank


def _collectives(per_rank, mesh) -> int:
    """How many all_to_all / all_gather the traced program runs (the pure-JAX backend's transport)."""
    fn = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
    jaxpr = str(fn.trace(jax.ShapeDtypeStruct((R * T, H), jnp.bfloat16), jax.ShapeDtypeStruct((R * T, K), jnp.int32),
                         jax.ShapeDtypeStruct((R * T, K), jnp.float32)).jaxpr)
    return jaxpr.count("all_to_all") + jaxpr.count("all_gather")


def test_checkpoint_policies_save_or_recompute_the_transport(rng):
    """Saving the names keeps the backward pass from redoing the dispatch (as many collectives as
    with nothing recomputed); saving everything but them redoes it. Gradients are the same."""
    mesh = make_mesh(R)
    buffer = deepep.Buffer(mesh, AXIS)
    policies = jax.checkpoint_policies
    save_names = _grad_under(policies.save_only_these_names(*deepep.CHECKPOINT_NAMES), buffer)
    recompute_names = _grad_under(policies.save_any_names_but_these(*deepep.CHECKPOINT_NAMES), buffer)
    save_all = _grad_under(policies.everything_saveable, buffer)
    assert _collectives(save_names, mesh) == _collectives(save_all, mesh) < _collectives(recompute_names, mesh)

    args = (random_bf16(rng, (R, T, H)), random_topk(rng, R, T, K, E), random_weights(rng, (R, T, K)))
    want = run_per_rank(mesh, save_all, *args)
    for per_rank in (save_names, recompute_names):
        for got, expected in zip(run_per_rank(mesh, per_rank, *args), want):
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


@pytest.mark.parametrize("op,output", [name.split("/")[1:] for name in deepep.CHECKPOINT_NAMES])
def test_checkpoint_names_are_documented(op, output):
    doc = getattr(deepep.Buffer, op).__doc__ or ""
    assert f"deepep/{op}/{output}" in doc
