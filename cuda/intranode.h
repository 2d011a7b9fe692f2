// The argument structs of the normal-mode (intranode) kernels (launchers: cuda/launch.h).
//
// Receive order is (source rank, source token index), so the row a token lands in on each rank
// is a pure function of the layout (`send_row`, computed by the dispatch kernel). A rank's rows
// for itself are copied straight into the output by its receiver block; rows for a peer go
// through a ring of slots in the peer's communication buffer (channel c carries the sender's
// tokens [T*c/C, T*(c+1)/C) in order), and the peer's receiver block moves each slot to its row.
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

// An expert-grouped dispatch (docs/API.md, "Expert-grouped dispatch"): the token-level dispatch of
// `DispatchArgs` (capacity R * T, so nothing is dropped at that level; no per-row ids or weights),
// whose receivers write each token straight to its grouped rows, one per (token, local expert)
// pair: parts[p].recv are the grouped outputs [N, row_bytes]. A pair's row is its expert's first
// row (padded groups of the experts before it), plus the expert's rows from lower source ranks,
// plus its prefix: how many earlier tokens of its sender name that expert.
// Each block keeps a table of one row base per (source rank, local expert), R * E_l = E ints
// (cuda/intranode_grouped.cuh); jax_deepep/gpu/intranode.py MAX_GROUPED_EXPERTS.
constexpr int kMaxGroupedExperts = 4096;

struct GroupedDispatchArgs : DispatchArgs {
  int grouped_capacity;        // N grouped rows
  int expert_alignment;        // each expert's group is padded to a multiple of this
  const int32_t* topk_prefix;  // [T, K] a pair's prefix (repeats of an expert: the same); null in cached mode
  int topk_prefix_offset;      // of the K prefixes in a ring slot
  // [R * T, K]: grouped row of (token-level row, k), -1 for none: written by a first dispatch
  // (repeats of an expert share its row), read by a cached one.
  int32_t* pair_row;
  int32_t* token_row;          // [N]: token-level row of each grouped row, -1 for padding (as pair_row)
  int32_t* recv_expert;        // [N]: local expert of each row, -1 for padding (first dispatch)
  float* recv_weight;          // [N]: the pair's weight (its token's weights for the expert, summed), or null
  int32_t* num_grouped_rows;   // []: grouped rows needed, padding included (first dispatch)
  int32_t* grouped_per_expert; // [E_l]: padded group sizes held within the N rows (first dispatch)
};

// An expert-grouped combine: per token, sum over its pairs of row_weight * y[pair row] in f32,
// rounded to bf16 once. `y` [N, H] holds grouped rows and `topk_weights` is [N]; the rest of
// `CombineArgs` is the token-level routing (capacity R * T). A ring slot carries one f32 partial
// sum per (token, rank) (`slot.weights_offset` past its 4 * H bytes), then K f32 weights.
struct GroupedCombineArgs : CombineArgs {
  const int32_t* pair_row;   // [R * T, K]
  const float* row_weights;  // [N], or null: every pair weighs 1 (the transpose of the dispatch)
};

}  // namespace jax_deepep
