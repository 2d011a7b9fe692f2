"""Greedy decoding with a small MoE model on the low-latency ops (inference).

    python examples/serve_moe.py --short            # CI: a few steps on 8 CPU devices, checked densely
    python examples/serve_moe.py --steps=64 --batch_per_device=32

One process drives every local device (JAX's default on one host); with --distributed it is one process of
a job (--coordinator_address, --num_processes, --process_id, or the cluster's environment), for instance
one per GPU, and the expert axis spans every process's devices.

Each device serves its own batch of sequences. Every decoder block runs attention over a KV cache,
then the MoE through `low_latency_dispatch(..., return_recv_hook=True)`: the sends are issued, the
block's shared expert is computed while tokens are in flight, `buffer.low_latency_recv` completes
the receive, the routed experts run on their `[E_l, R * M, H]` blocks, and `low_latency_combine`
(again split by the recv hook) brings the results back. With --check every step's logits are
compared with the same model computed densely on one device of each process, for that process's
sequences (no dispatch/combine), stepping from the same KV cache, so the comparison measures each
step's error rather than 32 steps of drift; and each of its MoE layers takes the expert-parallel
step's input to that layer, so it measures each layer's own error: FP8's rounding steps would
otherwise turn ulp-level differences upstream of a layer (matmuls of other shapes, sums in another
order) into logit differences of about 1e-2.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import common  # examples/common.py; before jax

common.default_to_8_cpu_devices()

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_deepep as deepep
from jax_deepep import moe
from jax_deepep.rounding import round_to

FLAGS = flags.FLAGS
common.define_model_flags(flags, vocab=512, topk=4, hidden_note=" (a multiple of 128 for FP8)")
flags.DEFINE_bool("short", False, "tiny model, few steps, --check on (CI)")
flags.DEFINE_integer("steps", 32, "tokens generated per sequence")
flags.DEFINE_integer("batch_per_device", 16, "sequences decoded per device (tokens per rank per step)")
flags.DEFINE_integer("heads", 4, "attention heads")
flags.DEFINE_bool("fp8", True, "dispatch tokens as FP8")
flags.DEFINE_bool("check", False, "compare every step's logits with the dense model")
flags.DEFINE_float("check_rtol", 1e-2, "allowed relative logit difference with --check")
common.define_distributed_flags(flags)

AXIS = "ep"
SEQUENCES = P(AXIS)  # each device decodes its own sequences


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab: int
    heads: int
    layers: int
    max_len: int  # KV cache length
    moe: moe.MoEConfig


def init_params(key, config: ModelConfig) -> dict:
    h, f = config.moe.hidden, config.moe.ffn_hidden
    keys = jax.random.split(key, config.layers + 2)

    def block(k):
        k_qkv, k_out, k_moe, k_gate, k_up, k_down = jax.random.split(k, 6)
        shared = {"w_gate": jax.random.normal(k_gate, (h, f)) / np.sqrt(h),
                  "w_up": jax.random.normal(k_up, (h, f)) / np.sqrt(h),
                  "w_down": jax.random.normal(k_down, (f, h)) / np.sqrt(f)}
        return {"attn_norm": jnp.ones((h,)), "qkv": jax.random.normal(k_qkv, (h, 3 * h)) / np.sqrt(h),
                "out": jax.random.normal(k_out, (h, h)) / np.sqrt(h), "moe_norm": jnp.ones((h,)),
                "moe": moe.init_params(k_moe, config.moe), "shared": shared}

    return {"embed": jax.random.normal(keys[0], (config.vocab, h)), "blocks": [block(k) for k in keys[2:]],
            "final_norm": jnp.ones((h,)), "unembed": jax.random.normal(keys[1], (h, config.vocab)) / np.sqrt(h)}


def param_specs(config: ModelConfig) -> dict:
    replicated = P()
    block = {"attn_norm": replicated, "qkv": replicated, "out": replicated, "moe_norm": replicated,
             "moe": moe.param_specs(AXIS), "shared": {"w_gate": replicated, "w_up": replicated, "w_down": replicated}}
    return {"embed": replicated, "blocks": [block] * config.layers, "final_norm": replicated, "unembed": replicated}


def empty_cache(num_sequences: int, config: ModelConfig) -> dict:
    head_dim = config.moe.hidden // config.heads
    shape = (config.layers, num_sequences, config.max_len, config.heads, head_dim)
    return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}


CACHE_SPECS = {"k": P(None, AXIS), "v": P(None, AXIS)}


def rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def attend(x, block, cache_k, cache_v, position, heads: int):
    """One new token per sequence against the KV cache: (output [B, H], updated cache_k, cache_v)."""
    batch, hidden = x.shape
    q, k, v = (a.reshape(batch, heads, hidden // heads) for a in jnp.split(x @ block["qkv"], 3, axis=-1))
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k[:, None], position, axis=1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v[:, None], position, axis=1)
    logits = jnp.einsum("bhd,bshd->bhs", q, cache_k) / np.sqrt(hidden // heads)
    visible = jnp.arange(cache_k.shape[1]) <= position
    weights = jax.nn.softmax(jnp.where(visible, logits, -1e30), axis=-1)
    out = jnp.einsum("bhs,bshd->bhd", weights, cache_v).reshape(batch, hidden)
    return out @ block["out"], cache_k, cache_v


def shared_expert(shared: dict, h):
    return moe.swiglu(shared["w_gate"], shared["w_up"], shared["w_down"], h)


def decode_step(params, cache, tokens, position, config: ModelConfig, mixture, moe_inputs=None):
    """(logits of the next token for each sequence, the updated cache, each MoE layer's input
    `[layers, B, H]` bf16); `mixture(block, h)` is routed + shared experts. Given `moe_inputs`, the MoE
    layers take those instead of computing their own (--check feeds the dense model so)."""
    x = params["embed"][tokens]
    new_k, new_v, inputs = [], [], []
    for layer, block in enumerate(params["blocks"]):
        attn, k, v = attend(rms_norm(x, block["attn_norm"]), block, cache["k"][layer], cache["v"][layer], position,
                            config.heads)
        x = x + attn
        new_k.append(k)
        new_v.append(v)
        if moe_inputs is None:
            # Rounded for good: the kernels read this bf16 `h` from memory, and the router must see the
            # same values (XLA:GPU would fold the `astype` into the router's f32 matmul input).
            h = round_to(rms_norm(x, block["moe_norm"]), jnp.bfloat16)
        else:
            h = moe_inputs[layer]
        inputs.append(h)
        x = x + mixture(block, h).astype(jnp.float32)
    logits = rms_norm(x, params["final_norm"]) @ params["unembed"]
    return logits, {"k": jnp.stack(new_k), "v": jnp.stack(new_v)}, jnp.stack(inputs)


def expert_parallel_mixture(buffer: deepep.Buffer, config: moe.MoEConfig, max_tokens: int):
    """Per shard: routed experts on the low-latency ops, the shared expert overlapping the dispatch."""
    def mixture(block, h):
        routed, shared = moe.low_latency_moe(block["moe"], h, buffer, config,
                                             num_max_dispatch_tokens_per_rank=max_tokens,
                                             overlap=lambda: shared_expert(block["shared"], h))
        return routed.astype(jnp.float32) + shared
    return mixture


def dense_mixture(config: moe.MoEConfig):
    def mixture(block, h):
        routed = moe.dense_moe(block["moe"], h, config, bf16_expert_outputs=True)  # as the low-latency path rounds
        return routed.astype(jnp.float32) + shared_expert(block["shared"], h)
    return mixture


def relative_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv):
    del argv
    common.join_job(flags)
    steps, batch, vocab, hidden, heads, ffn, experts, topk, layers = (
        FLAGS.steps, FLAGS.batch_per_device, FLAGS.vocab, FLAGS.hidden, FLAGS.heads, FLAGS.ffn, FLAGS.experts,
        FLAGS.topk, FLAGS.layers)
    check = FLAGS.check or FLAGS.short
    if check:  # f32 matmuls in full precision (GPUs default to TF32), so the comparison sees dispatch/combine only
        jax.config.update("jax_default_matmul_precision", "highest")
    if FLAGS.short:
        steps, batch, vocab, hidden, heads, ffn, experts, topk, layers = 4, 4, 64, 128, 2, 128, 8, 2, 2
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    config = ModelConfig(vocab=vocab, heads=heads, layers=layers, max_len=steps + 1,
                         moe=moe.MoEConfig(hidden=hidden, ffn_hidden=ffn, num_experts=experts, top_k=topk,
                                           use_fp8=FLAGS.fp8))
    # M = the tokens each rank sends per step: its batch.
    rdma_bytes = deepep.Buffer.get_low_latency_rdma_size_hint(batch, hidden, len(devices), experts)
    buffer = deepep.Buffer(mesh, AXIS, low_latency_mode=True, num_rdma_bytes=rdma_bytes)
    logging.info("%d processes, %d x %s devices, jax_deepep backend %s; %d layers, %d experts (top-%d), %s dispatch, "
                 "%d sequences/device", jax.process_count(), len(devices), devices[0].platform, buffer.backend.name,
                 layers, experts, topk, "FP8" if FLAGS.fp8 else "bf16", batch)

    specs = param_specs(config)
    def on_mesh(spec_tree):
        return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree)

    # Made by programs over the whole mesh, so every process holds its devices' shards.
    num_sequences, seed = batch * len(devices), FLAGS.seed
    params = jax.jit(lambda: init_params(jax.random.key(seed), config), out_shardings=on_mesh(specs))()
    cache = jax.jit(lambda: empty_cache(num_sequences, config), out_shardings=on_mesh(CACHE_SPECS))()
    tokens = jax.jit(lambda: jax.random.randint(jax.random.key(seed + 1), (num_sequences,), 0, vocab, jnp.int32),
                     out_shardings=NamedSharding(mesh, SEQUENCES))()

    mixture = expert_parallel_mixture(buffer, config.moe, batch)
    step_fn = jax.jit(jax.shard_map(
        lambda p, c, t, pos: decode_step(p, c, t, pos, config, mixture), mesh=mesh,
        in_specs=(specs, CACHE_SPECS, SEQUENCES, P()), out_specs=(SEQUENCES, CACHE_SPECS, P(None, AXIS))))
    dense_step = jax.jit(lambda p, c, t, h, pos: decode_step(p, c, t, pos, config, dense_mixture(config.moe), h))
    # The dense model runs on one device of each process, on the process's own sequences: its parameters
    # come from the same seed, and the sequences' rows are the process's shards. No XLA collective, which
    # processes sharing one GPU lack, moves values between the processes.
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    dense_params = jax.jit(lambda: init_params(jax.random.key(seed), config), out_shardings=single)() if check else None

    def own(values, specs):
        return multihost_utils.global_array_to_host_local_array(values, mesh, specs)

    generated, times, worst = [], [], 0.0
    for position in range(steps):
        start = time.perf_counter()
        logits, next_cache, moe_inputs = jax.block_until_ready(step_fn(params, cache, tokens, position))
        times.append(time.perf_counter() - start)
        if check:  # the dense step starts from the same cache, tokens and MoE inputs: no difference compounds
            *inputs, expert_parallel = own((cache, tokens, moe_inputs, logits),
                                           (CACHE_SPECS, SEQUENCES, P(None, AXIS), SEQUENCES))
            dense_logits, _, _ = dense_step(dense_params, *jax.device_put(inputs, single), position)
            worst = max(worst, relative_diff(expert_parallel, dense_logits))
        cache = next_cache
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        generated.append(own(tokens, SEQUENCES))
    steady = min(times[1:]) if steps > 1 else times[0]
    logging.info("decoded %d steps: first step %.0f ms (compiles), then %.2f ms/step, %.0f tokens/s over %d sequences",
                 steps, 1e3 * times[0], 1e3 * steady, num_sequences / steady, num_sequences)
    first = jax.process_index() * batch * jax.local_device_count()  # this process's first sequence
    logging.info("sequence %d: %s", first, " ".join(str(int(g[0])) for g in generated))
    buffer.destroy()
    if check:
        logging.info("largest relative logit difference, expert-parallel vs dense: %.2e (allowed %.0e)", worst,
                     FLAGS.check_rtol)
        if not worst <= FLAGS.check_rtol:
            logging.error("expert-parallel decoding disagrees with the dense model")
            sys.exit(1)


if __name__ == "__main__":
    app.run(main)
