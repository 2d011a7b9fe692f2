#include "xla_ffi/nvshmem_runtime.h"

#include <cuda.h>
#include <cuda_runtime.h>
#include <nvshmem_host.h>
#include <nvshmemx.h>

#include <mutex>
#include <string>
#include <vector>

namespace jax_deepep {
namespace {

NvshmemRuntime g_runtime;
bool g_nvshmem_up = false;  // nvshmemx_init_attr done
bool g_allocated = false;   // g_runtime holds a live buffer
std::string g_last_error;

// Device allocations registered with NVSHMEM as put sources, [base, base + size); dropped with the buffer.
struct Registration {
  uintptr_t base;
  size_t size;
};
std::vector<Registration> g_registrations;
std::mutex g_registrations_mutex;

int fail(const std::string& message) {
  g_last_error = message;
  return 1;
}

int fail_cuda(const char* what, cudaError_t status) {
  return fail(std::string(what) + ": " + cudaGetErrorString(status));
}

}  // namespace

NvshmemRuntime* nvshmem_runtime() { return g_allocated ? &g_runtime : nullptr; }

bool register_put_source(const void* ptr, size_t bytes, std::string* error) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(ptr);
  std::lock_guard<std::mutex> lock(g_registrations_mutex);
  for (const Registration& r : g_registrations) {
    if (start >= r.base && start + bytes <= r.base + r.size) return true;
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
  g_registrations.push_back({static_cast<uintptr_t>(base), size});
  return true;
}

}  // namespace jax_deepep

using jax_deepep::fail;
using jax_deepep::fail_cuda;
using jax_deepep::g_allocated;
using jax_deepep::g_nvshmem_up;
using jax_deepep::g_runtime;

extern "C" {

int jax_deepep_nvshmem_unique_id_size() { return static_cast<int>(sizeof(nvshmemx_uniqueid_t)); }

int jax_deepep_nvshmem_get_unique_id(void* out) {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (nvshmemx_get_uniqueid(&id) != 0) return fail("nvshmemx_get_uniqueid failed");
  *static_cast<nvshmemx_uniqueid_t*>(out) = id;
  return 0;
}

int jax_deepep_nvshmem_init(const void* unique_id, int rank, int num_ranks, int device) {
  if (g_nvshmem_up) return fail("NVSHMEM is already initialised in this process");
  const cudaError_t status = cudaSetDevice(device);
  if (status != cudaSuccess) return fail_cuda("cudaSetDevice", status);
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(rank, num_ranks, static_cast<const nvshmemx_uniqueid_t*>(unique_id), &attr)) {
    return fail("nvshmemx_set_attr_uniqueid_args failed");
  }
  if (nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) != 0) return fail("nvshmemx_init_attr failed");
  g_nvshmem_up = true;
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != num_ranks) {
    return fail("NVSHMEM assigned PE " + std::to_string(nvshmem_my_pe()) + " of " + std::to_string(nvshmem_n_pes()) +
                ", expected " + std::to_string(rank) + " of " + std::to_string(num_ranks));
  }
  return 0;
}

