// The XLA FFI handlers each library defines, by target name; the Python bindings hand them to
// jax.ffi.register_ffi_target. Each name is written once, next to its handler's Bind list.
#pragma once

#include <string>
#include <vector>

namespace jax_deepep {

struct FfiTarget {
  std::string name;
  void* handler;  // an XLA_FFI_Handler*
};

std::vector<FfiTarget> intranode_ffi_targets();
std::vector<FfiTarget> low_latency_ffi_targets();
std::vector<FfiTarget> internode_ffi_targets();

}  // namespace jax_deepep
