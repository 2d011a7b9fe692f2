// LogFMT-10, the format of a use_logfmt low-latency combine row: the arithmetic of jax_deepep/logfmt.py
// (which defines it), in integers, table lookups and f32 products only, so that the kernels decode
// exactly what the pure-JAX backend and the numpy oracle do.
//
// A row on the wire: the (amax, amin) bf16 magnitudes of each group of 128 channels (4 bytes a group,
// padded to layout.logfmt_meta_bytes), then each group's data back to back: 160 bytes when encoded
// (16 channels in 5 words: ten bits a value, code | sign << 9, the value at bit 10 i of the pair's
// 160 bits), 256 bytes of bf16 otherwise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/low_latency.cuh"
#include "cuda/toolbox.cuh"

namespace jax_deepep {

constexpr int kLogfmtMaxCode = 511;
constexpr int kLogOne = 1 << 16;  // logarithms are fixed point in units of 2^-16
constexpr int kLogRange = 32 * kLogOne;
constexpr int kEncodedGroupBytes = kLogfmtGroup * 10 / 8;
constexpr int kBf16GroupBytes = kLogfmtGroup * 2;
constexpr int kSmallestNormal = 0x0080;  // bf16 magnitude bit patterns
constexpr int kBf16One = 0x3F80;

// The tables of jax_deepep/logfmt.py. Every entry lies far from a rounding tie (tests check it), so the
// double-precision log2 / exp2 of any device gives these exact values.
struct LogfmtTables {
  int log2_mantissa[128];  // round(log2(1 + m / 128) * 2^16)
  float exp2_high[256];    // f32(2^(i / 256))
  float exp2_low[256];     // f32(2^(j / 2^16))
};

// Whole block; the caller synchronises before the first use.
__device__ __forceinline__ void fill_logfmt_tables(LogfmtTables& t) {
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    if (i < 128) t.log2_mantissa[i] = static_cast<int>(rint(log2(1.0 + i / 128.0) * kLogOne));
    t.exp2_high[i] = __double2float_rn(exp2(i / 256.0));
    t.exp2_low[i] = __double2float_rn(exp2(i / static_cast<double>(kLogOne)));
  }
}

// log2 of a normal bf16 magnitude, in units of 2^-16.
__device__ __forceinline__ int logfmt_log2(const LogfmtTables& t, int magnitude) {
  return ((magnitude >> 7) - 127) * kLogOne + t.log2_mantissa[magnitude & 0x7F];
}

// A bf16 magnitude as the format counts it: below the smallest normal, 0.
__device__ __forceinline__ int logfmt_magnitude(uint16_t bits) {
  const int magnitude = bits & 0x7FFF;
  return magnitude < kSmallestNormal ? 0 : magnitude;
}

struct LogfmtGroup {
  bool encoded;
  int log_amin;
  int span;  // log2(amax) - log_amin; 1 where the group is not encoded
};

__device__ __forceinline__ LogfmtGroup logfmt_group(const LogfmtTables& t, int amax, int amin) {
  const bool encoded = amax >= kSmallestNormal && amax < kBf16One && amin < amax;
  const int log_amax = logfmt_log2(t, max(amax, kSmallestNormal));
  const int lowest = log_amax - kLogRange;
  const int log_amin = amin == 0 ? lowest : max(logfmt_log2(t, amin), lowest);
  return {encoded, log_amin, encoded ? log_amax - log_amin : 1};
}

// The 9-bit code of a magnitude: rounded to the nearer decoded value in the linear domain.
__device__ __forceinline__ int logfmt_code(const LogfmtTables& t, const LogfmtGroup& g, int magnitude) {
  if (magnitude == 0) return 0;
  const int above = max(logfmt_log2(t, magnitude) - g.log_amin, -g.span);
  const int rounding = g.span + (g.span >> 1) - (g.span >> 10) * (g.span >> 10) / 368;
  const int numerator = above * (kLogfmtMaxCode - 1) + rounding;
  return numerator < 0 ? 0 : min(numerator / g.span, kLogfmtMaxCode);
}

// The magnitude code `code` of group g decodes to (0 for code 0).
__device__ __forceinline__ float logfmt_decode(const LogfmtTables& t, int log_amin, int span, int code) {
  const int y = log_amin + (code - 1) * span / (kLogfmtMaxCode - 1);
  const int n = y >> 16;
  if (code == 0 || n < -126) return 0.0f;
  const float mantissa = __fmul_rn(t.exp2_high[(y >> 8) & 255], t.exp2_low[y & 255]);
  return __fmul_rn(mantissa, __int_as_float((n + 127) << 23));
}

}  // namespace jax_deepep
