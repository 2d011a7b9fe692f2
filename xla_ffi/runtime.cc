// Host runtime and its C ABI (called from jax_deepep/gpu/runtime.py through ctypes).
//
// Every (Buffer id, device ordinal) owns one communication buffer. Peers are mapped either
// with peer access (same process) or by opening their CUDA IPC handle (another process).
#include "xla_ffi/runtime.h"

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "cuda/intranode.h"

namespace jax_deepep {
namespace {

// How long an intranode wait may last, until the Buffer's timeout is handed down here.
constexpr long long kWaitTimeoutNs = 5'000'000'000;

std::mutex registry_mutex;
std::map<std::pair<int64_t, int>, std::unique_ptr<RankState>> registry;
thread_local std::string last_error;

int fail(const std::string& what, cudaError_t err) {
  last_error = what + ": " + cudaGetErrorString(err);
  return 1;
}

int fail(const std::string& what) {
  last_error = what;
  return 1;
}

#define JDEEP_TRY(call)                                  \
  do {                                                   \
    cudaError_t err_ = (call);                           \
    if (err_ != cudaSuccess) return ::jax_deepep::fail(#call, err_); \
  } while (0)

RankState* lookup(int64_t buffer_id, int device) {
  auto it = registry.find({buffer_id, device});
  return it == registry.end() ? nullptr : it->second.get();
}

// Restores the calling thread's current device when it goes out of scope.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

int close_peers(RankState& s) {
  for (int r = 0; r < s.num_ranks; ++r) {
    if (s.peer_is_ipc[r]) JDEEP_TRY(cudaIpcCloseMemHandle(s.peers[r]));
    s.peer_is_ipc[r] = false;
    s.peers[r] = r == s.rank ? s.local : nullptr;
  }
  return 0;
}

}  // namespace

RankInfo RankState::info() const {
  RankInfo out{};
  out.rank = rank;
  out.num_ranks = num_ranks;
  for (int r = 0; r < kMaxRanks; ++r) out.buffers[r] = peers[r];
  out.error = error_device;
  out.timeout_ns = kWaitTimeoutNs;
  return out;
}

RankState* find_rank_state(int64_t buffer_id, int device) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  return lookup(buffer_id, device);
}

}  // namespace jax_deepep

using jax_deepep::RankState;

JAX_DEEPEP_EXPORT const char* jax_deepep_last_error() { return jax_deepep::last_error.c_str(); }

JAX_DEEPEP_EXPORT size_t jax_deepep_ring_offset() { return jax_deepep::ring_offset(); }

JAX_DEEPEP_EXPORT int jax_deepep_max_ranks() { return jax_deepep::kMaxRanks; }

JAX_DEEPEP_EXPORT int jax_deepep_max_channels() { return jax_deepep::kMaxChannels; }

JAX_DEEPEP_EXPORT int jax_deepep_max_local_experts() { return jax_deepep::kMaxLocalExperts; }

// Allocates and zeroes the buffer of `rank` on `device`; its peers are connected later.
JAX_DEEPEP_EXPORT int jax_deepep_create(int64_t buffer_id, int device, int rank, int num_ranks, size_t num_bytes) {
  using namespace jax_deepep;
  if (num_ranks < 1 || num_ranks > kMaxRanks || rank < 0 || rank >= num_ranks)
    return fail("jax_deepep_create: bad rank " + std::to_string(rank) + " of " + std::to_string(num_ranks));
  if (num_bytes < ring_offset()) return fail("jax_deepep_create: buffer smaller than its header");
  std::lock_guard<std::mutex> lock(registry_mutex);
  if (lookup(buffer_id, device)) return fail("jax_deepep_create: buffer already exists on this device");
  DeviceGuard guard(device);
  auto s = std::make_unique<RankState>();
  s->device = device;
  s->rank = rank;
  s->num_ranks = num_ranks;
  s->num_bytes = num_bytes;
  JDEEP_TRY(cudaMalloc(&s->local, num_bytes));
  JDEEP_TRY(cudaMemset(s->local, 0, num_bytes));
  JDEEP_TRY(cudaHostAlloc(&s->error_host, sizeof(ErrorRecord), cudaHostAllocMapped | cudaHostAllocPortable));
  *s->error_host = ErrorRecord{};
  JDEEP_TRY(cudaHostGetDevicePointer(reinterpret_cast<void**>(&s->error_device), s->error_host, 0));
  JDEEP_TRY(prepare_layout());
  JDEEP_TRY(prepare_dispatch());
  JDEEP_TRY(prepare_combine());
  JDEEP_TRY(cudaDeviceSynchronize());
  s->peers[rank] = s->local;
  registry[{buffer_id, device}] = std::move(s);
  return 0;
}

