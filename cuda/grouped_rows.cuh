// What the expert-grouped kernels of every mode share (docs/API.md, "Expert-grouped dispatch";
// intranode: cuda/intranode_grouped.cuh, internode: cuda/internode.cu): the block scan that lays
// out the groups, zero padding rows, a token's pair lanes and the weighted pair sums.
//
// Sums follow jax_deepep/reference/expert_grouped.py term by term: each product weight * y and
// each sum is rounded to f32 on its own (no fused multiply-add) and pairs are added in k order.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/bf16x8.cuh"
#include "cuda/toolbox.cuh"

namespace jax_deepep {

// Whole block: the sum of `value` over the threads before this one; `*total` gets the block's sum.
__device__ __forceinline__ int block_exclusive_sum(int value, int* total) {
  __shared__ int warp_sums[kWarps];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  int inclusive = value;
#pragma unroll
  for (int d = 1; d < kWarpSize; d *= 2) {
    const int v = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += v;
  }
  if (lane == kWarpSize - 1) warp_sums[warp] = inclusive;
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_sums[w] : 0;
    sum += warp_sums[w];
  }
  __syncthreads();  // warp_sums is reused by the next call
  *total = sum;
  return before + inclusive - value;
}

// Whole warp: `bytes` of zeros at `dst`.
__device__ __forceinline__ void zero_row(char* dst, int bytes, int lane) {
  if (((reinterpret_cast<uintptr_t>(dst) | static_cast<uintptr_t>(bytes)) & 15) == 0) {
    for (int i = lane; i < bytes / 16; i += kWarpSize) reinterpret_cast<int4*>(dst)[i] = make_int4(0, 0, 0, 0);
  } else {
    for (int i = lane; i < bytes; i += kWarpSize) dst[i] = 0;
  }
}

// One token's pairs as a warp holds them: lane k < K has `row`, the grouped row of the token's k-th
// expert (-1 for none). Repeats of an expert share its row; the lowest of their lanes owns it.
struct PairLanes {
  bool owner;       // this lane owns its row
  float weight;     // owners: the sum of the weights of the lanes sharing the row, in k order
  unsigned owners;  // the owner lanes
};

__device__ __forceinline__ PairLanes pair_lanes(int row, float weight, int num_topk, int lane) {
  const unsigned same = __match_any_sync(0xffffffffu, row);
  PairLanes p;
  p.owner = row >= 0 && lane == __ffs(same) - 1;
  p.weight = 0.0f;
  for (int k = 0; k < num_topk; ++k) {
    const float w = __shfl_sync(0xffffffffu, weight, k);
    if (same >> k & 1u) p.weight += w;
  }
  p.owners = __ballot_sync(0xffffffffu, p.owner);
  return p;
}

// Vectors of a row each lane sums in one pass of add_pair_rows, and pairs whose loads it issues
// together: 2 x 2 keeps four 16-byte loads in flight per lane (one at a time left the grouped
// combine at a third of the plain one's bandwidth); more spills in the internode kernels. A
// one-rank grouped combine holds no rank sum beside its pair sum and passes 4 vectors: eight loads.
constexpr int kPairVectors = 2;
constexpr int kSoloPairVectors = 4;
constexpr int kPairBatch = 2;

// Whole warp: out[u] (the eight channels of vector first + 32u, where below `vectors`) += for each
// owner lane in k order, its `weight` * y[its `row`], each product and sum rounded on its own. The
// loads of kPairBatch pairs are issued before the first of them is added; the adds keep k order.
template <int kVectors>
__device__ __forceinline__ void add_pair_rows(float (&out)[kVectors][8], const __nv_bfloat16* y, int hidden,
                                              unsigned owners, int row, float weight, int first, int vectors) {
  for (unsigned rest = owners; rest;) {
    int r[kPairBatch];
    float w[kPairBatch];
#pragma unroll
    for (int p = 0; p < kPairBatch; ++p) {
      const int k = rest ? __ffs(rest) - 1 : 0;  // owners is the same in every lane
      r[p] = rest ? __shfl_sync(0xffffffffu, row, k) : -1;
      w[p] = __shfl_sync(0xffffffffu, weight, k);
      rest &= rest - 1;
    }
    int4 v[kPairBatch][kVectors];
#pragma unroll
    for (int p = 0; p < kPairBatch; ++p) {
      const int4* src = reinterpret_cast<const int4*>(y + static_cast<int64_t>(max(r[p], 0)) * hidden);
#pragma unroll
      for (int u = 0; u < kVectors; ++u) {
        const int i = first + kWarpSize * u;
        v[p][u] = r[p] >= 0 && i < vectors ? __ldg(src + i) : make_int4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int p = 0; p < kPairBatch; ++p) {
      if (r[p] < 0) continue;
#pragma unroll
      for (int u = 0; u < kVectors; ++u) {
        float f[8];
        unpack_bf16x8(v[p][u], f);
#pragma unroll
        for (int c = 0; c < 8; ++c) out[u][c] = __fadd_rn(out[u][c], __fmul_rn(w[p], f[c]));
      }
    }
  }
}

// Whole warp: the pairs of token-level row `j` (-1: none) as lanes, each with its row weight.
struct TokenPairs {
  int row;       // lane k < K: the grouped row of the k-th expert, -1 for none
  float weight;  // owners: row_weights[row] (1 without row weights)
  unsigned owners;
};

// `pair_row` [rows, K]: each token-level row's grouped rows; `row_weights` [N] or null.
__device__ __forceinline__ TokenPairs token_pairs(const int32_t* pair_row, const float* row_weights, int num_topk,
                                                  int j, int lane) {
  TokenPairs t;
  t.row = j >= 0 && lane < num_topk ? pair_row[static_cast<int64_t>(j) * num_topk + lane] : -1;
  const PairLanes lanes = pair_lanes(t.row, 0.0f, num_topk, lane);
  t.owners = lanes.owners;
  t.weight = lanes.owner && row_weights ? row_weights[t.row] : 1.0f;
  return t;
}

// Whole warp: each of this lane's vectors i (of the row's hidden / 8) of the pair sum of `t`
// (add_pair_rows, kVectors vectors a pass), handed to store(i, sum) where i is below hidden / 8.
template <int kVectors, typename Store>
__device__ __forceinline__ void for_each_pair_sum(const __nv_bfloat16* y, int hidden, const TokenPairs& t,
                                                  Store&& store) {
  const int lane = threadIdx.x % kWarpSize, vectors = hidden / 8;
  for (int base = 0; base < vectors; base += kWarpSize * kVectors) {
    const int first = base + lane;
    float sum[kVectors][8] = {};
    add_pair_rows(sum, y, hidden, t.owners, t.row, t.weight, first, vectors);
#pragma unroll
    for (int u = 0; u < kVectors; ++u) {
      const int i = first + kWarpSize * u;
      if (i < vectors) store(i, sum[u]);
    }
  }
}

}  // namespace jax_deepep
