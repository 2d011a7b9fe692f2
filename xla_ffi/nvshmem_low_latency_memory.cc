// The low-latency handlers' memory in _nvshmem_lib: the Buffer's NVSHMEM symmetric buffer
// (xla_ffi/low_latency_memory.h).
#include "xla_ffi/low_latency_memory.h"
#include "xla_ffi/nvshmem_ffi.h"
#include "xla_ffi/nvshmem_runtime.h"

namespace jax_deepep {

const char* low_latency_target_prefix() { return "jax_deepep_ll_"; }

std::optional<LowLatencyMemory> find_low_latency_memory(int64_t buffer_id, int device, xla::ffi::Error* error) {
  std::shared_ptr<NvshmemState> state =
      live_nvshmem_state(buffer_id, device, "low-latency",
                         "create the Buffer with low_latency_mode=True and num_rdma_bytes > 0 first", error);
  if (state == nullptr) return std::nullopt;
  const PeerMemory memory = state->memory;
  const uint64_t num_bytes = state->num_bytes;
  const bool has_put_peers = state->has_put_peers;
  return LowLatencyMemory{std::move(state), memory, num_bytes, has_put_peers};
}

bool register_put_source(const LowLatencyMemory& memory, const void* ptr, size_t bytes, std::string* why) {
  return register_put_source(*static_cast<NvshmemState*>(memory.owner.get()), ptr, bytes, why);
}

}  // namespace jax_deepep
