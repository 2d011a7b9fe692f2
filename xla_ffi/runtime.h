// Host runtime of the normal (intranode) mode: the communication buffer of each (Buffer, device)
// and its peers' mappings, kept in the library's Registry (xla_ffi/registry.h). The functions
// below are what the Python bindings (intranode_module.cc) call; each throws on failure, except the teardown.
//
// A low-latency Buffer within one node also gets a low-latency area after the rings: a control
// block (LowLatencyControl), then num_rdma_bytes of halves, for the low-latency kernels built
// without NVSHMEM (xla_ffi/ipc_low_latency_memory.cc). One allocation, one IPC handle for both.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>

#include "cuda/comm_layout.h"
#include "cuda/nvshmem_peers.cuh"
#include "cuda/rank_info.h"

namespace jax_deepep {

// What NVSHMEM keeps in allocations of its own for the low-latency kernels (PeerMemory's fields),
// at the start of the low-latency area. Every rank's area has the same layout, so a field's offset
// from the halves is the same in every peer's mapping.
struct LowLatencyControl {
  char* peers[kMaxRanks];                          // local: every rank's halves, as mapped here
  uint32_t call_numbers[kNumCallKinds];            // local
  uint32_t receive_blocks_done[kNumReceiptKinds];  // local
  uint32_t numbering_blocks_done[kNumCallKinds];   // local
  int op_stamps[kMaxRanks];                        // written by the peers
  uint32_t receipts[kNumReceiptKinds * kMaxLowLatencyHalves * kMaxRanks];  // written by the peers (receipt_of)
};

struct RankState {
  int device = -1;
  int rank = 0;
  int num_ranks = 1;
  size_t num_bytes = 0;                     // header and rings
  size_t low_latency_bytes = 0;             // the low-latency halves after them (0: none)
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
  // The low-latency kernels' view of the low-latency area (every peer mapped, no staging).
  PeerMemory low_latency_memory() const;
};

// The state registered for (buffer id, device ordinal), or null.
std::shared_ptr<RankState> find_rank_state(int64_t buffer_id, int device);

// Allocates and zeroes the buffer of `rank` on `device` (num_bytes of header and rings, plus a
// low-latency area of low_latency_bytes halves when that is positive); its peers are connected
// later. Every wait of its kernels gives up after `timeout_s` seconds.
void create_comm_buffer(int64_t buffer_id, int device, int rank, int num_ranks, size_t num_bytes, double timeout_s,
                        size_t low_latency_bytes);
// The CUDA IPC handle of the buffer.
std::string comm_buffer_ipc_handle(int64_t buffer_id, int device);
// Maps `peer_rank`'s buffer, living in another process, from its IPC handle.
void connect_ipc(int64_t buffer_id, int device, int peer_rank, const std::string& handle);
// Maps `peer_rank`'s buffer living on `peer_device` of this process (peer access).
void connect_local(int64_t buffer_id, int device, int peer_rank, int peer_device);
// The teardown below goes on past CUDA errors and returns them as text ("" when none), so that a
// trapped CUDA context still gets everything released that can be; both are idempotent.
// Unmaps the peers' buffers once the device is idle (every process does this before any buffer is freed).
std::string disconnect(int64_t buffer_id, int device);
// Unregisters the buffer and waits for the device; its memory goes with the last handler holding it.
std::string destroy_comm_buffer(int64_t buffer_id, int device);
// What the first of the buffer's kernels that failed reports (xla_ffi/failure.h), "" if none did.
std::string comm_buffer_failure(int64_t buffer_id, int device);
// Free device memory as the driver reports it (for leak checks).
size_t device_free_bytes(int device);

}  // namespace jax_deepep
