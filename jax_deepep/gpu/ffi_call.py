"""`ffi_call`: one of our XLA FFI custom calls, per shard, with outputs typed as per-shard data.

A custom call's outputs come back typed as the same on every shard, but ours are per-rank data:
`varying.mark_varying` types them as varying (jax_deepep/varying.py says why).

Which calls declare a side effect (`side_effect=True`), and why only those:
- The normal-mode calls (intranode and internode dispatch, cached dispatch, combine, layout) declare
  none. Each op is one call whose results are a function of every rank's inputs plus state kept on
  the device (epochs, ring totals) that every call advances alike; every rank runs the same program
  (same JAX, XLA and flags in every process), so if XLA merges two identical calls or drops an unused
  one it does so on every rank and the results are those of running them all. They are also
  differentiated, and `jax.checkpoint` refuses effects in what it may recompute.
- The low-latency calls declare one. An op there is a send and a receive joined only by the send's
  token, through a buffer half in the peers' memory. Merging two equal sends leaves two receives
  reading one send (harmless while receives only read, wrong once they acknowledge what they read,
  as issue #21 plans); a send whose outputs are unused is still a send the caller issued, and
  every rank must make it. A side effect is the one marking JAX and XLA both honour: JAX keeps
  the call (no dead-code elimination), XLA neither merges (HloCSE) nor removes it (HloDCE), and
  the HLO stays the same in every process, since nothing in it depends on the trace (a
  per-call-site number would, and the handlers would have to decode it).
  It adds no order: HLO orders side effects only through data (and tokens), so the send's token
  remains what orders a send before its receive.
  The cost: a program with an effect never takes JAX's C++ dispatch path. Each call of such a
  program pays a Python dispatch (on the 2-core CI host, 30 us -> 530 us for a one-op program;
  benchmarks/LOG.md 2026-12-01 has the GPU figures).

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


def ffi_call(target: str, results, *args, axis_name: str, side_effect: bool = False, **attrs):
    """`jax.ffi.ffi_call(target, results)(*args, **attrs)`, outputs varying like the inputs and `axis_name`;
    `side_effect` for a call that XLA must neither merge nor drop (see above)."""
    out = jax.ffi.ffi_call(target, results, has_side_effect=side_effect, vmap_method="sequential")(*args, **attrs)
    return mark_varying(out, axis_name, *args)
