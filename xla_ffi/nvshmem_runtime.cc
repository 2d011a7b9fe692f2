#include "xla_ffi/nvshmem_runtime.h"

#include <cuda.h>
#include <cuda_runtime.h>
#include <nvshmem_host.h>
#include <nvshmemx.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "xla_ffi/failure.h"
#include "xla_ffi/host_errors.h"
#include "xla_ffi/registry.h"

namespace jax_deepep {
namespace {

Registry<NvshmemState>& states() {
  static Registry<NvshmemState> registry;
  return registry;
}

// Buffers being destroyed: out of states() (no handler finds them), their kernels done, waiting
// for nvshmem_release.
Registry<NvshmemState>& retired() {
  static Registry<NvshmemState> registry;
  return registry;
}

// The process's PE, once nvshmemx_init_attr succeeded (NVSHMEM is process-wide).
std::mutex pe_mutex;
std::optional<std::pair<int, int>> joined_pe;

}  // namespace

NvshmemState::~NvshmemState() {
  // Local frees only: the symmetric memory is freed collectively by nvshmem_release, or stays.
  for (const auto& r : registrations) nvshmemx_buffer_unregister(reinterpret_cast<void*>(r.first));
  cudaFree(const_cast<char**>(memory.peer));
  cudaFree(memory.call_numbers);
  cudaFree(memory.receive_blocks_done);
  cudaFree(memory.numbering_blocks_done);
  cudaFree(traffic);
  if (error_host != nullptr) cudaFreeHost(error_host);
}

std::shared_ptr<NvshmemState> find_nvshmem_state(int64_t buffer_id, int device) {
  return states().find({buffer_id, device});
}

bool register_put_source(NvshmemState& state, const void* ptr, size_t bytes, std::string* error) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(ptr);
  std::lock_guard<std::mutex> lock(state.registrations_mutex);
  for (const auto& r : state.registrations) {
    if (start >= r.first && start + bytes <= r.first + r.second) return true;
  }
  // The allocation holding ptr, from the driver (fetched through the runtime: no libcuda link).
  using GetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  static GetAddressRange get_address_range = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      fn = nullptr;
    }
    return reinterpret_cast<GetAddressRange>(fn);
  }();
  CUdeviceptr base = 0;
  size_t size = 0;
  if (get_address_range == nullptr ||
      get_address_range(&base, &size, static_cast<CUdeviceptr>(start)) != CUDA_SUCCESS) {
    *error = "the device allocation holding y could not be found (cuMemGetAddressRange)";
    return false;
  }
  if (nvshmemx_buffer_register(reinterpret_cast<void*>(base), size) != 0) {
    *error = "nvshmemx_buffer_register of the " + std::to_string(size) + "-byte allocation holding y failed";
    return false;
  }
  state.registrations.emplace_back(static_cast<uintptr_t>(base), size);
  return true;
}

std::string nvshmem_unique_id() {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (nvshmemx_get_uniqueid(&id) != 0) fail("nvshmemx_get_uniqueid failed");
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

void nvshmem_join(const std::string& unique_id, int rank, int num_ranks, int device) {
  std::lock_guard<std::mutex> lock(pe_mutex);
  if (joined_pe) fail("NVSHMEM is already initialised in this process");
  nvshmemx_uniqueid_t id;
  if (unique_id.size() != sizeof(id)) fail("an NVSHMEM unique id has " + std::to_string(sizeof(id)) + " bytes");
  std::memcpy(&id, unique_id.data(), sizeof(id));
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr)) fail("nvshmemx_set_attr_uniqueid_args failed");
  if (nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) != 0) fail("nvshmemx_init_attr failed");
  joined_pe = std::make_pair(rank, num_ranks);
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != num_ranks) {
    fail("NVSHMEM assigned PE " + std::to_string(nvshmem_my_pe()) + " of " + std::to_string(nvshmem_n_pes()) +
         ", expected " + std::to_string(rank) + " of " + std::to_string(num_ranks));
  }
}

std::optional<std::pair<int, int>> nvshmem_pe() {
  std::lock_guard<std::mutex> lock(pe_mutex);
  return joined_pe;
}

