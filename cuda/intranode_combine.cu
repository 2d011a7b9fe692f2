// Normal-mode combine over NVLink: the reverse of dispatch, one kernel per op (every block first
// passes the op barrier of cuda/op_sync.cuh).
//
// Block 2c sends channel c, block 2c+1 receives it (with one rank every block receives).
//  - sender warps, one group per peer s: the rows this rank received from s whose source tokens
//    lie in s's channel c (a contiguous run of rows: rows are ordered by source token) go back
//    into s's ring, in order;
//  - receiver warps: for each token of channel c, add up (in f32, rank order) its rows from every
//    rank it went to: this rank's own rows straight from `y`, the peers' from the rings; add the
//    biases, round to bf16 once.
// The expert-grouped combine is the same kernel on GroupedCombineArgs: a sender's slot carries the
// f32 sum of the token's pairs on this rank, and the receiver adds those partials instead of rows
// (cuda/intranode_grouped.cuh). One f32 partial per (token, rank), not one bf16 row per pair: the
// rings keep the plain combine's slot order (one slot per token and rank, by source token), so the
// ring bookkeeping is the plain combine's; the price is twice the bytes of a bf16 row per slot,
// about what the ~K/R pairs a token has on a rank would cost as rows.
#include <cuda_bf16.h>

#include "cuda/bf16x8.cuh"
#include "cuda/bulk_copy.cuh"
#include "cuda/launch.h"
#include "cuda/intranode_common.cuh"
#include "cuda/intranode_grouped.cuh"
#include "cuda/memory_order.cuh"
#include "cuda/op_sync.cuh"
#include "cuda/toolbox.cuh"
#include "cuda/wait.cuh"
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

template <typename Args>
__device__ void send_back(const RankInfo& info, const WaitContext& wait, const Args& args, BulkPipe& pipe,
                          const PeerGroup& g, int channel) {
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
    wait_ring_space(wait, g, mine, channel, base + chunk_end, slots);
    for (int i = chunk + g.warp_in_group; i < chunk_end; i += g.warps) {
      const int64_t row = first_row + i;
      char* p = ring_slot(info.buffers[dst], channel, me, num_ranks, slots, args.slot.bytes, base + i);
      if constexpr (kIsGrouped<Args>) {
        write_partial(args, p, static_cast<int>(row), lane);
      } else {
        const char* src = reinterpret_cast<const char*>(args.y + row * args.hidden);
        copy_row<Source::kInput>(pipe, p, src, row_bytes, lane);
        if (args.topk_weights && lane < args.num_topk)
          reinterpret_cast<float*>(p + args.slot.weights_offset)[lane] = args.topk_weights[row * args.num_topk + lane];
      }
    }
    publish_tail(pipe, g, theirs, channel, me, base + chunk_end);
  }
  if (g.leader) mine->sent_total[channel][dst] = base + count;
}

// A token's rows as positions: this rank's row in `y`, or the slot index in a peer's ring past
// what this channel's op started with; -1 where it was not sent (or was dropped).
struct TokenPositions {
  int token;
  int at[kMaxRanks];
};

// Where a token's rows are: this rank's own row in `y`, or a slot of a peer's ring.
struct TokenRows {
  int token;
  const char* row[kMaxRanks];  // null where it was not sent (or was dropped)
};

// Sums token t's rows (f32, rank order), adds the biases and rounds once into `out`.
__device__ void combine_row(const RankInfo& info, const CombineArgs& args, const TokenRows& rows, const int4* bias0,
                            const int4* bias1, int4* out) {
  const int me = info.rank, lane = threadIdx.x % 32;
  const int vectors = args.hidden / 8;
  // kUnroll vectors per lane per pass, all loads of one source issued before they are used.
  constexpr int kUnroll = 6;
  for (int first = lane; first < vectors; first += 32 * kUnroll) {
    float acc[kUnroll][8] = {};
    int4 v[kUnroll];
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      if (d >= info.num_ranks || !rows.row[d]) continue;
      const int4* p = reinterpret_cast<const int4*>(rows.row[d]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = first + 32 * u;
        v[u] = i >= vectors ? make_int4(0, 0, 0, 0) : (d == me ? __ldg(p + i) : __ldcv(p + i));
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) accumulate(acc[u], v[u]);
    }
    for (const int4* bias : {bias0, bias1}) {
      if (!bias) continue;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = first + 32 * u;
        v[u] = i >= vectors ? make_int4(0, 0, 0, 0) : __ldg(bias + i);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) accumulate(acc[u], v[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = first + 32 * u;
      if (i >= vectors) continue;
      out[i] = pack_bf16x8<int4>(acc[u]);
    }
  }
}

