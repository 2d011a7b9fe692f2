// Host runtime: the communication buffer of each (Buffer, device) and its peers' mappings.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/comm_layout.h"
#include "cuda/rank_info.h"

// Symbols Python loads from the library (the build hides everything else).
#define JAX_DEEPEP_EXPORT extern "C" __attribute__((visibility("default")))

namespace jax_deepep {

struct RankState {
  int device = -1;
  int rank = 0;
  int num_ranks = 1;
  size_t num_bytes = 0;
  char* local = nullptr;                    // this rank's buffer (cudaMalloc)
  char* peers[kMaxRanks] = {};              // every rank's buffer as seen from this device
  bool peer_is_ipc[kMaxRanks] = {};         // opened with cudaIpcOpenMemHandle (must be closed)
  ErrorRecord* error_host = nullptr;        // host-mapped record of the first wait that gave up
  ErrorRecord* error_device = nullptr;

  RankInfo info() const;
  size_t ring_bytes() const { return num_bytes - ring_offset(); }
};

// The state registered for (buffer id, device ordinal), or nullptr.
RankState* find_rank_state(int64_t buffer_id, int device);

}  // namespace jax_deepep
