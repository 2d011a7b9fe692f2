// Host runtime of the normal (intranode) mode: the communication buffer of each (Buffer, device)
// and its peers' mappings, kept in the library's Registry (xla_ffi/registry.h). The functions
// below are what the Python bindings (intranode_module.cc) call; each throws on failure.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>

#include "cuda/comm_layout.h"
#include "cuda/rank_info.h"

namespace jax_deepep {

struct RankState {
  int device = -1;
  int rank = 0;
  int num_ranks = 1;
  size_t num_bytes = 0;
  long long timeout_ns = 0;                 // how long one wait of a kernel may last (the Buffer's timeout)
  char* local = nullptr;                    // this rank's buffer (cudaMalloc)
  char* peers[kMaxRanks] = {};              // every rank's buffer as seen from this device
  bool peer_is_ipc[kMaxRanks] = {};         // opened with cudaIpcOpenMemHandle (must be closed)
  ErrorRecord* error_host = nullptr;        // host-mapped record of the first wait that gave up
  ErrorRecord* error_device = nullptr;

  RankState() = default;
  RankState(const RankState&) = delete;
  RankState& operator=(const RankState&) = delete;
  ~RankState();  // frees the memory (after the device is idle)

  RankInfo info() const;
  size_t ring_bytes() const { return num_bytes - ring_offset(); }
};

// The state registered for (buffer id, device ordinal), or null.
std::shared_ptr<RankState> find_rank_state(int64_t buffer_id, int device);

// Allocates and zeroes the buffer of `rank` on `device`; its peers are connected later. Every wait
// of its kernels gives up after `timeout_s` seconds.
void create_comm_buffer(int64_t buffer_id, int device, int rank, int num_ranks, size_t num_bytes, double timeout_s);
// The CUDA IPC handle of the buffer.
std::string comm_buffer_ipc_handle(int64_t buffer_id, int device);
// Maps `peer_rank`'s buffer, living in another process, from its IPC handle.
void connect_ipc(int64_t buffer_id, int device, int peer_rank, const std::string& handle);
// Maps `peer_rank`'s buffer living on `peer_device` of this process (peer access).
void connect_local(int64_t buffer_id, int device, int peer_rank, int peer_device);
// Unmaps the peers' buffers (every process does this before any buffer is freed).
void disconnect(int64_t buffer_id, int device);
// Unregisters the buffer; its memory goes with the last handler holding it (idempotent).
void destroy_comm_buffer(int64_t buffer_id, int device);
// What the first of the buffer's kernels that failed reports (xla_ffi/failure.h), "" if none did.
std::string comm_buffer_failure(int64_t buffer_id, int device);
// Free device memory as the driver reports it (for leak checks).
size_t device_free_bytes(int device);

}  // namespace jax_deepep
