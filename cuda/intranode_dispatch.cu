// Normal-mode dispatch (and cached dispatch) over NVLink, one kernel per op.
//
// Every block first passes the op barrier (cuda/op_sync.cuh); a first dispatch exchanges its
// counts on the way (cuda/notify.cuh). Block 2c sends channel c, block 2c+1 receives it (with one
// rank, every block copies its own channel). Inside a block the warps form one group per rank they
// serve:
//  - sender block, a group per peer: announces the channel's slot count, then pushes its tokens
//    for that peer into the peer's ring chunk by chunk (waiting for ring space, publishing the tail);
//  - receiver block, a group per peer: moves each arrived slot to the row the sender stamped on it
//    and publishes the head so the sender can reuse the slots; and a group for this rank itself,
//    which writes the channel's rows for this rank straight to their final output row. So no
//    block idles a group, and the own rows are not on the pushing sender's critical path.
// The expert-grouped dispatch is the same kernel on GroupedDispatchArgs: the rows stamped on the
// slots are token-level rows, each slot also carries its pairs' prefixes, and the receiver writes
// the token straight to its grouped rows (cuda/intranode_grouped.cuh).
#include "cuda/bulk_copy.cuh"
#include "cuda/launch.h"
#include "cuda/intranode_common.cuh"
#include "cuda/intranode_grouped.cuh"
#include "cuda/memory_order.cuh"
#include "cuda/notify.cuh"
#include "cuda/op_sync.cuh"
#include "cuda/toolbox.cuh"
#include "cuda/wait.cuh"
#include "cuda/warp_copy.cuh"

