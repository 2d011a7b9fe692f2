"""An expert-parallel Mixture-of-Experts layer on top of `Buffer.dispatch` / `Buffer.combine`.

    router -> top-k -> dispatch (bf16 or FP8) -> grouped SwiGLU experts -> combine

The dispatch receives its rows grouped by expert (`expert_grouped=True`), ready for `ragged_dot`, and
the combine weights them; where the Buffer's backend cannot group (the CUDA kernels, for now) or with
`MoEConfig(expert_grouped=False)`, the rows come by source and `group_by_expert` sorts them instead.

Parameters are plain dicts of arrays (`init_params`); the expert weights are sharded over the
expert-parallel mesh axis (`param_specs`), the router is replicated. `moe_layer` runs per shard,
inside `jax.shard_map` over (at least) the buffer's axis; `low_latency_moe` is the decoding variant
on the low-latency ops; `dense_moe` is the same model without expert parallelism, for checking.

Precision is the same on every path: bf16 matmul inputs with f32 accumulation, router in f32.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .buffer import Buffer
from .fp8 import per_block_cast_back, per_block_cast_to_fp8
from .rounding import round_to
from .types import DispatchOutput, ExpertGroupedHandle

SCORE_FUNCS = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    hidden: int
    ffn_hidden: int  # width of each expert's SwiGLU
    num_experts: int
    top_k: int
    score_func: str = "softmax"  # "softmax" or "sigmoid" router scores
    normalize_topk: bool = True  # rescale the k chosen scores to sum to 1
    use_fp8: bool = False  # dispatch tokens as per-128-channel FP8 (gradients still flow, in bf16)
    capacity: Optional[int] = None  # receive rows per rank (`num_worst_tokens`); None: nothing dropped
    # Receive rows grouped by expert: None where the Buffer's normal-mode backend can, True (a DeepEPError
    # where it cannot), False for rows by source sorted by `group_by_expert` (the layout before grouping).
    expert_grouped: Optional[bool] = None

    def __post_init__(self):
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"MoEConfig: `score_func` must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"MoEConfig: `top_k` must be in [1, num_experts={self.num_experts}], got {self.top_k}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """The router's choice for each token."""

    topk_idx: jax.Array  # i32[T, K], -1 for tokens that are not routed (masked out)
    topk_weights: jax.Array  # f32[T, K], 0 where topk_idx == -1
    scores: jax.Array  # f32[T, E], the full score matrix (for auxiliary losses)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertGroups:
    """(row, k) pairs of a receive buffer, sorted by local expert, for a grouped matmul."""

    rows: jax.Array  # i32[P]: receive row of each pair
    weights: jax.Array  # f32[P]: router weight of each pair, 0 for pairs of no local expert
    group_sizes: jax.Array  # i32[E_l]: pairs per local expert; pairs past their sum belong to none


# ---- parameters ---------------------------------------------------------------------------------

def init_params(key, config: MoEConfig) -> dict:
    """f32 parameters: `router [H, E]`, `w_gate`/`w_up [E, H, F]`, `w_down [E, F, H]`."""
    h, f, e = config.hidden, config.ffn_hidden, config.num_experts
    k_router, k_gate, k_up, k_down = jax.random.split(key, 4)

    def normal(k, shape, fan_in):
        return jax.random.normal(k, shape, jnp.float32) / jnp.sqrt(fan_in)

    return {
        "router": normal(k_router, (h, e), h),
        "w_gate": normal(k_gate, (e, h, f), h),
        "w_up": normal(k_up, (e, h, f), h),
        "w_down": normal(k_down, (e, f, h), f),
    }


def param_specs(expert_axis: str) -> dict:
    """PartitionSpecs: experts split over `expert_axis` (expert e on rank e // E_l), router replicated."""
    return {"router": P(), "w_gate": P(expert_axis), "w_up": P(expert_axis), "w_down": P(expert_axis)}


def _param_shardings(mesh, expert_axis: str) -> dict:
    return {name: NamedSharding(mesh, spec) for name, spec in param_specs(expert_axis).items()}


def shard_params(params: dict, mesh, expert_axis: str) -> dict:
    """`params` (the same values in every process) placed on `mesh` with `param_specs`."""
    shardings = _param_shardings(mesh, expert_axis)
    return {name: jax.device_put(value, shardings[name]) for name, value in params.items()}


def init_sharded_params(key, config: MoEConfig, mesh, expert_axis: str) -> dict:
    """`shard_params(init_params(key, config), ...)`, made where the values live: each device computes
    its own experts. No full copy exists anywhere, and in a job of several processes no check that
    every process holds the same values (which `device_put` runs as an all-gather of each array).
    The draws are the same; the values may differ in the last f32 bit, as any jitted `init_params`'s
    (XLA fuses the normal distribution's arithmetic)."""
    return jax.jit(lambda: init_params(key, config), out_shardings=_param_shardings(mesh, expert_axis))()


