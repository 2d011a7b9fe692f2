// Every (Buffer id, device ordinal) owns one communication buffer. Peers are mapped either
// with peer access (same process) or by opening their CUDA IPC handle (another process).
#include "xla_ffi/runtime.h"

#include <cstring>

#include "cuda/launch.h"
#include "xla_ffi/failure.h"
#include "xla_ffi/host_errors.h"
#include "xla_ffi/registry.h"

namespace jax_deepep {
namespace {

Registry<RankState>& states() {
  static Registry<RankState> registry;
  return registry;
}

// Where the low-latency area's halves start in a buffer (its control block lies just before).
size_t low_latency_halves_at(const RankState& s) {
  constexpr size_t kPage = 4096;
  const size_t control_at = (s.num_bytes + kPage - 1) / kPage * kPage;
  return control_at + (sizeof(LowLatencyControl) + kPage - 1) / kPage * kPage;
}

LowLatencyControl* low_latency_control(const RankState& s) {
  return reinterpret_cast<LowLatencyControl*>(s.local + low_latency_halves_at(s) - sizeof(LowLatencyControl));
}

// Keeps the low-latency kernels' table of peers in step with s.peers[r] (null while unmapped).
cudaError_t publish_low_latency_peer(const RankState& s, int r) {
  if (s.low_latency_bytes == 0) return cudaSuccess;
  char* halves = s.peers[r] == nullptr ? nullptr : s.peers[r] + low_latency_halves_at(s);
  return cudaMemcpy(&low_latency_control(s)->peers[r], &halves, sizeof(halves), cudaMemcpyHostToDevice);
}

std::shared_ptr<RankState> existing(int64_t buffer_id, int device, const char* what) {
  std::shared_ptr<RankState> s = states().find({buffer_id, device});
  if (!s) fail(std::string(what) + ": no communication buffer " + std::to_string(buffer_id) + " on device " +
               std::to_string(device));
  return s;
}

void close_peers(RankState& s, std::string& notes) {
  for (int r = 0; r < s.num_ranks; ++r) {
    if (s.peer_is_ipc[r]) note_cuda(notes, cudaIpcCloseMemHandle(s.peers[r]), "cudaIpcCloseMemHandle");
    s.peer_is_ipc[r] = false;
    s.peers[r] = r == s.rank ? s.local : nullptr;
    note_cuda(notes, publish_low_latency_peer(s, r), "clearing the low-latency peer table");
  }
}

}  // namespace

RankState::~RankState() {
  DeviceGuard guard(device);
  cudaDeviceSynchronize();  // cudaFree waits too; this also covers the peers' IPC mappings
  for (int r = 0; r < num_ranks; ++r) {
    if (peer_is_ipc[r]) cudaIpcCloseMemHandle(peers[r]);
  }
  if (local != nullptr) cudaFree(local);
  if (error_host != nullptr) cudaFreeHost(error_host);
}

RankInfo RankState::info() const {
  RankInfo out{};
  out.rank = rank;
  out.num_ranks = num_ranks;
  for (int r = 0; r < kMaxRanks; ++r) out.buffers[r] = peers[r];
  out.error = error_device;
  out.timeout_ns = timeout_ns;
  return out;
}

PeerMemory RankState::low_latency_memory() const {
  LowLatencyControl* control = low_latency_control(*this);
  PeerMemory out{};
  out.local = local + low_latency_halves_at(*this);
  out.staging = nullptr;  // every peer is mapped: nothing is ever put
  out.peer = control->peers;
  out.error = error_device;
  out.timeout_ns = timeout_ns;
  out.rank = rank;
  out.num_ranks = num_ranks;
  out.call_numbers = control->call_numbers;
  out.op_stamps = control->op_stamps;
  out.receipts = control->receipts;
  out.receive_blocks_done = control->receive_blocks_done;
  out.numbering_blocks_done = control->numbering_blocks_done;
  return out;
}

std::shared_ptr<RankState> find_rank_state(int64_t buffer_id, int device) {
  return states().find({buffer_id, device});
}

void create_comm_buffer(int64_t buffer_id, int device, int rank, int num_ranks, size_t num_bytes, double timeout_s,
                        size_t low_latency_bytes) {
  if (num_ranks < 1 || num_ranks > kMaxRanks || rank < 0 || rank >= num_ranks)
    fail("bad rank " + std::to_string(rank) + " of " + std::to_string(num_ranks));
  if (!(timeout_s > 0.0 && timeout_s < 1e9)) fail("the timeout must be in (0, 1e9) seconds");
  if (num_bytes < ring_offset()) fail("buffer smaller than its header");
  if (find_rank_state(buffer_id, device)) fail("buffer already exists on this device");
  DeviceGuard guard(device);
  auto s = std::make_shared<RankState>();
  s->device = device;
  s->rank = rank;
  s->num_ranks = num_ranks;
  s->num_bytes = num_bytes;
  s->low_latency_bytes = low_latency_bytes;
  s->timeout_ns = static_cast<long long>(timeout_s * 1e9);
  const size_t total = low_latency_bytes > 0 ? low_latency_halves_at(*s) + low_latency_bytes : num_bytes;
  check_cuda(cudaMalloc(&s->local, total), "cudaMalloc");
  check_cuda(cudaMemset(s->local, 0, total), "cudaMemset");  // rings, signals, receipts: all start at zero
  check_cuda(cudaHostAlloc(&s->error_host, sizeof(ErrorRecord), cudaHostAllocMapped | cudaHostAllocPortable),
             "cudaHostAlloc");
  *s->error_host = ErrorRecord{};
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&s->error_device), s->error_host, 0),
             "cudaHostGetDevicePointer");
  check_cuda(prepare_layout(), "prepare_layout");
  check_cuda(prepare_dispatch(), "prepare_dispatch");
  check_cuda(prepare_combine(), "prepare_combine");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  s->peers[rank] = s->local;
  check_cuda(publish_low_latency_peer(*s, rank), "publishing the low-latency peer table");
  if (!states().add({buffer_id, device}, std::move(s))) fail("buffer already exists on this device");
}

