// Where the low-latency handlers (low_latency_ffi.cc) find their Buffer's memory. The handlers are
// built into two libraries, each linking one definition of the functions below:
//  - _nvshmem_lib (nvshmem_low_latency_memory.cc): NVSHMEM's symmetric buffer, any number of nodes;
//  - _intranode_lib (ipc_low_latency_memory.cc): the low-latency area of the Buffer's communication
//    buffer, every peer mapped over CUDA IPC or peer access: one node, with one process per GPU or
//    one process owning several GPUs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "cuda/nvshmem_peers.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_deepep {

struct LowLatencyMemory {
  std::shared_ptr<void> owner;  // the Buffer's state, held while an op launches on it
  PeerMemory memory;
  uint64_t num_bytes;   // the halves' bytes (num_rdma_bytes)
  bool has_put_peers;   // some peer is reached by puts (not mapped): NVSHMEM across nodes only
};

// The prefix of this library's low-latency FFI target names ("jax_deepep_ll_" or "jax_deepep_ll_node_").
const char* low_latency_target_prefix();

// The memory of (buffer_id, device), or nullopt with *error set: no such Buffer (or one without
// low-latency memory), or an earlier kernel of the Buffer failed (xla_ffi/failure.h).
std::optional<LowLatencyMemory> find_low_latency_memory(int64_t buffer_id, int device, xla::ffi::Error* error);

// A zero-copy combine puts rows straight from XLA's `y`: makes [ptr, ptr + bytes) a valid put
// source (NVSHMEM registers its allocation, once). Called only when has_put_peers; false with
// `why` set on failure.
bool register_put_source(const LowLatencyMemory& memory, const void* ptr, size_t bytes, std::string* why);

}  // namespace jax_deepep
