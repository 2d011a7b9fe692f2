// How every handler turns the state its registry holds for (Buffer id, device) into one it may
// launch on: the normal-mode RankState (intranode_ffi.cc) and the NVSHMEM modes' NvshmemState
// (nvshmem_ffi.h) alike, each with the ErrorRecord its kernels write (cuda/wait.cuh).
#pragma once

#include <memory>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ffi/failure.h"

namespace jax_deepep {

// `state` (null when its registry has none) if usable, else null with *error set: `missing()` when
// there is no state, the failure (xla_ffi/failure.h) when an earlier kernel of the Buffer failed.
// `missing` builds its message only when needed: this runs on every launch.
template <typename State, typename Missing>
std::shared_ptr<State> live_state_or_error(std::shared_ptr<State> state, const Missing& missing,
                                           xla::ffi::Error* error) {
  if (state == nullptr) {
    *error = xla::ffi::Error(xla::ffi::ErrorCode::kFailedPrecondition, missing());
  } else if (std::string failure = failure_message(*state->error_host); !failure.empty()) {
    *error = xla::ffi::Error(xla::ffi::ErrorCode::kAborted, std::move(failure));
    state.reset();
  } else {
    *error = xla::ffi::Error::Success();
  }
  return state;
}

}  // namespace jax_deepep
