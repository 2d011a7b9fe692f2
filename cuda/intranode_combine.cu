// Normal-mode combine over NVLink: the reverse of dispatch, one kernel per op (every block first
// passes the op barrier of cuda/op_sync.cuh).
//
// Block 2c sends channel c, block 2c+1 receives it (with one rank every block receives).
//  - sender warps, one group per peer s (none for this rank, which sends nothing): the rows this rank received from s whose source tokens
//    lie in s's channel c (a contiguous run of rows: rows are ordered by source token) go back
//    into s's ring, in order;
//  - receiver warps: each takes every kWarps-th token of channel c, waits for that token's slots
//    only, and adds up (in f32, rank order) its rows from every rank it went to: this rank's own
//    rows straight from `y`, the peers' from the rings (every source's loads in flight at once);
//    adds the biases, rounds to bf16 once. The warps share no barrier: the ring heads follow the
//    tokens every warp has finished (finish_tokens).
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

// Where a token's rows are: this rank's own row in `y`, or a slot of a peer's ring.
struct TokenRows {
  int token;
  const char* row[kMaxRanks];  // null where it was not sent (or was dropped)
};

// Sums a token's rows (f32, rank order), adds the biases and rounds once into `out`, for up to
// kRanks ranks. Each pass issues the loads of every rank's vectors before it adds the first, so
// the reads of all sources are in flight together (about eight 16-byte loads per lane).
template <int kRanks>
__device__ void combine_row(const RankInfo& info, const CombineArgs& args, const TokenRows& rows, const int4* bias0,
                            const int4* bias1, int4* out) {
  constexpr int kUnroll = kRanks >= 8 ? 1 : kRanks >= 4 ? 2 : 4;  // vectors per lane and rank in one pass
  const int me = info.rank, lane = threadIdx.x % 32;
  const int vectors = args.hidden / 8;
  for (int first = lane; first < vectors; first += 32 * kUnroll) {
    int4 v[kRanks][kUnroll];
#pragma unroll
    for (int d = 0; d < kRanks; ++d) {
      const int4* p = reinterpret_cast<const int4*>(rows.row[d]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = first + 32 * u;
        v[d][u] = !p || i >= vectors ? make_int4(0, 0, 0, 0) : (d == me ? __ldg(p + i) : __ldcv(p + i));
      }
    }
    float acc[kUnroll][8] = {};
#pragma unroll
    for (int d = 0; d < kRanks; ++d) {
      if (!rows.row[d]) continue;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) accumulate(acc[u], v[d][u]);
    }
    for (const int4* bias : {bias0, bias1}) {
      if (!bias) continue;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = first + 32 * u;
        v[0][u] = i >= vectors ? make_int4(0, 0, 0, 0) : __ldg(bias + i);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) accumulate(acc[u], v[0][u]);
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
    // The slot was acquired through generic loads; the bulk engine reads it.
    if (lane == 0) {
      asm volatile("fence.proxy.async.global;" ::: "memory");
      pipe.copy(reinterpret_cast<char*>(out), only, args.hidden * 2);
    }
  } else if (info.num_ranks <= 1) {
    combine_row<1>(info, args, rows, bias0, bias1, out);
  } else if (info.num_ranks <= 2) {
    combine_row<2>(info, args, rows, bias0, bias1, out);
  } else if (info.num_ranks <= 4) {
    combine_row<4>(info, args, rows, bias0, bias1, out);
  } else {
    combine_row<kMaxRanks>(info, args, rows, bias0, bias1, out);
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

// What the warps of a combine receiver block share: where each peer's ring starts for this op,
// and how far the warps have got, from which the ring heads are released.
struct ReceiverState {
  uint64_t base[kMaxRanks];  // each peer's ring total when the op started
  int limit[kMaxRanks];      // tokens past this many sent to a rank were dropped there
  int sent_first[kMaxRanks];  // tokens before the channel sent to each rank
  int next[kWarps];           // each warp's next token (range.last once it has none left)
  int released;               // the heads cover the slots of every token before this one
  unsigned requests;          // warps that finished a token since the heads were last looked at
};

// Whole warp, a combine receiver with peers: this warp finished every token before `next` that is
// its own. Releases the heads once the tokens every warp finished (all before the smallest `next`)
// are `lag` past the released ones. Of the warps that ask at once, the first (requests 0 -> 1)
// releases, and looks again for as long as others asked meanwhile: one releasing warp at a time,
// so the heads only grow, and no warp ever waits for another.
template <typename Release>
__device__ __forceinline__ void finish_tokens(ReceiverState& state, BulkPipe& pipe, int next, int last, int lag,
                                              Release release) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  volatile int* progress = state.next;
  __syncwarp();  // every lane's reads of the slots come before `next`
  unsigned asked = 0;
  if (lane == 0) {
    pipe.flush();  // the bulk engine has read this warp's slots
    progress[warp] = next;
    __threadfence_block();  // the slots' reads and `next` come before the request
    asked = atomicAdd(&state.requests, 1u);
  }
  if (__shfl_sync(0xffffffffu, asked, 0) != 0) return;  // the releasing warp sees this one's `next`
  for (unsigned served = 1; served;) {
    int to = -1;  // lane 0 decides: the token the heads move to, or -1
    if (lane == 0) {
      __threadfence_block();  // the requests served come before the `next` read for them
      int done = last;
      for (int w = 0; w < kWarps; ++w) done = min(done, progress[w]);
      if (done - state.released >= lag) to = state.released = done;
    }
    to = __shfl_sync(0xffffffffu, to, 0);
    __syncwarp();  // lane 0's reads of `next` come before the heads
    if (to >= 0) release(to);  // lanes below R store the heads
    __syncwarp();  // the heads come before the next releasing warp's
    unsigned left = 0;
    if (lane == 0) {
      __threadfence_block();
      left = atomicSub(&state.requests, served) - served;
    }
    served = __shfl_sync(0xffffffffu, left, 0);
  }
}

