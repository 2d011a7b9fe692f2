"""Rounding that XLA keeps.

XLA:GPU removes convert pairs such as f32 -> bf16 -> f32 (its SimplifyFPConversions pass), so a
value rounded to bf16 and read back as f32 silently keeps its full precision there, while on CPU,
and after our CUDA kernels, it is rounded. Code that must match the kernels' results (the pure-JAX
reference ops, the dense twin of the MoE layer) rounds through an optimization barrier instead.
"""
from __future__ import annotations

import jax


def round_to(x, dtype):
    """`x.astype(dtype)` that a later upcast cannot undo."""
    return jax.lax.optimization_barrier(x.astype(dtype))
