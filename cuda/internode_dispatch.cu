// Internode dispatch and cached dispatch: one persistent kernel (protocol: internode.cuh; rings:
// internode_rings.cuh). Blocks 2c and 2c + 1 serve channel c, the tokens [T c / C, T (c + 1) / C) of
// every rank, so each ring carries rows in token order:
//  - block 2c: channel 0 first notifies every rank of this rank's counts, and a first grouped dispatch
//    lays out the groups (build_bases). Then sender warps, a group per destination node m, stage the
//    channel's tokens bound for any rank of m into the ring of this rank's RDMA peer there (stores
//    through the mapping where NVSHMEM maps that peer, else staged and put), and receiver warps, a group per rank
//    l of this node, drain the ring from l (the forwarder of l's RDMA peers) into XLA's outputs. Sender
//    warps then write the handle's metadata, which waits only for the counts.
//  - block 2c + 1: forwarder warps, a group per rank d of this node, copy the rows bound for d from the
//    rings of every node (a chunk of each in turn: forward_chunk) into the ring to d, each with its final
//    row on d (a plain dispatch's rows for this rank itself go straight into the outputs); a coordinator
//    warp releases the slots of each node's ring once every forwarder has read them.
// A token's final row on rank d is the first row of its source there (the counts of the sources before
// it) plus its position among its source's tokens for d: the sender announces, per ring, where the
// channel's tokens start among them, and the forwarder counts on. Rows at or past the capacity N are
// dropped (their forwarded row is -1). Senders wait on forwarders (ring space), forwarders on senders
// (rows) and receivers (ring space), receivers on forwarders (rows); senders and forwarders wait on each
// other across ranks, and forward_chunk says why no cycle forms.
#include <cuda_bf16.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>

#include "cuda/grouped_rows.cuh"
#include "cuda/internode_rings.cuh"
#include "cuda/launch.h"
#include "cuda/memory_order.cuh"
#include "cuda/nvshmem_peers.cuh"
#include "cuda/toolbox.cuh"
#include "cuda/wait.cuh"
#include "cuda/warp_copy.cuh"

