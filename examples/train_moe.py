"""Train a small MoE language model with expert parallelism on synthetic data.

    python examples/train_moe.py --short                       # CI: a few steps on 8 CPU devices
    python examples/train_moe.py --data_parallel=2 --steps=200 # (data=2, expert=devices/2) mesh

Decoder blocks of causal attention + an expert-parallel MoE (jax_deepep.moe) on a (data, expert)
mesh: tokens split over both axes, experts over the expert axis, everything else replicated.
Logs the loss, tokens/s, and the share of the step spent in dispatch/combine, estimated as the
time saved by a step whose dispatch/combine are replaced by an identity of the same shapes.

Multi-host: `--distributed` calls `jax.distributed.initialize` (with --coordinator_address,
--num_processes, --process_id when given, otherwise from the cluster environment); every process
feeds only its own devices' share of the batch.
"""
from __future__ import annotations

import dataclasses
import time

import common  # examples/common.py; before jax

common.default_to_8_cpu_devices()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_deepep as deepep
from jax_deepep import moe

FLAGS = flags.FLAGS
common.define_model_flags(flags, vocab=256, topk=2)
common.define_training_flags(flags, steps=100)
flags.DEFINE_integer("batch_per_device", 8, "sequences per device per step")
flags.DEFINE_integer("seq_len", 64, "tokens per sequence")
flags.DEFINE_integer("heads", 4, "attention heads")
flags.DEFINE_enum("score_func", "softmax", moe.SCORE_FUNCS, "router scores")
flags.DEFINE_bool("fp8", False, "dispatch tokens as FP8")
flags.DEFINE_float("aux_loss_weight", 0.01, "weight of the load-balancing loss")
flags.DEFINE_float("learning_rate", 3e-3, "peak AdamW learning rate")
flags.DEFINE_integer("log_every", 10, "log every N steps")
flags.DEFINE_integer("timing_steps", 5, "steps timed for the dispatch/combine share")
common.define_distributed_flags(flags)

DATA, EXPERT = common.DATA, common.EXPERT
TOKENS = P((DATA, EXPERT))  # batch dimension split over every device


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab: int
    seq_len: int
    heads: int
    layers: int
    moe: moe.MoEConfig


# ---- model ----------------------------------------------------------------------------------------

def init_params(key, config: ModelConfig) -> dict:
    h = config.moe.hidden
    keys = jax.random.split(key, config.layers + 2)

    def block(k):
        k_qkv, k_out, k_moe = jax.random.split(k, 3)
        return {"attn_norm": jnp.ones((h,)), "qkv": jax.random.normal(k_qkv, (h, 3 * h)) / np.sqrt(h),
                "out": jax.random.normal(k_out, (h, h)) / np.sqrt(h), "moe_norm": jnp.ones((h,)),
                "moe": moe.init_params(k_moe, config.moe)}

    return {"embed": jax.random.normal(keys[0], (config.vocab, h)),
            "blocks": [block(k) for k in keys[2:]],
            "final_norm": jnp.ones((h,)),
            "unembed": jax.random.normal(keys[1], (h, config.vocab)) / np.sqrt(h)}


def param_specs(config: ModelConfig) -> dict:
    """Experts over the expert axis, everything else replicated."""
    replicated = P()
    block = {"attn_norm": replicated, "qkv": replicated, "out": replicated, "moe_norm": replicated,
             "moe": moe.param_specs(EXPERT)}
    return {"embed": replicated, "blocks": [block] * config.layers, "final_norm": replicated,
            "unembed": replicated}


def rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def causal_attention(x, qkv_weight, out_weight, heads: int):
    batch, seq, hidden = x.shape
    q, k, v = jnp.split(x @ qkv_weight, 3, axis=-1)
    q, k, v = (a.reshape(batch, seq, heads, hidden // heads) for a in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hidden // heads)
    causal = jnp.tril(jnp.ones((seq, seq), jnp.bool_))
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, hidden) @ out_weight


def moe_without_exchange(params, x, routing: moe.Routing, config: moe.MoEConfig, num_ranks: int):
    """The MoE of one shard with dispatch/combine replaced by an identity of the same shapes: each rank
    keeps its tokens and sends expert e to local expert e mod E_l. Same expert compute, no exchange."""
    num_tokens = x.shape[0]
    capacity = config.capacity or num_ranks * num_tokens
    num_local = config.num_experts // num_ranks
    pad = ((0, capacity - num_tokens), (0, 0))
    recv_idx = jnp.pad(jnp.where(routing.topk_idx >= 0, routing.topk_idx % num_local, -1), pad, constant_values=-1)
    recv_x = jnp.pad(x, pad)
    y = moe.local_experts(params, recv_x, recv_idx, jnp.pad(routing.topk_weights, pad))
    return y[:num_tokens]


def forward_loss(params, tokens, buffer: deepep.Buffer, config: ModelConfig, exchange: bool):
    """Per shard: mean next-token cross entropy + weighted load-balancing loss, over all shards."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    x = params["embed"][inputs]
    aux = 0.0
    for block in params["blocks"]:
        x = x + causal_attention(rms_norm(x, block["attn_norm"]), block["qkv"], block["out"], config.heads)
        h = rms_norm(x, block["moe_norm"]).reshape(-1, x.shape[-1]).astype(jnp.bfloat16)
        routing = moe.route(block["moe"]["router"], h, config.moe)
        if exchange:
            y = moe.moe_from_routing(block["moe"], h, routing, buffer, config.moe)
        else:
            y = moe_without_exchange(block["moe"], h, routing, config.moe, buffer.num_ranks)
        x = x + y.astype(jnp.float32).reshape(x.shape)
        aux = aux + moe.load_balancing_loss(routing, config.moe.num_experts)
    logits = rms_norm(x, params["final_norm"]) @ params["unembed"]
    cross_entropy = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    axes = (DATA, EXPERT)
    num_shards = jax.lax.psum(1, axes)
    return (jax.lax.psum(cross_entropy, axes) / num_shards,
            jax.lax.psum(aux / config.layers, axes) / num_shards)


# ---- data -----------------------------------------------------------------------------------------

class SyntheticText:
    """Sequences from a fixed random Markov chain: each token has one likely successor (p = 0.8),
    otherwise uniform. A model can get the loss down to the chain's entropy."""

    def __init__(self, vocab: int, seq_len: int, seed: int):
        self.vocab, self.seq_len = vocab, seq_len
        self.successor = np.random.default_rng(seed).permutation(vocab)
        self.rng = np.random.default_rng([seed, jax.process_index()])  # each process its own stream

    def entropy(self) -> float:
        p_top = 0.8 + 0.2 / self.vocab
        p_rest = 0.2 / self.vocab
        return float(-(p_top * np.log(p_top) + (self.vocab - 1) * p_rest * np.log(p_rest)))

    def batch(self, num_sequences: int) -> np.ndarray:
        tokens = np.empty((num_sequences, self.seq_len + 1), np.int32)
        tokens[:, 0] = self.rng.integers(0, self.vocab, num_sequences)
        for t in range(1, self.seq_len + 1):
            follow = self.rng.random(num_sequences) < 0.8
            tokens[:, t] = np.where(follow, self.successor[tokens[:, t - 1]],
                                    self.rng.integers(0, self.vocab, num_sequences))
        return tokens


# ---- training -------------------------------------------------------------------------------------

def options() -> dict:
    """The flags, with --short shrinking everything for CI."""
    names = ("steps", "batch_per_device", "seq_len", "vocab", "hidden", "heads", "ffn", "experts", "topk", "layers",
             "log_every", "timing_steps")
    values = {name: FLAGS[name].value for name in names}
    if FLAGS.short:
        values.update(steps=6, batch_per_device=2, seq_len=16, vocab=64, hidden=128, heads=2, ffn=128, experts=8,
                      layers=1, log_every=2, timing_steps=2)
    return values


def main(argv):
    del argv
    common.join_job(flags)
    opts = options()
    devices = jax.devices()
    mesh = common.data_expert_mesh(FLAGS.data_parallel)
    buffer = deepep.Buffer(mesh, EXPERT)
    config = ModelConfig(vocab=opts["vocab"], seq_len=opts["seq_len"], heads=opts["heads"], layers=opts["layers"],
                         moe=moe.MoEConfig(hidden=opts["hidden"], ffn_hidden=opts["ffn"], num_experts=opts["experts"],
                                           top_k=opts["topk"], score_func=FLAGS.score_func, use_fp8=FLAGS.fp8))
    logging.info("%d processes, %d x %s devices, mesh %s, jax_deepep backend %s", jax.process_count(), len(devices),
                 devices[0].platform, dict(mesh.shape), buffer.backend.name)

    specs = param_specs(config)
    param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    replicated = NamedSharding(mesh, P())
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, FLAGS.learning_rate, max(1, opts["steps"] // 10),
                                                               max(2, opts["steps"])))
    params = jax.jit(init_params, static_argnums=1, out_shardings=param_shardings)(jax.random.key(FLAGS.seed), config)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, sharding: sharding,
                                          jax.eval_shape(optimizer.init, params), param_shardings,
                                          transform_non_params=lambda _: replicated)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    num_params = sum(a.size for a in jax.tree.leaves(params))
    logging.info("%.2fM parameters, %d layers of %d experts (top-%d), %s dispatch", num_params / 1e6,
                 config.layers, config.moe.num_experts, config.moe.top_k, "FP8" if FLAGS.fp8 else "bf16")

    def make_train_step(exchange: bool):
        def loss_fn(params, tokens):
            per_shard = jax.shard_map(
                lambda p, t: forward_loss(p, t, buffer, config, exchange), mesh=mesh,
                in_specs=(specs, TOKENS), out_specs=(P(), P()))
            cross_entropy, aux = per_shard(params, tokens)
            return cross_entropy + FLAGS.aux_loss_weight * aux, (cross_entropy, aux)

        def train_step(params, opt_state, tokens):
            (_, (cross_entropy, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, cross_entropy, aux

        return jax.jit(train_step, out_shardings=(param_shardings, opt_shardings, replicated, replicated))

    train_step = make_train_step(exchange=True)
    data = SyntheticText(config.vocab, config.seq_len, FLAGS.seed)
    token_sharding = NamedSharding(mesh, TOKENS)
    local_sequences = opts["batch_per_device"] * jax.local_device_count()
    global_tokens = opts["batch_per_device"] * len(devices) * config.seq_len

    def next_batch():
        return jax.make_array_from_process_local_data(token_sharding, data.batch(local_sequences))

    logging.info("synthetic text: %d tokens/step, loss floor (chain entropy) %.3f", global_tokens, data.entropy())
    step_times = []
    for step in range(opts["steps"]):
        batch = next_batch()
        start = time.perf_counter()
        params, opt_state, cross_entropy, aux = jax.block_until_ready(train_step(params, opt_state, batch))
        step_times.append(time.perf_counter() - start)
        if step % opts["log_every"] == 0 or step == opts["steps"] - 1:
            logging.info("step %4d  loss %.4f  balance %.3f  %8.0f tokens/s%s", step, float(cross_entropy),
                         float(aux), global_tokens / step_times[-1], "  (compiles)" if step == 0 else "")

    measure_exchange_share(make_train_step(exchange=False), train_step, params, opt_state, next_batch(),
                           opts["timing_steps"], global_tokens)
    buffer.destroy()


def measure_exchange_share(identity_step, train_step, params, opt_state, batch, repeats: int, global_tokens: int):
    """Dispatch/combine share = 1 - (step time with them replaced by identity) / (step time)."""
    def best_time(step_fn):
        jax.block_until_ready(step_fn(params, opt_state, batch))  # compiled, warm
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(step_fn(params, opt_state, batch))
            times.append(time.perf_counter() - start)
        return min(times)

    with_exchange, without = best_time(train_step), best_time(identity_step)
    logging.info("step %.1f ms (%.0f tokens/s); with dispatch/combine replaced by identity %.1f ms: "
                 "dispatch/combine share of the step %.0f%%", 1e3 * with_exchange, global_tokens / with_exchange,
                 1e3 * without, 100 * max(0.0, 1 - without / with_exchange))


if __name__ == "__main__":
    app.run(main)
