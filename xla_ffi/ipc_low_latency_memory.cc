// The low-latency handlers' memory in _intranode_lib: the low-latency area of the Buffer's
// communication buffer (xla_ffi/runtime.h), every peer of the node mapped over CUDA IPC or peer
// access (xla_ffi/low_latency_memory.h). Nothing is ever put, so the kernels here are built
// without NVSHMEM (cuda/remote_put.cuh).
#include <string>

#include "xla_ffi/live_state.h"
#include "xla_ffi/low_latency_memory.h"
#include "xla_ffi/runtime.h"

namespace ffi = xla::ffi;

namespace jax_deepep {

const char* low_latency_target_prefix() { return "jax_deepep_ll_node_"; }

std::optional<LowLatencyMemory> find_low_latency_memory(int64_t buffer_id, int device, ffi::Error* error) {
  auto where = [&] {
    return "communication buffer " + std::to_string(buffer_id) + " on device " + std::to_string(device);
  };
  std::shared_ptr<RankState> found = find_rank_state(buffer_id, device);
  if (found != nullptr && found->low_latency_bytes == 0) found.reset();  // a Buffer without low-latency area
  std::shared_ptr<RankState> s = live_state_or_error(
      std::move(found),
      [&] {
        return "jax_deepep low-latency: no " + where() + " with a low-latency area (create the Buffer with "
               "low_latency_mode=True and num_rdma_bytes > 0 first; was it destroyed?)";
      },
      error);
  if (s == nullptr) return std::nullopt;
  for (int r = 0; r < s->num_ranks; ++r) {
    if (s->peers[r] == nullptr) {
      *error = ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                          "jax_deepep low-latency: rank " + std::to_string(r) + "'s buffer is not mapped in " +
                              where());
      return std::nullopt;
    }
  }
  const PeerMemory memory = s->low_latency_memory();
  const uint64_t num_bytes = s->low_latency_bytes;
  return LowLatencyMemory{std::move(s), memory, num_bytes, false};
}

bool register_put_source(const LowLatencyMemory&, const void*, size_t, std::string* why) {
  *why = "nothing is put within one node";  // has_put_peers is false here: the handler never asks
  return false;
}

}  // namespace jax_deepep
