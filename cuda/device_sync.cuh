// Bounded waits for signalling between ranks (the primitives are in memory_order.cuh).
//
// A wait gives up after kWaitTimeoutNs, raises the rank's error code
// (the first one sticks) and returns; once an error is raised every later wait returns at once,
// so a dead peer makes the kernels finish with garbage instead of hanging.
#pragma once

#include <cstdint>
#include <cstdio>

#include "cuda/comm_layout.h"
#include "cuda/memory_order.cuh"
#include "cuda/rank_info.h"

namespace jax_deepep {

constexpr uint64_t kWaitTimeoutNs = 5ull * 1000 * 1000 * 1000;

__device__ __forceinline__ bool error_raised(const int* error) {
  return *reinterpret_cast<const volatile int*>(error) != kNoError;
}

static __device__ __noinline__ void raise_error(int* error, KernelError code, int rank, int peer, int channel) {
  if (atomicCAS(error, kNoError, code) == kNoError) {
    printf("jax_deepep: rank %d gave up waiting for rank %d (channel %d, error %d): peer not answering\n",
           rank, peer, channel, static_cast<int>(code));
  }
  __threadfence_system();
}

// Spins until `done(load_acquire(flag))`; returns the last value read. On timeout raises `code`.
template <typename T, typename Done>
__device__ __forceinline__ T wait_for(const T* flag, Done done, const RankInfo& info, KernelError code,
                                      int peer, int channel) {
  T value = load_acquire(flag);
  if (done(value)) return value;
  const uint64_t start = global_time_ns();
  for (uint32_t spins = 0;; ++spins) {
    value = load_acquire(flag);
    if (done(value)) return value;
    if ((spins & 255) == 0) {
      if (error_raised(info.error)) return value;
      if (global_time_ns() - start > kWaitTimeoutNs) {
        raise_error(info.error, code, info.rank, peer, channel);
        return value;
      }
    }
  }
}

}  // namespace jax_deepep
