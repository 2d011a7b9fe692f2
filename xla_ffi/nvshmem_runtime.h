// The process's NVSHMEM runtime for the low-latency kernels: one PE per process (one GPU), a
// symmetric buffer of num_rdma_bytes (two alternating halves) plus one half of staging for
// nvshmem puts, the peers' buffers mapped over NVLink where possible, and the kernels' error record.
// NVSHMEM itself is initialised once per process (it cannot be re-initialised after finalize);
// each low-latency Buffer allocates and frees its own symmetric buffer.
//
// Python (jax_deepep/gpu/low_latency.py) drives it through the extern "C" functions below; the
// FFI handlers read it through nvshmem_runtime().
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda/low_latency.cuh"

namespace jax_deepep {

struct NvshmemRuntime {
  PeerMemory memory;
  uint64_t num_bytes = 0;  // both halves (num_rdma_bytes)
  ErrorRecord* error_host = nullptr;  // host view of memory.error (mapped pinned memory)
  bool has_put_peers = false;   // some peer is reached by nvshmem puts (no direct mapping)
  bool group_mapped = false;    // every peer of this PE's direct group is mapped (nvshmem_ptr)
  int direct_group = 0;         // ranks per group of directly written peers (a node)
  unsigned long long* traffic = nullptr;  // device [4]: internode rows and bytes put (dispatch, combine)
};

// The runtime with an allocated buffer, or null.
NvshmemRuntime* nvshmem_runtime();

// Makes [ptr, ptr + bytes) usable as the local source of nvshmem puts: registers the whole device
// allocation holding it with NVSHMEM (once; XLA's buffers live in a few large allocations), so a
// zero-copy combine can put rows straight out of XLA's memory. False with `error` set on failure.
bool register_put_source(const void* ptr, size_t bytes, std::string* error);

}  // namespace jax_deepep

extern "C" {
// Bytes of an NVSHMEM unique id.
int jax_deepep_nvshmem_unique_id_size();
// Writes a fresh unique id (call on PE 0 only); 0 on success.
int jax_deepep_nvshmem_get_unique_id(void* out);
// Joins the job as PE `rank` of `num_ranks` on CUDA device `device`; collective. 0 on success.
int jax_deepep_nvshmem_init(const void* unique_id, int rank, int num_ranks, int device);
// Allocates the symmetric buffer (num_bytes of receive halves + staging); collective. 0 on success.
// Peers in this PE's group of `direct_group` consecutive ranks get loads/stores through the
// mapping nvshmem_ptr gives (where it gives one); all others get nvshmem puts.
int jax_deepep_nvshmem_alloc(uint64_t num_bytes, double timeout_s, int direct_group);
// Frees the symmetric buffer once every PE's kernels are done; collective. 0 on success.
int jax_deepep_nvshmem_free();
// Leaves NVSHMEM (at process exit); frees the buffer first if needed. 0 on success.
int jax_deepep_nvshmem_finalize();
// Why the last call failed.
const char* jax_deepep_nvshmem_last_error();
// Nonzero once a kernel gave up waiting for a peer: the WaitKind of the first wait that did (cuda/wait.cuh).
int jax_deepep_nvshmem_timeout_flag();
// Copies the internode network traffic counters (dispatch rows, bytes, combine rows, bytes) to out[4]
// (synchronises the device; for tests). 0 on success.
int jax_deepep_internode_traffic(uint64_t* out);
}
