// What the expert-grouped instantiations of the intranode kernels add (GroupedDispatchArgs,
// GroupedCombineArgs in cuda/intranode.h): the table of grouped row bases, the padding rows and
// the weighted pair sums (on cuda/grouped_rows.cuh). The plain instantiations never reach this
// code, so their generated code is that of the kernels without it.
//
// Sums follow jax_deepep/reference/expert_grouped.py term by term (cuda/grouped_rows.cuh): ranks
// are added in rank order, and a token is rounded to bf16 once.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/bf16x8.cuh"
#include "cuda/grouped_rows.cuh"
#include "cuda/intranode.h"
#include "cuda/notify.cuh"
#include "cuda/toolbox.cuh"

namespace jax_deepep {

template <typename Args>
constexpr bool kIsGrouped = std::is_same_v<Args, GroupedDispatchArgs> || std::is_same_v<Args, GroupedCombineArgs>;

// The block's table: bases[s * E_l + e] = first grouped row of source s's pairs of local expert e.
__device__ __forceinline__ int* grouped_bases() {
  __shared__ int bases[kMaxGroupedExperts];
  return bases;
}

// Whole block, a first grouped dispatch after read_counts: fills the block's bases table from the
// count exchange (padded groups of the experts before e, then the pairs of the sources before s)
// and returns the grouped rows needed. Block 0 also writes the handle's grouped counts.
__device__ __forceinline__ int build_grouped_bases(const RankInfo& info, const GroupedDispatchArgs& args,
                                                   uint32_t epoch, int* bases) {
  const int num_ranks = info.num_ranks, experts = args.num_experts / num_ranks, a = args.expert_alignment;
  const int run = (experts + kThreads - 1) / kThreads;  // each thread owns a run of experts
  const int lo = min(static_cast<int>(threadIdx.x) * run, experts), hi = min(lo + run, experts);
  auto pairs = [&](int src, int e) { return sent_count(info, args.notify, epoch, src, num_ranks + e); };
  auto padded = [a](int rows) { return (rows + a - 1) / a * a; };
  int rows = 0;
  for (int e = lo; e < hi; ++e) {
    int group = 0;
    for (int s = 0; s < num_ranks; ++s) group += pairs(s, e);
    rows += padded(group);
  }
  int total = 0;
  int start = block_exclusive_sum(rows, &total);
  for (int e = lo; e < hi; ++e) {
    int at = start;
    for (int s = 0; s < num_ranks; ++s) {
      bases[s * experts + e] = at;
      at += pairs(s, e);
    }
    const int group = padded(at - start);
    if (blockIdx.x == 0) args.grouped_per_expert[e] = max(min(args.grouped_capacity - start, group), 0);
    start += group;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *args.num_grouped_rows = total;
  __syncthreads();
  return total;
}

// Whole warp: grouped row `row` holds no pair (zero payload, weight 0; a first dispatch also
// writes expert -1 and token row -1).
__device__ __forceinline__ void clear_grouped_row(const GroupedDispatchArgs& args, int row, bool first, int lane) {
  for (int p = 0; p < args.num_parts; ++p) {
    const int bytes = args.parts[p].row_bytes;
    zero_row(args.parts[p].recv + static_cast<int64_t>(row) * bytes, bytes, lane);
  }
  if (lane == 0) {
    if (args.recv_weight) args.recv_weight[row] = 0.0f;
    if (first) {
      args.recv_expert[row] = -1;
      args.token_row[row] = -1;
    }
  }
}

// Whole grid, a first grouped dispatch: the grouped rows no pair fills (each group's padding, and
// the rows past every group) and the pair rows of the token-level rows past `num_recv`.
__device__ __forceinline__ void fill_grouped_padding(const RankInfo& info, const GroupedDispatchArgs& args,
                                                     uint32_t epoch, const int* bases, int total, int num_recv) {
  const int lane = threadIdx.x % kWarpSize, warps = gridDim.x * kWarps;
  const int warp = blockIdx.x * kWarps + threadIdx.x / kWarpSize;
  const int num_ranks = info.num_ranks, experts = args.num_experts / num_ranks, last = num_ranks - 1;
  for (int e = warp; e < experts; e += warps) {
    const int filled = bases[last * experts + e] + sent_count(info, args.notify, epoch, last, num_ranks + e);
    const int end = min(e + 1 < experts ? bases[e + 1] : total, args.grouped_capacity);
    for (int row = filled; row < end; ++row) clear_grouped_row(args, row, true, lane);
  }
  for (int row = total + warp; row < args.grouped_capacity; row += warps) clear_grouped_row(args, row, true, lane);
  for (int j = max(num_recv, 0) + warp; j < args.capacity; j += warps) {
    if (lane < args.num_topk) args.pair_row[static_cast<int64_t>(j) * args.num_topk + lane] = -1;
  }
}

// Whole grid, a cached grouped dispatch: the handle's padding rows (token row -1).
__device__ __forceinline__ void fill_cached_grouped_padding(const GroupedDispatchArgs& args) {
  const int lane = threadIdx.x % kWarpSize, warps = gridDim.x * kWarps;
  for (int row = blockIdx.x * kWarps + threadIdx.x / kWarpSize; row < args.grouped_capacity; row += warps) {
    if (__ldg(args.token_row + row) < 0) clear_grouped_row(args, row, false, lane);
  }
}

// Whole warp: the pairs of token-level row `j` (-1: none) of a grouped combine.
__device__ __forceinline__ TokenPairs token_pairs(const GroupedCombineArgs& args, int j, int lane) {
  return token_pairs(args.pair_row, args.row_weights, args.num_topk, j, lane);
}

// Whole warp, a grouped combine's sender: the f32 partial sum of token-level row j's pairs (one ring
// slot: f32 [H], then each k's topk_weights at its pair's row, 0 for none).
__device__ __forceinline__ void write_partial(const GroupedCombineArgs& args, char* slot, int j, int lane) {
  const TokenPairs t = token_pairs(args, j, lane);
  float4* out = reinterpret_cast<float4*>(slot);
  for_each_pair_sum<kPairVectors>(args.y, args.hidden, t, [&](int i, float (&sum)[8]) {
    out[2 * i] = make_float4(sum[0], sum[1], sum[2], sum[3]);
    out[2 * i + 1] = make_float4(sum[4], sum[5], sum[6], sum[7]);
  });
  // Every rank of the op combines weights or none (the same shapes); with N = 0 no row has any.
  if (args.combined_topk_weights && lane < args.num_topk)
    reinterpret_cast<float*>(slot + args.slot.weights_offset)[lane] = t.row >= 0 ? args.topk_weights[t.row] : 0.0f;
}

// Vector `i` of a token's output: its rank sum `acc` plus the biases (null: none), rounded to bf16 once.
__device__ __forceinline__ void store_token_vector(float (&acc)[8], const int4* bias0, const int4* bias1, int4* out,
                                                   int i) {
  for (const int4* bias : {bias0, bias1}) {
    if (bias) accumulate(acc, __ldg(bias + i));
  }
  out[i] = pack_bf16x8<int4>(acc);
}

// Whole warp, a grouped combine's receiver: token `token`'s sum over ranks (in rank order) of the
// partials: this rank's from its own pairs `t` (those of its token-level row, read ahead by the
// caller; `has_own`: the token has one), the peers' from their ring slots `slots[d]` (null: none);
// then the biases, rounded to bf16 once.
__device__ __forceinline__ void combine_partials(const RankInfo& info, const GroupedCombineArgs& args, int token,
                                                 bool has_own, const TokenPairs& t,
                                                 const char* const (&slots)[kMaxRanks]) {
  const int me = info.rank, lane = threadIdx.x % kWarpSize, vectors = args.hidden / 8;
  const int64_t at = static_cast<int64_t>(token) * args.hidden;
  const int4* bias0 = reinterpret_cast<const int4*>(args.bias[0] ? args.bias[0] + at : nullptr);
  const int4* bias1 = reinterpret_cast<const int4*>(args.bias[1] ? args.bias[1] + at : nullptr);
  int4* out = reinterpret_cast<int4*>(args.combined_x + at);
  // One rank: its pair sum is the only term of the rank sum (which starts at 0, as below).
  if (info.num_ranks == 1) {
    TokenPairs own = t;
    if (!has_own) own.owners = 0;
    for_each_pair_sum<kSoloPairVectors>(args.y, args.hidden, own, [&](int i, float (&sum)[8]) {
      float acc[8];
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[c] = __fadd_rn(0.0f, sum[c]);
      store_token_vector(acc, bias0, bias1, out, i);
    });
  }
  for (int base = 0; info.num_ranks > 1 && base < vectors; base += kWarpSize * kPairVectors) {
    const int first = base + lane;
    float acc[kPairVectors][8] = {};
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      if (d >= info.num_ranks) continue;
      float part[kPairVectors][8] = {};
      if (d == me) {
        if (!has_own) continue;
        add_pair_rows(part, args.y, args.hidden, t.owners, t.row, t.weight, first, vectors);
      } else {
        if (!slots[d]) continue;
        const float4* p = reinterpret_cast<const float4*>(slots[d]);
#pragma unroll
        for (int u = 0; u < kPairVectors; ++u) {
          const int i = first + kWarpSize * u;
          if (i >= vectors) continue;
          const float4 a = __ldcv(p + 2 * i), b = __ldcv(p + 2 * i + 1);
          const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
          for (int c = 0; c < 8; ++c) part[u][c] = f[c];
        }
      }
#pragma unroll
      for (int u = 0; u < kPairVectors; ++u) {
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[u][c] = __fadd_rn(acc[u][c], part[u][c]);
      }
    }
#pragma unroll
    for (int u = 0; u < kPairVectors; ++u) {
      const int i = first + kWarpSize * u;
      if (i < vectors) store_token_vector(acc[u], bias0, bias1, out, i);
    }
  }
  if (args.combined_topk_weights && lane < args.num_topk) {
    float w = 0.0f;
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      if (d >= info.num_ranks) continue;
      if (d == me) {
        if (has_own) w += t.row >= 0 ? args.topk_weights[t.row] : 0.0f;
      } else if (slots[d]) {
        w += reinterpret_cast<const volatile float*>(slots[d] + args.slot.weights_offset)[lane];
      }
    }
    args.combined_topk_weights[static_cast<int64_t>(token) * args.num_topk + lane] = w;
  }
}

}  // namespace jax_deepep
