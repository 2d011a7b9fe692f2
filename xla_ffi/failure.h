// The host's reading of a Buffer's ErrorRecord (cuda/wait.cuh): the one message that the handlers
// (as an FFI error) and the Python bindings (Buffer.failure) give for a kernel that failed.
#pragma once

#include <chrono>
#include <string>
#include <thread>

#include "cuda/wait.cuh"

namespace jax_deepep {

// "" while no kernel of the record's Buffer failed.
inline std::string failure_message(const volatile ErrorRecord& r) {
  const int code = r.code;
  if (code == 0) return "";
  // The failing kernel claims the record (its code) before it writes the other fields: a reader that
  // comes in between waits for them, as long as the kernel's own wait for a complete record (100 ms).
  for (int i = 0; i < 1000 && r.complete == 0; ++i) std::this_thread::sleep_for(std::chrono::microseconds(100));
  const std::string op = op_name(r.op), rank = std::to_string(r.rank), peer = std::to_string(r.peer);
  std::string what;
  if (code == static_cast<int>(WaitKind::kOpMismatch)) {
    what = op + " on rank " + rank + " met " + op_name(r.peer_op) + " on rank " + peer +
           ": the ranks reached different ops, or the same op with different shapes";
  } else if (code == static_cast<int>(WaitKind::kTooManyInFlight)) {
    const std::string halves = std::to_string(r.detail);
    what = op + " on rank " + rank + ": a send started before the call " + halves +
           " calls earlier, which used the same buffer half, was received: the program has more sends of this "
           "op in flight than the buffer's " + halves + " halves serve (receive earlier, or give the Buffer more "
           "num_rdma_bytes; docs/LOW_LATENCY.md)";
  } else if (code == static_cast<int>(WaitKind::kRepeatedReceive)) {
    what = op + " on rank " + rank + ": a call was received a second time, after its buffer half may have been "
           "reused (receive each call once; docs/LOW_LATENCY.md)";
  } else {
    what = op + " on rank " + rank + " timed out waiting for rank " + peer + " (" + wait_name(code) +
           (r.channel >= 0 ? ", channel " + std::to_string(r.channel) : std::string()) + ")";
    if (r.peer_op != 0) what += std::string("; rank ") + peer + " last started " + op_name(r.peer_op);
    if (r.peer_other_shapes) what += " with other shapes";
  }
  return "jax_deepep: " + what +
         "; the kernel trapped, so this process's CUDA context is lost and the process must restart "
         "(docs/RELIABILITY.md)";
}

}  // namespace jax_deepep