namespace jax_deepep {
namespace {

// One token as a warp moves it: where its payload parts are, and its metadata, loaded into
// registers one token ahead of its copy (for_each_ahead) so that no warp waits on a small load
// queued behind the bulk traffic. Lanes below K hold one expert id and weight each.
struct Token {
  const char* part[2];
  int index;       // source token index
  int row;         // destination row on the receiver (-1: not sent there)
  bool sent;       // sender side: sent to the rank the warp serves
  int position;    // sender side: tokens before it sent to that rank
  int32_t expert;  // global expert id (raw: the receiver range-checks it), or -1
  float weight;
};

// A token of a grouped dispatch also carries its pairs' prefixes (GroupedDispatchArgs::topk_prefix;
// a cached dispatch: 0). A separate type keeps the plain kernel's tokens as they were.
struct GroupedToken : Token {
  int prefix;
};

template <typename Args>
using TokenOf = std::conditional_t<kIsGrouped<Args>, GroupedToken, Token>;

// Sender side: token t of the inputs, as sent to rank `dst`.
template <typename Args>
__device__ __forceinline__ TokenOf<Args> input_token(const Args& args, int num_ranks, int t, int dst, int lane) {
  TokenOf<Args> k;
#pragma unroll
  for (int p = 0; p < 2; ++p)
    k.part[p] = p < args.num_parts ? args.parts[p].send + static_cast<int64_t>(t) * args.parts[p].row_bytes : nullptr;
  const int64_t at = static_cast<int64_t>(t) * num_ranks + dst;
  const int64_t pick = static_cast<int64_t>(t) * args.num_topk + lane;
  k.index = t;
  k.row = args.send_row[at];  // plain loads: a first dispatch wrote these positions in this launch
  k.position = args.send_count_before[at];
  k.sent = __ldg(reinterpret_cast<const unsigned char*>(args.is_token_in_rank) + at) != 0;
  k.expert = args.topk_idx && lane < args.num_topk ? __ldg(args.topk_idx + pick) : -1;
  k.weight = args.topk_weights && lane < args.num_topk ? __ldg(args.topk_weights + pick) : 0.0f;
  if constexpr (kIsGrouped<Args>) k.prefix = args.topk_prefix && lane < args.num_topk ? __ldg(args.topk_prefix + pick) : 0;
  return k;
}

// Receiver side: the token in ring slot `p` (written by a peer: cache-volatile loads).
template <typename Args>
__device__ __forceinline__ TokenOf<Args> ring_token(const Args& args, const DispatchSlot& slot, const char* p, int lane) {
  TokenOf<Args> k;
#pragma unroll
  for (int i = 0; i < 2; ++i) k.part[i] = p + slot.part_offset[i];
  const int2 meta = __ldcv(reinterpret_cast<const int2*>(p));
  k.index = meta.x;
  k.row = meta.y;
  k.sent = true;
  k.position = 0;
  const bool picks = lane < args.num_topk;
  k.expert = args.topk_idx && picks ? __ldcv(reinterpret_cast<const int*>(p + slot.topk_idx_offset) + lane) : -1;
  k.weight = args.topk_weights && picks ? __ldcv(reinterpret_cast<const float*>(p + slot.topk_weights_offset) + lane) : 0.0f;
  if constexpr (kIsGrouped<Args>)
    k.prefix = args.topk_prefix && picks ? __ldcv(reinterpret_cast<const int*>(p + args.topk_prefix_offset) + lane) : 0;
  return k;
}

// Writes token `k` into its output row (< capacity), converting expert ids to local ones.
template <Source kSource>
__device__ __forceinline__ void deliver(const DispatchArgs& args, BulkPipe& pipe, int me, int experts_per_rank,
                                        const Token& k, int source_rank, int lane) {
#pragma unroll
  for (int p = 0; p < 2; ++p) {  // constant indices keep `k` in registers
    if (p >= args.num_parts) break;
    const int bytes = args.parts[p].row_bytes;
    copy_row<kSource>(pipe, args.parts[p].recv + static_cast<int64_t>(k.row) * bytes, k.part[p], bytes, lane);
  }
  if (lane < args.num_topk) {
    const int64_t at = static_cast<int64_t>(k.row) * args.num_topk + lane;
    const int e = k.expert;
    const bool mine = e >= 0 && e < args.num_experts && e / experts_per_rank == me;
    if (args.topk_idx) args.recv_topk_idx[at] = mine ? e - me * experts_per_rank : -1;
    if (args.topk_weights) args.recv_topk_weights[at] = (args.topk_idx && !mine) ? 0.0f : k.weight;
  }
  if (lane == 0 && args.recv_src_idx) args.recv_src_idx[k.row] = k.index;
  if (lane == 0 && args.recv_src_rank) args.recv_src_rank[k.row] = source_rank;
}

// Grouped: writes token `k` (token-level row k.row, from `source_rank`) to each of its grouped rows,
// and the token-level handle's arrays; a first dispatch finds the rows from the bases table and
// the prefixes and writes them as the token's pair rows, a cached one reads them there.
template <Source kSource>
__device__ __forceinline__ void deliver_pairs(const GroupedDispatchArgs& args, BulkPipe& pipe, const int* bases,
                                              int me, int experts_per_rank, const GroupedToken& k, int source_rank,
                                              int lane) {
  const bool first = args.topk_prefix != nullptr;
  const int64_t at = static_cast<int64_t>(k.row) * args.num_topk + lane;
  int local = -1, row = -1;
  if (lane < args.num_topk) {
    if (first) {
      const int e = k.expert;
      if (e >= 0 && e < args.num_experts && e / experts_per_rank == me) {
        local = e - me * experts_per_rank;
        row = bases[source_rank * experts_per_rank + local] + k.prefix;
        if (row >= args.grouped_capacity) row = -1;  // dropped (past capacity)
      }
      args.pair_row[at] = row;
    } else {
      row = args.pair_row[at];
    }
  }
  const PairLanes pairs = pair_lanes(row, k.weight, args.num_topk, lane);
  for (unsigned rest = pairs.owners; rest; rest &= rest - 1) {
    const int r = __shfl_sync(0xffffffffu, row, __ffs(rest) - 1);
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      if (p >= args.num_parts) break;
      const int bytes = args.parts[p].row_bytes;
      copy_row<kSource>(pipe, args.parts[p].recv + static_cast<int64_t>(r) * bytes, k.part[p], bytes, lane);
    }
  }
  if (pairs.owner) {
    if (args.recv_weight) args.recv_weight[row] = pairs.weight;
    if (first) {
      args.recv_expert[row] = local;
      args.token_row[row] = k.row;
    }
  }
  if (lane == 0 && args.recv_src_idx) args.recv_src_idx[k.row] = k.index;
  if (lane == 0 && args.recv_src_rank) args.recv_src_rank[k.row] = source_rank;
}

// Rows past the received tokens: no expert, zero weight, no source.
__device__ void fill_padding(const DispatchArgs& args, int num_recv) {
  const int lane = threadIdx.x % 32;
  const int warps = gridDim.x * kWarps;
  for (int row = max(num_recv, 0) + blockIdx.x * kWarps + threadIdx.x / 32; row < args.capacity; row += warps) {
    if (lane < args.num_topk) {
      const int64_t at = static_cast<int64_t>(row) * args.num_topk + lane;
      if (args.recv_topk_idx) args.recv_topk_idx[at] = -1;
      if (args.recv_topk_weights) args.recv_topk_weights[at] = 0.0f;
    }
    if (lane == 0 && args.recv_src_idx) args.recv_src_idx[row] = -1;
    if (lane == 0 && args.recv_src_rank) args.recv_src_rank[row] = -1;
  }
}

// Per-token positions of this block's channel: send_count_before[t, d] and send_row[t, d], for
// d = `me` alone or for every other d (`own`): each block writes, and later reads, only the
// columns of the ranks it copies rows to. Counts tokens before the channel, then scans the
// channel a block-width at a time.
__device__ void compute_positions(const DispatchArgs& args, int num_ranks, TokenRange range,
                                  const int (&send_offset)[kMaxRanks], int me, bool own) {
  __shared__ BlockPrefix<kMaxRanks> prefix;
  const int lane = threadIdx.x % 32;
  if (threadIdx.x < kMaxRanks) prefix.running[threadIdx.x] = 0;
  __syncthreads();
  // The flags of the tokens before the channel, 16 bytes per thread and load: late channels would
  // otherwise chain several loads, each queued behind the other blocks' bulk traffic.
  int before[kMaxRanks] = {};
  const unsigned char* flags = reinterpret_cast<const unsigned char*>(args.is_token_in_rank);
  const int flag_bytes = range.first * num_ranks;
  for (int i = threadIdx.x * 16; i < flag_bytes; i += blockDim.x * 16) {
    union {
      uint4 v;
      unsigned char b[16];
    } chunk;
    if (i + 16 <= flag_bytes) {
      chunk.v = __ldg(reinterpret_cast<const uint4*>(flags + i));
    } else {
#pragma unroll
      for (int j = 0; j < 16; ++j) chunk.b[j] = i + j < flag_bytes ? flags[i + j] : 0;
    }
    int d = i % num_ranks;  // destination of byte j: (i + j) % R
#pragma unroll
    for (int j = 0; j < 16; ++j) {
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) before[r] += (r == d && chunk.b[j]) ? 1 : 0;
      d = d + 1 == num_ranks ? 0 : d + 1;
    }
  }
#pragma unroll
  for (int d = 0; d < kMaxRanks; ++d) {
    const int sum = __reduce_add_sync(0xffffffff, before[d]);
    if (lane == 0 && d < num_ranks && sum) atomicAdd(&prefix.running[d], sum);
  }
  __syncthreads();
  for (int first = range.first; first < range.last; first += blockDim.x) {
    const int t = first + threadIdx.x;
    const bool valid = t < range.last;
    bool sent[kMaxRanks];
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d)
      sent[d] = valid && d < num_ranks && args.is_token_in_rank[static_cast<int64_t>(t) * num_ranks + d];
    int count[kMaxRanks];
    block_prefix(prefix, sent, count);
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      if (d >= num_ranks || !valid || (d == me) != own) continue;
      const int64_t at = static_cast<int64_t>(t) * num_ranks + d;
      args.positions.send_count_before[at] = count[d];
      args.positions.send_row[at] = sent[d] ? send_offset[d] + count[d] : -1;
    }
  }
}

