// The one bounded wait of every kernel (intranode, low latency, internode) and the record of the
// first wait that gave up.
//
// wait_until spins on a flag a peer writes, with system-scope acquire loads, and reads the clock
// every kSpinsPerCheck spins. Past its context's timeout it gives up: the first wait of the
// Buffer to do so fills the ErrorRecord (host-mapped: the host reads it without a sync) and
// prints one line. A wait also gives up, without recording, once the record shows that another
// wait already did, so one dead peer makes every kernel finish (with garbage) instead of hanging.
// The record lives in host memory, and reading it from thousands of waiting threads would cost
// more than the waits (docs/LOW_LATENCY.md): only waits that already lasted kRecordCheckAfterNs
// read it.
#pragma once

#include <cstdint>

#include "cuda/toolbox.cuh"

#ifdef __CUDACC__
#include <cstdio>

#include "cuda/memory_order.cuh"
#endif

namespace jax_deepep {

// The op a kernel runs (ErrorRecord::op).
enum class OpKind : int {
  kLayout = 1,
  kDispatch,
  kCachedDispatch,
  kCombine,
  kLowLatencyDispatch,
  kLowLatencyCombine,
  kInternodeDispatch,
  kInternodeCombine,
};

// What a wait waits for (ErrorRecord::code).
enum class WaitKind : int {
  kOpBarrier = 1,      // intranode: a peer's flag that it started the same op
  kChannelCount,       // intranode: a sender's slot count for its ring of a channel
  kRingSpace,          // intranode: the receiver freeing ring slots (its head)
  kRingData,           // intranode: the sender filling ring slots (its tail)
  kTokenCounts,        // low latency, internode: a rank's token counts of this call
  kExpertRows,         // low latency: an expert's rows of this call, back from its rank
  kInboxRows,          // internode: the RDMA peer's row count of this call in the inbox
  kForwardedRows,      // internode: a forwarder's flag that it placed its rows here
  kReturnedRows,       // internode: a rank's flag that it returned its rows to this forwarder
  kPartialSums,        // internode: a node's partial sums of this rank's tokens
};

// Host-mapped pinned memory, one per (Buffer, device); all zero while no wait gave up.
struct ErrorRecord {
  int code;     // WaitKind of the first wait that gave up
  int op;       // its OpKind
  int rank;     // this rank
  int peer;     // the rank it waited for
  int channel;  // channel (intranode), else -1
};

JDEEP_HOST_DEVICE inline const char* op_name(int op) {
  switch (static_cast<OpKind>(op)) {
    case OpKind::kLayout: return "get_dispatch_layout";
    case OpKind::kDispatch: return "dispatch";
    case OpKind::kCachedDispatch: return "cached dispatch";
    case OpKind::kCombine: return "combine";
    case OpKind::kLowLatencyDispatch: return "low_latency_dispatch";
    case OpKind::kLowLatencyCombine: return "low_latency_combine";
    case OpKind::kInternodeDispatch: return "internode dispatch";
    case OpKind::kInternodeCombine: return "internode combine";
  }
  return "unknown op";
}

JDEEP_HOST_DEVICE inline const char* wait_name(int code) {
  switch (static_cast<WaitKind>(code)) {
    case WaitKind::kOpBarrier: return "the op barrier";
    case WaitKind::kChannelCount: return "a channel's token count";
    case WaitKind::kRingSpace: return "ring space";
    case WaitKind::kRingData: return "ring data";
    case WaitKind::kTokenCounts: return "token counts";
    case WaitKind::kExpertRows: return "an expert's rows";
    case WaitKind::kInboxRows: return "inbox rows";
    case WaitKind::kForwardedRows: return "forwarded rows";
    case WaitKind::kReturnedRows: return "returned rows";
    case WaitKind::kPartialSums: return "partial sums";
  }
  return "unknown wait";
}

// What a kernel's waits share.
struct WaitContext {
  ErrorRecord* record;  // device pointer of the Buffer's record
  long long timeout_ns;
  int rank;
  OpKind op;
};

#ifdef __CUDACC__

constexpr uint32_t kSpinsPerCheck = 256;
constexpr uint64_t kRecordCheckAfterNs = 1000 * 1000;

// Whether some wait of this Buffer already gave up. Today every later wait then gives up too.
__device__ __forceinline__ bool gave_up_before(const ErrorRecord* record) {
  return *reinterpret_cast<const volatile int*>(&record->code) != 0;
}

// The first caller fills the record and prints; the others only fence. A host that reads the
// record while it is being filled may see `code` before the other fields.
static __device__ __noinline__ void record_give_up(ErrorRecord* record, OpKind op, int rank, WaitKind what,
                                                   int peer, int channel) {
  if (atomicCAS(&record->code, 0, static_cast<int>(what)) == 0) {
    volatile ErrorRecord* r = record;
    r->op = static_cast<int>(op);
    r->rank = rank;
    r->peer = peer;
    r->channel = channel;
    printf("jax_deepep: %s on rank %d timed out waiting for rank %d (%s, channel %d)\n",
           op_name(static_cast<int>(op)), rank, peer, wait_name(static_cast<int>(what)), channel);
  }
  __threadfence_system();
}

// Spins until `done(load_acquire(flag))`; true then, false once the wait gave up (see the top of
// this file). *last (when given) gets the last value read.
template <typename T, typename Done>
__device__ __forceinline__ bool wait_until(const T* flag, Done done, const WaitContext& ctx, WaitKind what, int peer,
                                           int channel, T* last = nullptr) {
  T value = load_acquire(flag);
  bool arrived = done(value);
  if (!arrived) {
    const uint64_t start = global_time_ns();
    for (uint32_t spins = 1;; ++spins) {
      value = load_acquire(flag);
      if ((arrived = done(value))) break;
      if (spins % kSpinsPerCheck != 0) continue;
      const uint64_t waited = global_time_ns() - start;
      if (waited > static_cast<uint64_t>(ctx.timeout_ns)) {
        record_give_up(ctx.record, ctx.op, ctx.rank, what, peer, channel);
        break;
      }
      if (waited > kRecordCheckAfterNs && gave_up_before(ctx.record)) break;
    }
  }
  if (last != nullptr) *last = value;
  return arrived;
}

#endif  // __CUDACC__

}  // namespace jax_deepep
