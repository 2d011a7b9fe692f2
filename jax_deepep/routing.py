"""Routing helpers that every backend shares (pure JAX and the CUDA backends alike)."""
from __future__ import annotations

import jax.numpy as jnp


def valid_expert_ids(topk_idx, num_experts: int):
    """int32 ids with anything outside [0, E) replaced by -1 (checked before narrowing int64 ids,
    which would otherwise wrap into range)."""
    return jnp.where((topk_idx >= 0) & (topk_idx < num_experts), topk_idx, -1).astype(jnp.int32)