std::string comm_buffer_ipc_handle(int64_t buffer_id, int device) {
  std::shared_ptr<RankState> s = existing(buffer_id, device, "ipc_handle");
  DeviceGuard guard(device);
  cudaIpcMemHandle_t handle;
  check_cuda(cudaIpcGetMemHandle(&handle, s->local), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void connect_ipc(int64_t buffer_id, int device, int peer_rank, const std::string& handle_bytes) {
  std::shared_ptr<RankState> s = existing(buffer_id, device, "connect_ipc");
  if (peer_rank < 0 || peer_rank >= s->num_ranks || peer_rank == s->rank) fail("connect_ipc: bad peer rank");
  cudaIpcMemHandle_t handle;
  if (handle_bytes.size() != sizeof(handle)) fail("connect_ipc: an IPC handle has " + std::to_string(sizeof(handle)) + " bytes");
  std::memcpy(&handle, handle_bytes.data(), sizeof(handle));
  DeviceGuard guard(device);
  void* ptr = nullptr;
  check_cuda(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
  s->peers[peer_rank] = static_cast<char*>(ptr);
  s->peer_is_ipc[peer_rank] = true;
  check_cuda(publish_low_latency_peer(*s, peer_rank), "publishing the low-latency peer table");
}

void connect_local(int64_t buffer_id, int device, int peer_rank, int peer_device) {
  std::shared_ptr<RankState> s = existing(buffer_id, device, "connect_local");
  std::shared_ptr<RankState> peer = existing(buffer_id, peer_device, "connect_local");
  if (peer_rank < 0 || peer_rank >= s->num_ranks || peer->rank != peer_rank) fail("connect_local: bad peer rank");
  if (peer_device != device) {
    DeviceGuard guard(device);
    int can_access = 0;
    check_cuda(cudaDeviceCanAccessPeer(&can_access, device, peer_device), "cudaDeviceCanAccessPeer");
    if (!can_access)
      fail("connect_local: device " + std::to_string(device) + " cannot access device " + std::to_string(peer_device));
    cudaError_t err = cudaDeviceEnablePeerAccess(peer_device, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled) {
      cudaGetLastError();
    } else {
      check_cuda(err, "cudaDeviceEnablePeerAccess");
    }
  }
  s->peers[peer_rank] = peer->local;
  DeviceGuard guard(device);
  check_cuda(publish_low_latency_peer(*s, peer_rank), "publishing the low-latency peer table");
}

std::string disconnect(int64_t buffer_id, int device) {
  std::shared_ptr<RankState> s = find_rank_state(buffer_id, device);
  if (!s) return "";
  DeviceGuard guard(device);
  std::string notes;
  // Bounded: a wait that gives up traps its kernel. The mappings are closed even after an error.
  note_cuda(notes, cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  close_peers(*s, notes);
  return notes;
}

std::string destroy_comm_buffer(int64_t buffer_id, int device) {
  std::shared_ptr<RankState> s = states().remove({buffer_id, device});
  if (!s) return "";
  DeviceGuard guard(device);
  std::string notes;
  note_cuda(notes, cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  return notes;  // `s` frees the memory now, or when a handler still launching an op lets go of it
}

std::string comm_buffer_failure(int64_t buffer_id, int device) {
  std::shared_ptr<RankState> s = find_rank_state(buffer_id, device);
  return s ? failure_message(*s->error_host) : "";
}

size_t device_free_bytes(int device) {
  DeviceGuard guard(device);
  size_t free_bytes = 0, total_bytes = 0;
  return cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess ? free_bytes : 0;
}

}  // namespace jax_deepep
