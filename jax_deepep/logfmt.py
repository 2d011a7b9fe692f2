"""LogFMT-10, the lossy format of a `use_logfmt=True` low-latency combine row (DeepEP's LogFMT), defined
here for the pure-JAX backend and the byte counts; `cuda/logfmt.cuh` does the same arithmetic.

A bf16 row is cut into groups of 128 channels. In each group:
  - magnitudes are the bf16 bit patterns without the sign; below the smallest normal (zero, subnormals)
    they count as 0; amax and amin are the largest and smallest magnitude;
  - the group is encoded when amax is normal and below 1 and amin < amax; any other group (all equal,
    |x| >= 1, inf, nan, all zero) travels as its exact bf16 values;
  - logarithms are fixed point, int32 in units of 2^-16: log2 of a normal magnitude 2^e * (1 + m / 128)
    is e * 2^16 + LOG2_MANTISSA[m], LOG2_MANTISSA[m] = log2(1 + m / 128) * 2^16 rounded;
  - log_amin = max(log2(amin), log2(amax) - 32) (log2(amax) - 32 when amin is 0), span = log2(amax) -
    log_amin, step = span / 510: code c in 1..511 decodes to 2^(log_amin + (c - 1) * span // 510), code 0 to
    0, and a value travels as its code and its sign (10 bits);
  - a magnitude x encodes to floor(((log2(x) - log_amin) * 510 + 1.5 span - corr) / span) within [0, 511]
    (0 to 0), corr = (span >> 10)^2 // 368 ~ span * step * ln(2) / 8: the midpoint of two neighbouring
    decoded values in the linear domain lies step * ln(2) / 8 + O(step^3) above the midpoint of their
    logarithms, so this rounds to the nearer one (as DeepEP's LogFMT does);
  - 2^y for y in units of 2^-16 is EXP2_HIGH[y >> 8 & 255] * EXP2_LOW[y & 255] (f32 tables of 2^(i / 256)
    and 2^(j / 65536)) times 2^(y >> 16), and 0 below 2^-126.
Every operation is an integer operation, a table lookup or one f32 multiplication (no addition a
compiler could fuse with it), so the CUDA kernels, this module and a numpy model agree bit for bit.

Error: an encoded value decodes within (2^step - 1) / 2 + 2^-15 of its magnitude (step <= 32 / 510: at
most 2.3 %; 0.7 % for a group spanning 2^10), plus 2^-32 of its group's amax, plus magnitudes below 2^-126.

On the wire a row is the groups' (amax, amin) as bf16 pairs (4 bytes a group, padded to 16 bytes), then
each group's data: 160 bytes encoded (ten bits a value), 256 bytes as bf16. Only rows that travel to
another rank are encoded: a rank's own experts' rows are summed as they are, on every backend.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GROUP = 128  # channels per group (one (amax, amin) pair)
MAX_CODE = 511  # 9-bit magnitude codes; 0 is zero
ONE = 1 << 16  # 1.0 in the fixed-point logarithms
LOG_RANGE = 32 * ONE  # log_amin is at most this far below log2(amax)
ENCODED_GROUP_BYTES = GROUP * 10 // 8
BF16_GROUP_BYTES = GROUP * 2
_SMALLEST_NORMAL = 0x0080  # bf16 bit patterns of magnitudes
_BF16_ONE = 0x3F80
LOG2_MANTISSA = np.rint(np.log2(1.0 + np.arange(128) / 128.0) * ONE).astype(np.int32)
EXP2_HIGH = np.exp2(np.arange(256) / 256.0).astype(np.float32)
EXP2_LOW = np.exp2(np.arange(256) / float(ONE)).astype(np.float32)


def meta_bytes(hidden: int) -> int:
    """Bytes of a row's (amax, amin) pairs, padded so that the group data starts 16-byte aligned."""
    return (hidden // GROUP * 4 + 15) // 16 * 16


def _log2(magnitude):
    """log2 of normal bf16 magnitudes (int32 bit patterns), int32 in units of 2^-16."""
    return ((magnitude >> 7) - 127) * ONE + jnp.asarray(LOG2_MANTISSA)[magnitude & 0x7F]


def _exp2(y):
    """2^(y / 2^16) for y < 0 (int32), f32; 0 below 2^-126."""
    n = y >> 16
    mantissa = jnp.asarray(EXP2_HIGH)[(y >> 8) & 255] * jnp.asarray(EXP2_LOW)[y & 255]
    scale = jax.lax.bitcast_convert_type((jnp.maximum(n, -126) + 127) << 23, jnp.float32)
    return jnp.where(n < -126, np.float32(0.0), mantissa * scale)


def _groups(x):
    """x bf16 [..., H] -> (magnitudes int32 [..., G, 128], sign bits [..., G, 128], encoded [..., G],
    log_amin [..., G, 1], span [..., G, 1])."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.int32)
    bits = bits.reshape(*x.shape[:-1], x.shape[-1] // GROUP, GROUP)
    magnitude = bits & 0x7FFF
    magnitude = jnp.where(magnitude < _SMALLEST_NORMAL, 0, magnitude)
    amax, amin = jnp.max(magnitude, axis=-1), jnp.min(magnitude, axis=-1)
    encoded = (amax >= _SMALLEST_NORMAL) & (amax < _BF16_ONE) & (amin < amax)
    log_amax = _log2(amax)
    log_amin = jnp.where(amin == 0, log_amax - LOG_RANGE, jnp.maximum(_log2(amin), log_amax - LOG_RANGE))
    span = jnp.where(encoded, log_amax - log_amin, 1)  # any positive span for groups not encoded
    return magnitude, bits >> 15, encoded, log_amin[..., None], span[..., None]


ROUND_TRIP_ROWS = 1024  # rows decoded at once: a whole receive block's int32 temporaries would not fit in memory


def round_trip(x):
    """The f32 values a receiver decodes from bf16 rows `x [..., H]` (H a multiple of 128) sent as LogFMT-10."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= ROUND_TRIP_ROWS:
        return _round_trip_rows(rows).reshape(x.shape)
    return jax.lax.map(_round_trip_rows, rows, batch_size=ROUND_TRIP_ROWS).reshape(x.shape)


def _round_trip_rows(x):
    magnitude, sign, encoded, log_amin, span = _groups(x)
    above = jnp.maximum(_log2(jnp.maximum(magnitude, _SMALLEST_NORMAL)) - log_amin, -span)
    rounding = span + (span >> 1) - jnp.square(span >> 10) // 368
    code = jnp.clip(jnp.floor_divide(above * (MAX_CODE - 1) + rounding, span), 0, MAX_CODE)
    code = jnp.where(magnitude == 0, 0, code)
    value = jnp.where(code == 0, np.float32(0.0), _exp2(log_amin + (code - 1) * span // (MAX_CODE - 1)))
    value = jnp.where(sign == 1, -value, value).reshape(x.shape)
    return jnp.where(jnp.repeat(encoded, GROUP, axis=-1), value, x.astype(jnp.float32))


def row_bytes(x):
    """Bytes each bf16 row of `x [..., H]` takes on the wire as LogFMT-10 (int32 [...])."""
    encoded = _groups(x)[2]
    data = jnp.where(encoded, ENCODED_GROUP_BYTES, BF16_GROUP_BYTES)
    return meta_bytes(x.shape[-1]) + jnp.sum(data, axis=-1, dtype=jnp.int32)
