// Warp-wide row copies: 16-byte accesses when both ends and the length allow it.
#pragma once

#include <cstdint>

namespace jax_deepep {

// Source kinds: read-only inputs go through the non-coherent cache; ring slots that a peer
// wrote are read with cache-volatile loads so no stale line is ever used.
enum class Source { kInput, kRing };

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
    for (; i + 32 * (kUnroll - 1) < n; i += 32 * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load16<kSource>(s + i + 32 * u);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) d[i + 32 * u] = v[u];
    }
    for (; i < n; i += 32) d[i] = load16<kSource>(s + i);
  } else if ((alignment & 3) == 0) {
    const volatile int* s = static_cast<const int*>(src);
    int* d = static_cast<int*>(dst);
    for (int i = lane; i < bytes / 4; i += 32) d[i] = s[i];
  } else {
    const volatile unsigned char* s = static_cast<const unsigned char*>(src);
    unsigned char* d = static_cast<unsigned char*>(dst);
    for (int i = lane; i < bytes; i += 32) d[i] = s[i];
  }
}

// Zero one row of `bytes` bytes.
__device__ __forceinline__ void warp_zero(void* dst, int bytes, int lane) {
  if (((reinterpret_cast<uintptr_t>(dst) | static_cast<uintptr_t>(bytes)) & 15) == 0) {
    int4* d = static_cast<int4*>(dst);
    for (int i = lane; i < bytes / 16; i += 32) d[i] = make_int4(0, 0, 0, 0);
  } else {
    unsigned char* d = static_cast<unsigned char*>(dst);
    for (int i = lane; i < bytes; i += 32) d[i] = 0;
  }
}

}  // namespace jax_deepep
