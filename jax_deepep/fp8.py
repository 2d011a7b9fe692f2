"""Per-128-channel FP8 (e4m3) casting, as the dispatch kernels do it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import FP8_BLOCK
from .rounding import round_to

FP8_MAX = 448.0
_INVERSE_FP8_MAX = np.float32(1.0 / FP8_MAX)
_MIN_AMAX = 1e-4  # keeps all-zero blocks from producing a zero scale


def scales_struct(lead: tuple, hidden: int, use_ue8m0: bool) -> jax.ShapeDtypeStruct:
    """The shape and dtype of the scales of FP8 rows `[*lead, hidden]`: f32 per 128 channels, or with
    `use_ue8m0` int32 per 512 (four UE8M0 bytes)."""
    if use_ue8m0:
        return jax.ShapeDtypeStruct((*lead, hidden // (4 * FP8_BLOCK)), jnp.int32)
    return jax.ShapeDtypeStruct((*lead, hidden // FP8_BLOCK), jnp.float32)


def per_block_cast_to_fp8(x, *, round_scale: bool = False, use_ue8m0: bool = False):
    """Cast `x [..., H]` to `(float8_e4m3fn [..., H], scales)`.

    scale = amax(|block|) / 448 per 128 channels; `round_scale` rounds it up to a power of two.
    Scales are f32 `[..., H // 128]`, or with `use_ue8m0` int32 `[..., H // 512]` holding four
    UE8M0 bytes (the f32 exponent field) each, lowest channel block in the lowest byte.

    The arithmetic is fixed so that XLA (on every platform), the CUDA kernels and the tests' numpy
    oracle round alike, as DeepEP's kernels compute it: scale = amax * f32(1 / 448) and values
    x * (448 / amax) (x * (1 / scale) with `round_scale`). A division by a broadcast scale would not
    do: XLA rewrites it into a multiplication by the reciprocal, which moves ties of bf16 inputs.
    Nor does XLA:GPU's f32 division (a quarter of its `448 / amax` quotients are an ulp off the
    IEEE quotient the kernels and numpy compute, measured on the H200), hence
    `_correctly_rounded_quotient`.
    The e4m3 values are rounded through a barrier (`round_to`): otherwise XLA:GPU folds a cast
    followed by `per_block_cast_back` in the same program into no rounding at all. So is the input:
    the kernels quantise the bf16 `x` they are handed, and so must this cast (see below).
    """
    # XLA:GPU folds `f32 -> bf16 -> f32` into no rounding (rounding.py), so a bf16 `x` made in the same
    # program from f32 (`rms_norm(h).astype(bf16)`) would be quantised here from its unrounded f32
    # values, with other amaxes and scales than the kernels see. The barrier makes the cast read `x`
    # as its dtype holds it; XLA never removes or looks through a barrier, whereas a
    # `reduce_precision` to bf16 would also round f32 inputs, which this cast takes as they are.
    x = jax.lax.optimization_barrier(jnp.asarray(x))
    *lead, h = x.shape
    if x.size == 0:  # no rows (T = 0): XLA:CPU of jax 0.11.2 crashed compiling the cast below for them
        scales = scales_struct(tuple(lead), h, use_ue8m0)
        return jnp.zeros(x.shape, jnp.float8_e4m3fn), jnp.zeros(scales.shape, scales.dtype)
    blocks = x.astype(jnp.float32).reshape(*lead, h // FP8_BLOCK, FP8_BLOCK)
    amax = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-1), _MIN_AMAX)
    scale = amax * _INVERSE_FP8_MAX
    if round_scale or use_ue8m0:
        scale = _round_up_to_power_of_two(scale)
        inverse = _correctly_rounded_quotient(1.0, scale)  # a power of two
    else:
        inverse = _correctly_rounded_quotient(FP8_MAX, amax)
    q = round_to(blocks * inverse[..., None], jnp.float8_e4m3fn).reshape(*lead, h)
    if not use_ue8m0:
        return q, scale
    return q, pack_ue8m0(scale)


def _correctly_rounded_quotient(numerator: float, denominator):
    """`numerator / denominator` rounded to nearest even, as IEEE f32 division, from integer steps.

    `numerator` is a positive normal f32 constant; `denominator` positive normal f32 (an amax of
    at least `_MIN_AMAX`, or a scale). The significands are divided bit by bit (26 quotient bits:
    the 24 kept, a round bit and one more when the quotient's significand is below 1), the rest
    of the remainder decides ties. Other denominators (inf, NaN), and quotients outside the normal
    range, fall back to XLA's division.
    """
    num_bits = int(np.float32(numerator).view(np.uint32))
    num_exponent, num_significand = num_bits >> 23, jnp.uint32((num_bits & 0x7FFFFF) | 0x800000)
    bits = jax.lax.bitcast_convert_type(denominator, jnp.uint32)
    exponent = (bits >> 23).astype(jnp.int32)
    significand = (bits & 0x7FFFFF) | 0x800000
    remainder, quotient = jnp.broadcast_to(num_significand, bits.shape), jnp.zeros_like(bits)
    for _ in range(26):  # quotient = floor(num_significand * 2^25 / significand), in [2^24, 2^26)
        bit = remainder >= significand
        quotient = (quotient << 1) | bit.astype(jnp.uint32)
        remainder = (remainder - jnp.where(bit, significand, 0)) << 1
    wide = quotient >= (1 << 25)  # significand ratio >= 1: one more bit to drop
    drop = jnp.where(wide, 2, 1).astype(jnp.uint32)
    kept = quotient >> drop
    dropped = quotient & ((jnp.uint32(1) << drop) - 1)
    half = jnp.uint32(1) << (drop - 1)
    round_up = (dropped > half) | ((dropped == half) & ((remainder != 0) | ((kept & 1) == 1)))
    kept = kept + round_up.astype(jnp.uint32)
    carry = kept >= (1 << 24)  # rounding overflowed to the next power of two
    kept = jnp.where(carry, kept >> 1, kept)
    result_exponent = num_exponent - exponent + 127 - 1 + wide.astype(jnp.int32) + carry.astype(jnp.int32)
    result = (result_exponent.astype(jnp.uint32) << 23) | (kept & 0x7FFFFF)
    exact = jax.lax.bitcast_convert_type(result, jnp.float32)
    usable = (exponent > 0) & (exponent < 255) & (result_exponent > 0) & (result_exponent < 255)
    return jnp.where(usable, exact, np.float32(numerator) / denominator)


def _round_up_to_power_of_two(scale):
    """Exact for positive normal f32 (exp2(ceil(log2(.))) is not: XLA's exp2 misses powers of two)."""
    bits = jax.lax.bitcast_convert_type(scale, jnp.uint32)
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(exponent << 23, jnp.float32)


def pack_ue8m0(scale):
    """Pack power-of-two f32 scales `[..., G]` (G % 4 == 0) into int32 `[..., G // 4]`."""
    exponent = (jax.lax.bitcast_convert_type(scale, jnp.uint32) >> 23) & 0xFF
    *lead, g = exponent.shape
    exponent = exponent.reshape(*lead, g // 4, 4)
    shifts = jnp.arange(4, dtype=jnp.uint32) * 8
    packed = jnp.sum(exponent << shifts, axis=-1, dtype=jnp.uint32)
    return jax.lax.bitcast_convert_type(packed, jnp.int32)


def unpack_ue8m0(packed):
    """Inverse of `pack_ue8m0`: int32 `[..., G // 4]` -> f32 scales `[..., G]`."""
    words = jax.lax.bitcast_convert_type(packed, jnp.uint32)
    shifts = jnp.arange(4, dtype=jnp.uint32) * 8
    exponent = (words[..., None] >> shifts) & 0xFF
    scale = jax.lax.bitcast_convert_type(exponent << 23, jnp.float32)
    return scale.reshape(*packed.shape[:-1], packed.shape[-1] * 4)


def per_block_cast_back(x_fp8, scales, dtype=jnp.bfloat16):
    """Dequantise `(x_fp8, scales)`; int32 scales are read as packed UE8M0. The result is rounded
    to `dtype` for good (`round_to`), as a kernel's bf16 output is, whatever reads it next."""
    if scales.dtype == jnp.int32:
        scales = unpack_ue8m0(scales)
    *lead, h = x_fp8.shape
    blocks = x_fp8.astype(jnp.float32).reshape(*lead, h // FP8_BLOCK, FP8_BLOCK)
    return round_to((blocks * scales[..., None]).reshape(*lead, h), dtype)