void nvshmem_create(int64_t buffer_id, int device, uint64_t num_bytes, double timeout_s, int direct_group,
                    bool map_other_groups) {
  if (!nvshmem_pe()) fail("NVSHMEM is not initialised");
  if (!states().all().empty() || !retired().all().empty())
    fail("an NVSHMEM buffer already exists in this process (destroy its Buffer first)");
  // The kernels compare elapsed nanoseconds with it unsigned: it must be positive and representable.
  if (!(timeout_s > 0.0 && timeout_s < 1e9)) fail("the timeout must be in (0, 1e9) seconds");
  const int rank = nvshmem_my_pe(), num_ranks = nvshmem_n_pes();
  if (direct_group < 1 || num_ranks % direct_group != 0) {
    fail("the direct-peer group must divide the number of ranks, got " + std::to_string(direct_group));
  }
  DeviceGuard guard(device);
  auto s = std::make_shared<NvshmemState>();
  // Receive halves, then one half of staging for puts to peers without a direct mapping (the low-
  // latency halves are at most num_bytes / 2 each), then the peers' op stamps and receipts.
  const uint64_t staging_bytes = num_bytes / 2;
  const uint64_t staging_at = (num_bytes + 15) / 16 * 16;  // 16-byte rows are staged there
  const uint64_t control_at = (staging_at + staging_bytes + 15) / 16 * 16;
  const uint64_t control_bytes = (1 + kNumReceiptKinds * kMaxLowLatencyHalves) * num_ranks * sizeof(uint32_t);
  char* buffer = static_cast<char*>(nvshmem_malloc(control_at + control_bytes));
  if (buffer == nullptr) {
    fail("nvshmem_malloc of " + std::to_string(control_at + control_bytes) +
         " bytes failed (raise NVSHMEM_SYMMETRIC_SIZE?)");
  }
  s->memory.local = buffer;
  s->memory.staging = buffer + staging_at;
  s->memory.op_stamps = reinterpret_cast<int*>(buffer + control_at);
  s->memory.receipts = reinterpret_cast<uint32_t*>(s->memory.op_stamps + num_ranks);
  // Signals, stamps and receipts start at zero on every PE before anyone can write one.
  check_cuda(cudaMemset(buffer, 0, num_bytes), "clearing the symmetric buffer");
  check_cuda(cudaMemset(buffer + control_at, 0, control_bytes), "clearing the op stamps and receipts");
  check_cuda(cudaDeviceSynchronize(), "clearing the symmetric buffer");
  nvshmem_barrier_all();

  std::vector<char*> peers(num_ranks);
  for (int pe = 0; pe < num_ranks; ++pe) {
    // Outside the group a peer is another node even where nvshmem_ptr maps it (all PEs on one GPU, or
    // nodes joined by NVLink): it is written through the mapping only with map_other_groups.
    const bool direct = map_other_groups || pe / direct_group == rank / direct_group;
    peers[pe] = direct ? static_cast<char*>(nvshmem_ptr(buffer, pe)) : nullptr;
  }
  s->group_mapped = true;
  for (int pe = 0; pe < num_ranks; ++pe) {
    s->has_put_peers |= pe != rank && peers[pe] == nullptr;
    s->group_mapped &= pe / direct_group != rank / direct_group || peers[pe] != nullptr;
  }
  char** peers_device = nullptr;
  check_cuda(cudaMalloc(&peers_device, num_ranks * sizeof(char*)), "copying the peer table");
  s->memory.peer = peers_device;
  check_cuda(cudaMemcpy(peers_device, peers.data(), num_ranks * sizeof(char*), cudaMemcpyHostToDevice),
             "copying the peer table");
  const char* what = "allocating the error record and counters";
  check_cuda(cudaHostAlloc(&s->error_host, sizeof(ErrorRecord), cudaHostAllocMapped), what);
  *s->error_host = ErrorRecord{};
  check_cuda(cudaHostGetDevicePointer(&s->memory.error, s->error_host, 0), what);
  check_cuda(cudaMalloc(&s->memory.call_numbers, kNumCallKinds * sizeof(uint32_t)), what);
  check_cuda(cudaMemset(s->memory.call_numbers, 0, kNumCallKinds * sizeof(uint32_t)), what);
  check_cuda(cudaMalloc(&s->memory.receive_blocks_done, kNumReceiptKinds * sizeof(uint32_t)), what);
  check_cuda(cudaMemset(s->memory.receive_blocks_done, 0, kNumReceiptKinds * sizeof(uint32_t)), what);
  check_cuda(cudaMalloc(&s->memory.numbering_blocks_done, kNumCallKinds * sizeof(uint32_t)), what);
  check_cuda(cudaMemset(s->memory.numbering_blocks_done, 0, kNumCallKinds * sizeof(uint32_t)), what);
  check_cuda(cudaMalloc(&s->traffic, 4 * sizeof(unsigned long long)), what);
  check_cuda(cudaMemset(s->traffic, 0, 4 * sizeof(unsigned long long)), what);
  check_cuda(cudaDeviceSynchronize(), what);
  s->memory.timeout_ns = static_cast<long long>(timeout_s * 1e9);
  s->memory.rank = rank;
  s->memory.num_ranks = num_ranks;
  s->num_bytes = num_bytes;
  s->direct_group = direct_group;
  if (!states().add({buffer_id, device}, std::move(s))) fail("buffer already exists on this device");
}

