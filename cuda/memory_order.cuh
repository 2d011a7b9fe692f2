// System-scope acquire loads and release stores, a relaxed load, and the GPU's global timer: the
// primitives every kernel signals with (waits: wait.cuh). Peers' memory is reached through CUDA IPC, peer mappings
// or NVSHMEM, so every flag is read and written at system scope.
#pragma once

#include <cstdint>

namespace jax_deepep {

__device__ __forceinline__ uint64_t load_acquire(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ int load_acquire(const int* p) {
  return static_cast<int>(load_acquire(reinterpret_cast<const uint32_t*>(p)));
}

// A relaxed load, for a value an earlier kernel of this stream wrote (the kernel boundary makes it
// visible): unlike load_acquire it does not hold back the loads after it.
__device__ __forceinline__ uint32_t load_relaxed(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ void store_release(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void store_release(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void store_release(int* p, int v) {
  store_release(reinterpret_cast<uint32_t*>(p), static_cast<uint32_t>(v));
}

__device__ __forceinline__ uint64_t global_time_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

}  // namespace jax_deepep
