// Normal-mode combine over NVLink: the reverse of dispatch.
//
// Block 2c sends channel c, block 2c+1 receives it (with one rank every block receives).
//  - sender warps, one group per peer s: the rows this rank received from s whose source tokens
//    lie in s's channel c (a contiguous run of rows: rows are ordered by source token) go back
//    into s's ring, in order;
//  - receiver warps: for each token of channel c, add up (in f32, rank order) its rows from every
//    rank it went to: this rank's own rows straight from `y`, the peers' from the rings; add the
//    biases, round to bf16 once.
#include <cuda_bf16.h>

#include "cuda/device_sync.cuh"
#include "cuda/intranode.h"
#include "cuda/intranode_common.cuh"
#include "cuda/warp_copy.cuh"

namespace jax_deepep {
namespace {

// First row in [lo, hi) whose source token index is >= token (rows ascend by source token).
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

__device__ void send_back(const RankInfo& info, const CombineArgs& args, const PeerGroup& g, int channel) {
  const int me = info.rank, dst = g.peer, num_ranks = info.num_ranks, lane = threadIdx.x % 32;
  const int slots = args.ring.slots;
  CommHeader* mine = header_of(info.buffers[me]);
  CommHeader* theirs = header_of(info.buffers[dst]);
  const int num_recv = *args.num_recv_tokens;
  const int block_end = dst + 1 < num_ranks ? args.recv_rank_prefix[dst + 1] : num_recv;
  const int lo = min(args.recv_rank_prefix[dst], args.capacity), hi = min(block_end, args.capacity);
  const TokenRange range = channel_tokens(args.num_tokens, channel, args.ring.num_channels);
  const int first_row = lower_bound_row(args.recv_src_idx, lo, hi, range.first);
  const int count = lower_bound_row(args.recv_src_idx, first_row, hi, range.last) - first_row;
  const uint64_t base = mine->sent_total[channel][dst];
  const int row_bytes = args.hidden * 2;

  for (int chunk = 0; chunk < count; chunk += args.ring.chunk_tokens) {
    const int chunk_end = min(chunk + args.ring.chunk_tokens, count);
    if (g.leader) {
      wait_for(&mine->head[channel][dst], [&](uint64_t head) { return base + chunk_end <= head + slots; }, info,
               kRingSpaceTimeout, dst, channel);
    }
    named_barrier(g.barrier_id, g.threads());
    for (int i = chunk + g.warp_in_group; i < chunk_end; i += g.warps) {
      const int64_t row = first_row + i;
      char* p = ring_slot(info.buffers[dst], channel, me, num_ranks, slots, args.slot.bytes, base + i);
      warp_copy<Source::kInput>(p, args.y + row * args.hidden, row_bytes, lane);
      if (args.topk_weights && lane < args.num_topk)
        reinterpret_cast<float*>(p + args.slot.weights_offset)[lane] = args.topk_weights[row * args.num_topk + lane];
    }
    __threadfence_system();
    named_barrier(g.barrier_id, g.threads());
    if (g.leader) store_release(&theirs->tail[channel][me], base + chunk_end);
  }
  if (g.leader) mine->sent_total[channel][dst] = base + count;
}

__device__ __forceinline__ void accumulate(float (&acc)[8], const int4& v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}

// Where token t's rows are: this rank's own row in `y`, or a slot of a peer's ring.
struct TokenRows {
  const char* row[kMaxRanks];  // null where t was not sent (or was dropped)
};

// Rows are staged in shared memory through cp.async (kCombineStages pieces in flight per warp, no
// registers held), then summed from there. A lane only reads the vectors it copied itself, so it
// needs no barrier, only its own wait_group.
constexpr int kCombineStages = 3;
constexpr int kStageVectors = 768;  // 12 KiB of staging per warp
constexpr int kCombineSharedBytes = kIntranodeWarps * kStageVectors * 16;

__device__ __forceinline__ void async_load16(int4* shared, const int4* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(shared))),
               "l"(global)
               : "memory");
}

__device__ __forceinline__ void async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

__device__ __forceinline__ void async_wait_all_but_newest() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kCombineStages - 1) : "memory");
}

__device__ void combine_token(const RankInfo& info, const CombineArgs& args, const TokenRows& rows, int t,
                              int4* stage) {
  const int me = info.rank, lane = threadIdx.x % 32, num_ranks = info.num_ranks;
  const int vectors = args.hidden / 8;
  const int4* bias0 = reinterpret_cast<const int4*>(args.bias[0] ? args.bias[0] + static_cast<int64_t>(t) * args.hidden : nullptr);
  const int4* bias1 = reinterpret_cast<const int4*>(args.bias[1] ? args.bias[1] + static_cast<int64_t>(t) * args.hidden : nullptr);
  int4* out = reinterpret_cast<int4*>(args.combined_x + static_cast<int64_t>(t) * args.hidden);
  // A stage holds one piece of every rank's row: [R][piece] vectors.
  const int piece = kStageVectors / (kCombineStages * num_ranks) / 32 * 32;
  const int pieces = (vectors + piece - 1) / piece;
  auto issue = [&](int p) {
    if (p < pieces) {
      int4* st = stage + (p % kCombineStages) * num_ranks * piece;
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) {
        if (d >= num_ranks || !rows.row[d]) continue;
        const int4* g = reinterpret_cast<const int4*>(rows.row[d]) + static_cast<int64_t>(p) * piece;
        for (int j = lane; j < piece && p * piece + j < vectors; j += 32) async_load16(st + d * piece + j, g + j);
      }
    }
    async_commit();  // empty groups keep the group count uniform at the tail
  };
  for (int p = 0; p < kCombineStages; ++p) issue(p);
  for (int p = 0; p < pieces; ++p) {
    async_wait_all_but_newest();
    const int4* st = stage + (p % kCombineStages) * num_ranks * piece;
    for (int j = lane; j < piece && p * piece + j < vectors; j += 32) {
      const int i = p * piece + j;
      float acc[8] = {};
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) {
        if (d < num_ranks && rows.row[d]) accumulate(acc, st[d * piece + j]);
      }
      if (bias0) accumulate(acc, __ldg(bias0 + i));
      if (bias1) accumulate(acc, __ldg(bias1 + i));
      int4 packed;
      __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
      for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(acc[2 * k], acc[2 * k + 1]);
      out[i] = packed;
    }
    issue(p + kCombineStages);
  }
  if (args.combined_topk_weights && lane < args.num_topk) {
    float w = 0.0f;
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      if (d >= info.num_ranks || !rows.row[d]) continue;
      if (d == me) {
        const int64_t row = args.send_row[static_cast<int64_t>(t) * info.num_ranks + d];
        w += args.topk_weights[row * args.num_topk + lane];
      } else {
        w += reinterpret_cast<const volatile float*>(rows.row[d] + args.slot.weights_offset)[lane];
      }
    }
    args.combined_topk_weights[static_cast<int64_t>(t) * args.num_topk + lane] = w;
  }
}

