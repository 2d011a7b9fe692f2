"""The main demo: train a small MoE block with expert parallelism and check every step densely.

    python -m jax_deepep.demo [--steps=6 --tokens=64 --hidden=128 --experts=16 --topk=4 ...]

Router -> top-k -> dispatch -> per-expert SwiGLU -> combine, over all local devices (8 virtual CPU
devices when there is no GPU), trained with optax. Each step's loss and gradients are compared with
the same model computed densely on the same parameters and batch (no dispatch/combine). Fresh
random tokens every step, some of them padding (routed nowhere: expert id -1). Exits 1 when
expert parallelism and the dense model disagree.
"""
from __future__ import annotations

import os

# Before jax creates its CPU client: 8 virtual devices when nothing else was asked for.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import moe
from .buffer import Buffer

# Its own flag registry: importing the demo next to other absl programs (tests, tools) cannot clash.
FLAGS = flags.FlagValues()
flags.DEFINE_integer("steps", 6, "optimizer steps", flag_values=FLAGS)
flags.DEFINE_integer("tokens", 64, "tokens per device per step", flag_values=FLAGS)
flags.DEFINE_integer("hidden", 128, "model width (a multiple of 128 for --fp8)", flag_values=FLAGS)
flags.DEFINE_integer("ffn", 256, "width of each expert's SwiGLU", flag_values=FLAGS)
flags.DEFINE_integer("experts", 16, "experts in total (divisible by the expert-parallel size)", flag_values=FLAGS)
flags.DEFINE_integer("topk", 4, "experts per token", flag_values=FLAGS)
flags.DEFINE_integer("data_parallel", 1, "size of the data axis; the expert axis takes the remaining devices",
                     flag_values=FLAGS)
flags.DEFINE_enum("score_func", "softmax", moe.SCORE_FUNCS, "router scores", flag_values=FLAGS)
flags.DEFINE_bool("fp8", False, "dispatch tokens as FP8", flag_values=FLAGS)
flags.DEFINE_float("padding", 0.125, "fraction of padding tokens (routed nowhere)", flag_values=FLAGS)
flags.DEFINE_float("learning_rate", 3e-3, "Adam learning rate", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "random seed", flag_values=FLAGS)
flags.DEFINE_float("loss_rtol", 1e-3, "allowed relative loss difference, EP vs dense", flag_values=FLAGS)
flags.DEFINE_float("grad_rtol", 1e-2, "allowed relative gradient difference (norm of the difference / norm), "
                   "per parameter; bf16 matmuls sum in different orders", flag_values=FLAGS)

DATA, EXPERT = "data", "expert"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    x: jax.Array  # bf16 [B, H]
    target: jax.Array  # f32 [B, H]
    token_mask: jax.Array  # bool [B]: False for padding


@dataclasses.dataclass(frozen=True)
class StepReport:
    step: int
    loss: float
    dense_loss: float
    loss_diff: float  # relative
    grad_diff: float  # worst parameter's relative difference
    step_seconds: float


def make_batch(key, num_tokens: int, hidden: int, padding: float, teacher) -> Batch:
    """Random tokens; the target is a fixed nonlinear map of them (something to learn)."""
    k_x, k_mask = jax.random.split(key)
    x = jax.random.normal(k_x, (num_tokens, hidden), jnp.float32)
    mask = jax.random.uniform(k_mask, (num_tokens,)) >= padding
    return Batch(x.astype(jnp.bfloat16), jnp.tanh(x @ teacher), mask)


def masked_mse(y, batch: Batch, num_real_tokens):
    err = jnp.where(batch.token_mask[:, None], y.astype(jnp.float32) - batch.target, 0.0)
    return jnp.sum(err * err) / (num_real_tokens * y.shape[-1])


def relative_diff(a, b, floor: float = 1e-30) -> float:
    """|a - b| / |b| (Frobenius norms), with |b| taken as at least `floor`."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), floor))


def gradient_diff(grads: dict, dense_grads: dict) -> float:
    """The worst parameter's relative difference. A gradient that is zero in exact arithmetic (the
    router's with top-1 and normalised weights) is compared against 1e-3 of the whole gradient."""
    floor = 1e-3 * float(np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in dense_grads.values())))
    return max(relative_diff(grads[name], dense_grads[name], floor) for name in dense_grads)


