// How every handler reads its operands. Each handler binds a fixed list of typed operands,
// results and one attribute struct; an operand a call does not have (top-k ids or weights, FP8
// scales, a bias) is passed as an empty array of shape (0,), which Python makes with
// jax_deepep/gpu/ffi_call.py (optional_operand, optional_result). Real operands of those kinds are never 1-D, so the two
// cannot be confused, even for zero tokens.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_deepep {

// Operand types of the Bind lists; the aliases also keep commas out of the handler macros.
using I32 = xla::ffi::Buffer<xla::ffi::S32>;
using F32 = xla::ffi::Buffer<xla::ffi::F32>;
using BF16 = xla::ffi::Buffer<xla::ffi::BF16>;
using Pred = xla::ffi::Buffer<xla::ffi::PRED>;
using I32Matrix = xla::ffi::Buffer<xla::ffi::S32, 2>;
using BF16Matrix = xla::ffi::Buffer<xla::ffi::BF16, 2>;
using PredMatrix = xla::ffi::Buffer<xla::ffi::PRED, 2>;

template <typename B>
bool given(const B& b) {
  const auto dims = b.dimensions();
  return !(dims.size() == 1 && dims[0] == 0);
}

// The data of an optional operand or result, null when absent.
template <typename T, typename B>
T* data_or_null(const B& b) {
  return given(b) ? static_cast<T*>(b.untyped_data()) : nullptr;
}

// Bytes of one token of [T, ...]: everything past the first dimension.
inline int64_t row_bytes(const xla::ffi::AnyBuffer& b) {
  const auto dims = b.dimensions();
  int64_t n = static_cast<int64_t>(xla::ffi::ByteWidth(b.element_type()));
  for (size_t d = 1; d < dims.size(); ++d) n *= dims[d];
  return n;
}

inline int64_t leading_dim(const xla::ffi::AnyBuffer& b) {
  return b.dimensions().size() == 0 ? 0 : b.dimensions()[0];
}

// The start of every Bind list but the layout's: XLA's stream and the device ordinal, which with
// the Buffer id finds the Buffer's state.
inline auto bind_on_device() {
  return xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>().Ctx<xla::ffi::DeviceOrdinal>();
}

inline xla::ffi::Error invalid_argument(const std::string& message) {
  return xla::ffi::Error(xla::ffi::ErrorCode::kInvalidArgument, message);
}

// A kernel launch's status as an FFI error; `mode` prefixes the message ("low-latency", "internode").
inline xla::ffi::Error launch_status(cudaError_t status, const std::string& mode, const char* what) {
  if (status == cudaSuccess) return xla::ffi::Error::Success();
  return xla::ffi::Error(xla::ffi::ErrorCode::kInternal,
                         "jax_deepep " + mode + ": launching " + what + ": " + cudaGetErrorString(status));
}

}  // namespace jax_deepep