__device__ void receive_tokens(const RankInfo& info, const CombineArgs& args, int channel, int4* stage) {
  __shared__ uint64_t base[kMaxRanks];
  __shared__ int limit[kMaxRanks];  // tokens past this many sent to a rank were dropped there
  const int me = info.rank, num_ranks = info.num_ranks, warp = threadIdx.x / 32;
  const int slots = args.ring.slots;
  CommHeader* mine = header_of(info.buffers[me]);
  const TokenRange range = channel_tokens(args.num_tokens, channel, args.ring.num_channels);
  const int d = threadIdx.x;  // threads below num_ranks watch rank d's ring
  auto before = [&](int t, int rank) {
    return sent_before(args.send_count_before, args.is_token_in_rank, args.num_tokens, num_ranks, t, rank);
  };
  // Ring slots rank `rank` fills for tokens [range.first, t): sent there and not dropped.
  auto filled = [&](int t, int rank) {
    const int cap = max(limit[rank], 0);
    return min(before(t, rank), cap) - min(before(range.first, rank), cap);
  };
  if (d < num_ranks) {
    base[d] = mine->consumed_total[channel][d];
    limit[d] = args.capacity - args.send_offset[d];
  }
  __syncthreads();

  for (int chunk = range.first; chunk < range.last; chunk += args.ring.chunk_tokens) {
    const int chunk_end = min(chunk + args.ring.chunk_tokens, range.last);
    if (d < num_ranks && d != me) {
      const uint64_t need = base[d] + filled(chunk_end, d);
      wait_for(&mine->tail[channel][d], [need](uint64_t tail) { return tail >= need; }, info, kRingDataTimeout, d,
               channel);
    }
    __syncthreads();
    for (int t = chunk + warp; t < chunk_end; t += kIntranodeWarps) {
      TokenRows rows;
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) {
        rows.row[r] = nullptr;
        if (r >= num_ranks) continue;
        const int row = args.send_row[static_cast<int64_t>(t) * num_ranks + r];
        if (row < 0 || row >= args.capacity) continue;
        if (r == me) {
          rows.row[r] = reinterpret_cast<const char*>(args.y + static_cast<int64_t>(row) * args.hidden);
        } else {
          const uint64_t index = base[r] + before(t, r) - before(range.first, r);
          rows.row[r] = ring_slot(info.buffers[me], channel, r, num_ranks, slots, args.slot.bytes, index);
        }
      }
      combine_token(info, args, rows, t, stage);
    }
    __threadfence();
    __syncthreads();
    if (d < num_ranks && d != me)
      store_release(&header_of(info.buffers[d])->head[channel][me], base[d] + filled(chunk_end, d));
  }
  __syncthreads();
  if (d < num_ranks && d != me) mine->consumed_total[channel][d] = base[d] + filled(range.last, d);
}

__global__ void __launch_bounds__(kIntranodeThreads, 1) combine_kernel(RankInfo info, CombineArgs args) {
  const int num_ranks = info.num_ranks;
  const bool solo = num_ranks == 1;
  const int channel = solo ? blockIdx.x : blockIdx.x / 2;
  const bool sender = !solo && blockIdx.x % 2 == 0;
  if (!sender) {
    extern __shared__ __align__(128) int4 combine_stage[];
    receive_tokens(info, args, channel, combine_stage + (threadIdx.x / 32) * kStageVectors);
    return;
  }
  const PeerGroup g = peer_group(num_ranks);
  if (g.peer < num_ranks && g.peer != info.rank) send_back(info, args, g, channel);
}

}  // namespace

cudaError_t launch_combine(const RankInfo& info, const CombineArgs& args, cudaStream_t stream) {
  CombineArgs a = args;
  const bool solo = info.num_ranks == 1;
  if (solo) a.ring.num_channels *= 2;  // nothing to send: every block receives its own channel
  const int blocks = solo ? a.ring.num_channels : 2 * a.ring.num_channels;
  cudaError_t err =
      cudaFuncSetAttribute(combine_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kCombineSharedBytes);
  if (err != cudaSuccess) return err;
  combine_kernel<<<blocks, kIntranodeThreads, kCombineSharedBytes, stream>>>(info, a);
  return cudaGetLastError();
}

}  // namespace jax_deepep
