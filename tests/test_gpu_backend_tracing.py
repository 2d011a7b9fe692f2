"""The CUDA backend's ops trace through `jax.grad` inside `shard_map` (no GPU needed).

Tracing never runs a kernel, so a CPU mesh will do: the Buffer gets the CUDA backends with stand-ins
for their device memory. This catches tracing-time errors of the GPU path in CI, such as
custom-call outputs whose varying-axis type does not match what the custom_vjp rules need.
Needs the compiled library (built by `pip install .` where nvcc exists); skipped without it.
"""
import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import vmap_cases
from harness import buffer_with_cuda_backends, decoded_struct_members, handler_attrs_struct
from jax_deepep import DeepEPError, moe
from jax_deepep.gpu import available, unavailable_reason

pytestmark = pytest.mark.skipif(not available(), reason=f"CUDA library: {unavailable_reason()}")


# The custom calls of each layout: its dispatch, combine and cached dispatch (a combine's gradient).
_TARGETS = {False: ("jax_deepep_dispatch", "jax_deepep_combine", "jax_deepep_cached_dispatch"),
            True: ("jax_deepep_grouped_dispatch", "jax_deepep_grouped_combine", "jax_deepep_grouped_cached_dispatch")}


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("data_parallel", [1, 2])
@pytest.mark.parametrize("fp8", [False, True])
def test_moe_gradient_traces_through_cuda_backend(data_parallel, fp8, grouped):
    """The MoE layer and its gradient on the intranode kernels, with rows by source or grouped by expert
    (the layer's default there): the layout's custom calls and no other's, without effects."""
    mesh = jax.make_mesh((data_parallel, 8 // data_parallel), ("data", "expert"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    buffer = buffer_with_cuda_backends(mesh, "expert")
    config = moe.MoEConfig(hidden=128, ffn_hidden=256, num_experts=16, top_k=2, use_fp8=fp8)
    assert moe.expert_grouped(buffer, config)
    config = dataclasses.replace(config, expert_grouped=grouped)
    params = moe.shard_params(moe.init_params(jax.random.key(0), config), mesh, "expert")
    layer = moe.sharded_moe(buffer, config)
    tokens = NamedSharding(mesh, P(("data", "expert")))
    x = jax.device_put(jax.random.normal(jax.random.key(1), (64, 128)), tokens)
    mask = jax.device_put(jnp.ones((64,), bool), tokens)

    def loss(p, x):
        return jnp.sum(layer(p, x, mask).astype(jnp.float32) ** 2)

    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(params, x)
    called = {e.params["target_name"] for e in _equations(traced.jaxpr.jaxpr) if e.primitive.name == "ffi_call"}
    assert set(_TARGETS[grouped]) <= called and not called & set(_TARGETS[not grouped]), called
    # Without effects the training step keeps JAX's C++ dispatch path (gpu/ffi_call.py says why).
    assert not traced.jaxpr.effects, traced.jaxpr.effects
    # Every call carries exactly the attributes its handler decodes (else XLA refuses it, on a GPU only).
    if data_parallel == 1:
        calls = _custom_call_attributes(traced.lower(lowering_platforms=("cuda",)).as_text())
        assert set(_TARGETS[grouped]) <= {target for target, _ in calls}
        for target, attributes in calls:
            _check_decodable(attributes, handler_attrs_struct(target), target)


def _equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in its equations' parameters."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


# The custom calls of each layout on the internode kernels (a cached dispatch is the plain dispatch's call).
_INTERNODE_TARGETS = {False: ("jax_deepep_internode_dispatch", "jax_deepep_internode_combine"),
                      True: ("jax_deepep_internode_grouped_dispatch", "jax_deepep_internode_grouped_combine",
                             "jax_deepep_internode_grouped_cached_dispatch")}


def _internode_buffer(mesh, axis_name: str, exact: bool = False, ranks_per_node: int = 4,
                      num_rdma_bytes: int = 1 << 30):
    """A Buffer whose normal mode traces through the internode kernels, in nodes of `ranks_per_node` ranks."""
    from jax_deepep.gpu import nvshmem
    from jax_deepep.gpu.internode import InternodeBackend

    if not nvshmem.available():
        pytest.skip(nvshmem.unavailable_reason())
    buffer = buffer_with_cuda_backends(mesh, axis_name, ranks_per_node=ranks_per_node, exact_internode_combine=exact)
    symmetric = types.SimpleNamespace(buffer_id=3, num_bytes=num_rdma_bytes)
    buffer.normal_backend = InternodeBackend(symmetric, ranks_per_node=ranks_per_node, exact_combine=exact)
    return buffer


@pytest.mark.parametrize("grouped", [False, True])
def test_moe_gradient_traces_through_internode_kernels(grouped):
    """The MoE layer and its gradient on the internode kernels, with rows by source or grouped by expert
    (the layer's default there too): the layout's custom calls and no other's, without effects, each
    carrying exactly the attributes its handler decodes."""
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    buffer = _internode_buffer(mesh, "expert")
    config = moe.MoEConfig(hidden=128, ffn_hidden=256, num_experts=16, top_k=2)
    assert moe.expert_grouped(buffer, config)
    layer = moe.sharded_moe(buffer, dataclasses.replace(config, expert_grouped=grouped))
    params = moe.shard_params(moe.init_params(jax.random.key(0), config), mesh, "expert")
    x = jax.device_put(jax.random.normal(jax.random.key(1), (64, 128)), NamedSharding(mesh, P("expert")))

    def loss(p, x):
        return jnp.sum(layer(p, x).astype(jnp.float32) ** 2)

    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(params, x)
    called = {e.params["target_name"] for e in _equations(traced.jaxpr.jaxpr) if e.primitive.name == "ffi_call"}
    assert set(_INTERNODE_TARGETS[grouped]) <= called and not called & set(_INTERNODE_TARGETS[not grouped]), called
    assert not traced.jaxpr.effects, traced.jaxpr.effects
    calls = _custom_call_attributes(traced.lower(lowering_platforms=("cuda",)).as_text())
    assert set(_INTERNODE_TARGETS[grouped]) <= {target for target, _ in calls}
    for target, attributes in calls:
        _check_decodable(attributes, handler_attrs_struct(target), target)


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


def _mlir_dict(text: str, start: int) -> tuple:
    """The MLIR attribute dictionary opening at text[start] ("{"): ({name: nested dict, or the value's text},
    the index after its closing brace)."""
    out, i = {}, start + 1
    while text[i] != "}":
        name = re.match(r"\s*([\w.]+) = ", text[i:])
        i += name.end()
        if text[i] == "{":
            value, i = _mlir_dict(text, i)
        else:
            end = re.search(r"[,}]", text[i:]).start()
            value, i = text[i:i + end].strip(), i + end
        out[name.group(1)] = value
        i += text[i] == ","
    return out, i + 1


def _custom_call_attributes(text: str) -> list:
    """(target, its attribute dictionary) of every jax_deepep custom call in a StableHLO module's text."""
    calls = []
    for match in re.finditer(r"custom_call @(jax_deepep_\w+)\(.*?mhlo\.backend_config = ", text):
        calls.append((match.group(1), _mlir_dict(text, match.end())[0]))
    return calls


def _check_decodable(attributes: dict, struct: str, where: str):
    members = decoded_struct_members(struct)
    assert sorted(attributes) == sorted(members), (where, struct)
    for name, nested in members.items():
        if nested is not None:
            _check_decodable(attributes[name], nested, f"{where}.{name}")


def test_low_latency_calls_carry_what_the_handlers_decode():
    """Every low-latency custom call's attributes are the fields its handler decodes (checked on the GPU
    only when it runs); each send has a call site of its own, so XLA can never merge two."""
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    half = 135424  # sizes.low_latency_layout(8, 256, 16).half_bytes
    buffer = buffer_with_cuda_backends(mesh, "expert", low_latency_mode=True, num_rdma_bytes=5 * half + 5)
    config = moe.MoEConfig(hidden=256, ffn_hidden=256, num_experts=16, top_k=2, use_fp8=True)
    params = moe.shard_params(moe.init_params(jax.random.key(0), config), mesh, "expert")
    layer = moe.sharded_moe(buffer, config, low_latency_tokens=8)
    x = jax.device_put(jax.random.normal(jax.random.key(1), (64, 256)), NamedSharding(mesh, P("expert")))

    def two_equal_layers(params, x):
        return layer(params, x), layer(params, x)

    text = jax.jit(two_equal_layers).trace(params, x).lower(lowering_platforms=("cuda",)).as_text()
    calls = _custom_call_attributes(text)
    assert sorted({target for target, _ in calls}) == ["jax_deepep_ll_combine_recv", "jax_deepep_ll_combine_send",
                                                       "jax_deepep_ll_dispatch_recv", "jax_deepep_ll_dispatch_send"]
    for target, attributes in calls:
        _check_decodable(attributes, handler_attrs_struct(target), target)
        assert attributes["sizes"]["num_halves"] == "4 : i64"  # 5 fit: rounded down to a power of two
    sites = [attributes["call_site"] for target, attributes in calls if target.endswith("_send")]
    assert len(sites) == 4 and len(set(sites)) == 4, sites


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("exact", [False, True])
def test_internode_calls_carry_what_the_handlers_decode(exact, grouped):
    """The internode dispatch, cached dispatch and combine attributes, plain or expert-grouped, are the
    fields their handlers decode; combine's `exact_partials` is the Buffer's `exact_internode_combine`,
    and its partial rows are sized for it (f32 or bf16 values, then the K f32 weights). A grouped
    dispatch's rows carry K pair prefixes after the weights (its cached dispatch's carry none), and a
    grouped combine returns f32 rows (each token-level row's sum of its pairs) to the forwarders."""
    mesh = jax.make_mesh((8,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    buffer = _internode_buffer(mesh, "ep", exact)
    hidden, top_k = 256, 4  # rows of 16-byte multiples: no padding

    def step(x, idx, w):
        out = buffer.dispatch(x[0], topk_idx=idx[0], topk_weights=w[0], num_experts=16, expert_grouped=grouped)
        again = buffer.dispatch(x[0], handle=out.handle)
        combined = buffer.combine(again.recv_x, out.handle, topk_weights=out.recv_topk_weights)
        return combined[0][None]

    args = (jax.ShapeDtypeStruct((8, 16, hidden), jnp.bfloat16), jax.ShapeDtypeStruct((8, 16, top_k), jnp.int32),
            jax.ShapeDtypeStruct((8, 16, top_k), jnp.float32))
    traced = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))).trace(*args)
    calls = _custom_call_attributes(traced.lower(lowering_platforms=("cuda",)).as_text())
    assert sorted({target for target, _ in calls}) == sorted(_INTERNODE_TARGETS[grouped])
    for target, attributes in calls:
        _check_decodable(attributes, handler_attrs_struct(target), target)
    dispatch, combine = (next(attributes for target, attributes in calls if target == name)
                         for name in _INTERNODE_TARGETS[grouped][:2])
    assert combine["exact_partials"] == ("true" if exact else "false")
    assert combine["layout"]["partial_bytes"] == f"{hidden * (4 if exact else 2) + top_k * 4} : ui64"
    assert combine["layout"]["return_bytes"] == f"{hidden * (4 if grouped else 2) + top_k * 4} : ui64"
    ids_and_weights = 16 + 2 * 4 * top_k  # header, ids, weights
    assert dispatch["layout"]["prefix_at"] == f"{ids_and_weights} : ui64"
    assert dispatch["layout"]["part_at0"] == f"{ids_and_weights + (4 * top_k if grouped else 0)} : ui64"
    if grouped:  # the cached dispatch moves no ids: its rows carry no prefixes
        cached = next(attributes for target, attributes in calls if target == _INTERNODE_TARGETS[True][2])
        assert cached["layout"]["part_at0"] == "16 : ui64" and cached["num_experts"] == "0 : i64"


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


def test_low_latency_kernels_serve_one_size_per_buffer():
    """Where the buffer halves lie depends on (M, H, E): a second size on the same Buffer is refused at trace
    time, since its calls' halves would overlap those of calls in flight."""
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    buffer = buffer_with_cuda_backends(mesh, "expert", low_latency_mode=True, num_rdma_bytes=1 << 30)
    x = jax.device_put(jnp.zeros((64, 256), jnp.bfloat16), NamedSharding(mesh, P("expert")))
    idx = jax.device_put(jnp.zeros((64, 2), jnp.int32), NamedSharding(mesh, P("expert")))

    def dispatch(m):
        def body(x, idx):
            return buffer.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=m, num_experts=16).recv_x

        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"))).trace(x, idx)

    dispatch(8)
    dispatch(8)  # the same size again
    with pytest.raises(DeepEPError, match=r"serve one .*first \(8, 256, 16\), got \(16, 256, 16\)"):
        dispatch(16)


