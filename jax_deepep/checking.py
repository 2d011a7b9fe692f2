"""Checked mode: turn bad data inside `jit` (expert ids outside [-1, E)) into a raised error.

By default such ids behave like -1 (the kernels never index with them). Wrapping a function
with `checked` traces it with data checks switched on and runs it under
`jax.experimental.checkify`, so the first violation raises `checkify.JaxRuntimeError`.

    step = deepep.checked(train_step)     # wrap the plain (not yet jitted) function
    loss = step(params, batch)            # jitted; raises on bad expert ids
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.experimental import checkify

_enabled = contextvars.ContextVar("jax_deepep_checks", default=False)


@contextlib.contextmanager
def _checks_on():
    token = _enabled.set(True)
    try:
        yield
    finally:
        _enabled.reset(token)


def check_expert_ids(topk_idx, num_experts: int):
    """Called by the ops at trace time; a no-op unless tracing under `checked`."""
    if topk_idx is None or not _enabled.get():
        return
    ok = jnp.all((topk_idx >= -1) & (topk_idx < num_experts))
    checkify.check(ok, f"jax_deepep: topk_idx holds expert ids outside [-1, {num_experts})")


def checked(fn, **jit_kwargs):
    """Return a jitted `fn` with data checks: it raises `checkify.JaxRuntimeError` on bad expert ids.

    Wrap the plain function, not an already-jitted one (its cached trace has no checks).
    `jit_kwargs` go to `jax.jit` (e.g. `static_argnums`).
    """

    def traced(*args, **kwargs):
        with _checks_on():
            return fn(*args, **kwargs)

    checked_fn = jax.jit(checkify.checkify(traced, errors=checkify.user_checks), **jit_kwargs)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        err, out = checked_fn(*args, **kwargs)
        # Inside shard_map the error flags come back sharded over the mesh; checkify's host-side
        # reduction sorts them, which explicitly sharded arrays refuse, so bring them to the host.
        jax.device_get(err).throw()
        return out

    return run
