// Low-latency dispatch/combine kernels over an NVSHMEM symmetric buffer (docs/API.md).
//
// The symmetric buffer holds B halves (as many as num_rdma_bytes holds, a power of two from 2 to
// kMaxLowLatencyHalves):
// call number `seq`, counted per op kind, uses half `seq % B`. Before a send writes into a peer's
// half it waits for that peer's receipt of call `seq - B`, the half's previous user (receipts are
// kept per half, so calls may be received in any order), so a fast rank never overwrites rows a
// slow rank has yet to read, whatever order XLA runs the calls in. Where the halves lie depends on
// (M, H, E): a Buffer serves one of them (jax_deepep/gpu/low_latency.py). A send whose own rank has
// not yet received call `seq - B` can never get that receipt (the stream runs this rank's receive
// after the send): it fails at once, naming the limit. One half (jax_deepep/sizes.py:low_latency_layout):
//   dispatch area  [E_l][R][M] rows of (16-byte header + payload), header = source token index
//   combine area   [E][M] rows: expert e's output for the token in slot j of e, bf16 [H] or a
//                  LogFMT row (cuda/logfmt.cuh) of a use_logfmt combine
//   signals        E dispatch counts [E_l][R] + E combine flags [E], 64-bit (call_signal in
//                  nvshmem_peers.cuh: the op's signature, the call number and a count)
// Signals carry the call number, so nobody resets them and any number of blocks may poll them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/nvshmem_peers.cuh"
#include "cuda/toolbox.cuh"

namespace jax_deepep {

constexpr int kFp8Block = 128;    // channels per FP8 scale
constexpr int kRowHeaderBytes = 16;
constexpr int kLogfmtGroup = 128;  // channels per (amax, amin) pair of a LogFMT row (cuda/logfmt.cuh)

// One half, as jax_deepep/sizes.py:low_latency_layout computes it (the handler passes it on).
struct LowLatencyLayout {
  size_t dispatch_row_bytes;
  size_t combine_row_bytes;
  size_t logfmt_meta_bytes;  // a LogFMT row's (amax, amin) pairs, before its group data
  size_t combine_offset;     // within a half
  size_t signal_offset;   // within a half
  size_t half_bytes;
};

// Bytes of a dispatched row that carry data: the header, then bf16 [H] or FP8 [H] + f32 scales.
inline JDEEP_HOST_DEVICE size_t dispatch_payload_bytes(int hidden, bool use_fp8) {
  return kRowHeaderBytes + (use_fp8 ? hidden + (hidden / kFp8Block) * 4 : hidden * 2);
}

struct LowLatencyShape {
  int num_tokens;   // T (senders)
  int top_k;        // K
  int hidden;       // H
  int max_tokens;   // M
  int num_experts;  // E
};

// What every low-latency launch needs besides its arrays (launchers: cuda/launch.h).
struct LowLatencyCall {
  PeerMemory mem;
  LowLatencyShape shape;
  LowLatencyLayout layout;
  int num_halves;      // B
  uint32_t signature;  // OpSignature of the op and its sizes: ranks must agree on it
};

// cast_rows (FP8 with other ranks, else null): scratch [T] of layout.dispatch_row_bytes, each token's
// row cast once before the send copies it to every expert it goes to. With one rank every row is
// this rank's own, which the receive casts from x as it packs it: no cast kernel.
struct LowLatencyDispatchSendArgs {
  const __nv_bfloat16* x;  // [T, H]
  const int* topk_idx;     // [T, K]
  int* send_slot;          // [T, K]
  int* token;              // [1]
  char* cast_rows;
  bool use_fp8, round_scale;
};

// recv_scales is f32 [E_l, R*M, H/128], or int32 [E_l, R*M, H/512] of UE8M0 bytes when use_ue8m0.
// x, topk_idx, send_slot and cast_rows are the send's (this rank's own rows are read there; a
// one-rank FP8 receive casts them from x with the send's round_scale); the call's shape.num_tokens
// is T and shape.top_k is K.
struct LowLatencyDispatchRecvArgs {
  const int* token;        // [1]
  const __nv_bfloat16* x;  // [T, H]
  const int* topk_idx;     // [T, K]: the send's expert ids
  const int* send_slot;    // [T, K]
  const char* cast_rows;   // FP8 with other ranks: [T] rows of layout.dispatch_row_bytes, else null
  void* recv_x;            // [E_l, R*M, H]
  void* recv_scales;       // null for bf16 rows
  int* recv_count;         // [E_l]
  int* recv_src_info;      // [E_l, R*M]
  int* recv_layout_range;  // [E_l, R, 2]
  bool use_fp8, use_ue8m0, round_scale;
};

// zero_copy: nvshmem puts read y itself, which must lie in memory registered with NVSHMEM,
// instead of a staged copy of the rows. use_logfmt: rows to other ranks travel as LogFMT rows
// (cuda/logfmt.cuh), staged for puts whatever zero_copy says.
struct LowLatencyCombineSendArgs {
  const __nv_bfloat16* y;        // [E_l, R*M, H]
  const int* recv_layout_range;  // [E_l, R, 2]
  int* token;                    // [1]
  bool zero_copy, use_logfmt;
};

// token: the send's call number; null with one rank, whose combine has no send (its receive moves
// nothing and numbers no call).
struct LowLatencyCombineRecvArgs {
  const int* token;              // [1], or null
  const __nv_bfloat16* y;        // [E_l, R*M, H]
  const int* recv_layout_range;  // [E_l, R, 2]
  const int* topk_idx;           // [T, K]
  const float* topk_weights;     // [T, K]
  const int* send_slot;          // [T, K]
  __nv_bfloat16* out;            // [T, H]
  bool use_logfmt;               // rows from other ranks are LogFMT rows
};

}  // namespace jax_deepep