@pytest.mark.parametrize("use_logfmt", [False, True])
def test_low_latency_combine_carries_use_logfmt(use_logfmt):
    """`use_logfmt` reaches both combine calls (the kernels' row format, and the op signature the ranks compare),
    next to every field their handlers decode."""
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    buffer = buffer_with_cuda_backends(mesh, "expert", low_latency_mode=True, num_rdma_bytes=1 << 30)
    tokens = NamedSharding(mesh, P("expert"))
    x = jax.device_put(jnp.zeros((64, 256), jnp.bfloat16), tokens)
    idx = jax.device_put(jnp.zeros((64, 2), jnp.int32), tokens)
    w = jax.device_put(jnp.ones((64, 2), jnp.float32), tokens)

    def body(x, idx, w):
        ll = buffer.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=8, num_experts=16, use_fp8=False)
        return buffer.low_latency_combine(ll.recv_x, idx, w, ll.handle, use_logfmt=use_logfmt)

    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))
    calls = _custom_call_attributes(step.trace(x, idx, w).lower(lowering_platforms=("cuda",)).as_text())
    combine = [(target, attributes) for target, attributes in calls if "_combine_" in target]
    assert sorted(target for target, _ in combine) == ["jax_deepep_ll_combine_recv", "jax_deepep_ll_combine_send"]
    for target, attributes in combine:
        _check_decodable(attributes, handler_attrs_struct(target), target)
        assert attributes["use_logfmt"] == str(use_logfmt).lower(), (target, attributes["use_logfmt"])


