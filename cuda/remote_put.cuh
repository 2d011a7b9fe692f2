// The put path of the low-latency kernels: how a PE writes into a peer it cannot map (another node).
//
// The kernels are built twice (cuda/low_latency.cu): with NVSHMEM into _nvshmem_lib, where these
// are NVSHMEM's puts, and without it (JDEEP_WITHOUT_NVSHMEM) into _intranode_lib for one node over
// CUDA IPC or peer access, where the host maps every peer (xla_ffi/ipc_low_latency_memory.cc), so
// no kernel ever takes this path there: reaching it anyway traps rather than write nowhere.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#ifndef JDEEP_WITHOUT_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace jax_deepep {

// Whole warp: starts copying `bytes` from local `src` to `dst` (this PE's symmetric address) on `pe`.
__device__ __forceinline__ void put_warp(void* dst, const void* src, size_t bytes, int pe) {
#ifdef JDEEP_WITHOUT_NVSHMEM
  __trap();
#else
  nvshmemx_putmem_nbi_warp(dst, src, bytes, pe);
#endif
}

// Waits until this thread's puts are complete at their destinations.
__device__ __forceinline__ void put_quiet() {
#ifdef JDEEP_WITHOUT_NVSHMEM
  __trap();
#else
  nvshmem_quiet();
#endif
}

// Sets `dst` (this PE's symmetric address) on `pe` to `value` atomically: a reader polling it never
// sees half of it (a plain put does not promise that over a network).
template <typename T>
__device__ __forceinline__ void put_value(T* dst, T value, int pe) {
#ifdef JDEEP_WITHOUT_NVSHMEM
  __trap();
#else
  if constexpr (std::is_same_v<T, int>) {
    nvshmem_int_atomic_set(dst, value, pe);
  } else if constexpr (std::is_same_v<T, uint32_t>) {
    nvshmem_uint32_atomic_set(dst, value, pe);
  } else {
    static_assert(std::is_same_v<T, uint64_t>, "put_value takes int, uint32_t or uint64_t");
    nvshmemx_signal_op(dst, value, NVSHMEM_SIGNAL_SET, pe);
  }
#endif
}

}  // namespace jax_deepep
