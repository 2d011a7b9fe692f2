// What the NVSHMEM handlers (internode_ffi.cc, and low_latency_ffi.cc through
// nvshmem_low_latency_memory.cc) share: their Buffer's state in a usable state.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>

#include "cuda/nvshmem_peers.cuh"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/live_state.h"
#include "xla_ffi/nvshmem_runtime.h"

namespace jax_deepep {

// The state of (buffer_id, device), or null with *error set (xla_ffi/live_state.h): no buffer
// (`set_up` says which Buffer makes one), or an earlier kernel of the Buffer failed. `mode`
// prefixes the messages ("low-latency", "internode").
inline std::shared_ptr<NvshmemState> live_nvshmem_state(int64_t buffer_id, int device, const std::string& mode,
                                                        const char* set_up, xla::ffi::Error* error) {
  return live_state_or_error(
      find_nvshmem_state(buffer_id, device),
      [&] {
        return "jax_deepep " + mode + ": no NVSHMEM buffer " + std::to_string(buffer_id) + " on device " +
               std::to_string(device) + " (" + set_up + ")";
      },
      error);
}

}  // namespace jax_deepep