namespace jax_deepep {
namespace {

constexpr int kSenderWarps = kWarps / 2;     // block 2c: warps [0, 8) send, [8, 16) receive
constexpr int kForwarderWarps = kWarps - 1;  // block 2c + 1: the last warp coordinates
// A group's shared words: the head or tail its leader saw, then (send_to_node) the ring's end counts.
constexpr int kGroupWords = 4 + 2 * kInternodeMaxRanksPerNode;

__host__ __device__ OpKind op_kind(const InternodeDispatchShape& s) {
  return s.grouped ? OpKind::kInternodeGroupedDispatch : OpKind::kInternodeDispatch;
}

// What two ranks' calls must agree on (the signature their signals carry): the op, and every size that
// places a row or a slot in a peer's buffer or says what a row holds. (Only this rank reads the grouped
// capacity and the alignment.)
OpSignature signature_of(const InternodeDispatchCall& c) {
  const InternodeDispatchShape& s = c.shape;
  const InternodeRings& r = c.rings;
  const auto word = [](auto value) { return static_cast<uint32_t>(value); };
  return OpSignature(op_kind(s), {word(s.num_tokens), word(s.capacity), word(s.top_k), word(s.has_ids),
                                  word(s.has_weights), word(s.num_parts), word(s.part_bytes[0]),
                                  word(s.num_parts == 2 ? s.part_bytes[1] : 0), word(s.num_experts),
                                  word(s.ranks_per_node), word(c.layout.row_bytes), word(r.channels),
                                  word(r.rdma_slots), word(r.rdma_batch), word(r.nvl_slots), word(r.nvl_batch)});
}

// This call's counts [R src][R dst] and per-expert counts [R src][E / R] in this rank's buffer: two of
// each, by call parity, since a rank may start the next call while a slower one still reads this one's.
__device__ __forceinline__ uint64_t* counts_of(const InternodeDispatchCall& c, uint32_t seq) {
  return reinterpret_cast<uint64_t*>(c.mem.local + c.signals.counts) +
         static_cast<size_t>(seq & 1u) * c.mem.num_ranks * c.mem.num_ranks;
}

__device__ __forceinline__ uint64_t* expert_counts_of(const InternodeDispatchCall& c, uint32_t seq) {
  return reinterpret_cast<uint64_t*>(c.mem.local + c.signals.expert_counts) +
         static_cast<size_t>(seq & 1u) * kInternodeMaxExperts;
}

// Bit d: token t goes to rank d of node m.
__device__ __forceinline__ int token_mask(const bool* is_token_in_rank, int t, int num_ranks, int m, int per_node) {
  int mask = 0;
  const bool* flags = is_token_in_rank + static_cast<size_t>(t) * num_ranks + m * per_node;
  for (int d = 0; d < per_node; ++d) mask |= flags[d] << d;
  return mask;
}

// Whole warp: the sum over src < `sources` of counts[src * stride] (this call's notified counts).
__device__ __forceinline__ int sum_counts(const uint64_t* counts, int sources, int stride, const RingCall& call,
                                          int lane) {
  int sum = 0;
  for (int src = lane; src < sources; src += kWarpSize)
    sum += wait_call_signal(counts + static_cast<size_t>(src) * stride, call.seq, call.wait.signature, call.wait,
                            WaitKind::kTokenCounts, src);
  return __reduce_add_sync(0xffffffffu, sum);
}

// ---- block 2c: notify, send, receive, metadata --------------------------------------------------
// Whole block, channel 0: this rank's counts per rank and per expert, to every rank (one signal each,
// so that a reader never sees half of one).
__device__ void notify(const InternodeDispatchCall& c, const InternodeDispatchIn& in, const RingCall& call) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, R = c.mem.num_ranks;
  const int experts_per_rank = c.shape.has_ids ? c.shape.num_experts / R : 0;
  uint64_t* const counts = counts_of(c, call.seq) + static_cast<size_t>(c.mem.rank) * R;
  uint64_t* const experts = expert_counts_of(c, call.seq) + static_cast<size_t>(c.mem.rank) * experts_per_rank;
  for (int d = warp; d < R; d += kWarps) {
    for (int i = lane; i < R + experts_per_rank; i += kWarpSize) {
      const int count = i < R ? in.tokens_per_rank[i] : in.tokens_per_expert[d * experts_per_rank + i - R];
      store_symmetric(c.mem, i < R ? counts + i : experts + (i - R), call.signal(count), d);
    }
  }
  __syncwarp();
  if (lane == 0) nvshmem_quiet();
}

// Whole warp: token t as a dispatched row at `row` (its forwarded row is filled in by the forwarder).
__device__ void write_row(const InternodeDispatchCall& c, const InternodeDispatchIn& in, char* row, int t, int mask,
                          int lane) {
  const InternodeDispatchShape& s = c.shape;
  const InternodeDispatchLayout& l = c.layout;
  if (lane == 0) *reinterpret_cast<int4*>(row) = make_int4(c.mem.rank, t, mask, -1);
  if (s.has_ids && lane < s.top_k) reinterpret_cast<int*>(row + l.ids_at)[lane] = in.ids[t * s.top_k + lane];
  if (s.has_weights && lane < s.top_k)
    reinterpret_cast<float*>(row + l.weights_at)[lane] = in.weights[t * s.top_k + lane];
  if (in.prefix != nullptr && lane < s.top_k)
    reinterpret_cast<int*>(row + l.prefix_at)[lane] = in.prefix[t * s.top_k + lane];
  for (int p = 0; p < s.num_parts; ++p)
    warp_copy<Source::kInput>(row + l.part_at[p],
                              static_cast<const char*>(in.part[p]) + static_cast<size_t>(t) * s.part_bytes[p],
                              s.part_bytes[p], lane);
}

// Tokens a sender takes at a time: at most a batch, so a window's rows always fit the ring.
__device__ __forceinline__ int send_window(const InternodeRings& r) {
  return min(kWarpSize, static_cast<int>(r.rdma_batch));
}

// Whole group: the channel's tokens bound for any rank of node m, in token order, into the ring of this
// rank's RDMA peer there; then the handle's send_row of m's ranks for those tokens. `words`: the group's
// shared words.
__device__ void send_to_node(const InternodeDispatchCall& c, const InternodeDispatchIn& in,
                             const InternodeDispatchOut& out, const RingCall& call, const OpRings& o,
                             const WarpGroup& g, int m, int channel, TokenRange range, int* words) {
  const Topology& topo = o.topo;
  const InternodeRings& r = c.rings;
  const int lane = threadIdx.x % kWarpSize, L = topo.per_node, R = topo.num_ranks;
  // The ring's end counts: its rows, then per rank d of m the rows bound for d, then the tokens before
  // the channel bound for d (where the channel's tokens start among this rank's tokens for d).
  int* const ends = words + 1;
  g.sync();  // the group is done with the words of its last node
  if (g.leader())
    for (int j = 0; j < 1 + 2 * L; ++j) ends[j] = 0;
  g.sync();
  {
    int rows = 0, bound[kInternodeMaxRanksPerNode] = {}, before[kInternodeMaxRanksPerNode] = {};
    for (int t = g.warp * kWarpSize + lane; t < range.last; t += g.warps * kWarpSize) {
      const int mask = token_mask(in.is_token_in_rank, t, R, m, L);
      rows += t >= range.first && mask != 0;
#pragma unroll
      for (int d = 0; d < kInternodeMaxRanksPerNode; ++d) {
        if (t < range.first) {
          before[d] += (mask >> d) & 1;
        } else {
          bound[d] += (mask >> d) & 1;
        }
      }
    }
    rows = __reduce_add_sync(0xffffffffu, rows);
    if (lane == 0) atomicAdd(ends, rows);
#pragma unroll
    for (int d = 0; d < kInternodeMaxRanksPerNode; ++d) {
      const int b = __reduce_add_sync(0xffffffffu, bound[d]), f = __reduce_add_sync(0xffffffffu, before[d]);
      if (lane == 0 && d < L) {
        atomicAdd(ends + 1 + d, b);
        atomicAdd(ends + 1 + L + d, f);
      }
    }
  }
  g.sync();

  RingProducer p = o.to_node(m, channel, words);
  p.start(g, call);
  if (g.leader_warp() && lane < 1 + 2 * L)
    set_signal(signal_address(c.mem, o.link(topo.node, channel).end + lane, p.pe, p.puts), call.signal(ends[lane]),
               p.pe, p.puts);

  const int window = send_window(r);
  for (int t0 = range.first; t0 < range.last; t0 += window) {
    const int t = t0 + lane;
    const int mask = lane < window && t < range.last ? token_mask(in.is_token_in_rank, t, R, m, L) : 0;
    const unsigned bound = __ballot_sync(0xffffffffu, mask != 0);
    const int n = __popc(bound);
    if (n == 0) continue;
    p.reserve(g, call, n);
    for (int k = g.warp; k < n; k += g.warps) {
      const int at = nth_set_lane(bound, k, lane);
      write_row(c, in, p.slot(k), t0 + at, __shfl_sync(0xffffffffu, mask, at), lane);
    }
    p.advance(g, call, n, static_cast<int>(r.rdma_batch));
  }
  p.finish(g, call);
  if (!p.same_node && g.leader()) {
    atomicAdd(c.traffic.counters + 0, static_cast<unsigned long long>(p.rows));
    atomicAdd(c.traffic.counters + 1, static_cast<unsigned long long>(p.rows) * c.layout.row_bytes);
  }

  // send_row [T, R] of m's ranks: this rank's first row on each (the counts of the ranks before it),
  // then its tokens in order.
  const uint64_t* counts = counts_of(c, call.seq);
  for (int d = g.warp; d < L; d += g.warps) {
    const int col = m * L + d;
    int row = sum_counts(counts + col, topo.rank, R, call, lane) + ends[1 + L + d];
    for (int t0 = range.first; t0 < range.last; t0 += kWarpSize) {
      const int t = t0 + lane;
      const bool sent = t < range.last && in.is_token_in_rank[static_cast<size_t>(t) * R + col];
      const unsigned b = __ballot_sync(0xffffffffu, sent);
      if (t < range.last)
        out.send_row[static_cast<size_t>(t) * R + col] = sent ? row + __popc(b & ((1u << lane) - 1)) : -1;
      row += __popc(b);
    }
  }
}

// A forwarded row as a receiver warp loads it (cache-volatile: ring slots are rewritten within a call):
// lane k < K holds the row's k-th id, weight and prefix.
struct ForwardedRow {
  const char* at;
  int src_rank, src_idx, row;  // row: the token-level output row, -1 when dropped
  int expert, prefix;
  float weight;
};

__device__ ForwardedRow load_row(const InternodeDispatchShape& s, const InternodeDispatchLayout& l, const char* at,
                                 int lane) {
  const int4 header = __ldcv(reinterpret_cast<const int4*>(at));
  const bool pick = lane < s.top_k;
  ForwardedRow f{at, header.x, header.y, header.w, -1, 0, 0.0f};
  if (s.has_ids && pick) f.expert = __ldcv(reinterpret_cast<const int*>(at + l.ids_at) + lane);
  if (s.has_weights && pick) f.weight = __ldcv(reinterpret_cast<const float*>(at + l.weights_at) + lane);
  if (s.grouped && s.has_ids && pick) f.prefix = __ldcv(reinterpret_cast<const int*>(at + l.prefix_at) + lane);
  return f;
}

// Whole warp, a plain dispatch: token-level row `f.row` (ids made local, -1 for other ranks' experts,
// whose weights are zeroed).
__device__ void deliver(const InternodeDispatchShape& s, const InternodeDispatchLayout& l,
                        const InternodeDispatchOut& out, int num_ranks, int rank, const ForwardedRow& f, int lane) {
  const int experts_per_rank = s.has_ids ? s.num_experts / num_ranks : 0;
  const size_t at = static_cast<size_t>(f.row) * s.top_k + lane;
  int local = -1;
  if (s.has_ids && lane < s.top_k) {
    const int e = f.expert;
    local = e >= 0 && e < s.num_experts && e / experts_per_rank == rank ? e % experts_per_rank : -1;
    out.ids[at] = local;
  }
  if (s.has_weights && lane < s.top_k) out.weights[at] = s.has_ids && local < 0 ? 0.0f : f.weight;
  for (int p = 0; p < s.num_parts; ++p)
    warp_copy<Source::kPeer>(static_cast<char*>(out.part[p]) + static_cast<size_t>(f.row) * s.part_bytes[p],
                             f.at + l.part_at[p], s.part_bytes[p], lane);
}

// ---- expert-grouped rows ----------------------------------------------------------------------
// Whole block, a first grouped dispatch: fills `bases` [(R + 1) * E_l] from the pairs per local expert
// each source notified: bases[src * E_l + e] is the first grouped row of source src's pairs of expert e
// (the padded groups of the experts before e, then the pairs of the sources before src),
// bases[R * E_l + e] the end of e's pairs. Block 0 also writes the held group sizes and the rows needed.
// Returns the rows needed.
__device__ int build_bases(const RingCall& call, int num_ranks, const uint64_t* pair_counts, int experts_per_rank,
                           int alignment, int capacity, const InternodeGroupedOut& out, int* bases) {
  const int experts = experts_per_rank;
  for (int i = threadIdx.x; i < num_ranks * experts; i += kThreads)
    bases[i] = wait_call_signal(pair_counts + i, call.seq, call.wait.signature, call.wait, WaitKind::kTokenCounts,
                                i / experts);
  __syncthreads();
  const int run = (experts + kThreads - 1) / kThreads;  // each thread owns a run of experts
  const int lo = min(static_cast<int>(threadIdx.x) * run, experts), hi = min(lo + run, experts);
  auto padded = [alignment](int rows) { return (rows + alignment - 1) / alignment * alignment; };
  int rows = 0;
  for (int e = lo; e < hi; ++e) {
    int group = 0;
    for (int src = 0; src < num_ranks; ++src) group += bases[src * experts + e];
    rows += padded(group);
  }
  int total = 0;
  int start = block_exclusive_sum(rows, &total);
  for (int e = lo; e < hi; ++e) {
    int at = start;
    for (int src = 0; src <= num_ranks; ++src) {
      const int pairs = src < num_ranks ? bases[src * experts + e] : 0;
      bases[src * experts + e] = at;
      at += pairs;
    }
    const int group = padded(at - start);
    if (blockIdx.x == 0) out.held[e] = max(min(capacity - start, group), 0);
    start += group;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *out.num_rows = total;
  __syncthreads();
  return total;
}

// Whole warp: token-level row `i` to its grouped rows (`live`: a received row `f`; else padding). A first
// dispatch finds them from `bases` and the row's prefixes and writes them as the row's pair rows
// (-1 for none); a cached one reads them there.
__device__ void deliver_pairs(const InternodeDispatchShape& s, const InternodeDispatchLayout& l,
                              const InternodeDispatchOut& out, const int* bases, int num_ranks, int rank, int i,
                              const ForwardedRow& f, bool live, int lane) {
  const bool first = s.has_ids;
  const int experts_per_rank = first ? s.num_experts / num_ranks : 0;
  const size_t at = static_cast<size_t>(i) * s.top_k + lane;
  int local = -1, pair = -1;
  if (lane < s.top_k) {
    if (first) {
      const int e = live ? f.expert : -1;
      if (e >= 0 && e < s.num_experts && e / experts_per_rank == rank) {
        local = e % experts_per_rank;
        pair = bases[f.src_rank * experts_per_rank + local] + f.prefix;
        if (pair >= s.grouped_capacity) pair = -1;  // dropped (past capacity)
      }
      out.grouped.pair_row[at] = pair;
    } else if (live) {
      pair = out.grouped.pair_row[at];
    }
  }
  const float weight = s.has_weights && live && lane < s.top_k ? f.weight : 0.0f;
  const PairLanes pairs = pair_lanes(pair, weight, s.top_k, lane);
  if (!live) return;
  for (unsigned rest = pairs.owners; rest; rest &= rest - 1) {
    const int r = __shfl_sync(0xffffffffu, pair, __ffs(rest) - 1);
    for (int p = 0; p < s.num_parts; ++p)
      warp_copy<Source::kPeer>(static_cast<char*>(out.part[p]) + static_cast<size_t>(r) * s.part_bytes[p],
                               f.at + l.part_at[p], s.part_bytes[p], lane);
  }
  if (!pairs.owner) return;
  if (out.grouped.weight != nullptr) out.grouped.weight[pair] = pairs.weight;
  if (first) {
    out.grouped.expert[pair] = local;
    out.grouped.token_row[pair] = i;
  }
}

// Whole warp: grouped row `row` holds no pair (zero parts, weight 0; a first dispatch also writes
// expert -1 and token row -1).
__device__ void clear_grouped_row(const InternodeDispatchShape& s, const InternodeDispatchOut& out, int row,
                                  bool first, int lane) {
  for (int p = 0; p < s.num_parts; ++p)
    zero_row(static_cast<char*>(out.part[p]) + static_cast<size_t>(row) * s.part_bytes[p], s.part_bytes[p], lane);
  if (lane != 0) return;
  if (out.grouped.weight != nullptr) out.grouped.weight[row] = 0.0f;
  if (first) {
    out.grouped.expert[row] = -1;
    out.grouped.token_row[row] = -1;
  }
}

// Warp `warp` of `warps`: its share of the grouped rows no pair fills. A first dispatch: each group's
// padding and the rows past every group (`bases` and `total` from build_bases); a cached one: the
// handle's padding rows.
__device__ void fill_grouped_padding(const InternodeDispatchShape& s, const InternodeDispatchOut& out,
                                     const int* bases, int num_ranks, int total, int warp, int warps) {
  const int lane = threadIdx.x % kWarpSize, N = s.grouped_capacity;
  const bool first = s.has_ids;
  if (!first) {
    for (int row = warp; row < N; row += warps) {
      if (out.grouped.token_row[row] < 0) clear_grouped_row(s, out, row, false, lane);
    }
    return;
  }
  const int experts_per_rank = s.num_experts / num_ranks;
  const int* pairs_end = bases + num_ranks * experts_per_rank;
  for (int e = warp; e < experts_per_rank; e += warps) {
    const int end = min(e + 1 < experts_per_rank ? bases[e + 1] : total, N);
    for (int row = pairs_end[e]; row < end; ++row) clear_grouped_row(s, out, row, true, lane);
  }
  for (int row = total + warp; row < N; row += warps) clear_grouped_row(s, out, row, true, lane);
}

// ---- receive and metadata ------------------------------------------------------------------------
// Whole group: drains the ring from forwarder l (this node) into the outputs.
template <bool kGrouped>
__device__ void receive_from(const InternodeDispatchCall& c, const InternodeDispatchOut& out, const RingCall& call,
                             const OpRings& o, const WarpGroup& g, int l, int channel, const int* bases, int* words) {
  const Topology& topo = o.topo;
  const int lane = threadIdx.x % kWarpSize;
  RingConsumer q = o.consumer_of_local(l, channel, words);
  g.sync();  // the group is done with its words
  q.start(g, call);
  if (g.leader())
    words[1] = wait_ring_end(o.link(o.local_link(l), channel).end, call, true, q.pe, channel);
  g.sync();
  const int rows = words[1];
  for (int done = 0; done < rows;) {
    const int ready = min(q.wait_rows(g, call, done), rows);
    for (int i = done + g.warp; i < ready; i += g.warps) {
      const ForwardedRow f = load_row(c.shape, c.layout, q.read.slot(i), lane);
      if (f.row < 0) continue;  // dropped (past capacity)
      if (lane == 0) {
        out.src_rank[f.row] = f.src_rank;
        out.src_idx[f.row] = f.src_idx;
      }
      if constexpr (kGrouped) {
        deliver_pairs(c.shape, c.layout, out, bases, topo.num_ranks, topo.rank, f.row, f, true, lane);
      } else {
        deliver(c.shape, c.layout, out, topo.num_ranks, topo.rank, f, lane);
      }
    }
    g.sync();  // every warp's loads of the slots returned (their stores used them)
    if (g.leader()) q.release(call, ready);
    done = ready;
  }
}

// Sender warp `warp` of `warps` (every channel's), once its sends are done: its share of the handle's
// metadata, which needs only the counts: token-level rows past the received ones (and a grouped
// dispatch's padding rows), and on the first warp recv_rank_prefix, num_recv and the per-expert counts.
template <bool kGrouped>
__device__ void write_metadata(const InternodeDispatchCall& c, const InternodeDispatchOut& out, const RingCall& call,
                               const Topology& topo, const int* bases, int grouped_rows, int warp, int warps) {
  const InternodeDispatchShape& s = c.shape;
  const int lane = threadIdx.x % kWarpSize, R = topo.num_ranks;
  const uint64_t* counts = counts_of(c, call.seq) + topo.rank;
  const int total = sum_counts(counts, R, R, call, lane);
  for (int i = min(total, s.capacity) + warp; i < s.capacity; i += warps) {
    if (lane == 0) {
      out.src_rank[i] = -1;
      out.src_idx[i] = -1;
    }
    if constexpr (kGrouped) {
      deliver_pairs(s, c.layout, out, bases, R, topo.rank, i, ForwardedRow{}, false, lane);
    } else {
      const size_t at = static_cast<size_t>(i) * s.top_k + lane;
      if (s.has_ids && lane < s.top_k) out.ids[at] = -1;
      if (s.has_weights && lane < s.top_k) out.weights[at] = 0.0f;
    }
  }
  if constexpr (kGrouped) fill_grouped_padding(s, out, bases, R, grouped_rows, warp, warps);
  if (warp != 0) return;
  for (int first = 0, before = 0; first < R; first += kWarpSize) {
    const int src = first + lane;
    const int n = src < R ? wait_call_signal(counts + static_cast<size_t>(src) * R, call.seq, call.wait.signature,
                                             call.wait, WaitKind::kTokenCounts, src)
                          : 0;
    int inclusive = n;
#pragma unroll
    for (int d = 1; d < kWarpSize; d *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += v;
    }
    if (src < R) out.recv_rank_prefix[src] = before + inclusive - n;
    before += __shfl_sync(0xffffffffu, inclusive, kWarpSize - 1);
  }
  if (lane == 0) *out.num_recv = total;
  if (out.per_expert == nullptr) return;
  const int experts_per_rank = s.num_experts / R;
  const uint64_t* experts = expert_counts_of(c, call.seq);
  for (int e = 0; e < experts_per_rank; ++e) {
    const int sum = sum_counts(experts + e, R, experts_per_rank, call, lane);
    if (lane == 0) out.per_expert[e] = (sum + c.expert_alignment - 1) / c.expert_alignment * c.expert_alignment;
  }
}

// Block 2c.
template <bool kGrouped>
__device__ void send_and_receive(const InternodeDispatchCall& c, const InternodeDispatchIn& in,
                                 const InternodeDispatchOut& out, const RingCall& call, const OpRings& o,
                                 int channel, int* bases) {
  const Topology& topo = o.topo;
  __shared__ int words[kWarps][kGroupWords];
  const int warp = threadIdx.x / kWarpSize;
  if (channel == 0) notify(c, in, call);
  int grouped_rows = 0;
  if constexpr (kGrouped) {
    if (c.shape.has_ids)
      grouped_rows = build_bases(call, topo.num_ranks, expert_counts_of(c, call.seq),
                                 c.shape.num_experts / topo.num_ranks, c.expert_alignment, c.shape.grouped_capacity,
                                 out.grouped, bases);
  }
  if (warp < kSenderWarps) {
    const WarpGroup g = warp_groups(0, kSenderWarps, topo.nodes, 1);
    const TokenRange range = channel_tokens(c.shape.num_tokens, channel, static_cast<int>(c.rings.channels));
    if (g.index < g.count) {
      for (int m = g.index; m < topo.nodes; m += g.count)
        send_to_node(c, in, out, call, o, g, m, channel, range, words[warp - g.warp]);
    }
    write_metadata<kGrouped>(c, out, call, topo, bases, grouped_rows, channel * kSenderWarps + warp,
                             static_cast<int>(c.rings.channels) * kSenderWarps);
  } else {
    const WarpGroup g = warp_groups(kSenderWarps, kWarps - kSenderWarps, topo.per_node, 1 + kSenderWarps / 2);
    if (g.index < g.count) {
      for (int l = g.index; l < topo.per_node; l += g.count)
        receive_from<kGrouped>(c, out, call, o, g, l, channel, bases, words[warp - g.warp]);
    }
  }
}

// ---- block 2c + 1: forward ----------------------------------------------------------------------
// What the forwarder block keeps in shared memory (ints, one after the other).
struct ForwardTables {
  int* counts;     // [R src][L]: tokens src sends to each rank of this node
  int* base;       // [nodes][L]: first row of source (n, this local index) on each rank of this node
  int* progress;   // [L][nodes]: rows of node n's ring that forwarder d has read (volatile)
  int* rows;       // [L][nodes]: rows in node n's ring (forwarder d's copy)
  int* position;   // [L][nodes]: position of the ring's next row for d among its source's tokens for d
  int* ready;      // [L][nodes]: rows of node n's ring that forwarder d saw its tail announce
  int* ring_rows;  // [nodes]: rows in node n's ring (the coordinator's copy)
  int* released;   // [nodes]: rows of node n's ring the coordinator released

  __device__ ForwardTables(int* at, int num_ranks, int per_node) {
    const int nodes = num_ranks / per_node;
    counts = at;
    base = counts + num_ranks * per_node;
    progress = base + num_ranks;
    rows = progress + num_ranks;
    position = rows + num_ranks;
    ready = position + num_ranks;
    ring_rows = ready + num_ranks;
    released = ring_rows + nodes;
  }
  static int ints(int num_ranks, int per_node) {
    return num_ranks * per_node + 5 * num_ranks + 2 * num_ranks / per_node;
  }
};

// Rows of a node's ring a forwarder takes at a time: fixed, so every forwarder of the node takes the
// rings' chunks in the same order, (chunk, node), skipping rings without more rows. No cycle can then
// form: take the forwarder at the earliest (chunk c, node n) step. Every forwarder has passed chunk
// c - 1 of ring n, so the coordinator released it, and the sender's window that completes chunk c
// (sender windows are send_window tokens, so at most that many rows) needs no more room than that
// exactly when chunk + send_window - 1 <= the ring's slots (a bound that is tight). The sender publishes
// before it waits, so that forwarder gets its rows. And a chunk's rows for d fit the ring to d.
__device__ __forceinline__ int forward_chunk(const InternodeRings& r) {
  return min(min(kWarpSize, static_cast<int>(r.nvl_batch)), static_cast<int>(r.rdma_slots) - send_window(r) + 1);
}

// A plain dispatch's forwarder for this rank itself delivers the rows into the outputs, one copy less
// (its ring to itself carries none); a grouped dispatch's rows need the bases the receivers' block holds.
template <bool kGrouped>
__device__ __forceinline__ bool forwarder_delivers(const Topology& topo, int d) {
  return !kGrouped && d == topo.local;
}

// Whole group: the rows bound for rank d of this node from every node's ring of this channel into the
// ring to d, each with its final row there (or into the outputs: forwarder_delivers). The group takes
// a chunk of each node's ring in turn, so the senders of every node stream at once (a forwarder
// draining node after node held all but one node's senders at a full ring). Only the group's leader
// writes its entries of the tables, between two group barriers, so every warp reads the same values.
template <bool kGrouped>
__device__ void forward_to(const InternodeDispatchCall& c, const InternodeDispatchOut& out, const RingCall& call,
                           const OpRings& o, const WarpGroup& g, int d, int channel, const ForwardTables& tables,
                           int* words) {
  const Topology& topo = o.topo;
  const InternodeRings& r = c.rings;
  const int lane = threadIdx.x % kWarpSize, L = topo.per_node, nodes = topo.nodes;
  const int T = c.shape.num_tokens, N = c.shape.capacity;
  const bool delivers = forwarder_delivers<kGrouped>(topo, d);
  RingProducer p = o.to_local(d, channel, words);
  g.sync();  // the group is done with its words
  p.start(g, call);
  int* const rows = tables.rows + d * nodes;
  int* const position = tables.position + d * nodes;
  int* const ready = tables.ready + d * nodes;
  volatile int* const progress = tables.progress + d * nodes;
  if (g.leader()) {
    int bound = 0;
    for (int n = 0; n < nodes; ++n) {
      const uint64_t* end = o.link(n, channel).end;
      const int peer = topo.rdma_peer(n);
      const bool same_node = n == topo.node;
      rows[n] = wait_ring_end(end, call, same_node, peer, channel);
      bound += wait_ring_end(end + 1 + d, call, same_node, peer, channel);
      position[n] = wait_ring_end(end + 1 + L + d, call, same_node, peer, channel);
      ready[n] = 0;
    }
    set_signal(mapped(c.mem, p.pe, o.link(o.local_link(topo.local), channel).end), call.signal(delivers ? 0 : bound),
               p.pe, false);
  }
  g.sync();
  int left = 0;  // nodes whose ring still has rows for this forwarder
  for (int n = 0; n < nodes; ++n) left += rows[n] > 0;
  const int chunk = forward_chunk(r);
  for (int n = 0; left > 0; n = n + 1 < nodes ? n + 1 : 0) {
    const int total = rows[n], i = progress[n];
    if (i >= total) continue;
    const RingSlots ring = o.from_node(n, channel);
    const int w = min(chunk, total - i);
    int seen = ready[n];
    if (i + w > seen) {
      if (p.published < p.rows) {  // the receiver gets what is written while this group waits
        g.sync();
        p.publish(g, call);
      }
      if (g.leader())
        words[1] = wait_ring_data(o.link(n, channel).tail, call, n == topo.node, i + w - 1, topo.rdma_peer(n), channel);
      g.sync();
      seen = min(words[1], total);
    }
    int mask = 0, token = 0;
    if (lane < w) {
      const int4 header = __ldcv(reinterpret_cast<const int4*>(ring.slot(i + lane)));
      token = header.y;
      mask = header.z;
    }
    const unsigned bound = __ballot_sync(0xffffffffu, lane < w && ((mask >> d) & 1));
    const int n_bound = __popc(bound);
    if (n_bound > 0) {
      const int first_row = tables.base[n * L + d] + position[n];
      if (!delivers) p.reserve(g, call, n_bound);
      for (int k = g.warp; k < n_bound; k += g.warps) {
        const int at = nth_set_lane(bound, k, lane);
        const int t = __shfl_sync(0xffffffffu, token, at);
        const int row = first_row + k;
        const bool kept = row < N;
        if (!delivers) {
          char* dst = p.slot(k);
          warp_copy<Source::kPeer>(dst, ring.slot(i + at), static_cast<int>(c.layout.row_bytes), lane);
          __syncwarp();  // the header's copy before its forwarded row
          if (lane == 0) reinterpret_cast<int*>(dst)[3] = kept ? row : -1;
        } else if (kept) {
          ForwardedRow f = load_row(c.shape, c.layout, ring.slot(i + at), lane);
          f.row = row;
          if (lane == 0) {
            out.src_rank[row] = f.src_rank;
            out.src_idx[row] = f.src_idx;
          }
          deliver(c.shape, c.layout, out, topo.num_ranks, topo.rank, f, lane);
        }
        if (lane == 0 && t >= 0 && t < T)
          atomicOr(reinterpret_cast<unsigned*>(out.forwarded) + static_cast<size_t>(n) * T + t,
                   0x80000000u | (kept ? 1u << d : 0u));
      }
      if (!delivers) p.advance(g, call, n_bound, static_cast<int>(r.nvl_batch));
    }
    g.sync();  // every warp's loads of the slots before i + w returned, and it read the tables and words
    if (g.leader()) {
      progress[n] = i + w;
      position[n] += n_bound;
      ready[n] = seen;
    }
    g.sync();
    left -= i + w >= total;
  }
  p.finish(g, call);
}

// Coordinator warp: releases the slots of each node's ring once every forwarder read them (it wrote
// head 0 of each as the block started).
__device__ void release_rdma_rings(const RingCall& call, const OpRings& o, int channel, const ForwardTables& tables) {
  const Topology& topo = o.topo;
  const int lane = threadIdx.x % kWarpSize, L = topo.per_node, nodes = topo.nodes;
  volatile const int* progress = tables.progress;
  bool puts = false;
  for (int n = lane; n < nodes; n += kWarpSize) {
    tables.ring_rows[n] = wait_ring_end(o.link(n, channel).end, call, n == topo.node, topo.rdma_peer(n), channel);
    tables.released[n] = 0;
    puts |= o.puts_to(topo.rdma_peer(n));
  }
  // The forwarders wait on peers with timeouts and trap the context when one gives up, so this loop
  // over their progress in shared memory needs none of its own.
  for (bool pending = true; __any_sync(0xffffffffu, pending);) {
    pending = false;
    for (int n = lane; n < nodes; n += kWarpSize) {
      int read = tables.ring_rows[n];
      for (int d = 0; d < L; ++d) read = min(read, progress[d * nodes + n]);
      if (read > tables.released[n]) {
        o.set_node_head(n, channel, call.signal(read));
        tables.released[n] = read;
      }
      pending |= tables.released[n] < tables.ring_rows[n];
    }
  }
  if (puts) nvshmem_quiet();  // this lane's head puts are complete before the kernel ends
}

// Block 2c + 1: head 0 of every node's ring first (the senders wait for it), then the tables, then
// forwarders and coordinator.
template <bool kGrouped>
__device__ void forward(const InternodeDispatchCall& c, const InternodeDispatchOut& out, const RingCall& call,
                        const OpRings& o, int channel, int* shared) {
  __shared__ int words[kWarps][kGroupWords];
  const Topology& topo = o.topo;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, L = topo.per_node;
  const int nodes = topo.nodes, R = topo.num_ranks, T = c.shape.num_tokens;
  if (warp == kForwarderWarps) {
    for (int n = lane; n < nodes; n += kWarpSize)
      o.set_node_head(n, channel, call.signal(0));
  }
  const ForwardTables tables(shared, R, L);
  const TokenRange range = channel_tokens(T, channel, static_cast<int>(c.rings.channels));
  const int span = range.last - range.first;
  for (int i = threadIdx.x; i < nodes * span; i += kThreads)
    out.forwarded[static_cast<size_t>(i / span) * T + range.first + i % span] = 0;
  for (int i = threadIdx.x; i < L * nodes; i += kThreads) tables.progress[i] = 0;
  const uint64_t* counts = counts_of(c, call.seq);
  for (int i = threadIdx.x; i < R * L; i += kThreads)
    tables.counts[i] = wait_call_signal(counts + static_cast<size_t>(i / L) * R + topo.node_rank(i % L), call.seq,
                                        call.wait.signature, call.wait, WaitKind::kTokenCounts, i / L);
  __syncthreads();
  for (int i = threadIdx.x; i < nodes * L; i += kThreads) {
    const int src = topo.rdma_peer(i / L), d = i % L;
    int sum = 0;
    for (int s2 = 0; s2 < src; ++s2) sum += tables.counts[s2 * L + d];
    tables.base[i] = sum;
  }
  __syncthreads();
  if (warp == kForwarderWarps) {
    release_rdma_rings(call, o, channel, tables);
    return;
  }
  const WarpGroup g = warp_groups(0, kForwarderWarps, L, 1);
  if (g.index >= g.count) return;
  for (int d = g.index; d < L; d += g.count)
    forward_to<kGrouped>(c, out, call, o, g, d, channel, tables, words[warp - g.warp]);
}

template <bool kGrouped>
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(InternodeDispatchCall c, InternodeDispatchIn in,
                                                              InternodeDispatchOut out, uint32_t signature) {
  extern __shared__ int shared[];  // block 2c: a first grouped dispatch's bases; block 2c + 1: ForwardTables
  const OpRings o{c.mem, c.signals, c.rings, c.signals.dispatch_links, Topology(c.mem, c.shape.ranks_per_node)};
  const RingCall call{wait_context(c.mem, op_kind(c.shape), signature), static_cast<uint32_t>(out.token[0])};
  const int channel = blockIdx.x / 2;
  if (blockIdx.x % 2 == 0) {
    send_and_receive<kGrouped>(c, in, out, call, o, channel, shared);
  } else {
    forward<kGrouped>(c, out, call, o, channel, shared);
  }
}

}  // namespace

cudaError_t launch_internode_dispatch(const InternodeDispatchCall& call, const InternodeDispatchIn& in,
                                      const InternodeDispatchOut& out, cudaStream_t stream) {
  const InternodeDispatchShape& s = call.shape;
  const int R = call.mem.num_ranks;
  const uint32_t signature = signature_of(call).value;
  start_call_kernel<<<1, kWarpSize, 0, stream>>>(call.mem, kInternodeDispatchCall, signature, out.token);
  // A first grouped dispatch's sender blocks hold build_bases' table, the forwarder blocks their tables.
  const int bases = s.grouped && s.has_ids ? (R + 1) * (s.num_experts / R) : 0;
  const size_t shared_bytes =
      static_cast<size_t>(std::max(bases, ForwardTables::ints(R, s.ranks_per_node))) * sizeof(int);
  const int blocks = 2 * static_cast<int>(call.rings.channels);
  if (s.grouped) {
    dispatch_kernel<true><<<blocks, kThreads, shared_bytes, stream>>>(call, in, out, signature);
  } else {
    dispatch_kernel<false><<<blocks, kThreads, shared_bytes, stream>>>(call, in, out, signature);
  }
  return cudaGetLastError();
}

}  // namespace jax_deepep
