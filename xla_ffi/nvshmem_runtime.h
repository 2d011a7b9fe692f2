// Host runtime of the NVSHMEM kernels (low latency and internode): the process's NVSHMEM PE and,
// per (Buffer, device) in the library's Registry (xla_ffi/registry.h), a symmetric buffer of
// num_rdma_bytes (the low-latency halves, or internode's regions) plus half as much again of staging
// for nvshmem puts, the peers' buffers mapped over NVLink where possible, the kernels' error record
// and the put sources registered with NVSHMEM.
//
// What NVSHMEM allows only once per process, not per Buffer:
//  - init and finalize: one PE per process for its lifetime (NVSHMEM cannot re-initialise after
//    finalize), so every NVSHMEM Buffer of a process is the same rank of the same ranks;
//  - the symmetric heap size, fixed at init (NVSHMEM_SYMMETRIC_SIZE);
//  - registering an allocation as a put source (nvshmemx_buffer_register refuses an allocation
//    registered already, and XLA's buffers share a few large allocations).
// Hence one NVSHMEM Buffer lives at a time in a process; each allocates and frees its own
// symmetric buffer.
//
// The Python bindings (nvshmem_module.cc) call the functions below; each throws on failure.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cuda/nvshmem_peers.cuh"

namespace jax_deepep {

struct NvshmemState {
  PeerMemory memory{};
  uint64_t num_bytes = 0;       // the receive halves (num_rdma_bytes)
  ErrorRecord* error_host = nullptr;  // host view of memory.error (mapped pinned memory)
  bool has_put_peers = false;   // some peer is reached by nvshmem puts (no direct mapping)
  bool group_mapped = false;    // every peer of this PE's direct group is mapped (nvshmem_ptr)
  int direct_group = 0;         // ranks per group of directly written peers (a node)
  unsigned long long* traffic = nullptr;  // device [4]: rows and bytes sent to other nodes (dispatch, combine)

  // Device allocations registered with NVSHMEM as put sources, [base, base + size).
  std::mutex registrations_mutex;
  std::vector<std::pair<uintptr_t, size_t>> registrations;

  NvshmemState() = default;
  NvshmemState(const NvshmemState&) = delete;
  NvshmemState& operator=(const NvshmemState&) = delete;
  ~NvshmemState();  // unregisters the put sources and frees what is local (not the symmetric memory)

  // The record of the first wait that gave up; its `code` (a WaitKind, cuda/wait.cuh) is 0 while none did.
  const volatile ErrorRecord& error() const { return *error_host; }
};

// The state registered for (buffer id, device ordinal), or null.
std::shared_ptr<NvshmemState> find_nvshmem_state(int64_t buffer_id, int device);

// Makes [ptr, ptr + bytes) usable as the local source of nvshmem puts: registers the whole device
// allocation holding it with NVSHMEM (once; XLA's buffers live in a few large allocations), so a
// zero-copy combine can put rows straight out of XLA's memory. False with `error` set on failure.
bool register_put_source(NvshmemState& state, const void* ptr, size_t bytes, std::string* error);

// A fresh unique id (on PE 0 only), as bytes.
std::string nvshmem_unique_id();
// Joins the job as PE `rank` of `num_ranks` on CUDA device `device`; collective.
void nvshmem_join(const std::string& unique_id, int rank, int num_ranks, int device);
// (rank, number of ranks) once joined.
std::optional<std::pair<int, int>> nvshmem_pe();
// Allocates the symmetric buffer of (buffer_id, device): num_bytes of receive halves + staging;
// collective. Peers in this PE's group of `direct_group` consecutive ranks (with `map_other_groups`,
// every peer) get loads/stores through the mapping nvshmem_ptr gives, where it gives one; all others
// get nvshmem puts.
void nvshmem_create(int64_t buffer_id, int device, uint64_t num_bytes, double timeout_s, int direct_group,
                    bool map_other_groups);
// Destroying a buffer, in two steps around a barrier of every PE (with a timeout, in Python):
// Takes the buffer out of the registry (no handler finds it any more) and waits until this PE's
// kernels are done with it; returns the CUDA errors met ("" when none; after a trap, the sticky
// error), going on past them. Idempotent.
std::string nvshmem_retire(int64_t buffer_id, int device);
// Frees a retired buffer: the symmetric memory with nvshmem_free (collective) when `collective_free`,
// what is local always; without it the symmetric memory stays until the process leaves NVSHMEM
// (a peer that is gone would never join the collective free). Idempotent.
void nvshmem_release(int64_t buffer_id, int device, bool collective_free);
// Leaves NVSHMEM (at process exit): releases every buffer left without collective waits, then
// nvshmem_finalize (collective) when `finalize` and no kernel of those buffers left the context lost.
void nvshmem_leave(bool finalize);
// What the first of the buffer's kernels that failed reports (xla_ffi/failure.h), "" if none did.
std::string nvshmem_failure(int64_t buffer_id, int device);
// The buffer's counters of what went to other nodes (put or written through the mapping): dispatch rows,
// bytes, combine rows, bytes (synchronises the device; for tests).
std::array<uint64_t, 4> internode_traffic(int64_t buffer_id, int device);

}  // namespace jax_deepep
