"""Train a small Flax NNX model around the expert-parallel MoE module (jax_deepep.flax.MoE) with optax.

    python examples/train_flax_moe.py --short               # CI: a few steps on 8 CPU devices
    python examples/train_flax_moe.py --data_parallel=2     # (data=2, expert=devices/2) mesh

The model embeds tokens, applies residual MoE blocks and predicts a fixed shuffle of each token
(a task every expert can learn). Tokens are split over every device, experts over the expert axis;
the whole step (forward, `nnx.value_and_grad`, AdamW update) is one `nnx.jit`.
"""
from __future__ import annotations


import common  # examples/common.py; before jax

common.default_to_8_cpu_devices()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_deepep as deepep
from jax_deepep import moe
from jax_deepep.flax import MoE

FLAGS = flags.FLAGS
common.define_model_flags(flags, vocab=512, topk=2)
common.define_training_flags(flags, steps=200)
flags.DEFINE_integer("tokens_per_device", 64, "tokens per device per step")
flags.DEFINE_float("learning_rate", 3e-3, "AdamW learning rate")
flags.DEFINE_integer("log_every", 20, "log every N steps")

DATA, EXPERT = common.DATA, common.EXPERT


class Model(nnx.Module):
    """Embedding, residual MoE blocks (RMS-normed inputs), a linear head."""

    def __init__(self, buffer: deepep.Buffer, vocab: int, layers: int, config: moe.MoEConfig, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, config.hidden, rngs=rngs)
        self.norms = nnx.List([nnx.RMSNorm(config.hidden, rngs=rngs) for _ in range(layers)])
        self.blocks = nnx.List([MoE(buffer, config, rngs=rngs) for _ in range(layers)])
        self.head = nnx.Linear(config.hidden, vocab, rngs=rngs)

    def __call__(self, tokens, mask):
        h = self.embed(tokens)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h), mask).astype(h.dtype)
        return self.head(h)


def main(argv):
    del argv
    if FLAGS.short:
        FLAGS.steps, FLAGS.tokens_per_device, FLAGS.log_every = 6, 16, 2
        FLAGS.vocab, FLAGS.hidden, FLAGS.ffn = 64, 128, 128
    mesh = common.data_expert_mesh(FLAGS.data_parallel)
    buffer = deepep.Buffer(mesh, EXPERT)
    config = moe.MoEConfig(hidden=FLAGS.hidden, ffn_hidden=FLAGS.ffn, num_experts=FLAGS.experts, top_k=FLAGS.topk)
    model = Model(buffer, FLAGS.vocab, FLAGS.layers, config, rngs=nnx.Rngs(FLAGS.seed))
    optimizer = nnx.Optimizer(model, optax.adamw(FLAGS.learning_rate), wrt=nnx.Param)
    logging.info("mesh %s, %s backend, %d parameters", dict(mesh.shape), buffer.backend.name,
                 sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))))

    @nnx.jit
    def train_step(model, optimizer, tokens, targets, mask):
        def loss_fn(model):
            logits = model(tokens, mask).astype(jnp.float32)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(FLAGS.seed)
    shuffle = rng.permutation(FLAGS.vocab).astype(np.int32)
    batch = FLAGS.tokens_per_device * mesh.size
    sharding = NamedSharding(mesh, P((DATA, EXPERT)))
    first = None
    for step in range(1, FLAGS.steps + 1):
        tokens = rng.integers(0, FLAGS.vocab, batch, dtype=np.int32)
        mask = rng.random(batch) < 0.9  # some padding tokens, routed nowhere
        tokens, targets, mask = (jax.device_put(a, sharding) for a in (tokens, shuffle[tokens], mask))
        loss = float(train_step(model, optimizer, tokens, targets, mask))
        first = loss if first is None else first
        if step % FLAGS.log_every == 0 or step == FLAGS.steps:
            logging.info("step %4d  loss %.4f", step, loss)
    logging.info("loss %.4f -> %.4f over %d steps", first, loss, FLAGS.steps)


if __name__ == "__main__":
    app.run(main)
