// Eight bf16 values in one 16-byte vector (int4 or uint4, one load or store) as eight floats: the
// inner steps of every combine reduction and of the FP8 cast. Sums are taken in f32 and rounded
// to bf16 once, when packed. Vectors are passed by value: a reference to a reinterpreted load
// lets the compiler split the 16-byte load into four.
#pragma once

#include <cuda_bf16.h>

namespace jax_deepep {

template <typename Vec16>
__device__ __forceinline__ void unpack_bf16x8(Vec16 v, float (&out)[8]) {
  static_assert(sizeof(Vec16) == 16, "eight bf16 values");
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// acc += v
template <typename Vec16>
__device__ __forceinline__ void accumulate(float (&acc)[8], Vec16 v) {
  float f[8];
  unpack_bf16x8(v, f);
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] += f[i];
}

// acc += weight * v
template <typename Vec16>
__device__ __forceinline__ void accumulate(float (&acc)[8], Vec16 v, float weight) {
  float f[8];
  unpack_bf16x8(v, f);
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] += weight * f[i];
}

// Rounds eight floats to bf16 (to nearest even).
template <typename Vec16>
__device__ __forceinline__ Vec16 pack_bf16x8(const float (&v)[8]) {
  static_assert(sizeof(Vec16) == 16, "eight bf16 values");
  Vec16 packed;
  __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  return packed;
}

}  // namespace jax_deepep
