"""Flax modules of the expert-parallel MoE layer (`jax_deepep.moe`): `MoE` (NNX) and `MoELinen` (linen).

flax is optional (`pip install jax_deepep[flax]`); `import jax_deepep` does not import this module.

    buffer = jax_deepep.Buffer(mesh, "expert")
    layer = jax_deepep.flax.MoE(buffer, moe.MoEConfig(hidden=256, ffn_hidden=512, num_experts=16, top_k=2),
                                rngs=nnx.Rngs(0))
    y = layer(x, mask)  # x [B, H] global, tokens split over the mesh as `moe.sharded_moe` splits them

Both hold the layer's parameters (`moe.init_params`: `router`, `w_gate`, `w_up`, `w_down`, f32) with the
layer's sharding (`moe.param_specs`: experts split over the buffer's axis, router replicated) and call
`moe.sharded_moe`, so their numbers are the functional layer's.
"""
from __future__ import annotations

from typing import Optional

import jax
from flax import linen, nnx

from . import moe
from .buffer import Buffer


def _partition_names(spec: jax.sharding.PartitionSpec, ndim: int) -> tuple:
    """A PartitionSpec as flax's per-dimension mesh-axis names."""
    return tuple(spec) + (None,) * (ndim - len(spec))


class MoE(nnx.Module):
    """NNX module of `moe.sharded_moe(buffer, config, token_axes=token_axes)`: `__call__(x [B, H], mask=None)`.

    The parameters are `nnx.Param`s placed on the buffer's mesh with the layer's sharding (their
    `out_sharding` metadata names the mesh axes); `low_latency_tokens` selects the decoding layer, as in
    `moe.sharded_moe`.
    """

    def __init__(self, buffer: Buffer, config: moe.MoEConfig, *, rngs: nnx.Rngs, token_axes=None,
                 low_latency_tokens: Optional[int] = None):
        self.config = config
        self.layer = moe.sharded_moe(buffer, config, token_axes=token_axes, low_latency_tokens=low_latency_tokens)
        params = moe.init_sharded_params(rngs.params(), config, buffer.mesh, buffer.axis_name)
        specs = moe.param_specs(buffer.axis_name)
        self.param_names = tuple(specs)
        for name, value in params.items():
            names = _partition_names(specs[name], value.ndim)
            setattr(self, name, nnx.Param(value, out_sharding=names, mesh=buffer.mesh))

    def params(self) -> dict:
        """The parameters as the functional layer takes them."""
        return {name: getattr(self, name)[...] for name in self.param_names}

    def __call__(self, x, mask=None):
        return self.layer(self.params(), x, mask)


class MoELinen(linen.Module):
    """The linen twin of `MoE` (linen modules are dataclasses: `MoELinen(buffer, config)`).

    `init` makes each parameter as `moe.init_params` does (from the parameter's own "params" key), boxed
    with the layer's partitioning (`linen.Partitioned`, so `linen.get_partition_spec` / `linen.get_sharding`
    give the layer's shardings); `apply` takes them boxed or unboxed.
    """

    buffer: Buffer
    config: moe.MoEConfig
    token_axes: Optional[tuple] = None
    low_latency_tokens: Optional[int] = None

    @linen.compact
    def __call__(self, x, mask=None):
        def init_params(key):
            return moe.init_params(key, self.config)

        shapes = jax.eval_shape(init_params, jax.random.key(0))
        params = {}
        for name, spec in moe.param_specs(self.buffer.axis_name).items():
            init = linen.with_partitioning(lambda key, name=name: init_params(key)[name],
                                           _partition_names(spec, shapes[name].ndim))
            params[name] = self.param(name, init)
        layer = moe.sharded_moe(self.buffer, self.config, token_axes=self.token_axes,
                                low_latency_tokens=self.low_latency_tokens)
        return layer(params, x, mask)
