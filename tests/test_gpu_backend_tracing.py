"""The CUDA backend's ops trace through `jax.grad` inside `shard_map` (no GPU needed).

Tracing never runs a kernel, so a CPU mesh will do: the Buffer gets the CUDA backends with stand-ins
for their device memory. This catches tracing-time errors of the GPU path in CI, such as
custom-call outputs whose varying-axis type does not match what the custom_vjp rules need.
Needs the compiled library (built by `pip install .` where nvcc exists); skipped without it.
"""
import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import vmap_cases
from harness import buffer_with_cuda_backends
from jax_deepep import DeepEPError, moe
from jax_deepep.gpu import available, unavailable_reason

pytestmark = pytest.mark.skipif(not available(), reason=f"CUDA library: {unavailable_reason()}")


@pytest.mark.parametrize("data_parallel", [1, 2])
@pytest.mark.parametrize("fp8", [False, True])
def test_moe_gradient_traces_through_cuda_backend(data_parallel, fp8):
    mesh = jax.make_mesh((data_parallel, 8 // data_parallel), ("data", "expert"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    buffer = buffer_with_cuda_backends(mesh, "expert")
    config = moe.MoEConfig(hidden=128, ffn_hidden=256, num_experts=16, top_k=2, use_fp8=fp8)
    params = moe.shard_params(moe.init_params(jax.random.key(0), config), mesh, "expert")
    layer = moe.sharded_moe(buffer, config)
    tokens = NamedSharding(mesh, P(("data", "expert")))
    x = jax.device_put(jax.random.normal(jax.random.key(1), (64, 128)), tokens)
    mask = jax.device_put(jnp.ones((64,), bool), tokens)

    def loss(p):
        return jnp.sum(layer(p, x, mask).astype(jnp.float32) ** 2)

    traced = jax.jit(jax.value_and_grad(loss)).trace(params)
    assert "jax_deepep_combine" in str(traced.jaxpr) and "jax_deepep_cached_dispatch" in str(traced.jaxpr)
    # Without effects the training step keeps JAX's C++ dispatch path (gpu/ffi_call.py says why).
    assert not traced.jaxpr.effects, traced.jaxpr.effects


@pytest.mark.parametrize("backend_class", ["intranode", "internode"])
def test_expert_grouped_is_refused_by_the_cuda_backends(backend_class):
    """Until the kernels write grouped rows, `expert_grouped=True` is a DeepEPError on the CUDA backends, and
    the MoE layer (`MoEConfig.expert_grouped=None`) receives its rows by source there instead."""
    from jax_deepep.gpu.internode import InternodeBackend

    mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    buffer = buffer_with_cuda_backends(mesh, "expert")
    if backend_class == "internode":  # only its class attributes are reached before the refusal
        buffer.normal_backend = object.__new__(InternodeBackend)
    config = moe.MoEConfig(hidden=128, ffn_hidden=256, num_experts=16, top_k=2)
    assert not moe.expert_grouped(buffer, config)
    params = moe.shard_params(moe.init_params(jax.random.key(0), config), mesh, "expert")
    x = jax.device_put(jax.random.normal(jax.random.key(1), (64, 128)), NamedSharding(mesh, P("expert")))
    layer = moe.sharded_moe(buffer, dataclasses.replace(config, expert_grouped=True))
    with pytest.raises(DeepEPError, match=f"expert_grouped=True is not yet implemented on the CUDA {backend_class}"):
        jax.jit(layer).trace(params, x)


def test_low_latency_moe_traces_through_cuda_kernels():
    """The decoding layer on the NVSHMEM kernels' custom calls, also free of effects."""
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    buffer = buffer_with_cuda_backends(mesh, "expert", low_latency_mode=True, num_rdma_bytes=1 << 30)
    config = moe.MoEConfig(hidden=256, ffn_hidden=256, num_experts=16, top_k=2, use_fp8=True)
    params = moe.shard_params(moe.init_params(jax.random.key(0), config), mesh, "expert")
    layer = moe.sharded_moe(buffer, config, low_latency_tokens=8)
    x = jax.device_put(jax.random.normal(jax.random.key(1), (64, 256)), NamedSharding(mesh, P("expert")))
    traced = jax.jit(layer).trace(params, x)
    for target in ("jax_deepep_ll_dispatch_send", "jax_deepep_ll_dispatch_recv", "jax_deepep_ll_combine_send",
                   "jax_deepep_ll_combine_recv"):
        assert target in str(traced.jaxpr), target
    assert not traced.jaxpr.effects, traced.jaxpr.effects


@pytest.mark.parametrize("name", sorted(vmap_cases.CASES))
def test_vmap_traces_through_cuda_backend(name):
    """`jax.vmap` of each op (and `jax.grad` of it) runs the custom calls once per element (a scan); a
    low-latency send whose receive comes later (`return_recv_hook=True`) is refused."""
    case = vmap_cases.CASES[name]
    mesh = jax.make_mesh((8,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    buffer_args = dict(low_latency_mode=True, num_rdma_bytes=1 << 30) if case.low_latency else {}
    buffer = buffer_with_cuda_backends(mesh, "ep", **buffer_args)
    batch, t, k = vmap_cases.BATCH, 8 * vmap_cases.T, vmap_cases.K
    args = (jax.ShapeDtypeStruct((batch, t, vmap_cases.H), jnp.bfloat16),
            jax.ShapeDtypeStruct((batch, t, k), jnp.int32), jax.ShapeDtypeStruct((batch, t, k), jnp.float32))
    fn = vmap_cases.mapped(case, buffer)

    def per_shard(*shards):  # every output gains a leading rank axis
        return jax.tree.map(lambda a: a[None], fn(*shards))

    jitted = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P(None, "ep"), out_specs=P("ep")))
    if case.targets is None:
        with pytest.raises(DeepEPError, match="return_recv_hook=True` cannot be mapped"):
            jitted.trace(*args)
        return
    jaxpr = str(jitted.trace(*args).jaxpr)
    for target in case.targets:
        assert target in jaxpr, target
    assert "scan" in jaxpr