template <typename Args>
__device__ void send_to_self(const RankInfo& info, const Args& args, BulkPipe& pipe, const PeerGroup& g,
                             TokenRange range, int experts_per_rank, const int* bases) {
  const int me = info.rank, lane = threadIdx.x % 32;
  for_each_ahead(
      range.first + g.warp_in_group, range.last, g.warps,
      [&](int t) { return input_token(args, info.num_ranks, t, me, lane); },
      [&](const TokenOf<Args>& k) {
        if (k.row < 0 || k.row >= args.capacity) return;  // not sent here, or dropped (past capacity)
        if constexpr (kIsGrouped<Args>) {
          deliver_pairs<Source::kInput>(args, pipe, bases, me, experts_per_rank, k, me, lane);
        } else {
          deliver<Source::kInput>(args, pipe, me, experts_per_rank, k, me, lane);
        }
      });
}

template <typename Args>
__device__ void send_to_peer(const RankInfo& info, const WaitContext& wait, const Args& args, BulkPipe& pipe,
                             const DispatchSlot& slot, const PeerGroup& g, int channel, TokenRange range,
                             uint32_t epoch) {
  const int me = info.rank, dst = g.peer, num_ranks = info.num_ranks, lane = threadIdx.x % 32;
  const int slots = args.ring.slots;
  CommHeader* mine = header_of(info.buffers[me]);
  CommHeader* theirs = header_of(info.buffers[dst]);
  // Tokens before t (in [range.first, range.last]) sent to dst; reads only this channel's
  // tokens, whose positions this block computed.
  const int first = range.first < range.last ? args.send_count_before[static_cast<int64_t>(range.first) * num_ranks + dst] : 0;
  auto before = [&](int t) {
    if (t == range.first) return first;
    const int64_t prev = static_cast<int64_t>(t - 1) * num_ranks + dst;
    return args.send_count_before[prev] + (args.is_token_in_rank[prev] ? 1 : 0);
  };
  const int count = before(range.last) - first;
  const uint64_t base = mine->sent_total[channel][dst];
  if (g.leader) store_release(&theirs->channel_count[channel][me], (static_cast<uint64_t>(epoch) << 32) | count);

  for (int chunk = range.first; chunk < range.last; chunk += args.ring.chunk_tokens) {
    const int chunk_end = min(chunk + args.ring.chunk_tokens, range.last);
    const int sent_after = before(chunk_end) - first;
    if (sent_after == before(chunk) - first) continue;
    wait_ring_space(wait, g, mine, channel, base + sent_after, slots);
    for_each_ahead(
        chunk + g.warp_in_group, chunk_end, g.warps, [&](int t) { return input_token(args, num_ranks, t, dst, lane); },
        [&](const TokenOf<Args>& k) {
          if (!k.sent) return;
          char* p = ring_slot(info.buffers[dst], channel, me, num_ranks, slots, slot.bytes, base + k.position - first);
          if (lane == 0) *reinterpret_cast<int2*>(p) = make_int2(k.index, k.row);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            if (i >= args.num_parts) break;
            copy_row<Source::kInput>(pipe, p + slot.part_offset[i], k.part[i], args.parts[i].row_bytes, lane);
          }
          if (lane < args.num_topk) {
            if (args.topk_idx) reinterpret_cast<int32_t*>(p + slot.topk_idx_offset)[lane] = k.expert;
            if (args.topk_weights) reinterpret_cast<float*>(p + slot.topk_weights_offset)[lane] = k.weight;
            if constexpr (kIsGrouped<Args>) {
              if (args.topk_prefix) reinterpret_cast<int32_t*>(p + args.topk_prefix_offset)[lane] = k.prefix;
            }
          }
        });
    publish_tail(pipe, g, theirs, channel, me, base + sent_after);
  }
  if (g.leader) mine->sent_total[channel][dst] = base + count;
}

