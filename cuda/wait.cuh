// The one bounded wait of every kernel (intranode, low latency, internode), the record of the
// first failure, and what a kernel does then.
//
// wait_until spins on a flag a peer writes, with system-scope acquire loads, and reads the clock
// every kSpinsPerCheck spins. Past its context's timeout it gives up (fail_op): the first failure
// of the Buffer fills the ErrorRecord (host-mapped: the host reads it without a sync), prints one
// line and traps. The trap ends every kernel of the process on that device at once, so nothing more
// is written into a peer's memory and no output of the op is ever handed on as valid: the next
// synchronisation with the device raises, and the handlers and the host runtime turn the record
// into a "timed out" error (xla_ffi/failure.h). The price is the CUDA context: the process must
// restart, which is what a multi-host job does when a rank stalls past the timeout anyway
// (docs/RELIABILITY.md). The other choice, a flag every handler checks, cannot stop XLA from
// handing the failed op's outputs on.
#pragma once

#include <cstdint>
#include <initializer_list>

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
  kGroupedDispatch,
  kGroupedCachedDispatch,
  kGroupedCombine,
  kInternodeGroupedDispatch,  // first and cached, as kInternodeDispatch
  kInternodeGroupedCombine,
};

// What a wait waits for (ErrorRecord::code).
enum class WaitKind : int {
  kOpBarrier = 1,      // intranode: a peer's flag that it started the same op
  kChannelCount,       // intranode: a sender's slot count for its ring of a channel
  kRingSpace,          // intranode: the receiver freeing ring slots (its head)
  kRingData,           // intranode: the sender filling ring slots (its tail)
  kTokenCounts,        // low latency, internode: a rank's token counts of this call
  kExpertRows,         // low latency: an expert's rows of this call, back from its rank
  kInternodeRingSpace, // internode: a ring's consumer freeing slots (its head; 0 once it started the call)
  kInternodeRingData,  // internode: a ring's producer filling slots (its tail)
  kInternodeRingEnd,   // internode: a ring's producer announcing the rows it sends this call
  kOpMismatch,         // not a timeout: the peer started a different op, or the same op with other shapes
  kReceipt,            // low latency: a rank's receipt of an earlier call, before its buffer half is reused
  kTooManyInFlight,    // not a timeout: more sends of one low-latency op in flight than the buffer has halves
  kRepeatedReceive,    // not a timeout: a low-latency call received a second time (its half may be reused)
};

// True for the codes that are not timeouts but a call pattern or a peer the kernels cannot pair.
JDEEP_HOST_DEVICE inline bool is_refusal(int code) {
  return code == static_cast<int>(WaitKind::kOpMismatch) || code == static_cast<int>(WaitKind::kTooManyInFlight) ||
         code == static_cast<int>(WaitKind::kRepeatedReceive);
}

// Host-mapped pinned memory, one per (Buffer, device); all zero while no wait gave up.
struct ErrorRecord {
  int code;     // WaitKind of the first wait that gave up
  int op;       // its OpKind
  int rank;     // this rank
  int peer;     // the rank it waited for
  int channel;  // channel (intranode), else -1
  int peer_op;  // the OpKind the peer started last (kOpMismatch: instead of ours), 0 if unknown
  int peer_other_shapes;  // 1: the peer started the same op with other shapes (its signature differs)
  int detail;   // kTooManyInFlight: the buffer's halves; else 0
  int complete; // 1 once the fields above are written
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
    case OpKind::kGroupedDispatch: return "expert-grouped dispatch";
    case OpKind::kGroupedCachedDispatch: return "expert-grouped cached dispatch";
    case OpKind::kGroupedCombine: return "expert-grouped combine";
    case OpKind::kInternodeGroupedDispatch: return "internode expert-grouped dispatch";
    case OpKind::kInternodeGroupedCombine: return "internode expert-grouped combine";
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
    case WaitKind::kInternodeRingSpace: return "internode ring space";
    case WaitKind::kInternodeRingData: return "internode ring data";
    case WaitKind::kInternodeRingEnd: return "an internode ring's row count";
    case WaitKind::kOpMismatch: return "the same op";
    case WaitKind::kReceipt: return "its receipt of an earlier call";
    case WaitKind::kTooManyInFlight: return "fewer calls in flight";
    case WaitKind::kRepeatedReceive: return "a call not yet received";
  }
  return "unknown wait";
}