std::string nvshmem_retire(int64_t buffer_id, int device) {
  std::shared_ptr<NvshmemState> s = states().remove({buffer_id, device});
  if (!s) return "";
  // A handler that found the state before it left the registry may still be launching an op on it;
  // launching takes microseconds, the state's timeout bounds the wait all the same.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::nanoseconds(s->memory.timeout_ns);
  while (s.use_count() > 1 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  std::string notes;
  if (s.use_count() > 1) notes = "an op was still being launched on the buffer after the timeout";
  DeviceGuard guard(device);
  // Bounded: a wait that gives up traps its kernel (then this returns the sticky error).
  note_cuda(notes, cudaDeviceSynchronize(), "waiting for the kernels on the symmetric buffer");
  retired().add({buffer_id, device}, std::move(s));
  return notes;
}

void nvshmem_release(int64_t buffer_id, int device, bool collective_free) {
  std::shared_ptr<NvshmemState> s = retired().remove({buffer_id, device});
  if (!s) return;
  DeviceGuard guard(device);
  if (collective_free) nvshmem_free(s->memory.local);  // every PE frees its part, after a barrier
  // Otherwise the symmetric memory stays allocated until nvshmem_finalize or the process's end.
}

void nvshmem_leave(bool finalize) {
  // At exit, with no waits on peers that may be gone: any buffer left keeps its symmetric memory
  // until nvshmem_finalize releases the heap. A CUDA error while waiting for its kernels means a
  // lost context (a trap), which cannot take part in nvshmem_finalize's collective either.
  for (const auto& [key, state] : states().all()) finalize &= nvshmem_retire(key.first, key.second).empty();
  for (const auto& [key, state] : retired().all()) nvshmem_release(key.first, key.second, false);
  std::lock_guard<std::mutex> lock(pe_mutex);
  if (joined_pe && finalize) nvshmem_finalize();
  joined_pe.reset();
}

std::string nvshmem_failure(int64_t buffer_id, int device) {
  std::shared_ptr<NvshmemState> s = find_nvshmem_state(buffer_id, device);
  return s ? failure_message(s->error()) : "";
}

std::array<uint64_t, 4> internode_traffic(int64_t buffer_id, int device) {
  std::shared_ptr<NvshmemState> s = find_nvshmem_state(buffer_id, device);
  if (!s) fail("no NVSHMEM buffer " + std::to_string(buffer_id) + " on device " + std::to_string(device));
  std::array<uint64_t, 4> out{};
  DeviceGuard guard(device);
  check_cuda(cudaMemcpy(out.data(), s->traffic, sizeof(out), cudaMemcpyDeviceToHost), "reading the traffic counters");
  return out;
}

}  // namespace jax_deepep
