// The argument structs of the normal-mode (intranode) kernels (launchers: cuda/launch.h).
//
// Receive order is (source rank, source token index), so the row a token lands in on each rank
// is a pure function of the layout (`send_row`, computed by the dispatch kernel). Senders put
// rows for their own rank straight into the output; rows for a peer go through a ring of
// slots in the peer's communication buffer (channel c carries the sender's tokens
// [T*c/C, T*(c+1)/C) in order), and the peer's receiver block moves each slot to its row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/comm_layout.h"
#include "cuda/rank_info.h"

namespace jax_deepep {

struct LayoutArgs {
  const int32_t* topk_idx;  // [T, K]
  int num_tokens, num_topk, num_experts, num_ranks;
  int32_t* num_tokens_per_rank;    // [R]
  int32_t* num_tokens_per_expert;  // [E]
  bool* is_token_in_rank;          // [T, R]
};

// Inputs and outputs of a first dispatch's count exchange (cuda/notify.cuh; per-token positions
// are computed by the sender blocks, one channel each).
struct NotifyArgs {
  int num_experts, expert_alignment;
  const int32_t* num_tokens_per_rank;    // [R]
  const int32_t* num_tokens_per_expert;  // [E]
  int32_t* send_offset;                  // [R]: first row of this rank's block on each rank
  int32_t* recv_rank_prefix;             // [R]
  int32_t* num_recv_tokens;              // []
  int32_t* num_recv_tokens_per_expert;   // [E_l], aligned
};

// One payload of a token row (the bf16 or FP8 values, or the FP8 scales).
struct TokenPart {
  const char* send;  // [T, row_bytes]
  char* recv;        // [N, row_bytes]
  int row_bytes;
};

struct RingShape {
  int num_channels;  // C
  int slots;         // slots per (channel, peer) ring
  int chunk_tokens;  // tokens a sender moves between tail updates (<= slots)
};

// Bytes of one ring slot and the offsets inside it, as jax_deepep/sizes.py computes them (the
// handler passes them on): the source token index and destination row (int2), each part, K ids,
// K weights.
struct DispatchSlot {
  int part_offset[2];
  int topk_idx_offset, topk_weights_offset, bytes;
};

// A combine slot: bf16 [H], then K f32 weights.
struct CombineSlot {
  int weights_offset, bytes;
};

struct DispatchArgs {
  int num_tokens, capacity, num_topk, num_experts;
  int num_parts;
  TokenPart parts[2];
  const int32_t* topk_idx;       // [T, K] global expert ids, or null
  const float* topk_weights;     // [T, K] or null
  int32_t* recv_topk_idx;        // [N, K] local ids, -1 elsewhere (null without topk_idx)
  float* recv_topk_weights;      // [N, K] (null without topk_weights)
  int32_t* recv_src_idx;         // [N], or null (cached mode)
  int32_t* recv_src_rank;        // [N], or null (cached mode)
  const bool* is_token_in_rank;  // [T, R]
  // [T, R]: destination row (-1 if not sent) and tokens before t sent to each rank. A first
  // (non-cached) dispatch computes them, each sender block for its channel, into `positions`.
  const int32_t* send_row;
  const int32_t* send_count_before;
  struct Positions {
    int32_t* send_row;
    int32_t* send_count_before;
  } positions;                      // null in cached mode
  NotifyArgs notify;                // a first dispatch's count exchange (unused in cached mode)
  const int32_t* num_recv_tokens;   // cached mode: from the handle
  RingShape ring;
  DispatchSlot slot;
};

struct CombineArgs {
  int num_tokens, capacity, hidden, num_topk;
  const __nv_bfloat16* y;        // [N, H]
  const float* topk_weights;     // [N, K] or null
  const __nv_bfloat16* bias[2];  // [T, H] or null
  __nv_bfloat16* combined_x;     // [T, H]
  float* combined_topk_weights;  // [T, K] or null
  const bool* is_token_in_rank;
  const int32_t* send_row;
  const int32_t* send_count_before;
  const int32_t* send_offset;
  const int32_t* recv_src_idx;
  const int32_t* recv_rank_prefix;
  const int32_t* num_recv_tokens;
  RingShape ring;
  CombineSlot slot;
};

}  // namespace jax_deepep
