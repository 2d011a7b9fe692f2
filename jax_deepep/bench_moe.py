"""The MoE-layer table of `python -m jax_deepep.bench --mode moe`: one expert-parallel SwiGLU layer
after the router (dispatch -> grouped matmul with `jax.lax.ragged_dot` -> combine), timed forward
(`moe_fwd`) and forward + backward to the parameters and tokens (`moe_fwd_bwd`), per layout and transport:

  * `buffer/grouped`: `Buffer.dispatch(..., expert_grouped=True)`: the rows arrive grouped by expert and
    go straight into `ragged_dot`; the combine weights each pair's row;
  * `buffer/argsort`: `Buffer.dispatch` with rows by source, then `moe.group_by_expert` (an argsort and
    a gather of the rows) before `ragged_dot`, and a scatter-add of the pairs back onto their rows;
  * `jax:<transport>/argsort`: the same layer on the JAX-native exchanges of `baselines.py` (`ragged`:
    MaxText-style `ragged_all_to_all`; `ring`: `ppermute`s; `padded`: one `all_to_all`);
  * `experts` / `ceiling`: the grouped matmuls alone, on rows already grouped: what no exchange can beat.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import baselines, moe
from .bench import (AXIS, Result, Runner, Sizes, _input_sets, _made_on_ranks, _normal_buffer, local_ranks, per_rank,
                    stateless)
from .sizes import GROUPED_COMBINE_CHANNEL_BYTES

LAYOUTS = ("grouped", "argsort")


def _expert_params(mesh: Mesh, sizes: Sizes, ffn_hidden: int, seed: int) -> dict:
    """bf16 `w_gate`, `w_up [R, E_l, H, F]`, `w_down [R, E_l, F, H]`: each rank's experts, made where they live
    (leading rank axis, as `bench.per_rank` takes its arguments)."""
    config = moe.MoEConfig(hidden=sizes.hidden, ffn_hidden=ffn_hidden, num_experts=sizes.num_experts,
                           top_k=sizes.num_topk)
    num_local = sizes.num_experts // sizes.num_ranks

    def make():
        params = moe.init_params(jax.random.PRNGKey(seed), config)
        return {name: params[name].astype(jnp.bfloat16).reshape(sizes.num_ranks, num_local, *params[name].shape[1:])
                for name in ("w_gate", "w_up", "w_down")}

    return _made_on_ranks(make, mesh)


def _buffer_layer(buffer, sizes: Sizes, ffn_hidden: int, grouped: bool):
    config = moe.MoEConfig(hidden=sizes.hidden, ffn_hidden=ffn_hidden, num_experts=sizes.num_experts,
                           top_k=sizes.num_topk, expert_grouped=grouped)

    def layer(params, x, idx, w, lay):
        del lay  # the layer computes its own layout, as a model does
        return moe.moe_from_routing(params, x, moe.Routing(idx, w, None), buffer, config)

    return layer


def _baseline_layer(transport: str, sizes: Sizes):
    def layer(params, x, idx, w, lay):
        out = baselines.dispatch(transport, x, idx, w, lay, axis_name=AXIS, num_experts=sizes.num_experts)
        y = moe.local_experts(params, out.recv_parts[0], out.recv_topk_idx, out.recv_topk_weights)
        return baselines.combine(transport, y, out.plan, axis_name=AXIS).combined_x

    return layer


def _with_backward(layer):
    """The layer's forward and backward: gradients of a sum of squares w.r.t. the parameters and `x`."""
    def loss(params, x, idx, w, lay):
        return jnp.sum(jnp.square(layer(params, x, idx, w, lay).astype(jnp.float32)))

    return jax.grad(loss, argnums=(0, 1))


def _relative_diff(a, b) -> float:
    a, b = local_ranks(a).astype(np.float64), local_ranks(b).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bench_moe(runner: Runner, mesh: Mesh, sizes: Sizes, args):
    """The MoE-layer table (see the module docstring); returns the Buffer."""
    E = sizes.num_experts
    sets = _input_sets(mesh, sizes, args)
    params = _expert_params(mesh, sizes, args.moe_ffn, args.seed)
    buffer = _normal_buffer(mesh, sizes, args, row_bytes=GROUPED_COMBINE_CHANNEL_BYTES)  # the grouped layout's combine
    layout_fn = per_rank(mesh, lambda idx: buffer.get_dispatch_layout(idx, E))
    inputs = [(params, x, idx, w, layout_fn(idx)) for x, idx, w in sets]
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    no_collectives = "processes share a GPU: no XLA collectives" if args.shared_gpu else ""

    layers = {f"buffer[{buffer.backend.name}]/{layout}": (_buffer_layer(buffer, sizes, args.moe_ffn,
                                                                          layout == "grouped"), "")
              for layout in LAYOUTS}
    for transport in baselines.TRANSPORTS:
        skip = no_collectives or ("XLA:CPU has no ragged-all-to-all" if transport == "ragged" and on_cpu else "")
        layers[f"jax:{transport}/argsort"] = (_baseline_layer(transport, sizes), skip)

    reference_name = f"buffer[{buffer.backend.name}]/argsort"
    reference_out = per_rank(mesh, layers[reference_name][0])(*inputs[0])
    for name, (layer, skip) in layers.items():
        if not skip and args.check and name != reference_name:
            try:
                diff = _relative_diff(per_rank(mesh, layer)(*inputs[0]), reference_out)
                skip = "" if diff < 2e-2 else f"mismatch vs {reference_name}: relative difference {diff:.3g}"
            except Exception as e:  # the timing below records the failure
                print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        runner.run(Result("moe_fwd", name, "bf16"), stateless(layer), inputs, skip=skip)
        runner.run(Result("moe_fwd_bwd", name, "bf16"), stateless(_with_backward(layer)), inputs,
                   skip=skip)

    def grouped_rows(x, idx, w):
        out = buffer.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E, expert_grouped=True)
        return out.recv_x, out.num_recv_tokens_per_expert

    rows, why = [], ""
    try:
        rows = [per_rank(mesh, grouped_rows)(x, idx, w) for x, idx, w in sets]
    except Exception as e:  # a backend without expert-grouped dispatch: the ceiling is not measured
        why = f"no grouped rows: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    def experts(p, r, group_sizes):
        return moe.grouped_swiglu(p["w_gate"], p["w_up"], p["w_down"], r, group_sizes)

    runner.run(Result("experts", "ceiling", "bf16", note="the grouped matmuls alone, on rows already grouped"),
               stateless(experts), [(params, r, n) for r, n in rows], skip="" if rows else why)
    return buffer

