// How a handler checks a layout it receives as an attribute. jax_deepep/sizes.py computes every
// layout and the handlers never derive one again; they check that each piece a kernel writes lies
// after the one before, starts aligned and ends within its space, so that a wrong attribute fails
// the call instead of writing out of bounds.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_deepep {

// `bytes` at `offset`, which must be a multiple of `alignment`.
struct Piece {
  const char* name;
  uint64_t offset;
  uint64_t bytes;
  uint64_t alignment;
};

// Success when every piece starts at or after the end of the one before, aligned, and ends within
// `space` bytes; else an invalid-argument error naming `what` (the layout) and the first bad piece.
inline xla::ffi::Error check_layout(const char* what, std::initializer_list<Piece> pieces,
                                    uint64_t space) {
  uint64_t end = 0;
  for (const Piece& p : pieces) {
    if (p.offset < end || p.offset % p.alignment != 0 || p.bytes > space || p.offset > space - p.bytes) {
      return xla::ffi::Error(xla::ffi::ErrorCode::kInvalidArgument,
                             std::string("jax_deepep: bad ") + what + " attribute: " + p.name + " (" +
                                 std::to_string(p.bytes) + " bytes at " + std::to_string(p.offset) +
                                 ") must start at or after " + std::to_string(end) + ", aligned to " +
                                 std::to_string(p.alignment) + ", and end within " + std::to_string(space) +
                                 " bytes");
    }
    end = p.offset + p.bytes;
  }
  return xla::ffi::Error::Success();
}

// The first failure among `checks` (check_layout results), else success.
inline xla::ffi::Error first_failure(std::initializer_list<xla::ffi::Error> checks) {
  for (const xla::ffi::Error& e : checks) {
    if (e.failure()) return e;
  }
  return xla::ffi::Error::Success();
}

}  // namespace jax_deepep
