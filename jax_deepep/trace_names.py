"""The names the ops leave in a trace (docs/API.md).

- Each op is traced under `jax.named_scope("deepep/<op>")`, on every backend, so the op metadata of
  HLO dumps and profiles says which op an instruction belongs to.
- The transport outputs carry `jax.ad_checkpoint.checkpoint_name`s "deepep/<op>/<output>" (listed in
  `CHECKPOINT_NAMES`), so a `jax.checkpoint` policy can save them rather than redo the communication
  in the backward pass (`jax.checkpoint_policies.save_only_these_names(*CHECKPOINT_NAMES)`), or
  recompute them to save memory (`save_any_names_but_these`).
"""
from __future__ import annotations

import functools

import jax
from jax.ad_checkpoint import checkpoint_name

_OUTPUTS = {
    "dispatch": ("recv_x", "recv_topk_idx", "recv_topk_weights", "handle"),
    "combine": ("combined_x", "combined_topk_weights"),
    "low_latency_dispatch": ("recv_x", "handle"),
    "low_latency_combine": ("combined_x",),
}

CHECKPOINT_NAMES = tuple(f"deepep/{op}/{output}" for op, outputs in _OUTPUTS.items() for output in outputs)


def scoped(op: str):
    """Decorator: trace the op under `jax.named_scope("deepep/<op>")`."""

    def wrap(fn):
        @functools.wraps(fn)
        def in_scope(*args, **kwargs):
            with jax.named_scope(f"deepep/{op}"):
                return fn(*args, **kwargs)

        return in_scope

    return wrap


def named(op: str, output: str, tree):
    """`tree` (arrays, a pytree or None) with the checkpoint name "deepep/<op>/<output>"."""
    return checkpoint_name(tree, f"deepep/{op}/{output}")
