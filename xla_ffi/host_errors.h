// How the host runtimes report failures: as exceptions, which the Python bindings turn into
// Python exceptions carrying the message.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace jax_deepep {

[[noreturn]] inline void fail(const std::string& message) { throw std::runtime_error(message); }

// Errors after which the CUDA context of the process is lost for good (a trap among them).
inline bool context_lost(cudaError_t status) {
  return status == cudaErrorLaunchFailure || status == cudaErrorIllegalInstruction ||
         status == cudaErrorIllegalAddress || status == cudaErrorAssert || status == cudaErrorHardwareStackError ||
         status == cudaErrorMisalignedAddress || status == cudaErrorInvalidPc;
}

inline void check_cuda(cudaError_t status, const std::string& what) {
  if (status == cudaSuccess) return;
  fail(what + ": " + cudaGetErrorString(status) +
       (context_lost(status) ? " (the CUDA context is lost, for instance after a jax_deepep kernel trapped: "
                               "Buffer.failure() says why; the process must restart)"
                             : ""));
}

// Makes `device` current for the calling thread and restores the previous one on scope exit.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace jax_deepep