# ---- router -------------------------------------------------------------------------------------

def route(router, x, config: MoEConfig, token_mask=None) -> Routing:
    """Scores in f32, top-k, optional renormalisation; tokens where `token_mask` is False get -1."""
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32))
    if config.score_func == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
    topk_weights, topk_idx = jax.lax.top_k(scores, config.top_k)
    if config.normalize_topk:
        topk_weights = topk_weights / jnp.sum(topk_weights, axis=-1, keepdims=True)
    topk_idx = topk_idx.astype(jnp.int32)
    if token_mask is not None:
        topk_idx = jnp.where(token_mask[:, None], topk_idx, -1)
        topk_weights = jnp.where(token_mask[:, None], topk_weights, 0.0)
    return Routing(topk_idx, topk_weights, scores)


def load_balancing_loss(routing: Routing, num_experts: int):
    """Switch-Transformer auxiliary loss, E * sum_e (share of routed pairs to e) * (mean score of e);
    1 when perfectly balanced. Over this shard's routed tokens."""
    routed = routing.topk_idx >= 0
    pairs = jnp.sum(jax.nn.one_hot(routing.topk_idx, num_experts, dtype=jnp.float32), axis=(0, 1))
    share = pairs / jnp.maximum(jnp.sum(routed), 1)
    token_routed = jnp.any(routed, axis=1, keepdims=True)
    probs = routing.scores / jnp.sum(routing.scores, axis=-1, keepdims=True)
    mean_prob = jnp.sum(jnp.where(token_routed, probs, 0.0), axis=0) / jnp.maximum(jnp.sum(token_routed), 1)
    return num_experts * jnp.sum(share * mean_prob)


# ---- experts ------------------------------------------------------------------------------------

