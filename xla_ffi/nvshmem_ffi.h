// What the NVSHMEM handlers (low_latency_ffi.cc, internode_ffi.cc) share: the process's runtime in
// a usable state, and a kernel launch's status as an FFI error.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "cuda/nvshmem_peers.cuh"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/nvshmem_runtime.h"

namespace jax_deepep {

// The runtime, or null with *error set: no buffer (`set_up` says which Buffer makes one), or an
// earlier wait timed out. `mode` prefixes the messages ("low-latency", "internode").
inline NvshmemRuntime* live_nvshmem_runtime(const std::string& mode, const char* set_up, xla::ffi::Error* error) {
  NvshmemRuntime* rt = nvshmem_runtime();
  if (rt == nullptr) {
    *error = xla::ffi::Error(xla::ffi::ErrorCode::kFailedPrecondition,
                             "jax_deepep " + mode + ": NVSHMEM is not set up in this process (" + set_up + ")");
    return nullptr;
  }
  if (jax_deepep_nvshmem_timeout_flag() != 0) {
    const volatile ErrorRecord& r = *rt->error_host;
    *error = xla::ffi::Error(xla::ffi::ErrorCode::kDeadlineExceeded,
                             "jax_deepep " + mode + ": an earlier " + op_name(r.op) + " on rank " +
                                 std::to_string(r.rank) + " timed out waiting for rank " + std::to_string(r.peer) +
                                 " (" + wait_name(r.code) + "); the buffer is unusable, destroy the Buffer");
    return nullptr;
  }
  *error = xla::ffi::Error::Success();
  return rt;
}

inline xla::ffi::Error launch_status(cudaError_t status, const std::string& mode, const char* what) {
  if (status == cudaSuccess) return xla::ffi::Error::Success();
  return xla::ffi::Error(xla::ffi::ErrorCode::kInternal,
                         "jax_deepep " + mode + ": launching " + what + ": " + cudaGetErrorString(status));
}

}  // namespace jax_deepep