template <typename Args>
__device__ void receive_from_peer(const RankInfo& info, const WaitContext& wait, const Args& args,
                                  BulkPipe& pipe, const DispatchSlot& slot, const PeerGroup& g, int channel,
                                  uint32_t epoch, int experts_per_rank, const int* bases) {
  __shared__ int64_t shared_count[kMaxRanks];
  const int me = info.rank, src = g.peer, lane = threadIdx.x % 32;
  const int slots = args.ring.slots;
  CommHeader* mine = header_of(info.buffers[me]);
  CommHeader* theirs = header_of(info.buffers[src]);
  const uint64_t base = mine->consumed_total[channel][src];
  if (g.leader) {
    const uint64_t announced =
        wait_until(&mine->channel_count[channel][src],
                   [epoch](uint64_t v) { return static_cast<uint32_t>(v >> 32) == epoch; }, wait,
                   WaitKind::kChannelCount, src, channel);
    shared_count[src] = static_cast<int64_t>(announced & 0xffffffffu);
  }
  named_barrier(g.barrier_id, g.threads());
  const int64_t count = shared_count[src];
  int64_t done = 0;
  while (done < count) {
    named_barrier(g.barrier_id, g.threads());  // everyone read shared_count[src] of the last round
    if (g.leader) {
      const uint64_t tail = wait_until(&mine->tail[channel][src], [&](uint64_t v) { return v > base + done; },
                                       wait, WaitKind::kRingData, src, channel);
      shared_count[src] = min(static_cast<int64_t>(tail - base) - done, count - done);
    }
    named_barrier(g.barrier_id, g.threads());
    const int64_t ready = shared_count[src];
    // The slots were acquired through generic loads; the bulk engine reads them next.
    if (lane == 0) asm volatile("fence.proxy.async.global;" ::: "memory");
    for_each_ahead(
        g.warp_in_group, static_cast<int>(ready), g.warps,
        [&](int i) {
          const char* p = ring_slot(info.buffers[me], channel, src, info.num_ranks, slots, slot.bytes, base + done + i);
          return ring_token(args, slot, p, lane);
        },
        [&](const TokenOf<Args>& k) {
          if (k.row < 0 || k.row >= args.capacity) return;  // dropped (past capacity)
          if constexpr (kIsGrouped<Args>) {
            deliver_pairs<Source::kPeer>(args, pipe, bases, me, experts_per_rank, k, src, lane);
          } else {
            deliver<Source::kPeer>(args, pipe, me, experts_per_rank, k, src, lane);
          }
        });
    done += ready;
    if (lane == 0) pipe.flush();  // the slots are read: the sender may refill them
    // Every load of the slots has returned before the barrier, which orders them before the
    // leader's release: the sender cannot overwrite a slot that is still being read.
    __syncwarp();
    named_barrier(g.barrier_id, g.threads());
    if (g.leader) store_release(&theirs->head[channel][me], base + done);
  }
  if (g.leader) mine->consumed_total[channel][src] = base + count;
}