def group_by_expert(recv_topk_idx, recv_topk_weights, num_local_experts: int,
                    max_pairs: Optional[int] = None) -> ExpertGroups:
    """Sort the (row, k) pairs of a receive buffer by local expert (receive rows come by source).

    Pairs of no local expert sort last; `max_pairs` keeps only the first that many.
    """
    num_rows, top_k = recv_topk_idx.shape
    expert = jnp.where(recv_topk_idx >= 0, recv_topk_idx, num_local_experts).ravel()
    order = jnp.argsort(expert, stable=True)[:max_pairs]
    group_sizes = jnp.bincount(expert, length=num_local_experts + 1)[:num_local_experts].astype(jnp.int32)
    weights = jnp.where(recv_topk_idx >= 0, recv_topk_weights, 0.0).ravel()
    return ExpertGroups(rows=(order // top_k).astype(jnp.int32), weights=weights[order], group_sizes=group_sizes)


def grouped_swiglu(w_gate, w_up, w_down, rows, group_sizes, out_dtype=jnp.float32):
    """SwiGLU of each row with its group's expert: `rows [P, H]` sorted by group -> `[P, H]` of
    `out_dtype` (the last matmul's f32 sum, rounded once).

    Rows past `sum(group_sizes)` give zeros.
    """
    dot = functools.partial(jax.lax.ragged_dot, group_sizes=group_sizes, preferred_element_type=jnp.float32)
    rows = rows.astype(jnp.bfloat16)
    gate = dot(rows, w_gate.astype(jnp.bfloat16))
    up = dot(rows, w_up.astype(jnp.bfloat16))
    hidden = (jax.nn.silu(gate) * up).astype(jnp.bfloat16)
    return dot(hidden, w_down.astype(jnp.bfloat16), preferred_element_type=out_dtype)


def swiglu(w_gate, w_up, w_down, x):
    """SwiGLU of every row of `x [..., H]` with one expert, at the precision of `grouped_swiglu`."""
    x = x.astype(jnp.bfloat16)
    gate = jnp.dot(x, w_gate.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    up = jnp.dot(x, w_up.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    hidden = (jax.nn.silu(gate) * up).astype(jnp.bfloat16)
    return jnp.dot(hidden, w_down.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def local_experts(params: dict, recv_x, recv_topk_idx, recv_topk_weights):
    """Weighted sum over k of each receive row's local experts: bf16 `[N, H]`, ready to combine.

    A token's k experts must be distinct (as top-k picks them): then a row has at most
    min(K, E_l) local pairs, and only N * min(K, E_l) rows go through the expert matmuls.
    """
    num_local_experts = params["w_gate"].shape[0]
    num_rows, top_k = recv_topk_idx.shape
    groups = group_by_expert(recv_topk_idx, recv_topk_weights, num_local_experts,
                             max_pairs=num_rows * min(top_k, num_local_experts))
    out = grouped_swiglu(params["w_gate"], params["w_up"], params["w_down"],
                         jnp.take(recv_x, groups.rows, axis=0), groups.group_sizes)
    y = jnp.zeros((recv_x.shape[0], out.shape[1]), jnp.float32)
    return y.at[groups.rows].add(out * groups.weights[:, None]).astype(jnp.bfloat16)


# ---- FP8 dispatch with a bf16 backward ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _DispatchArgs:
    buffer: Buffer
    num_experts: int
    capacity: Optional[int]
    expert_grouped: bool


def _fp8_dispatch_body(args: _DispatchArgs, x, topk_weights, topk_idx) -> DispatchOutput:
    """Dispatch `x` as FP8 and dequantise on arrival; the cotangent is a bf16 combine (FP8 has none)."""
    out = args.buffer.dispatch(per_block_cast_to_fp8(x), topk_idx=topk_idx, topk_weights=topk_weights,
                               num_experts=args.num_experts, num_worst_tokens=args.capacity,
                               expert_grouped=args.expert_grouped)
    return dataclasses.replace(out, recv_x=per_block_cast_back(*out.recv_x))


_fp8_dispatch = jax.custom_vjp(_fp8_dispatch_body, nondiff_argnums=(0,))


def _fp8_dispatch_fwd(args, x, topk_weights, topk_idx):
    # The body, not the custom_vjp: a `jax.checkpoint` policy sees the dispatch's checkpoint names.
    out = _fp8_dispatch_body(args, x, topk_weights, topk_idx)
    return out, (out.handle, out.recv_topk_idx)


def _fp8_dispatch_bwd(args, residuals, g: DispatchOutput):
    handle, recv_topk_idx = residuals
    g_weights = g.recv_topk_weights
    if isinstance(handle, ExpertGroupedHandle):
        # The pair weights reach the combine through the handle; the transpose of dispatch is unweighted.
        g_weights = g_weights + g.handle.weight
        handle = handle.with_unit_weights()
    g_weights = jnp.where(recv_topk_idx >= 0, g_weights, 0.0)
    g_x, g_topk_weights = args.buffer.combine(g.recv_x, handle, topk_weights=g_weights)
    return g_x, g_topk_weights, None


_fp8_dispatch.defvjp(_fp8_dispatch_fwd, _fp8_dispatch_bwd)


def expert_grouped(buffer: Buffer, config: MoEConfig) -> bool:
    """Whether the layer receives its rows grouped by expert (`MoEConfig.expert_grouped`)."""
    if config.expert_grouped is None:
        return buffer.normal_backend.expert_grouped is not None
    return config.expert_grouped


def _dispatch(buffer: Buffer, x, routing: Routing, config: MoEConfig, grouped: bool) -> DispatchOutput:
    if config.use_fp8:
        return _fp8_dispatch(_DispatchArgs(buffer, config.num_experts, config.capacity, grouped), x,
                             routing.topk_weights, routing.topk_idx)
    return buffer.dispatch(x, topk_idx=routing.topk_idx, topk_weights=routing.topk_weights,
                           num_experts=config.num_experts, num_worst_tokens=config.capacity, expert_grouped=grouped)


# ---- the layer ----------------------------------------------------------------------------------

def moe_layer(params: dict, x, buffer: Buffer, config: MoEConfig, token_mask=None):
    """Per shard (inside `jax.shard_map` over `buffer.axis_name`): this rank's tokens `x [T, H]` ->
    bf16 `[T, H]`. `params` holds this rank's slice of the experts (`param_specs`)."""
    x = x.astype(jnp.bfloat16)
    routing = route(params["router"], x, config, token_mask)
    return moe_from_routing(params, x, routing, buffer, config)


def moe_from_routing(params: dict, x, routing: Routing, buffer: Buffer, config: MoEConfig):
    """`moe_layer` after the router: dispatch, local experts, combine."""
    grouped = expert_grouped(buffer, config)
    out = _dispatch(buffer, x, routing, config, grouped)
    if grouped:  # each pair's output goes back as its own bf16 row; combine weights and sums them
        # (bf16 straight from the matmul, the same values as a cast after it: the backward's matmuls then
        # take the bf16 cotangent as it is, not widened to f32)
        y = grouped_swiglu(params["w_gate"], params["w_up"], params["w_down"], out.recv_x,
                           out.num_recv_tokens_per_expert, out_dtype=jnp.bfloat16)
    else:
        y = local_experts(params, out.recv_x, out.recv_topk_idx, out.recv_topk_weights)
    combined, _ = buffer.combine(y, out.handle)
    return combined


def dense_moe(params: dict, x, config: MoEConfig, token_mask=None, *, bf16_expert_outputs: bool = False):
    """The same model on one device with all experts: every expert sees every token, the router's
    weights select. For checking `moe_layer`; costs E / K times the expert compute.

    `bf16_expert_outputs=True` rounds each expert's output to bf16 before the weighted sum, as
    `low_latency_moe` does (its experts' rows travel back as bf16): without it, that rounding alone
    moves a 2-layer decoder's logits by about 2% (measured with examples/serve_moe.py)."""
    x = x.astype(jnp.bfloat16)
    routing = route(params["router"], x, config, token_mask)
    if config.use_fp8:  # the experts see what FP8 dispatch delivers; gradients pass straight through
        x = x + jax.lax.stop_gradient(per_block_cast_back(*per_block_cast_to_fp8(x)) - x)
    gates = jnp.sum(jax.nn.one_hot(routing.topk_idx, config.num_experts, dtype=jnp.float32)
                    * routing.topk_weights[..., None], axis=1)  # [T, E]; one_hot(-1) is all zeros
    every_expert = jax.vmap(swiglu, in_axes=(0, 0, 0, None))(params["w_gate"], params["w_up"], params["w_down"], x)
    if bf16_expert_outputs:
        every_expert = round_to(every_expert, jnp.bfloat16).astype(jnp.float32)
    return round_to(jnp.einsum("te,eth->th", gates, every_expert), jnp.bfloat16)


# ---- decoding on the low-latency ops --------------------------------------------------------------

def low_latency_moe(params: dict, x, buffer: Buffer, config: MoEConfig, *, num_max_dispatch_tokens_per_rank: int,
                    token_mask=None, overlap: Optional[Callable[[], Any]] = None):
    """Per shard, decoding: `x [T, H]` (T <= M) -> (bf16 `[T, H]`, result of `overlap()`).

    Uses `return_recv_hook=True`: `overlap()` (e.g. the shared expert or attention of the step) is
    traced between dispatch's send and its receive so XLA can run it while tokens are in flight.
    Experts run as one batched matmul over each expert's block of `R * M` rows. Inference only.
    """
    x = x.astype(jnp.bfloat16)
    routing = route(params["router"], x, config, token_mask)
    pending = buffer.low_latency_dispatch(x, routing.topk_idx,
                                          num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
                                          num_experts=config.num_experts, use_fp8=config.use_fp8,
                                          return_recv_hook=True)
    overlapped = overlap() if overlap is not None else None
    received = buffer.low_latency_recv(pending)
    recv_x = per_block_cast_back(*received.recv_x) if config.use_fp8 else received.recv_x
    y = jax.vmap(swiglu)(params["w_gate"], params["w_up"], params["w_down"], recv_x).astype(jnp.bfloat16)
    pending_combine = buffer.low_latency_combine(y, routing.topk_idx, routing.topk_weights, received.handle,
                                                 return_recv_hook=True)
    return buffer.low_latency_recv(pending_combine), overlapped


# ---- global arrays --------------------------------------------------------------------------------

def sharded_moe(buffer: Buffer, config: MoEConfig, *, token_axes=None, low_latency_tokens: Optional[int] = None):
    """`moe_layer` on global arrays: `f(params, x [B, H], token_mask=None) -> [B, H]`, a `jax.shard_map`
    over the buffer's mesh with the tokens split over `token_axes` (default: every mesh axis, e.g.
    (data, expert)) and the experts over the buffer's axis. Call it under `jax.jit`.

    With `low_latency_tokens=M` it runs `low_latency_moe` instead (decoding; needs a low-latency buffer).
    """
    mesh = buffer.mesh
    tokens = P(tuple(mesh.axis_names) if token_axes is None else tuple(token_axes))
    specs = param_specs(buffer.axis_name)

    def per_shard(params, x, token_mask):
        if low_latency_tokens is None:
            return moe_layer(params, x, buffer, config, token_mask)
        y, _ = low_latency_moe(params, x, buffer, config, num_max_dispatch_tokens_per_rank=low_latency_tokens,
                               token_mask=token_mask)
        return y

    def apply(params, x, token_mask=None):
        if token_mask is None:
            token_mask = jnp.ones(x.shape[:1], jnp.bool_)
        return jax.shard_map(per_shard, mesh=mesh, in_specs=(specs, tokens, tokens), out_specs=tokens)(
            params, x, token_mask)

    return apply
