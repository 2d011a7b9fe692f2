// Sequential access to an FFI handler's RemainingArgs / RemainingRets, for handlers whose operand
// list depends on attributes (optional top-k ids, weights, biases, FP8 scales).
#pragma once

#include <stdexcept>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_deepep {

class ArgReader {
 public:
  explicit ArgReader(const xla::ffi::RemainingArgs& args) : args_(args) {}
  xla::ffi::AnyBuffer next() {
    auto b = args_.get<xla::ffi::AnyBuffer>(at_++);
    if (!b.has_value()) throw std::runtime_error("jax_deepep: missing FFI argument " + std::to_string(at_ - 1));
    return *b;
  }
  template <typename T>
  const T* next_data() { return static_cast<const T*>(next().untyped_data()); }

 private:
  const xla::ffi::RemainingArgs& args_;
  size_t at_ = 0;
};

class RetReader {
 public:
  explicit RetReader(const xla::ffi::RemainingRets& rets) : rets_(rets) {}
  xla::ffi::AnyBuffer next() {
    auto b = rets_.get<xla::ffi::AnyBuffer>(at_++);
    if (!b.has_value()) throw std::runtime_error("jax_deepep: missing FFI result " + std::to_string(at_ - 1));
    return **b;
  }
  template <typename T>
  T* next_data() { return static_cast<T*>(next().untyped_data()); }

 private:
  const xla::ffi::RemainingRets& rets_;
  size_t at_ = 0;
};

}  // namespace jax_deepep
