"""What the example scripts share: 8 virtual CPU devices by default, the model-size flags, joining a
job of several processes, and the training examples' flags and (data, expert) mesh."""
from __future__ import annotations

import os

DATA, EXPERT = "data", "expert"


def default_to_8_cpu_devices():
    """8 virtual CPU devices unless asked otherwise. jax reads the flag when it creates its CPU client, so
    call this before importing jax."""
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


def define_model_flags(flags, *, vocab: int, topk: int, hidden_note: str = ""):
    """The sizes every example's MoE model takes (absl `flags`), with this example's defaults."""
    flags.DEFINE_integer("vocab", vocab, "vocabulary size")
    flags.DEFINE_integer("hidden", 256, "model width" + hidden_note)
    flags.DEFINE_integer("ffn", 512, "width of each expert's SwiGLU")
    flags.DEFINE_integer("experts", 16, "routed experts per MoE layer (divisible by the expert axis)")
    flags.DEFINE_integer("topk", topk, "routed experts per token")
    flags.DEFINE_integer("layers", 2, "MoE layers")
    flags.DEFINE_integer("seed", 0, "random seed")


def define_distributed_flags(flags):
    """The flags of a job of several processes (absl `flags`); `join_job` reads them."""
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize (several processes, one or more hosts)")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed)")
    flags.DEFINE_integer("num_processes", None, "number of processes (with --distributed)")
    flags.DEFINE_integer("process_id", None, "this process's id (with --distributed)")


def join_job(flags):
    """With --distributed, join the job (`jax.distributed.initialize`, from the three flags above when given,
    otherwise from the cluster's environment): from then on jax.devices() are every process's devices."""
    import jax

    if flags.FLAGS.distributed:
        jax.distributed.initialize(coordinator_address=flags.FLAGS.coordinator_address,
                                   num_processes=flags.FLAGS.num_processes, process_id=flags.FLAGS.process_id)


def define_training_flags(flags, *, steps: int):
    """The flags both training examples take besides the model sizes (absl `flags`)."""
    flags.DEFINE_bool("short", False, "tiny model, few steps (CI)")
    flags.DEFINE_integer("steps", steps, "training steps")
    flags.DEFINE_integer("data_parallel", 1, "size of the data axis; the expert axis takes the other devices")


def data_expert_mesh(data_parallel: int):
    """A (DATA, EXPERT) mesh over every device: `data_parallel` along DATA, the others along EXPERT."""
    import jax
    from absl import app

    devices = jax.devices()
    if len(devices) % data_parallel:
        raise app.UsageError(f"--data_parallel={data_parallel} must divide the {len(devices)} devices")
    return jax.make_mesh((data_parallel, len(devices) // data_parallel), (DATA, EXPERT),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