def describe_routing(params, batch: Batch, config: moe.MoEConfig, num_ranks: int) -> str:
    """How uneven the routing of `batch` is: tokens each expert rank receives, unrouted tokens."""
    idx = np.asarray(moe.route(params["router"], batch.x, config, batch.token_mask).topk_idx)
    dest = np.where(idx >= 0, idx // (config.num_experts // num_ranks), -1)
    received = [int(np.sum(np.any(dest == r, axis=1))) for r in range(num_ranks)]
    return (f"routing of step 0: tokens received per expert rank {received}; "
            f"{int(np.sum(np.all(idx < 0, axis=1)))} padding tokens routed nowhere (expert id -1)")


def run(*, steps, tokens, hidden, ffn, experts, topk, data_parallel, score_func, fp8, padding, learning_rate,
        seed, out=print) -> list:
    """Train for `steps` steps; one StepReport per step (EP and dense loss, their differences)."""
    devices = jax.devices()
    if len(devices) % data_parallel:
        raise ValueError(f"--data_parallel={data_parallel} does not divide the {len(devices)} devices")
    mesh = jax.make_mesh((data_parallel, len(devices) // data_parallel), (DATA, EXPERT),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    buffer = Buffer(mesh, EXPERT)
    config = moe.MoEConfig(hidden=hidden, ffn_hidden=ffn, num_experts=experts, top_k=topk, score_func=score_func,
                           use_fp8=fp8)
    out(f"jax {jax.__version__}, {len(devices)} x {devices[0].platform} devices, mesh {dict(mesh.shape)}; "
        f"jax_deepep backend: {buffer.backend.name}")
    out(f"MoE: {tokens} tokens/device, hidden {hidden}, ffn {ffn}, {experts} experts, top-{topk}, "
        f"{score_func} router, {'FP8' if fp8 else 'bf16'} dispatch, {padding:.1%} padding tokens")

    key_params, key_teacher, key_data = jax.random.split(jax.random.key(seed), 3)
    params = moe.init_sharded_params(key_params, config, mesh, EXPERT)
    teacher = jax.random.normal(key_teacher, (hidden, hidden), jnp.float32) / np.sqrt(hidden)
    optimizer = optax.adam(learning_rate)
    # Leaves the optimizer makes off the mesh (the step count) go on it, as train_step returns them:
    # otherwise the second step compiles again.
    replicated = NamedSharding(mesh, P())
    opt_state = jax.tree.map(lambda a: a if isinstance(a.sharding, NamedSharding) else jax.device_put(a, replicated),
                             optimizer.init(params))
    ep_moe = moe.sharded_moe(buffer, config)
    batch_sharding = Batch(*(NamedSharding(mesh, P((DATA, EXPERT))),) * 3)

    def ep_loss(params, batch: Batch):
        y = ep_moe(params, batch.x, batch.token_mask)
        return masked_mse(y, batch, jnp.sum(batch.token_mask))

    def dense_loss(params, batch: Batch):
        y = moe.dense_moe(params, batch.x, config, batch.token_mask)
        return masked_mse(y, batch, jnp.sum(batch.token_mask))

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(ep_loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    dense_value_and_grad = jax.jit(jax.value_and_grad(dense_loss))

    reports = []
    for step in range(steps):
        batch = make_batch(jax.random.fold_in(key_data, step), tokens * len(devices), hidden, padding, teacher)
        batch = jax.device_put(batch, batch_sharding)
        # The dense model runs on one device, at the parameters the EP step starts from.
        dense_params, dense_batch = jax.device_put((params, batch), devices[0])
        dense_value, dense_grads = dense_value_and_grad(dense_params, dense_batch)
        if step == 0:
            out(describe_routing(dense_params, dense_batch, config, mesh.shape[EXPERT]))
            out(f"{'step':>4} {'loss (EP)':>12} {'loss (dense)':>12} {'loss diff':>10} {'grad diff':>10} "
                f"{'step ms':>9}")
        start = time.perf_counter()
        new_params, opt_state, loss, grads = jax.block_until_ready(train_step(params, opt_state, batch))
        seconds = time.perf_counter() - start
        report = StepReport(step, float(loss), float(dense_value), relative_diff(loss, dense_value),
                            gradient_diff(grads, dense_grads), seconds)
        reports.append(report)
        out(f"{step:>4} {report.loss:>12.6f} {report.dense_loss:>12.6f} {report.loss_diff:>10.2e} "
            f"{report.grad_diff:>10.2e} {1e3 * seconds:>9.1f}" + ("  (compiles)" if step == 0 else ""))
        params = new_params
    buffer.destroy()
    return reports


def check(reports, loss_rtol: float, grad_rtol: float, out=print) -> bool:
    bad = [r for r in reports if not (r.loss_diff <= loss_rtol and r.grad_diff <= grad_rtol)]
    for r in bad:
        out(f"MISMATCH at step {r.step}: loss diff {r.loss_diff:.2e} (allowed {loss_rtol:.0e}), "
            f"grad diff {r.grad_diff:.2e} (allowed {grad_rtol:.0e})")
    if not bad:
        out(f"OK: expert-parallel loss and gradients match the dense model at every step "
            f"(loss within {loss_rtol:.0e}, gradients within {grad_rtol:.0e}); loss "
            f"{reports[0].loss:.4f} -> {reports[-1].loss:.4f}")
    return not bad


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    if any(arg in ("-h", "--help", "--helpfull") for arg in argv[1:]):
        print(f"{__doc__}\n{FLAGS.get_help()}")
        return 0
    try:
        FLAGS(argv)
    except flags.Error as error:
        print(f"{error}\n\n{FLAGS.get_help()}", file=sys.stderr)
        return 2
    options = {name: FLAGS[name].value for name in (
        "steps", "tokens", "hidden", "ffn", "experts", "topk", "data_parallel", "score_func", "fp8", "padding",
        "learning_rate", "seed")}
    reports = run(**options)
    return 0 if check(reports, FLAGS.loss_rtol, FLAGS.grad_rtol) else 1


if __name__ == "__main__":
    sys.exit(main())
