"""`ffi_call`: one of our XLA FFI custom calls, per shard, with outputs typed as per-shard data.

A custom call's outputs come back typed as the same on every shard, but ours are per-rank data:
`varying.mark_varying` types them as varying (jax_deepep/varying.py says why).

None of our custom calls declares a side effect: each is a function of its inputs plus state kept
on the device (epochs, ring totals, call numbers), and every rank runs the same program (same JAX,
XLA and flags in every process), so if XLA drops or merges calls it does so on every rank alike.
A side effect would take the whole program off JAX's C++ dispatch path (a Python dispatch of about
a millisecond per call).

Under `jax.vmap` a call runs once per element of the mapped axis, in order (`vmap_method="sequential"`,
a scan): the kernels move one batch of tokens per call, and every rank maps the same axis, so the
peers' calls pair up element by element.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..varying import mark_varying


def optional_operand(a, dtype):
    """`a`, or for an operand the call does not have an empty array of shape (0,), which the
    handlers take as absent (xla_ffi/operands.h)."""
    return a if a is not None else jnp.zeros((0,), dtype)


def optional_result(shape, dtype) -> jax.ShapeDtypeStruct:
    """A result of `shape`, or with `shape` None an absent one (shape (0,), as `optional_operand`)."""
    return jax.ShapeDtypeStruct((0,) if shape is None else shape, dtype)


def struct_attribute(layout, dtype=np.uint64) -> dict:
    """A `jax_deepep.sizes` dataclass as a struct attribute (XLA_FFI_REGISTER_STRUCT_ATTR_DECODING):
    every field a `dtype` scalar, a tuple field `f` spelled `f0`, `f1`, ... (the C++ struct's array)."""
    attribute = {}
    for field in dataclasses.fields(layout):
        value = getattr(layout, field.name)
        if isinstance(value, tuple):
            attribute.update({f"{field.name}{i}": dtype(v) for i, v in enumerate(value)})
        else:
            attribute[field.name] = dtype(value)
    return attribute


def ffi_call(target: str, results, *args, axis_name: str, **attrs):
    """`jax.ffi.ffi_call(target, results)(*args, **attrs)`, outputs varying like the inputs and `axis_name`."""
    out = jax.ffi.ffi_call(target, results, vmap_method="sequential")(*args, **attrs)
    return mark_varying(out, axis_name, *args)