@pytest.mark.parametrize("hook", [False, True])
def test_one_rank_low_latency_combine_is_its_receive_alone(hook):
    """With one rank the combine moves nothing: its receive call sums y alone, taking no token (absent, shape
    (0,)), and no send call numbers it; the dispatch keeps both calls."""
    mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    buffer = buffer_with_cuda_backends(mesh, "expert", low_latency_mode=True, num_rdma_bytes=1 << 30)
    x, idx, w = jnp.zeros((8, 256), jnp.bfloat16), jnp.zeros((8, 2), jnp.int32), jnp.ones((8, 2), jnp.float32)

    def body(x, idx, w):
        ll = buffer.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=8, num_experts=16, use_fp8=False)
        out = buffer.low_latency_combine(ll.recv_x, idx, w, ll.handle, return_recv_hook=hook)
        return buffer.low_latency_recv(out) if hook else out

    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))
    text = step.trace(x, idx, w).lower(lowering_platforms=("cuda",)).as_text()
    calls = _custom_call_attributes(text)
    assert sorted(target for target, _ in calls) == ["jax_deepep_ll_combine_recv",
                                                     "jax_deepep_ll_dispatch_recv",
                                                     "jax_deepep_ll_dispatch_send"], calls
    for target, attributes in calls:
        _check_decodable(attributes, handler_attrs_struct(target), target)
    receive = re.search(r"custom_call @jax_deepep_ll_combine_recv\(.*?\) \{.*?\} : \((tensor<[^>]*>)", text)
    assert receive and receive.group(1) == "tensor<0xi32>", receive and receive.group(1)


