// Low-latency dispatch/combine kernels over an NVSHMEM symmetric buffer (docs/API.md).
//
// The symmetric buffer holds two halves used by alternate calls (call number `seq`, counted per op
// kind, uses half `seq & 1`), so a call never overwrites what a slower peer still reads from the
// call before. One half, laid out as `config.low_latency_rdma_size_hint` sizes it:
//   dispatch area  [E_l][R][M] rows of (16-byte header + payload), header = source token index
//   combine area   [E][M] rows of bf16 [H]: expert e's output for the token in slot j of e
//   signals        E dispatch counts [E_l][R] (seq << 16 | count) + E combine flags [E] (seq)
// Signals carry the call number, so nobody resets them and any number of blocks may poll them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/nvshmem_peers.cuh"

namespace jax_deepep {

constexpr int kFp8Block = 128;    // channels per FP8 scale
constexpr int kRowHeaderBytes = 16;

struct LowLatencyLayout {
  size_t dispatch_row_bytes;
  size_t combine_row_bytes;
  size_t combine_offset;  // within a half
  size_t signal_offset;   // within a half
  size_t half_bytes;
};

// Must agree with jax_deepep/config.py:low_latency_rdma_size_hint.
inline LowLatencyLayout make_low_latency_layout(int64_t max_tokens, int64_t hidden, int64_t num_experts) {
  auto align = [](size_t n) { return (n + 127) / 128 * 128; };
  size_t bf16_bytes = hidden * 2, fp8_bytes = hidden + (hidden / kFp8Block) * 4;
  LowLatencyLayout l;
  l.dispatch_row_bytes = kRowHeaderBytes + (bf16_bytes > fp8_bytes ? bf16_bytes : fp8_bytes);
  l.combine_row_bytes = hidden * 2;
  size_t dispatch_bytes = align(num_experts * max_tokens * l.dispatch_row_bytes);
  size_t combine_bytes = align(num_experts * max_tokens * l.combine_row_bytes);
  l.combine_offset = dispatch_bytes;
  l.signal_offset = dispatch_bytes + combine_bytes;
  l.half_bytes = l.signal_offset + align(num_experts * 4 * 2);
  return l;
}

struct LowLatencyShape {
  int num_tokens;   // T (senders)
  int top_k;        // K
  int hidden;       // H
  int max_tokens;   // M
  int num_experts;  // E
};

// Sends this rank's tokens (FP8-cast in flight when use_fp8) to every expert's rank and signals
// each expert's count. Writes send_slot [T, K] (row of (t, k) in its expert block, -1 when not
// sent) and token[0] = this call's number, which the recv call reads.
cudaError_t launch_low_latency_dispatch_send(cudaStream_t stream, const PeerMemory& mem, const LowLatencyShape& s,
                                             const __nv_bfloat16* x, const int* topk_idx, int* send_slot,
                                             int* token, bool use_fp8, bool round_scale);

// Waits for every source rank's counts, then packs the rows of each local expert in
// (source rank, source token) order into recv_x [E_l, R*M, H] (bf16 or fp8 + scales).
// recv_scales is f32 [E_l, R*M, H/128], or int32 [E_l, R*M, H/512] of UE8M0 bytes when use_ue8m0.
cudaError_t launch_low_latency_dispatch_recv(cudaStream_t stream, const PeerMemory& mem, const LowLatencyShape& s,
                                             const int* token, void* recv_x, void* recv_scales, int* recv_count,
                                             int* recv_src_info, int* recv_layout_range, bool use_fp8,
                                             bool use_ue8m0);

// Sends each local expert's rows back to the other source ranks and flags each expert as done
// there (this rank's own rows stay in y for the recv). token[0] = this call's number, as in dispatch.
// zero_copy: nvshmem puts read y itself, which must lie in memory registered with NVSHMEM,
// instead of a staged copy of the rows.
cudaError_t launch_low_latency_combine_send(cudaStream_t stream, const PeerMemory& mem, const LowLatencyShape& s,
                                            const __nv_bfloat16* y, const int* recv_layout_range, int* token,
                                            bool zero_copy);

// Waits for every other rank's experts' flags, then out[t] = sum_k w[t, k] * row of (t, k), in f32;
// the rows of this rank's experts come straight from y (the send's input) and recv_layout_range.
cudaError_t launch_low_latency_combine_recv(cudaStream_t stream, const PeerMemory& mem, const LowLatencyShape& s,
                                            const int* token, const __nv_bfloat16* y, const int* recv_layout_range,
                                            const int* topk_idx, const float* topk_weights, const int* send_slot,
                                            __nv_bfloat16* out);

}  // namespace jax_deepep
