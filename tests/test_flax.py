"""The Flax modules (jax_deepep/flax.py): the numbers of the functional layer (jax_deepep.moe), and
optax training steps under `nnx.jit` / `jax.jit`. flax stays optional: `import jax_deepep` leaves it out."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

import jax_deepep as deepep
from jax_deepep import moe

flax = pytest.importorskip("flax")
from flax import linen, nnx  # noqa: E402

from jax_deepep.flax import MoE, MoELinen  # noqa: E402

CONFIG = moe.MoEConfig(hidden=128, ffn_hidden=256, num_experts=16, top_k=2)
B = 64


@pytest.fixture(scope="module")
def buffer():
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return deepep.Buffer(mesh, "expert")


def _tokens():
    x = jax.random.normal(jax.random.key(1), (B, CONFIG.hidden))
    return x, jnp.arange(B) % 5 != 0


def _assert_equal(a, b):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_import_leaves_flax_out():
    code = "import sys, jax_deepep; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nnx_module_has_the_layers_parameters_and_numbers(buffer):
    layer = MoE(buffer, CONFIG, rngs=nnx.Rngs(0))
    params = layer.params()
    shapes = jax.eval_shape(lambda key: moe.init_params(key, CONFIG), jax.random.key(0))
    specs = moe.param_specs("expert")
    for name, value in params.items():
        assert (value.shape, value.dtype) == (shapes[name].shape, shapes[name].dtype)
        assert value.sharding.is_equivalent_to(NamedSharding(buffer.mesh, specs[name]), value.ndim), name
    x, mask = _tokens()
    _assert_equal(nnx.jit(lambda m, x, mask: m(x, mask))(layer, x, mask),
                  jax.jit(moe.sharded_moe(buffer, CONFIG))(params, x, mask))


def test_linen_module_has_the_layers_numbers(buffer):
    layer = MoELinen(buffer, CONFIG)
    x, mask = _tokens()
    variables = layer.init(jax.random.key(0), x, mask)
    assert linen.get_partition_spec(variables)["params"]["w_gate"] == jax.sharding.PartitionSpec("expert", None, None)
    params = moe.shard_params(linen.unbox(variables)["params"], buffer.mesh, "expert")
    want = jax.jit(moe.sharded_moe(buffer, CONFIG))(params, x, mask)
    _assert_equal(jax.jit(layer.apply)({"params": params}, x, mask), want)
    _assert_equal(jax.jit(layer.apply)(variables, x, mask), want)  # boxed, as init made them


def _mse(y):
    return jnp.mean(y.astype(jnp.float32) ** 2)


def test_nnx_training_steps(buffer):
    layer = MoE(buffer, CONFIG, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
    x, mask = _tokens()

    @nnx.jit
    def step(layer, optimizer, x, mask):
        loss, grads = nnx.value_and_grad(lambda m: _mse(m(x, mask)))(layer)
        optimizer.update(layer, grads)
        return loss, grads

    losses = []
    for _ in range(3):
        loss, grads = step(layer, optimizer, x, mask)
        losses.append(float(loss))
        for name in layer.param_names:
            assert np.all(np.isfinite(np.asarray(getattr(grads, name)[...])))
    assert losses[-1] < losses[0], losses


def test_linen_training_steps(buffer):
    layer = MoELinen(buffer, CONFIG)
    x, mask = _tokens()
    params = linen.unbox(layer.init(jax.random.key(0), x, mask))["params"]
    tx = optax.adam(1e-2)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: _mse(layer.apply({"params": p}, x, mask)))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(3):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
