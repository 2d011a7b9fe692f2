"""Varying-axis types of values made inside `shard_map`.

JAX tracks which mesh axes a value varies over. Our ops' outputs are per-rank data (they depend on
what the other ranks sent), and custom_vjp rules require a cotangent typed like its primal, so every
output an op makes without a collective (custom-call results, constant results) is marked as varying
over the expert-parallel axis and over every axis its inputs vary over.
"""
from __future__ import annotations

import jax


def varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax 0.10+; older versions call it `vma`
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def mark_varying(out, axis_name: str, *inputs):
    """`out` (a pytree) with every array varying over `axis_name` and over the axes `inputs` vary over."""
    return _vary_over(out, frozenset({axis_name}).union(*(varying_axes(a) for a in jax.tree.leaves(inputs))))


def vary_like(out, *inputs):
    """`out` (a pytree) with every array varying over the axes `inputs` vary over (a constant standing in
    for a result computed from them)."""
    return _vary_over(out, frozenset().union(*(varying_axes(a) for a in jax.tree.leaves(inputs))))


def _vary_over(out, axes: frozenset):
    def mark(x):
        missing = tuple(sorted(axes - varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(mark, out)