// What two ranks must agree on to pair their kernels: the op in the top 8 bits, a hash of the
// shapes that size its buffers in the low 24.
struct OpSignature {
  uint32_t value;
  JDEEP_HOST_DEVICE OpSignature(OpKind op, std::initializer_list<uint32_t> shapes) {
    uint32_t h = 2166136261u;  // FNV-1a over the shape words
    for (uint32_t word : shapes) {
      for (int b = 0; b < 4; ++b) h = (h ^ ((word >> (8 * b)) & 0xffu)) * 16777619u;
    }
    value = static_cast<uint32_t>(op) << 24 | (h & 0xffffffu);
  }
};

// What a kernel's waits share.
struct WaitContext {
  ErrorRecord* record;  // device pointer of the Buffer's record
  long long timeout_ns;
  int rank;
  OpKind op;
  // [R]: the stamp each peer wrote as its last op started (the op in the top 8 bits, as in
  // OpSignature), or null: a wait that gives up names the peer's op.
  const int* peer_stamps;
  uint32_t signature;  // this op's OpSignature, which the peer's stamp is compared with; 0: unknown
};

#ifdef __CUDACC__

constexpr uint32_t kSpinsPerCheck = 256;
constexpr uint64_t kRecordWaitNs = 100 * 1000 * 1000;

// Records the failure (the first caller of the Buffer only), prints it and traps; never returns.
// A later caller waits (bounded) for the first one's record to be complete, so that the trap,
// which stops every thread, cannot cut the record short.
static __device__ __noinline__ void fail_op(const WaitContext& ctx, WaitKind what, int peer, int channel,
                                            int peer_op = 0, int detail = 0) {
  volatile ErrorRecord* r = ctx.record;
  int other_shapes = 0;
  if (peer_op == 0 && ctx.peer_stamps != nullptr) {
    const uint32_t stamp = *reinterpret_cast<const volatile uint32_t*>(ctx.peer_stamps + peer);
    peer_op = static_cast<int>(stamp >> 24);
    other_shapes = ctx.signature != 0 && peer_op == static_cast<int>(ctx.op) && stamp != ctx.signature;
  }
  if (atomicCAS(&ctx.record->code, 0, static_cast<int>(what)) == 0) {
    r->op = static_cast<int>(ctx.op);
    r->rank = ctx.rank;
    r->peer = peer;
    r->channel = channel;
    r->peer_op = peer_op;
    r->peer_other_shapes = other_shapes;
    r->detail = detail;
    __threadfence_system();
    r->complete = 1;
    __threadfence_system();
    if (what == WaitKind::kOpMismatch) {
      printf("jax_deepep: %s on rank %d met %s on rank %d (the ranks' ops or shapes differ); trapping\n",
             op_name(static_cast<int>(ctx.op)), ctx.rank, op_name(peer_op), peer);
    } else if (is_refusal(static_cast<int>(what))) {
      printf("jax_deepep: %s on rank %d: %s; trapping\n", op_name(static_cast<int>(ctx.op)), ctx.rank,
             what == WaitKind::kTooManyInFlight ? "more sends in flight than the buffer has halves"
                                                : "a call received twice");
    } else {
      printf("jax_deepep: %s on rank %d timed out waiting for rank %d (%s, channel %d; -1: none)%s%s%s; trapping\n",
             op_name(static_cast<int>(ctx.op)), ctx.rank, peer, wait_name(static_cast<int>(what)), channel,
             peer_op != 0 ? "; it last started " : "", peer_op != 0 ? op_name(peer_op) : "",
             other_shapes ? " with other shapes" : "");
    }
  } else {
    const uint64_t start = global_time_ns();
    while (r->complete == 0 && global_time_ns() - start < kRecordWaitNs) {
    }
  }
  __trap();
}

// Spins until `done(load_acquire(flag))` and returns the value read; fails the op (see the top of
// this file) once the wait lasted longer than the context's timeout.
template <typename T, typename Done>
__device__ __forceinline__ T wait_until(const T* flag, Done done, const WaitContext& ctx, WaitKind what, int peer,
                                        int channel) {
  T value = load_acquire(flag);
  if (done(value)) return value;
  const uint64_t start = global_time_ns();
  for (uint32_t spins = 1;; ++spins) {
    value = load_acquire(flag);
    if (done(value)) return value;
    if (spins % kSpinsPerCheck == 0 && global_time_ns() - start > static_cast<uint64_t>(ctx.timeout_ns))
      fail_op(ctx, what, peer, channel);
  }
}

#endif  // __CUDACC__

}  // namespace jax_deepep
