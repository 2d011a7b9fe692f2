// What a kernel needs to know about its rank and the peers' communication buffers.
#pragma once

#include <cstdint>

#include "cuda/comm_layout.h"

namespace jax_deepep {

struct RankInfo {
  int rank;
  int num_ranks;
  char* buffers[kMaxRanks];  // buffers[r]: rank r's communication buffer, mapped here
  int* error;                // host-mapped; nonzero once a wait timed out
  // The Buffer's liveness cell (device memory that outlives the Buffer) and the id it holds while
  // the Buffer lives. XLA may replay a launch from a captured CUDA graph after the Buffer was
  // destroyed; such a kernel finds another id there and returns before touching any memory.
  const int64_t* live;
  int64_t id;
};

// Error codes a kernel raises (first one wins).
enum KernelError : int {
  kNoError = 0,
  kBarrierTimeout = 1,
  kChannelCountTimeout = 2,
  kRingSpaceTimeout = 3,
  kRingDataTimeout = 4,
};

}  // namespace jax_deepep
