"""Trace-time argument checks (docs/API.md): every message names the argument and what
was expected, and is raised before anything is lowered."""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .limits import FP8_BLOCK, MAX_INT32, MAX_TOPK, ROW_CHANNELS


class DeepEPError(ValueError):
    """Bad arguments to a jax_deepep op (raised at trace time)."""


def fail(op: str, message: str):
    raise DeepEPError(f"{op}: {message}")


def _range_text(minimum: Optional[int], maximum: Optional[int]) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


def integer(op: str, name: str, value, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """`value` as a Python int. Python ints and numpy integer scalars are accepted, bools refused
    (True is an int to Python, never a count here)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        fail(op, f"`{name}` must be an int{_range_text(minimum, maximum)}, got {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        fail(op, f"`{name}` must be an int{_range_text(minimum, maximum)}, got {value}")
    return value


def int32_count(op: str, name: str, value, *, minimum: int) -> int:
    """`integer(...)` of an expert count or a row capacity, which must also fit int32 (the ids and row
    indices it bounds are int32)."""
    value = integer(op, name, value, minimum=minimum)
    if value > MAX_INT32:
        fail(op, f"`{name}` must fit int32 (at most {MAX_INT32}), got {value}")
    return value


def expert_count(op: str, num_experts, num_ranks: int) -> int:
    """`num_experts` as an int32 count that the `num_ranks` ranks share evenly."""
    num_experts = int32_count(op, "num_experts", num_experts, minimum=1)
    if num_experts % num_ranks:
        fail(op, f"`num_experts` must be divisible by the number of ranks ({num_ranks}), got {num_experts}")
    return num_experts


def boolean(op: str, name: str, value) -> bool:
    """`value` as a Python bool: True or False (numpy bools too); anything else refused."""
    if not isinstance(value, (bool, np.bool_)):
        fail(op, f"`{name}` must be True or False, got {value!r}")
    return bool(value)


def seconds(op: str, name: str, value, *, maximum: float) -> float:
    """`value` as a float number of seconds in (0, maximum); bools refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        fail(op, f"`{name}` must be a number of seconds in (0, {maximum:g}), got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0 < value < maximum):
        fail(op, f"`{name}` must be a number of seconds in (0, {maximum:g}), got {value}")
    return value


def _describe(a) -> str:
    if a is None:
        return "None"
    if isinstance(a, tuple):
        return "(" + ", ".join(_describe(v) for v in a) + ")"
    if hasattr(a, "shape") and hasattr(a, "dtype"):
        return f"{np.dtype(a.dtype).name}{list(a.shape)}"
    return type(a).__name__


def expect_array(op: str, name: str, a, *, ndim: int, dtypes, shape=None):
    """Check rank, dtype (one of `dtypes`) and, where given, the shape (None = any size)."""
    names = [np.dtype(d).name for d in dtypes]
    if not (hasattr(a, "shape") and hasattr(a, "dtype")) or len(a.shape) != ndim or \
            np.dtype(a.dtype).name not in names:
        fail(op, f"`{name}` must be a {ndim}-D {' or '.join(names)} array, got {_describe(a)}")
    if shape is not None:
        for got, want in zip(a.shape, shape):
            if want is not None and got != want:
                fail(op, f"`{name}` must have shape {_shape_text(shape)}, got {list(a.shape)}")


def _shape_text(shape) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def index_dtypes():
    """topk_idx may be int64 only where JAX keeps int64 (x64 enabled)."""
    return (jnp.int32, jnp.int64) if jax.config.jax_enable_x64 else (jnp.int32,)


def expect_top_k(op: str, name: str, a):
    """The second dimension of a checked [*, K] array is a top-k count the kernels serve."""
    if not 1 <= a.shape[1] <= MAX_TOPK:
        fail(op, f"`{name}` must have 1 to {MAX_TOPK} columns (K, the top-k), got shape {list(a.shape)}")


def topk_ids(op: str, topk_idx, num_tokens: Optional[int] = None):
    """Check expert ids `topk_idx [T, K]` (T = `num_tokens` when given)."""
    expect_array(op, "topk_idx", topk_idx, ndim=2, dtypes=index_dtypes(), shape=(num_tokens, None))
    expect_top_k(op, "topk_idx", topk_idx)


def row_hidden(op: str, name: str, hidden: int):
    """Rows move in 16-byte pieces on every backend (the kernels' copies): the hidden size of `name` must be
    a positive multiple of ROW_CHANNELS."""
    if hidden <= 0 or hidden % ROW_CHANNELS:
        fail(op, f"`{name}` hidden size must be a positive multiple of {ROW_CHANNELS} (rows move in 16-byte "
                 f"pieces), got {hidden}")


def token_parts(op: str, name: str, x, num_rows=None) -> tuple:
    """Split a bf16 array or an FP8 pair into a tuple of parts; check dtypes and shapes."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            fail(op, f"`{name}` as FP8 must be the pair (float8_e4m3fn [T, H], float32 [T, H // 128]), "
                     f"got a sequence of {len(x)}")
        values, scales = x
        expect_array(op, f"{name}[0]", values, ndim=2, dtypes=(jnp.float8_e4m3fn,), shape=(num_rows, None))
        rows, hidden = values.shape
        if hidden <= 0 or hidden % FP8_BLOCK:
            fail(op, f"`{name}[0]` hidden size must be a positive multiple of {FP8_BLOCK} for FP8, got {hidden}")
        expect_array(op, f"{name}[1]", scales, ndim=2, dtypes=(jnp.float32,),
                     shape=(rows, hidden // FP8_BLOCK))
        return (values, scales)
    expect_array(op, name, x, ndim=2, dtypes=(jnp.bfloat16,), shape=(num_rows, None))
    row_hidden(op, name, x.shape[1])
    return (x,)


def axis_size(op: str, axis_name: str) -> int:
    """Size of `axis_name` in the enclosing shard_map; a clear error outside one."""
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError:
        fail(op, f"must be called inside `jax.shard_map` over the mesh axis {axis_name!r} "
                 "(the axis is not bound here)")