def _internode_round_trip(buffer, grouped: bool, num_experts: int, dispatch_config, combine_config):
    """A shard_map step of every internode op on one Buffer: dispatch of bf16 and of FP8 rows, cached dispatch,
    combine with weights (`grouped`: their expert-grouped twins)."""
    def step(x, values, scales, idx, w):
        routing = dict(topk_idx=idx[0], topk_weights=w[0], num_experts=num_experts, expert_grouped=grouped,
                       config=dispatch_config)
        out = buffer.dispatch(x[0], **routing)
        fp8 = buffer.dispatch((values[0], scales[0]), **routing)
        again = buffer.dispatch(x[0], handle=out.handle, config=dispatch_config)
        combined, _ = buffer.combine(again.recv_x, out.handle, topk_weights=out.recv_topk_weights,
                                     config=combine_config)
        return combined[None], fp8.recv_x[0][None]

    return step


@pytest.mark.parametrize("ranks_per_node", [1, 2, 4])
@pytest.mark.parametrize("exact, grouped", [(False, False), (True, False), (False, True), (True, True)])
def test_a_buffer_of_the_hint_holds_every_internode_op(ranks_per_node, exact, grouped):
    """A Buffer of exactly `rdma_bytes_hint(...)` bytes (for its node size, or for any) traces every internode op
    of those sizes (dispatch of bf16 and FP8 rows, cached dispatch, combine with weights) with the built-in
    default Configs (config=None) and with a given one, and every call's rings fit it as its handler checks them
    (its rings, and its send rings in the staging half); for its node size the hint is the most a call needs."""
    from jax_deepep import Buffer, Config
    from jax_deepep.config import default_combine_config, default_dispatch_config
    from jax_deepep.gpu.internode import rdma_bytes_hint

    mesh = jax.make_mesh((8,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    tokens, hidden, top_k, experts = 48, 512, 4, 16
    args = (jax.ShapeDtypeStruct((8, tokens, hidden), jnp.bfloat16),
            jax.ShapeDtypeStruct((8, tokens, hidden), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((8, tokens, hidden // 128), jnp.float32),
            jax.ShapeDtypeStruct((8, tokens, top_k), jnp.int32), jax.ShapeDtypeStruct((8, tokens, top_k), jnp.float32))
    given = Config(6, 4, 20, 3, 24)
    for config, dispatch_config, combine_config in (
            (None, default_dispatch_config(8, Buffer.num_sms), default_combine_config(8, Buffer.num_sms)),
            (given, given, given)):
        for hint_node_size in (ranks_per_node, None):
            hint = rdma_bytes_hint(tokens, hidden, top_k, experts, 8, ranks_per_node=hint_node_size,
                                   exact_internode_combine=exact, expert_grouped=grouped, config=config)
            buffer = _internode_buffer(mesh, "ep", exact, ranks_per_node, num_rdma_bytes=hint)
            step = _internode_round_trip(buffer, grouped, experts, dispatch_config, combine_config)
            traced = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))).trace(*args)
            calls = _custom_call_attributes(traced.lower(lowering_platforms=("cuda",)).as_text())
            assert len(calls) == 4, [target for target, _ in calls]
            needs = []
            for target, attributes in calls:
                rings = {name: int(value.split(" : ")[0]) for name, value in attributes["rings"].items()}
                needs.append(max(rings["receive_bytes"], 2 * rings["staging_bytes"]))
                assert needs[-1] <= hint, (target, needs[-1], hint)
            if hint_node_size is not None:
                assert max(needs) == hint


@pytest.mark.parametrize("sizes, config, match", [
    (dict(tokens=32768), None, "at most 32767 tokens per rank, got T=32768"),
    (dict(tokens=20000), (2, 8, 64, 8, 64), "up to 40000 rows through one ring in one call"),
    (dict(tokens=64), (130, 8, 64, 8, 64), r"`config.num_sms` must be at most 128 in internode mode"),
    (dict(tokens=64, num_rdma_bytes=1 << 20), None, r"the Buffer is too small: num_rdma_bytes=1048576"),
])
def test_internode_ops_refuse_what_the_kernels_cannot_serve(sizes, config, match):
    """At trace time, as a DeepEPError: more tokens than a signal counts, more rows through one ring in one call
    (a channel's tokens of every node), more channels than the signals have room for, a Buffer too small for the
    op's rings (naming the size hint)."""
    from jax_deepep import Config

    mesh = jax.make_mesh((8,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    buffer = _internode_buffer(mesh, "ep", ranks_per_node=4, num_rdma_bytes=sizes.get("num_rdma_bytes", 1 << 30))
    config = None if config is None else Config(*config)

    def body(x, idx):
        return buffer.dispatch(x, topk_idx=idx, num_experts=16, config=config).recv_x

    args = (jax.ShapeDtypeStruct((8 * sizes["tokens"], 256), jnp.bfloat16),
            jax.ShapeDtypeStruct((8 * sizes["tokens"], 2), jnp.int32))
    with pytest.raises(DeepEPError, match=match):
        jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))).trace(*args)


@pytest.mark.parametrize("kernels", ["intranode", "internode"])
def test_expert_grouped_dispatch_refuses_more_experts_than_its_row_bases_hold(kernels):
    """The grouped kernels keep a row base per expert in shared memory (MAX_GROUPED_EXPERTS): a dispatch over
    more experts is a DeepEPError at trace time, naming the backend."""
    mesh = jax.make_mesh((8,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    buffer = (buffer_with_cuda_backends(mesh, "ep") if kernels == "intranode"
              else _internode_buffer(mesh, "ep", ranks_per_node=4))

    def body(x, idx):
        return buffer.dispatch(x, topk_idx=idx, num_experts=8 * 513, expert_grouped=True).recv_x

    args = (jax.ShapeDtypeStruct((8 * 16, 256), jnp.bfloat16), jax.ShapeDtypeStruct((8 * 16, 2), jnp.int32))
    match = f"expert_grouped=True serves at most 4096 experts on the CUDA {kernels} backend, got num_experts=4104"
    with pytest.raises(DeepEPError, match=match):
        jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))).trace(*args)


