// What a kernel needs to know about its rank and the peers' communication buffers.
#pragma once

#include "cuda/comm_layout.h"

namespace jax_deepep {

struct RankInfo {
  int rank;
  int num_ranks;
  char* buffers[kMaxRanks];  // buffers[r]: rank r's communication buffer, mapped here
  int* error;                // host-mapped; nonzero once a wait timed out
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