__device__ void combine_token(const RankInfo& info, const CombineArgs& args, const TokenRows& rows, BulkPipe& pipe) {
  const int me = info.rank, lane = threadIdx.x % 32, t = rows.token;
  int sources = 0;
  const char* only = nullptr;
#pragma unroll
  for (int d = 0; d < kMaxRanks; ++d) {
    if (d < info.num_ranks && rows.row[d]) {
      ++sources;
      only = rows.row[d];
    }
  }
  const int4* bias0 = reinterpret_cast<const int4*>(args.bias[0] ? args.bias[0] + static_cast<int64_t>(t) * args.hidden : nullptr);
  const int4* bias1 = reinterpret_cast<const int4*>(args.bias[1] ? args.bias[1] + static_cast<int64_t>(t) * args.hidden : nullptr);
  int4* out = reinterpret_cast<int4*>(args.combined_x + static_cast<int64_t>(t) * args.hidden);
  if (sources == 1 && !bias0 && !bias1 && bulk_copyable(out, only, args.hidden * 2)) {
    // One term and no bias: the f32 sum rounds back to that very row, so copy it (bulk engine).
    if (lane == 0) pipe.copy(reinterpret_cast<char*>(out), only, args.hidden * 2);
  } else {
    combine_row(info, args, rows, bias0, bias1, out);
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

template <typename Args>
__device__ void receive_tokens(const RankInfo& info, const WaitContext& wait, const Args& args, int channel,
                               BulkPipe& pipe) {
  __shared__ uint64_t base[kMaxRanks];
  __shared__ int limit[kMaxRanks];  // tokens past this many sent to a rank were dropped there
  __shared__ int sent_first[kMaxRanks];  // tokens before the channel sent to each rank
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
    sent_first[d] = before(range.first, d);
  }
  __syncthreads();

  // With one rank there is no ring to release: the whole channel is one chunk.
  const int chunk_tokens = num_ranks == 1 ? max(range.last - range.first, 1) : args.ring.chunk_tokens;
  for (int chunk = range.first; chunk < range.last; chunk += chunk_tokens) {
    const int chunk_end = min(chunk + chunk_tokens, range.last);
    if (d < num_ranks && d != me) {
      const uint64_t need = base[d] + filled(chunk_end, d);
      wait_until(&mine->tail[channel][d], [need](uint64_t tail) { return tail >= need; }, wait, WaitKind::kRingData, d,
                 channel);
    }
    __syncthreads();
    // The ring slots were acquired through generic loads; the bulk engine may read them next.
    if (threadIdx.x % 32 == 0) asm volatile("fence.proxy.async.global;" ::: "memory");
    // Each token's row positions are loaded one token ahead of its copy or sum (as small ints,
    // which stay in registers across the sum).
    auto positions = [&](int t) {
      TokenPositions p;
      p.token = t;
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) {
        p.at[r] = -1;
        if (r >= num_ranks) continue;
        const int row = args.send_row[static_cast<int64_t>(t) * num_ranks + r];
        if (row < 0 || row >= args.capacity) continue;
        p.at[r] = r == me ? row : before(t, r) - sent_first[r];
      }
      return p;
    };
    for_each_ahead(chunk + warp, chunk_end, kWarps, positions, [&](const TokenPositions& p) {
      TokenRows rows;
      rows.token = p.token;
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) {
        rows.row[r] = nullptr;
        if (p.at[r] < 0) continue;
        if (r != me) {
          rows.row[r] = ring_slot(info.buffers[me], channel, r, num_ranks, slots, args.slot.bytes, base[r] + p.at[r]);
        } else if constexpr (!kIsGrouped<Args>) {
          rows.row[r] = reinterpret_cast<const char*>(args.y + static_cast<int64_t>(p.at[r]) * args.hidden);
        }
      }
      if constexpr (kIsGrouped<Args>) {
        combine_partials(info, args, p.token, p.at[me], rows.row);  // this rank's own term: its token-level row
      } else {
        combine_token(info, args, rows, pipe);
      }
    });
    if (threadIdx.x % 32 == 0) pipe.flush();  // the ring slots are read: the senders may refill them
    __threadfence();
    __syncthreads();
    if (d < num_ranks && d != me)
      store_release(&header_of(info.buffers[d])->head[channel][me], base[d] + filled(chunk_end, d));
  }
  __syncthreads();
  if (d < num_ranks && d != me) mine->consumed_total[channel][d] = base[d] + filled(range.last, d);
}

template <typename Args>
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(RankInfo info, Args args) {
  const int num_ranks = info.num_ranks;
  const bool solo = num_ranks == 1;
  const int channel = solo ? blockIdx.x : blockIdx.x / 2;
  const bool sender = !solo && blockIdx.x % 2 == 0;
  const WaitContext wait = wait_context(info, kIsGrouped<Args> ? OpKind::kGroupedCombine : OpKind::kCombine);
  const uint32_t epoch = op_epoch(info);
  const OpSignature signature(wait.op, {static_cast<uint32_t>(args.slot.bytes), static_cast<uint32_t>(args.hidden),
                                        static_cast<uint32_t>(args.num_topk),
                                        static_cast<uint32_t>(args.ring.num_channels),
                                        static_cast<uint32_t>(args.ring.slots),
                                        static_cast<uint32_t>(args.ring.chunk_tokens)});
  if (blockIdx.x == 0) announce_op(info, epoch, signature);
  wait_for_peers(info, wait, epoch, signature);
  extern __shared__ __align__(128) char bulk_shared[];
  BulkPipe pipe;
  pipe.init(bulk_shared, threadIdx.x / 32);
  if (sender) {
    const PeerGroup g = peer_group(num_ranks);
    if (g.peer < num_ranks && g.peer != info.rank) send_back(info, wait, args, pipe, g, channel);
  } else {
    receive_tokens(info, wait, args, channel, pipe);
  }
  if (threadIdx.x % 32 == 0) pipe.drain();  // shared memory must outlive the last bulk store
  finish_op(info, epoch);
}

}  // namespace

cudaError_t prepare_combine() {
  const cudaError_t err = allow_intranode_shared_memory(combine_kernel<CombineArgs>);
  return err == cudaSuccess ? allow_intranode_shared_memory(combine_kernel<GroupedCombineArgs>) : err;
}

cudaError_t launch_combine(const RankInfo& info, const CombineArgs& args, cudaStream_t stream) {
  return launch_intranode(combine_kernel<CombineArgs>, info, args, stream);
}

cudaError_t launch_grouped_combine(const RankInfo& info, const GroupedCombineArgs& args, cudaStream_t stream) {
  return launch_intranode(combine_kernel<GroupedCombineArgs>, info, args, stream);
}

}  // namespace jax_deepep
