// The count exchange of a first (not cached) dispatch, done by the dispatch kernel itself:
// block 0 writes into every peer's header how many tokens this rank sends to each rank and to
// each of that peer's experts (before announce_op raises the flag that publishes them); after
// wait_for_peers every block reads the count matrix for the row offsets it needs, and block 0
// writes the handle's counts.
#pragma once

#include "cuda/comm_layout.h"
#include "cuda/intranode.h"

namespace jax_deepep {

// counts[src][j] of op `epoch`: tokens rank src sends to rank j (j < R), then to this rank's
// local expert j - R. This rank's own row comes straight from the layout.
__device__ __forceinline__ int sent_count(const RankInfo& info, const NotifyArgs& n, uint32_t epoch, int src, int j) {
  const int num_ranks = info.num_ranks, me = info.rank;
  if (src == me) {
    const int experts_per_rank = n.num_experts / num_ranks;
    return j < num_ranks ? n.num_tokens_per_rank[j] : n.num_tokens_per_expert[me * experts_per_rank + j - num_ranks];
  }
  const volatile int32_t* row = header_of(info.buffers[me])->notify[epoch & 1][src];
  return row[j];
}

// Block 0, whole block, before announce_op: this rank's counts into every peer's header.
__device__ __forceinline__ void post_counts(const RankInfo& info, const NotifyArgs& n, uint32_t epoch) {
  const int num_ranks = info.num_ranks, me = info.rank;
  const int experts_per_rank = n.num_experts / num_ranks;
  const int row = num_ranks + experts_per_rank;
  for (int i = threadIdx.x; i < num_ranks * row; i += blockDim.x) {
    const int dst = i / row, j = i % row;
    if (dst == me) continue;
    const int v = j < num_ranks ? n.num_tokens_per_rank[j] : n.num_tokens_per_expert[dst * experts_per_rank + j - num_ranks];
    header_of(info.buffers[dst])->notify[epoch & 1][me][j] = v;
  }
}

// What every block of a first dispatch needs from the count matrix.
struct RankCounts {
  int send_offset[kMaxRanks];  // first row of this rank's tokens on each rank
  int num_recv;                // tokens this rank receives
};

// Whole block, after wait_for_peers: fills `counts` (shared memory); block 0 also writes the
// handle's send_offset, recv_rank_prefix, num_recv_tokens and aligned per-expert counts.
__device__ __forceinline__ void read_counts(const RankInfo& info, const NotifyArgs& n, uint32_t epoch,
                                            RankCounts& counts) {
  const int num_ranks = info.num_ranks, me = info.rank;
  if (threadIdx.x < num_ranks) {
    const int r = threadIdx.x;
    int offset = 0, prefix = 0;
    for (int s = 0; s < me; ++s) offset += sent_count(info, n, epoch, s, r);
    for (int s = 0; s < r; ++s) prefix += sent_count(info, n, epoch, s, me);
    counts.send_offset[r] = offset;
    if (blockIdx.x == 0) {
      n.send_offset[r] = offset;
      n.recv_rank_prefix[r] = prefix;
    }
  }
  if (threadIdx.x == 0) {
    int num_recv = 0;
    for (int s = 0; s < num_ranks; ++s) num_recv += sent_count(info, n, epoch, s, me);
    counts.num_recv = num_recv;
    if (blockIdx.x == 0) *n.num_recv_tokens = num_recv;
  }
  if (blockIdx.x == 0) {
    const int experts_per_rank = n.num_experts / num_ranks, a = n.expert_alignment;
    for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) {
      int tokens = 0;
      for (int s = 0; s < num_ranks; ++s) tokens += sent_count(info, n, epoch, s, num_ranks + e);
      n.num_recv_tokens_per_expert[e] = (tokens + a - 1) / a * a;
    }
  }
  __syncthreads();
}

}  // namespace jax_deepep
