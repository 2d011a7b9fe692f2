"""Routing helpers that every backend shares (pure JAX and the CUDA backends alike)."""
from __future__ import annotations

import jax.numpy as jnp


def valid_expert_ids(topk_idx, num_experts: int):
    """int32 ids with anything outside [0, E) replaced by -1 (checked before narrowing int64 ids,
    which would otherwise wrap into range)."""
    return jnp.where((topk_idx >= 0) & (topk_idx < num_experts), topk_idx, -1).astype(jnp.int32)


def first_occurrences(topk_idx):
    """`topk_idx` with every repeat of an expert within a token's row set to -1 (docs/API.md), so an
    expert gets each token once and never more than M rows from one rank (low-latency mode; the CUDA
    send kernel does the same itself)."""
    top_k = topk_idx.shape[1]
    earlier = jnp.tril(jnp.ones((top_k, top_k), bool), -1)  # [k, k']: k' < k
    repeat = jnp.any((topk_idx[:, :, None] == topk_idx[:, None, :]) & earlier, axis=2)
    return jnp.where(repeat, jnp.asarray(-1, topk_idx.dtype), topk_idx)


def grouped_routing(topk_idx, num_experts: int):
    """What an expert-grouped dispatch of the CUDA kernels sends beyond a dispatch's routing: checked ids,
    each pair's prefix (how many earlier tokens of this rank name its expert; the repeats of an expert
    within a token share their first's), and per expert the tokens naming it (repeats once), which the
    count exchange sends."""
    ids = valid_expert_ids(topk_idx, num_experts)
    num_tokens, top_k = ids.shape
    first_k = jnp.argmax(ids[:, :, None] == ids[:, None, :], axis=2)  # the first k' naming the same id
    first = (ids >= 0) & (first_k == jnp.arange(top_k))
    # Sorting the first occurrences by expert (stable: by token within an expert) ranks each among its
    # expert's: int32 keys of T * K pairs, never the token rows.
    key = jnp.where(first, ids, num_experts).ravel()
    order = jnp.argsort(key, stable=True)
    position = jnp.zeros(key.shape, jnp.int32).at[order].set(jnp.arange(key.size, dtype=jnp.int32))
    counts = jnp.bincount(key, length=num_experts + 1).astype(jnp.int32)
    starts = jnp.cumsum(counts, dtype=jnp.int32) - counts
    prefix = (position - starts[key]).reshape(num_tokens, top_k)
    return ids, jnp.take_along_axis(prefix, first_k, axis=1), counts[:num_experts]
