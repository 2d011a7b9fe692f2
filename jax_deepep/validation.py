"""Trace-time argument checks (SPEC.md section 4): every message names the argument and what
was expected, and is raised before anything is lowered."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import FP8_BLOCK


class DeepEPError(ValueError):
    """Bad arguments to a jax_deepep op (raised at trace time)."""


def fail(op: str, message: str):
    raise DeepEPError(f"{op}: {message}")


def _describe(a) -> str:
    if a is None:
        return "None"
    if isinstance(a, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in a) + ")"
    if hasattr(a, "shape") and hasattr(a, "dtype"):
        return f"{np.dtype(a.dtype).name}{list(a.shape)}"
    return type(a).__name__


def expect_array(op: str, name: str, a, *, ndim: int, dtypes, shape=None):
    """Check rank, dtype (one of `dtypes`) and, where given, the shape (None = any size)."""
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
        fail(op, f"`{name}` must be an array, got {_describe(a)}")
    names = [np.dtype(d).name for d in dtypes]
    if len(a.shape) != ndim or np.dtype(a.dtype).name not in names:
        want = " or ".join(names)
        fail(op, f"`{name}` must be a {ndim}-D {want} array, got {_describe(a)}")
    if shape is not None:
        for got, want in zip(a.shape, shape):
            if want is not None and got != want:
                fail(op, f"`{name}` must have shape {_shape_text(shape)}, got {list(a.shape)}")


def _shape_text(shape) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def index_dtypes():
    """topk_idx may be int64 only where JAX keeps int64 (x64 enabled)."""
    return (jnp.int32, jnp.int64) if jax.config.jax_enable_x64 else (jnp.int32,)


def token_parts(op: str, name: str, x, num_rows=None) -> tuple:
    """Split a bf16 array or an FP8 pair into a tuple of parts; check dtypes and shapes."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            fail(op, f"`{name}` as FP8 must be the pair (float8_e4m3fn [T, H], float32 [T, H // 128]), "
                     f"got a sequence of {len(x)}")
        values, scales = x
        expect_array(op, f"{name}[0]", values, ndim=2, dtypes=(jnp.float8_e4m3fn,), shape=(num_rows, None))
        rows, hidden = values.shape
        if hidden % FP8_BLOCK:
            fail(op, f"`{name}[0]` hidden size must be a multiple of {FP8_BLOCK} for FP8, got {hidden}")
        expect_array(op, f"{name}[1]", scales, ndim=2, dtypes=(jnp.float32,),
                     shape=(rows, hidden // FP8_BLOCK))
        return (values, scales)
    expect_array(op, name, x, ndim=2, dtypes=(jnp.bfloat16,), shape=(num_rows, None))
    return (x,)


def axis_size(op: str, axis_name: str) -> int:
    """Size of `axis_name` in the enclosing shard_map; a clear error outside one."""
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError:
        fail(op, f"must be called inside `jax.shard_map` over the mesh axis {axis_name!r} "
                 "(the axis is not bound here)")
