// What every kernel file builds on: the block shape all communication kernels launch with, 16-byte
// alignment of row pieces, the split of tokens into channels, named barriers, the last block of a
// launch and the block-wide running prefix of flags (ballots).
// Row copies are in warp_copy.cuh and bf16 arithmetic in bf16x8.cuh: other concepts, same rule
// (one copy each, used by every kernel that needs it).
//
// Host code includes this header too (sizes of rows and slots): device code is behind __CUDACC__.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define JDEEP_HOST_DEVICE __host__ __device__
#else
#define JDEEP_HOST_DEVICE
#endif

namespace jax_deepep {

constexpr int kWarpSize = 32;
constexpr int kThreads = 512;  // threads of every dispatch/combine block, in every mode
constexpr int kWarps = kThreads / kWarpSize;

// n rounded up to a multiple of 16: every piece of a row or slot starts 16-byte aligned, so it
// can move with 16-byte vector accesses.
template <typename Int>
JDEEP_HOST_DEVICE constexpr Int align16(Int n) {
  return (n + 15) / 16 * 16;
}

#ifdef __CUDACC__

// Tokens [first, last) of `channel`: channels split the sender's tokens into contiguous ranges,
// so a ring carries its tokens in (source token index) order (intranode and internode kernels).
struct TokenRange {
  int first, last;
};

__device__ __forceinline__ TokenRange channel_tokens(int num_tokens, int channel, int num_channels) {
  return {static_cast<int>(static_cast<int64_t>(num_tokens) * channel / num_channels),
          static_cast<int>(static_cast<int64_t>(num_tokens) * (channel + 1) / num_channels)};
}

// First received row in [lo, hi) whose source token index is >= token (one source's rows ascend by
// source token), for the combines that send a channel's rows back.
__device__ __forceinline__ int lower_bound_row(const int32_t* recv_src_idx, int lo, int hi, int token) {
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (recv_src_idx[mid] < token) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// One thread of each block of a launch, after the block's work: whether this block is the launch's
// last to finish, counted in `done` (reset by the last for the next launch). The fences on both sides
// of the count order every block's work before what the last block does next (as a grid barrier does).
// A launch of one block is its own last block, with nothing to count or order (its barrier, which
// every caller passes first, orders its threads' work).
__device__ __forceinline__ bool last_block_of_launch(uint32_t* done) {
  if (gridDim.x * gridDim.y * gridDim.z == 1) return true;
  __threadfence();
  if (atomicAdd(done, 1u) != gridDim.x * gridDim.y * gridDim.z - 1) return false;
  __threadfence();
  *done = 0;
  return true;
}

// Named barrier over `num_threads` threads (a multiple of 32); id 0 is __syncthreads.
__device__ __forceinline__ void named_barrier(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

// Shared state of a running prefix of kFlags flags over the threads of a kThreads block.
template <int kFlags>
struct BlockPrefix {
  int warp_counts[kWarps][kFlags];
  int running[kFlags];  // set flags of the earlier passes (the caller sets where it starts)
};

// One pass, whole block: position[f] = how many threads before this one (earlier passes, then
// this pass in thread order) have flag f set. Afterwards `running` counts this pass too.
template <int kFlags>
__device__ __forceinline__ void block_prefix(BlockPrefix<kFlags>& prefix, const bool (&flag)[kFlags],
                                             int (&position)[kFlags]) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  unsigned ballots[kFlags];
#pragma unroll
  for (int f = 0; f < kFlags; ++f) {
    ballots[f] = __ballot_sync(0xffffffffu, flag[f]);
    if (lane == 0) prefix.warp_counts[warp][f] = __popc(ballots[f]);
  }
  __syncthreads();
#pragma unroll
  for (int f = 0; f < kFlags; ++f) {
    int before = prefix.running[f] + __popc(ballots[f] & ((1u << lane) - 1u));
    for (int w = 0; w < warp; ++w) before += prefix.warp_counts[w][f];
    position[f] = before;
  }
  __syncthreads();  // every thread read `running` before it moves on
  if (threadIdx.x < kFlags) {
    int total = 0;
    for (int w = 0; w < kWarps; ++w) total += prefix.warp_counts[w][threadIdx.x];
    prefix.running[threadIdx.x] += total;
  }
  __syncthreads();
}

#endif  // __CUDACC__

}  // namespace jax_deepep