// Writes the CUDA IPC handle of the buffer (CUDA_IPC_HANDLE_SIZE bytes) to `out`.
JAX_DEEPEP_EXPORT int jax_deepep_ipc_handle(int64_t buffer_id, int device, char* out) {
  std::lock_guard<std::mutex> lock(jax_deepep::registry_mutex);
  RankState* s = jax_deepep::lookup(buffer_id, device);
  if (!s) return jax_deepep::fail("jax_deepep_ipc_handle: no such buffer");
  jax_deepep::DeviceGuard guard(device);
  cudaIpcMemHandle_t handle;
  JDEEP_TRY(cudaIpcGetMemHandle(&handle, s->local));
  std::memcpy(out, &handle, sizeof(handle));
  return 0;
}

JAX_DEEPEP_EXPORT int jax_deepep_ipc_handle_size() { return static_cast<int>(sizeof(cudaIpcMemHandle_t)); }

// Maps `peer_rank`'s buffer, living in another process, from its IPC handle.
JAX_DEEPEP_EXPORT int jax_deepep_connect_ipc(int64_t buffer_id, int device, int peer_rank, const char* handle_bytes) {
  std::lock_guard<std::mutex> lock(jax_deepep::registry_mutex);
  RankState* s = jax_deepep::lookup(buffer_id, device);
  if (!s || peer_rank < 0 || peer_rank >= s->num_ranks || peer_rank == s->rank)
    return jax_deepep::fail("jax_deepep_connect_ipc: no such buffer or bad peer rank");
  jax_deepep::DeviceGuard guard(device);
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, handle_bytes, sizeof(handle));
  void* ptr = nullptr;
  JDEEP_TRY(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess));
  s->peers[peer_rank] = static_cast<char*>(ptr);
  s->peer_is_ipc[peer_rank] = true;
  return 0;
}

// Maps `peer_rank`'s buffer living on `peer_device` of this process (peer access).
JAX_DEEPEP_EXPORT int jax_deepep_connect_local(int64_t buffer_id, int device, int peer_rank, int peer_device) {
  std::lock_guard<std::mutex> lock(jax_deepep::registry_mutex);
  RankState* s = jax_deepep::lookup(buffer_id, device);
  RankState* peer = jax_deepep::lookup(buffer_id, peer_device);
  if (!s || !peer || peer_rank < 0 || peer_rank >= s->num_ranks || peer->rank != peer_rank)
    return jax_deepep::fail("jax_deepep_connect_local: no such buffer or bad peer rank");
  if (peer_device != device) {
    jax_deepep::DeviceGuard guard(device);
    int can_access = 0;
    JDEEP_TRY(cudaDeviceCanAccessPeer(&can_access, device, peer_device));
    if (!can_access)
      return jax_deepep::fail("jax_deepep_connect_local: device " + std::to_string(device) +
                              " cannot access device " + std::to_string(peer_device));
    cudaError_t err = cudaDeviceEnablePeerAccess(peer_device, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled) {
      cudaGetLastError();
    } else if (err != cudaSuccess) {
      return jax_deepep::fail("cudaDeviceEnablePeerAccess", err);
    }
  }
  s->peers[peer_rank] = peer->local;
  return 0;
}

// Unmaps the peers' buffers (every process does this before any buffer is freed).
JAX_DEEPEP_EXPORT int jax_deepep_disconnect(int64_t buffer_id, int device) {
  std::lock_guard<std::mutex> lock(jax_deepep::registry_mutex);
  RankState* s = jax_deepep::lookup(buffer_id, device);
  if (!s) return 0;
  jax_deepep::DeviceGuard guard(device);
  JDEEP_TRY(cudaDeviceSynchronize());
  return jax_deepep::close_peers(*s);
}

// Frees the buffer (idempotent).
JAX_DEEPEP_EXPORT int jax_deepep_destroy(int64_t buffer_id, int device) {
  std::lock_guard<std::mutex> lock(jax_deepep::registry_mutex);
  auto it = jax_deepep::registry.find({buffer_id, device});
  if (it == jax_deepep::registry.end()) return 0;
  RankState& s = *it->second;
  jax_deepep::DeviceGuard guard(device);
  JDEEP_TRY(cudaDeviceSynchronize());
  if (jax_deepep::close_peers(s)) return 1;
  JDEEP_TRY(cudaFree(s.local));
  JDEEP_TRY(cudaFreeHost(s.error_host));
  jax_deepep::registry.erase(it);
  return 0;
}

// Free device memory as the driver reports it (for leak checks).
JAX_DEEPEP_EXPORT size_t jax_deepep_device_free_bytes(int device) {
  jax_deepep::DeviceGuard guard(device);
  size_t free_bytes = 0, total_bytes = 0;
  return cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess ? free_bytes : 0;
}

// The WaitKind of the first wait on this buffer that gave up (cuda/wait.cuh), 0 if none.
JAX_DEEPEP_EXPORT int jax_deepep_error_code(int64_t buffer_id, int device) {
  std::lock_guard<std::mutex> lock(jax_deepep::registry_mutex);
  RankState* s = jax_deepep::lookup(buffer_id, device);
  return s ? static_cast<const volatile jax_deepep::ErrorRecord*>(s->error_host)->code : 0;
}

