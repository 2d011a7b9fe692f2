"""What the example scripts share: 8 virtual CPU devices by default, and the model-size flags."""
from __future__ import annotations

import os


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
