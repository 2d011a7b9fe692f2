"""The expert-parallel MoE layer (jax_deepep.moe) against the same model computed densely: outputs,
loss and gradients (parameters and tokens), over 1, 2, 4, 8 expert ranks and a (data, expert) mesh,
with padding tokens (expert id -1) and uneven routing."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_deepep as deepep
from jax_deepep import moe

DATA, EXPERT = "data", "expert"
TOKENS_PER_DEVICE = 24


def make_mesh(data: int, expert: int) -> Mesh:
    devices = jax.devices("cpu")
    if len(devices) < data * expert:
        pytest.skip(f"needs {data * expert} CPU devices, have {len(devices)}")
    return Mesh(np.array(devices[:data * expert]).reshape(data, expert), (DATA, EXPERT))


def relative_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_problem(config: moe.MoEConfig, num_tokens: int, seed: int):
    """Parameters, tokens, a padding mask (about 15% routed nowhere) and a regression target.

    A router bias towards the first experts makes the routing uneven (rank 0 receives the most).
    """
    keys = jax.random.split(jax.random.key(seed), 5)
    params = moe.init_params(keys[0], config)
    params["router"] = params["router"].at[:, : config.top_k].add(0.3)
    x = jax.random.normal(keys[1], (num_tokens, config.hidden), jnp.float32).astype(jnp.bfloat16)
    mask = jax.random.uniform(keys[2], (num_tokens,)) > 0.15
    target = jax.random.normal(keys[3], (num_tokens, config.hidden), jnp.float32)
    return params, x, mask, target


def mse(y, target):
    return jnp.mean((y.astype(jnp.float32) - target) ** 2)


class NaNPaddingBackend:
    """The pure-JAX backend, but receive rows past num_recv_tokens (grouped: past the last group) hold
    NaN: the API leaves them unspecified and the CUDA kernels do not write them, so the layer must never
    let them leak."""

    def __init__(self, inner, grouped: bool = False):
        self.inner, self.name, self.grouped = inner, f"nan-padding({getattr(inner, 'name', 'grouped')})", grouped
        if not grouped:
            self.expert_grouped = NaNPaddingBackend(inner.expert_grouped, grouped=True)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _poison(self, parts, handle):
        num_live = jnp.sum(handle.num_recv_tokens_per_expert) if self.grouped else handle.num_recv_tokens

        def poison(a):
            live = (jnp.arange(a.shape[0]) < num_live).reshape(-1, *([1] * (a.ndim - 1)))
            return jnp.where(live, a, jnp.asarray(jnp.nan, a.dtype))
        return tuple(poison(a) for a in parts)

    def dispatch(self, *args, **kwargs):
        result = self.inner.dispatch(*args, **kwargs)
        return dataclasses.replace(result, recv_parts=self._poison(result.recv_parts, result.handle))

    def cached_dispatch(self, ctx, config, handle, parts, topk_weights=None):
        recv_parts, recv_w = self.inner.cached_dispatch(ctx, config, handle, parts, topk_weights)
        return self._poison(recv_parts, handle), recv_w


def ep_vs_dense(mesh: Mesh, config: moe.MoEConfig, seed: int, nan_padding: bool = False):
    """(EP output, dense output, EP (loss, grads), dense (loss, grads)); grads w.r.t. params and x."""
    num_tokens = TOKENS_PER_DEVICE * mesh.size
    params, x, mask, target = random_problem(config, num_tokens, seed)
    buffer = deepep.Buffer(mesh, EXPERT)
    if nan_padding:
        buffer.normal_backend = NaNPaddingBackend(buffer.normal_backend)
    layer = moe.sharded_moe(buffer, config)
    tokens = NamedSharding(mesh, P((DATA, EXPERT)))
    ep_params = moe.shard_params(params, mesh, EXPERT)
    ep_x, ep_mask, ep_target = (jax.device_put(a, tokens) for a in (x, mask, target))

    def ep_loss(params, x):
        return mse(layer(params, x, ep_mask), ep_target)

    def dense_loss(params, x):
        return mse(moe.dense_moe(params, x, config, mask), target)

    y_ep = jax.jit(layer)(ep_params, ep_x, ep_mask)
    y_dense = jax.jit(moe.dense_moe, static_argnums=2)(params, x, config, mask)
    grad_ep = jax.jit(jax.value_and_grad(ep_loss, argnums=(0, 1)))(ep_params, ep_x)
    grad_dense = jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1)))(params, x)
    return y_ep, y_dense, grad_ep, grad_dense


def assert_matches(y_ep, y_dense, grad_ep, grad_dense, tol=2e-2):
    # bf16 rounding differs (EP rounds each rank's partial sum before combine): allow ~bf16 error.
    assert relative_diff(y_ep, y_dense) < tol
    (loss_ep, (g_params_ep, g_x_ep)), (loss_dense, (g_params_dense, g_x_dense)) = grad_ep, grad_dense
    np.testing.assert_allclose(float(loss_ep), float(loss_dense), rtol=1e-3)
    for name in g_params_dense:
        assert relative_diff(g_params_ep[name], g_params_dense[name]) < tol, name
    assert relative_diff(g_x_ep, g_x_dense) < tol


CONFIG = moe.MoEConfig(hidden=128, ffn_hidden=64, num_experts=8, top_k=3)


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
def test_layer_matches_dense(num_ranks):
    assert_matches(*ep_vs_dense(make_mesh(1, num_ranks), CONFIG, seed=num_ranks))


def test_layer_on_data_and_expert_axes():
    assert_matches(*ep_vs_dense(make_mesh(2, 4), CONFIG, seed=11))


def test_params_made_on_the_mesh_equal_the_placed_ones():
    """`init_sharded_params` computes each device's experts where they live, with the draws of
    `shard_params(init_params(...))` (to the last f32 bit: XLA fuses them in a program) and its shardings."""
    mesh = make_mesh(2, 2)
    config = moe.MoEConfig(hidden=64, ffn_hidden=32, num_experts=8, top_k=2)
    key = jax.random.key(3)
    made = moe.init_sharded_params(key, config, mesh, EXPERT)
    placed = moe.shard_params(moe.init_params(key, config), mesh, EXPERT)
    for name, value in placed.items():
        assert made[name].sharding.is_equivalent_to(value.sharding, value.ndim), name
        np.testing.assert_allclose(np.asarray(made[name]), np.asarray(value), rtol=1e-6, atol=1e-7, err_msg=name)


def test_fp8_sigmoid_router_without_normalisation():
    config = moe.MoEConfig(hidden=256, ffn_hidden=64, num_experts=16, top_k=4, score_func="sigmoid",
                           normalize_topk=False, use_fp8=True)
    assert_matches(*ep_vs_dense(make_mesh(1, 4), config, seed=5))


@pytest.mark.parametrize("expert_grouped", [False, True])
@pytest.mark.parametrize("use_fp8", [False, True])
def test_unwritten_padding_rows_never_leak(use_fp8, expert_grouped):
    config = dataclasses.replace(CONFIG, use_fp8=use_fp8, expert_grouped=expert_grouped, capacity=200)
    assert_matches(*ep_vs_dense(make_mesh(1, 4), config, seed=13, nan_padding=True))


@pytest.mark.parametrize("use_fp8", [False, True])
def test_layer_with_rows_by_source_matches_dense(use_fp8):
    """`MoEConfig(expert_grouped=False)`: the rows come by source and `group_by_expert` sorts them."""
    config = dataclasses.replace(CONFIG, use_fp8=use_fp8, expert_grouped=False)
    assert_matches(*ep_vs_dense(make_mesh(1, 4), config, seed=17))


def test_too_small_capacity_drops_tokens():
    """With a capacity below what rank 0 receives, EP differs from dense (tokens are dropped)."""
    config = moe.MoEConfig(hidden=128, ffn_hidden=64, num_experts=8, top_k=3, capacity=TOKENS_PER_DEVICE)
    y_ep, y_dense, _, _ = ep_vs_dense(make_mesh(1, 4), config, seed=3)
    assert relative_diff(y_ep, y_dense) > 0.1


def test_group_by_expert():
    recv_topk_idx = jnp.array([[1, -1], [0, 1], [-1, -1], [1, 0]], jnp.int32)
    recv_topk_weights = jnp.array([[0.5, 0.0], [0.25, 0.75], [0.0, 0.0], [0.125, 0.375]], jnp.float32)
    groups = moe.group_by_expert(recv_topk_idx, recv_topk_weights, num_local_experts=2)
    np.testing.assert_array_equal(groups.group_sizes, [2, 3])
    np.testing.assert_array_equal(groups.rows[:5], [1, 3, 0, 1, 3])
    np.testing.assert_array_equal(groups.weights, [0.25, 0.375, 0.5, 0.75, 0.125, 0.0, 0.0, 0.0])
    kept = moe.group_by_expert(recv_topk_idx, recv_topk_weights, num_local_experts=2, max_pairs=5)
    np.testing.assert_array_equal(kept.rows, groups.rows[:5])
    np.testing.assert_array_equal(kept.group_sizes, [2, 3])


def test_low_latency_layer_matches_dense():
    mesh = make_mesh(1, 4)
    config = moe.MoEConfig(hidden=128, ffn_hidden=64, num_experts=8, top_k=2, use_fp8=True)
    max_tokens = 16
    rdma_bytes = deepep.Buffer.get_low_latency_rdma_size_hint(max_tokens, config.hidden, mesh.size, config.num_experts)
    buffer = deepep.Buffer(mesh, EXPERT, low_latency_mode=True, num_rdma_bytes=rdma_bytes)
    params, x, mask, _ = random_problem(config, 12 * mesh.size, seed=7)
    layer = moe.sharded_moe(buffer, config, low_latency_tokens=max_tokens)
    tokens = NamedSharding(mesh, P((DATA, EXPERT)))
    y_ep = jax.jit(layer)(moe.shard_params(params, mesh, EXPERT), jax.device_put(x, tokens),
                          jax.device_put(mask, tokens))
    dense = functools.partial(moe.dense_moe, config=config, bf16_expert_outputs=True)  # rounds as the LL path does
    y_dense = jax.jit(dense)(params, x, token_mask=mask)
    assert relative_diff(y_ep, y_dense) < 5e-3
    assert not np.any(np.asarray(y_ep, np.float32)[~np.asarray(mask)])  # padding tokens get zeros


def test_low_latency_overlap_runs_between_send_and_recv():
    """`overlap()` is traced after the dispatch send and before its receive."""
    mesh = make_mesh(1, 2)
    config = moe.MoEConfig(hidden=128, ffn_hidden=64, num_experts=4, top_k=2)
    buffer = deepep.Buffer(mesh, EXPERT, low_latency_mode=True, num_rdma_bytes=1 << 24)
    params, x, _, _ = random_problem(config, 8 * mesh.size, seed=9)
    events = []
    recv = buffer.low_latency_recv

    def tracking_recv(pending):
        events.append("recv")
        return recv(pending)

    buffer.low_latency_recv = tracking_recv

    def per_shard(params, x):
        y, shared = moe.low_latency_moe(params, x, buffer, config, num_max_dispatch_tokens_per_rank=8,
                                        overlap=lambda: events.append("overlap") or x * 2)
        return y + shared

    jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(moe.param_specs(EXPERT), P((DATA, EXPERT))),
                          out_specs=P((DATA, EXPERT))))(moe.shard_params(params, mesh, EXPERT), x)
    assert events == ["overlap", "recv", "recv"]


def test_load_balancing_loss():
    num_experts = 4
    # Every expert gets the same share of pairs and of probability: the loss is 1.
    balanced = moe.Routing(topk_idx=jnp.array([[0, 1], [2, 3], [-1, -1]], jnp.int32),
                           topk_weights=jnp.array([[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]], jnp.float32),
                           scores=jnp.array([[0.25] * 4, [0.25] * 4, [1.0, 0.0, 0.0, 0.0]], jnp.float32))
    np.testing.assert_allclose(moe.load_balancing_loss(balanced, num_experts), 1.0, rtol=1e-6)
    # Everything on expert 0 with all the probability: the loss is E.
    collapsed = moe.Routing(topk_idx=jnp.array([[0], [0]], jnp.int32), topk_weights=jnp.ones((2, 1), jnp.float32),
                            scores=jnp.array([[1.0, 0.0, 0.0, 0.0]] * 2, jnp.float32))
    np.testing.assert_allclose(moe.load_balancing_loss(collapsed, num_experts), num_experts, rtol=1e-6)