template <typename Args>
__device__ void receive_tokens(const RankInfo& info, const WaitContext& wait, const Args& args, int channel,
                               BulkPipe& pipe) {
  __shared__ ReceiverState state;
  const int me = info.rank, num_ranks = info.num_ranks, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slots = args.ring.slots;
  CommHeader* mine = header_of(info.buffers[me]);
  const TokenRange range = channel_tokens(args.num_tokens, channel, args.ring.num_channels);
  auto before = [&](int t, int rank) {
    return sent_before(args.send_count_before, args.is_token_in_rank, args.num_tokens, num_ranks, t, rank);
  };
  // Ring slots rank `rank` fills for tokens [range.first, t): sent there and not dropped.
  auto filled = [&](int t, int rank) {
    const int cap = max(state.limit[rank], 0);
    return min(before(t, rank), cap) - min(before(range.first, rank), cap);
  };
  const int d = threadIdx.x;  // threads below num_ranks set up rank d's ring
  if (d < num_ranks) {
    state.base[d] = mine->consumed_total[channel][d];
    state.limit[d] = args.capacity - args.send_offset[d];
    state.sent_first[d] = before(range.first, d);
  }
  if (d < kWarps) state.next[d] = min(range.first + d, range.last);
  if (d == 0) {
    state.released = range.first;
    state.requests = 0;
  }
  __syncthreads();

  // Heads may lag the finished tokens by fewer than `lag` slots: a sender's chunk holding the
  // slot of the first unfinished token then still fits in the ring (chunk + lag - 1 <= slots).
  const int lag = max(min(args.ring.chunk_tokens, slots + 1 - args.ring.chunk_tokens), 1);
  auto release = [&](int done) {
    if (lane < num_ranks && lane != me)
      store_release(&header_of(info.buffers[lane])->head[channel][me], state.base[lane] + filled(done, lane));
  };
  // Lane r < R: where the token's row from rank r is, loaded one token ahead of its sum: its row
  // in `y` for this rank, else its slot index in r's ring past what this op started with; -1
  // where it was not sent (or was dropped). A grouped combine also reads this rank's own pairs
  // of the token ahead (two dependent loads: its token-level row's pair rows, then their weights).
  struct Ahead {
    int2 at;
    TokenPairs own;
  };
  auto position = [&](int t) {
    Ahead a;
    a.at = make_int2(t, -1);
    if (lane < num_ranks) {
      const int row = args.send_row[static_cast<int64_t>(t) * num_ranks + lane];
      if (row >= 0 && row < args.capacity) a.at.y = lane == me ? row : before(t, lane) - state.sent_first[lane];
    }
    if constexpr (kIsGrouped<Args>) a.own = token_pairs(args, __shfl_sync(0xffffffffu, a.at.y, me), lane);
    return a;
  };
  uint64_t seen = 0;  // lane r < R: the tail of rank r's ring as last read
  for_each_ahead(range.first + warp, range.last, kWarps, position, [&](const Ahead& a) {
    const int2 at = a.at;
    if (lane < num_ranks && lane != me && at.y >= 0) {
      const uint64_t need = state.base[lane] + at.y + 1;
      if (seen < need)
        seen = wait_until(&mine->tail[channel][lane], [need](uint64_t tail) { return tail >= need; }, wait,
                          WaitKind::kRingData, lane, channel);
    }
    __syncwarp();  // the slots this warp reads were acquired by their lanes
    TokenRows rows;
    rows.token = at.x;
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      const int slot = __shfl_sync(0xffffffffu, at.y, r);
      rows.row[r] = nullptr;
      if (r >= num_ranks || slot < 0) continue;
      if (r != me) {
        rows.row[r] = ring_slot(info.buffers[me], channel, r, num_ranks, slots, args.slot.bytes, state.base[r] + slot);
      } else if constexpr (!kIsGrouped<Args>) {
        rows.row[r] = reinterpret_cast<const char*>(args.y + static_cast<int64_t>(slot) * args.hidden);
      }
    }
    if constexpr (kIsGrouped<Args>) {
      combine_partials(info, args, at.x, __shfl_sync(0xffffffffu, at.y, me) >= 0, a.own, rows.row);
    } else {
      combine_token(info, args, rows, pipe);
    }
    if (num_ranks > 1) finish_tokens(state, pipe, min(at.x + kWarps, range.last), range.last, lag, release);
  });
  if (threadIdx.x % 32 == 0) pipe.flush();
  __syncthreads();  // every warp's slots are read, and every earlier head release is done
  if (d < num_ranks && d != me) {
    const uint64_t end = state.base[d] + filled(range.last, d);
    store_release(&header_of(info.buffers[d])->head[channel][me], end);
    mine->consumed_total[channel][d] = end;
  }
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
    const PeerGroup g = peer_group_without(num_ranks, info.rank);
    if (g.peer < num_ranks) send_back(info, wait, args, pipe, g, channel);
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