int jax_deepep_nvshmem_alloc(uint64_t num_bytes, double timeout_s, int direct_group) {
  if (!g_nvshmem_up) return fail("NVSHMEM is not initialised");
  if (g_allocated) return fail("an NVSHMEM buffer already exists in this process (destroy its Buffer first)");
  // The kernels compare elapsed nanoseconds with it unsigned: it must be positive and representable.
  if (!(timeout_s > 0.0 && timeout_s < 1e9)) return fail("the timeout must be in (0, 1e9) seconds");
  const int rank = nvshmem_my_pe(), num_ranks = nvshmem_n_pes();
  if (direct_group < 1 || num_ranks % direct_group != 0) {
    return fail("the direct-peer group must divide the number of ranks, got " + std::to_string(direct_group));
  }
  // Receive halves, then one half of staging for puts to peers without a direct mapping.
  const uint64_t staging_bytes = num_bytes / 2;
  char* buffer = static_cast<char*>(nvshmem_malloc(num_bytes + staging_bytes));
  if (buffer == nullptr) {
    return fail("nvshmem_malloc of " + std::to_string(num_bytes + staging_bytes) +
                " bytes failed (raise NVSHMEM_SYMMETRIC_SIZE?)");
  }
  // Signals start at zero on every PE before anyone can write one.
  cudaError_t status;
  if ((status = cudaMemset(buffer, 0, num_bytes)) != cudaSuccess || (status = cudaDeviceSynchronize()) != cudaSuccess) {
    return fail_cuda("clearing the symmetric buffer", status);
  }
  nvshmem_barrier_all();

  std::vector<char*> peers(num_ranks);
  for (int pe = 0; pe < num_ranks; ++pe) {
    // Outside the group a peer is another node even where nvshmem_ptr maps it (all PEs on one GPU).
    const bool direct = pe / direct_group == rank / direct_group;
    peers[pe] = direct ? static_cast<char*>(nvshmem_ptr(buffer, pe)) : nullptr;
  }
  bool has_put_peers = false, group_mapped = true;
  for (int pe = 0; pe < num_ranks; ++pe) {
    has_put_peers |= pe != rank && peers[pe] == nullptr;
    group_mapped &= pe / direct_group != rank / direct_group || peers[pe] != nullptr;
  }
  char** peers_device = nullptr;
  if ((status = cudaMalloc(&peers_device, num_ranks * sizeof(char*))) != cudaSuccess ||
      (status = cudaMemcpy(peers_device, peers.data(), num_ranks * sizeof(char*), cudaMemcpyHostToDevice)) !=
          cudaSuccess) {
    return fail_cuda("copying the peer table", status);
  }
  jax_deepep::ErrorRecord* error_host = nullptr;
  jax_deepep::ErrorRecord* error_device = nullptr;
  uint32_t* call_numbers = nullptr;
  unsigned long long* traffic = nullptr;
  if ((status = cudaHostAlloc(&error_host, sizeof(jax_deepep::ErrorRecord), cudaHostAllocMapped)) != cudaSuccess ||
      (status = cudaHostGetDevicePointer(&error_device, error_host, 0)) != cudaSuccess ||
      (status = cudaMalloc(&call_numbers, jax_deepep::kNumCallKinds * sizeof(uint32_t))) != cudaSuccess ||
      (status = cudaMemset(call_numbers, 0, jax_deepep::kNumCallKinds * sizeof(uint32_t))) != cudaSuccess ||
      (status = cudaMalloc(&traffic, 4 * sizeof(unsigned long long))) != cudaSuccess ||
      (status = cudaMemset(traffic, 0, 4 * sizeof(unsigned long long))) != cudaSuccess ||
      (status = cudaDeviceSynchronize()) != cudaSuccess) {
    return fail_cuda("allocating the error record and counters", status);
  }
  *error_host = jax_deepep::ErrorRecord{};

  g_runtime = jax_deepep::NvshmemRuntime{};
  g_runtime.memory.local = buffer;
  g_runtime.memory.staging = buffer + num_bytes;
  g_runtime.memory.peer = peers_device;
  g_runtime.memory.error = error_device;
  g_runtime.memory.timeout_ns = static_cast<long long>(timeout_s * 1e9);
  g_runtime.memory.rank = rank;
  g_runtime.memory.num_ranks = num_ranks;
  g_runtime.memory.call_numbers = call_numbers;
  g_runtime.num_bytes = num_bytes;
  g_runtime.error_host = error_host;
  g_runtime.has_put_peers = has_put_peers;
  g_runtime.group_mapped = group_mapped;
  g_runtime.direct_group = direct_group;
  g_runtime.traffic = traffic;
  g_allocated = true;
  return 0;
}

int jax_deepep_nvshmem_free() {
  if (!g_allocated) return 0;
  g_allocated = false;
  const cudaError_t status = cudaDeviceSynchronize();  // none of our kernels may still use the buffer
  nvshmem_barrier_all();                               // nor a peer's
  {
    std::lock_guard<std::mutex> lock(jax_deepep::g_registrations_mutex);
    for (const auto& r : jax_deepep::g_registrations) nvshmemx_buffer_unregister(reinterpret_cast<void*>(r.base));
    jax_deepep::g_registrations.clear();
  }
  nvshmem_free(g_runtime.memory.local);
  cudaFree(const_cast<char**>(g_runtime.memory.peer));
  cudaFree(g_runtime.memory.call_numbers);
  cudaFree(g_runtime.traffic);
  cudaFreeHost(g_runtime.error_host);
  g_runtime = jax_deepep::NvshmemRuntime{};
  if (status != cudaSuccess) return fail_cuda("synchronising before freeing the symmetric buffer", status);
  return 0;
}

int jax_deepep_nvshmem_finalize() {
  const int status = jax_deepep_nvshmem_free();
  if (g_nvshmem_up) nvshmem_finalize();
  g_nvshmem_up = false;
  return status;
}

const char* jax_deepep_nvshmem_last_error() { return jax_deepep::g_last_error.c_str(); }

int jax_deepep_internode_traffic(uint64_t* out) {
  if (!g_allocated) return fail("no NVSHMEM buffer");
  const cudaError_t status = cudaMemcpy(out, g_runtime.traffic, 4 * sizeof(uint64_t), cudaMemcpyDeviceToHost);
  return status == cudaSuccess ? 0 : fail_cuda("reading the traffic counters", status);
}

int jax_deepep_nvshmem_timeout_flag() {
  if (!g_allocated) return 0;
  return static_cast<const volatile jax_deepep::ErrorRecord*>(g_runtime.error_host)->code;
}

}  // extern "C"
