// Eight bf16 values (16 bytes, one vector load) added into eight f32 accumulators: the inner step
// of every combine reduction (intranode_combine.cu, internode.cu).
#pragma once

#include <cuda_bf16.h>

namespace jax_deepep {

template <typename Vec16>
__device__ __forceinline__ void accumulate(float (&acc)[8], Vec16 v) {
  static_assert(sizeof(Vec16) == 16, "eight bf16 values");
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}

}  // namespace jax_deepep
