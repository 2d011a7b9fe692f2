// Warp-wide row copies through registers, for rows the bulk-copy engine (bulk_copy.cuh) cannot
// take or where a warp's own loads are the better fit: 16-byte accesses, eight loads per lane
// in flight, when both ends and the length allow it; else 4-byte or single-byte accesses.
#pragma once

#include <cstdint>

#include "cuda/toolbox.cuh"

namespace jax_deepep {

// Where a row comes from: inputs that nobody writes while the kernel runs go through the
// non-coherent cache; memory a peer writes (rings, inboxes, landed rows), seen after an acquire
// of its signal, is read with cache-volatile loads so that no stale line is ever used.
enum class Source { kInput, kPeer };

template <Source kSource>
__device__ __forceinline__ int4 load16(const int4* p) {
  if constexpr (kSource == Source::kInput) {
    return __ldg(p);
  } else {
    return __ldcv(p);
  }
}

template <Source kSource>
__device__ __forceinline__ void warp_copy(void* dst, const void* src, int bytes, int lane) {
  const uintptr_t alignment = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                              static_cast<uintptr_t>(bytes);
  if ((alignment & 15) == 0) {
    const int4* s = static_cast<const int4*>(src);
    int4* d = static_cast<int4*>(dst);
    const int n = bytes / 16;
    constexpr int kUnroll = 8;  // 4 KiB in flight per warp
    int i = lane;
    for (; i + kWarpSize * (kUnroll - 1) < n; i += kWarpSize * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load16<kSource>(s + i + kWarpSize * u);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) d[i + kWarpSize * u] = v[u];
    }
    for (; i < n; i += kWarpSize) d[i] = load16<kSource>(s + i);
  } else if ((alignment & 3) == 0) {
    const volatile int* s = static_cast<const int*>(src);
    int* d = static_cast<int*>(dst);
    for (int i = lane; i < bytes / 4; i += kWarpSize) d[i] = s[i];
  } else {
    const volatile unsigned char* s = static_cast<const unsigned char*>(src);
    unsigned char* d = static_cast<unsigned char*>(dst);
    for (int i = lane; i < bytes; i += kWarpSize) d[i] = s[i];
  }
}

}  // namespace jax_deepep
