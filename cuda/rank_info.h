// What a normal-mode (intranode) kernel knows about its rank, the peers' communication buffers
// and how long its waits may last.
#pragma once

#include "cuda/comm_layout.h"
#include "cuda/wait.cuh"

namespace jax_deepep {

struct RankInfo {
  int rank;
  int num_ranks;
  char* buffers[kMaxRanks];  // buffers[r]: rank r's communication buffer, mapped here
  ErrorRecord* error;        // device pointer of this (Buffer, device)'s host-mapped record
  long long timeout_ns;      // how long one wait may last
};

inline JDEEP_HOST_DEVICE WaitContext wait_context(const RankInfo& info, OpKind op) {
  return {info.error, info.timeout_ns, info.rank, op, nullptr, 0};  // a mismatch is found at the op barrier
}

}  // namespace jax_deepep