// The op a dispatch kernel runs: plain or grouped, first or cached.
template <typename Args>
__device__ __forceinline__ OpKind dispatch_op(bool first) {
  if constexpr (kIsGrouped<Args>) return first ? OpKind::kGroupedDispatch : OpKind::kGroupedCachedDispatch;
  return first ? OpKind::kDispatch : OpKind::kCachedDispatch;
}

template <typename Args>
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(RankInfo info, Args args) {
  __shared__ RankCounts counts;
  const int num_ranks = info.num_ranks, me = info.rank;
  const bool solo = num_ranks == 1;
  const int channel = solo ? blockIdx.x : blockIdx.x / 2;
  const bool sender = solo || blockIdx.x % 2 == 0;
  const bool first = args.positions.send_row != nullptr;  // not cached: exchange counts, compute positions
  const int experts_per_rank = args.num_experts / num_ranks;
  const WaitContext wait = wait_context(info, dispatch_op<Args>(first));
  const uint32_t epoch = op_epoch(info);
  const OpSignature signature(wait.op, {static_cast<uint32_t>(args.slot.bytes), static_cast<uint32_t>(args.num_parts),
                                        static_cast<uint32_t>(args.num_topk), static_cast<uint32_t>(args.num_experts),
                                        static_cast<uint32_t>(args.ring.num_channels),
                                        static_cast<uint32_t>(args.ring.slots),
                                        static_cast<uint32_t>(args.ring.chunk_tokens)});
  if (blockIdx.x == 0) {
    if (first) post_counts(info, args.notify, epoch);
    announce_op(info, epoch, signature);
  }
  wait_for_peers(info, wait, epoch, signature);
  if (first) read_counts(info, args.notify, epoch, counts);
  const TokenRange range = channel_tokens(args.num_tokens, channel, args.ring.num_channels);
  fill_padding(args, first ? counts.num_recv : *args.num_recv_tokens);
  const int* bases = nullptr;
  if constexpr (kIsGrouped<Args>) {
    if (first) {
      int* table = grouped_bases();
      const int total = build_grouped_bases(info, args, epoch, table);
      fill_grouped_padding(info, args, epoch, table, total, counts.num_recv);
      bases = table;
    } else {
      fill_cached_grouped_padding(args);
    }
  }
  // The receiver block copies this rank's own rows (a sender block serves the peers only).
  const bool own = solo || !sender;
  if (first) {
    compute_positions(args, num_ranks, range, counts.send_offset, me, own);
    __syncthreads();
  }

  extern __shared__ __align__(128) char bulk_shared[];
  BulkPipe pipe;
  pipe.init(bulk_shared, threadIdx.x / 32);
  // Spare warps (peer >= num_ranks) when the groups do not divide the warp count.
  if (!own) {
    const PeerGroup g = peer_group_without(num_ranks, me);
    if (g.peer < num_ranks) send_to_peer(info, wait, args, pipe, args.slot, g, channel, range, epoch);
  } else {
    const PeerGroup g = peer_group(num_ranks);
    if (g.peer == me) {
      send_to_self(info, args, pipe, g, range, experts_per_rank, bases);
    } else if (g.peer < num_ranks) {
      receive_from_peer(info, wait, args, pipe, args.slot, g, channel, epoch, experts_per_rank, bases);
    }
  }
  if (threadIdx.x % 32 == 0) pipe.drain();  // shared memory must outlive the last bulk store
  finish_op(info, epoch);
}

}  // namespace

cudaError_t prepare_dispatch() {
  const cudaError_t err = allow_intranode_shared_memory(dispatch_kernel<DispatchArgs>);
  return err == cudaSuccess ? allow_intranode_shared_memory(dispatch_kernel<GroupedDispatchArgs>) : err;
}

cudaError_t launch_dispatch(const RankInfo& info, const DispatchArgs& args, cudaStream_t stream) {
  return launch_intranode(dispatch_kernel<DispatchArgs>, info, args, stream);
}

cudaError_t launch_grouped_dispatch(const RankInfo& info, const GroupedDispatchArgs& args, cudaStream_t stream) {
  return launch_intranode(dispatch_kernel<GroupedDispatchArgs>, info, args, stream);
}

}  // namespace jax_deepep
