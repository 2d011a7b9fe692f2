// What the NVSHMEM kernels (low_latency.cu, internode.cu) share: where this PE's symmetric memory is
// and how to reach the other PEs, the call numbers that tag every signal, and the bounded wait.
//
// Peers whose buffer nvshmem_ptr maps (NVLink/P2P, or the same GPU) inside this PE's group get
// plain stores; every other peer gets nvshmem puts from the symmetric staging area. Signals carry
// the call number that wrote them, so nobody resets them and any number of blocks may poll them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "cuda/memory_order.cuh"

namespace jax_deepep {

struct PeerMemory {
  char* local;                // this PE's symmetric buffer
  char* staging;              // symmetric: the source of nvshmem puts
  char* const* peer;          // device array [R]: peer's buffer mapped here (NVLink/P2P), or null
  int* timeout_flag;          // device memory; nonzero once a wait timed out (polled by kernels)
  int* timeout_flag_host;     // host-mapped copy of it, which the host reads without a sync
  long long timeout_ns;
  int rank;
  int num_ranks;
  // Device memory [kNumCallKinds]: the last call number of each op kind. Each op counts its call on
  // the device, so no host state ties a launch to its call and XLA may treat the ops as pure.
  uint32_t* call_numbers;
};

// Indices into PeerMemory::call_numbers.
constexpr int kDispatchCall = 0;           // low-latency dispatch
constexpr int kCombineCall = 1;            // low-latency combine
constexpr int kInternodeDispatchCall = 2;  // internode dispatch and cached dispatch
constexpr int kInternodeCombineCall = 3;   // internode combine
constexpr int kNumCallKinds = 4;

// Error flag values (which wait timed out).
constexpr int kDispatchTimeout = 1;
constexpr int kCombineTimeout = 2;
constexpr int kInternodeDispatchTimeout = 3;
constexpr int kInternodeCombineTimeout = 4;

__host__ __device__ inline const char* timeout_kind_name(int kind) {
  switch (kind) {
    case kDispatchTimeout: return "low-latency dispatch";
    case kCombineTimeout: return "low-latency combine";
    case kInternodeDispatchTimeout: return "internode dispatch";
    default: return "internode combine";
  }
}

#ifdef __CUDACC__
// Numbers a call: token[0] = ++counter. The kernels after it on the stream read token[0].
__global__ void next_call_number_kernel(uint32_t* counter, int* token);

__device__ __forceinline__ bool timed_out_before(const PeerMemory& mem) {
  return *reinterpret_cast<volatile int*>(mem.timeout_flag) != 0;
}

// Spins until the signal at `p` carries `tag` in the bits above `tag_shift` and stores it in
// *value; false after the timeout (or at once when an earlier wait already timed out).
__device__ inline bool wait_signal(const int* p, uint32_t tag, int tag_shift, const PeerMemory& mem, int kind,
                                   int peer, int* value) {
  *value = load_acquire(p);
  if ((static_cast<uint32_t>(*value) >> tag_shift) == tag) return true;
  if (timed_out_before(mem)) return false;
  const uint64_t start = global_time_ns();
  while (true) {
    *value = load_acquire(p);
    if ((static_cast<uint32_t>(*value) >> tag_shift) == tag) return true;
    if (global_time_ns() - start > static_cast<uint64_t>(mem.timeout_ns)) {
      if (!timed_out_before(mem)) {
        printf("jax_deepep: %s on rank %d timed out waiting for rank %d\n", timeout_kind_name(kind), mem.rank, peer);
      }
      *reinterpret_cast<volatile int*>(mem.timeout_flag) = kind;
      *reinterpret_cast<volatile int*>(mem.timeout_flag_host) = kind;
      __threadfence_system();
      return false;
    }
  }
}

#endif  // __CUDACC__

}  // namespace jax_deepep
