// What the NVSHMEM handlers (internode_ffi.cc, and low_latency_ffi.cc through
// nvshmem_low_latency_memory.cc) share: their Buffer's state in a usable state.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>

#include "cuda/nvshmem_peers.cuh"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/failure.h"
#include "xla_ffi/nvshmem_runtime.h"

namespace jax_deepep {

// The state of (buffer_id, device), or null with *error set: no buffer (`set_up` says which
// Buffer makes one), or an earlier kernel of the Buffer failed (xla_ffi/failure.h). `mode` prefixes the messages ("low-latency",
// "internode").
inline std::shared_ptr<NvshmemState> live_nvshmem_state(int64_t buffer_id, int device, const std::string& mode,
                                                        const char* set_up, xla::ffi::Error* error) {
  std::shared_ptr<NvshmemState> state = find_nvshmem_state(buffer_id, device);
  if (state == nullptr) {
    *error = xla::ffi::Error(xla::ffi::ErrorCode::kFailedPrecondition,
                             "jax_deepep " + mode + ": no NVSHMEM buffer " + std::to_string(buffer_id) +
                                 " on device " + std::to_string(device) + " (" + set_up + ")");
    return nullptr;
  }
  if (const std::string failure = failure_message(state->error()); !failure.empty()) {
    *error = xla::ffi::Error(xla::ffi::ErrorCode::kAborted, failure);
    return nullptr;
  }
  *error = xla::ffi::Error::Success();
  return state;
}

}  // namespace jax_deepep