@pytest.mark.parametrize("op", ["dispatch_bf16", "dispatch_fp8", "combine", "combine_logfmt"])
def test_low_latency_receive_program_takes_no_empty_array(op):
    """A `return_recv_hook=True` receive compiled on its own takes no array of zero elements from its send:
    one that fed its custom call crashed XLA's GPU compiler (benchmarks/LOG.md, session 30). Absent
    operands are made inside the receive program instead."""
    mesh = jax.make_mesh((8,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    buffer = buffer_with_cuda_backends(mesh, "ep", low_latency_mode=True, num_rdma_bytes=1 << 30)
    m, experts = 16, 16

    def per_shard(fn):  # a program of its own over the mesh; every output gains a leading rank axis
        def body(*shards):
            return jax.tree.map(lambda a: a[None], fn(*jax.tree.map(lambda a: a[0], shards)))

        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))

    def send(x, idx, weights):
        out = buffer.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=m, num_experts=experts,
                                          use_fp8=op == "dispatch_fp8", return_recv_hook=op.startswith("dispatch"))
        if op.startswith("dispatch"):
            return out
        y = jnp.zeros(out.recv_x.shape, jnp.bfloat16)
        return buffer.low_latency_combine(y, idx, weights, out.handle, use_logfmt=op == "combine_logfmt",
                                          return_recv_hook=True)

    args = (jax.ShapeDtypeStruct((8, m, 256), jnp.bfloat16), jax.ShapeDtypeStruct((8, m, 2), jnp.int32),
            jax.ShapeDtypeStruct((8, m, 2), jnp.float32))
    pending = jax.eval_shape(per_shard(send), *args)
    text = per_shard(buffer.low_latency_recv).trace(pending).lower(lowering_platforms=("cuda",)).as_text()
    parameters = re.search(r"func\.func public @main\(([^)]*)\)", text).group(1)
    empty = [p for p in parameters.split(", ") if re.search(r"tensor<(\d+x)*0x", p)]
    assert not empty, f"the receive program takes empty arrays: {empty}"
