// Internode combine: one persistent kernel, dispatch's route reversed (protocol: internode.cuh; rings:
// internode_rings.cuh). Blocks 2c and 2c + 1 serve channel c, the tokens [T c / C, T (c + 1) / C) of
// every source rank, in token windows (combine_window), and each window's source nodes in turn:
//  - block 2c: returner warps, a group per rank l of this node, send each received row of the sources
//    (n, l) (a source's rows are sorted by token, so a window's are one run) into the ring to
//    forwarder l: the bf16 row and its K f32 weights (grouped: the f32 sum of its weighted pair rows).
//    A plain combine's rows for this rank's own forwarder skip that copy: its reducer reads them from y.
//    Finisher warps take this rank's tokens in order and, for each node the token went to, the next
//    partial of that node's ring; they sum them in f32 in node order, add the biases and round once.
//  - block 2c + 1: reducer warps take, per window, each source node n and its tokens that came to this
//    node (forwarded bit 31) in order: the next row of ring d for each rank d that kept the token (ring
//    d carries exactly those rows, in (window, n, t) order), summed in f32 in local rank order and
//    rounded to bf16 unless exact; that partial and its f32 weights go into the ring to the source.
// Summation orders are those of the pure-JAX implementation, row for row. Returners wait on reducers
// (ring space), reducers on returners (rows) and finishers (ring space), finishers on reducers (rows).
// Every role walks the (window, node) steps in one order, a window's rows fit every ring, and every
// producer publishes what it wrote before it waits (a reducer each step: see reduce), so the role at
// the earliest step can always go on, and no cycle forms across ranks.
#include <cuda_bf16.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>

#include "cuda/bf16x8.cuh"
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

constexpr int kReturnerWarps = kWarps / 2;  // block 2c: warps [0, 8) return, [8, 16) finish

__host__ __device__ bool is_grouped(const InternodeCombineShape& s) { return s.pair_top_k > 0; }

__host__ __device__ OpKind op_kind(const InternodeCombineShape& s) {
  return is_grouped(s) ? OpKind::kInternodeGroupedCombine : OpKind::kInternodeCombine;
}

// What two ranks' calls must agree on (the signature their signals carry): the op, and every size that
// places a row or a slot in a peer's buffer or says what a row holds. (Only this rank reads the biases.)
OpSignature signature_of(const InternodeCombineCall& c) {
  const InternodeCombineShape& s = c.shape;
  const InternodeRings& r = c.rings;
  const auto word = [](auto value) { return static_cast<uint32_t>(value); };
  return OpSignature(op_kind(s), {word(s.num_tokens), word(s.hidden), word(s.top_k), word(s.pair_top_k),
                                  word(s.exact_partials), word(s.ranks_per_node), word(c.layout.return_bytes),
                                  word(c.layout.partial_bytes), word(r.channels), word(r.rdma_slots),
                                  word(r.rdma_batch), word(r.nvl_slots), word(r.nvl_batch)});
}

// Eight channels of a row of values in f32 or bf16. A node's partial travels to the source in f32
// when exact (the sum is rounded once, at the source), else rounded to bf16 at the forwarder as
// DeepEP does, which halves the network bytes of combine. A row returned to its forwarder is bf16
// (plain: a row of y) or f32 (grouped: a sum of weighted pair rows, rounded once at the source).
// Rows a peer wrote (or this kernel, in a ring) are read with cache-volatile loads, inputs through the
// non-coherent cache (warp_copy.cuh: Source).
template <bool kF32>
struct RowValues;

template <>
struct RowValues<true> {
  static constexpr int kBytes = 4;  // per channel
  struct Raw {
    int4 a, b;  // eight f32 values' bits
  };
  __device__ static void store(char* at, const float (&acc)[8]) {
    reinterpret_cast<float4*>(at)[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    reinterpret_cast<float4*>(at)[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
  }
  template <Source kSource>
  __device__ static Raw load(const char* at) {
    const int4* p = reinterpret_cast<const int4*>(at);
    return {load16<kSource>(p), load16<kSource>(p + 1)};
  }
  __device__ static void add(float (&acc)[8], const Raw& v) {
    acc[0] += __int_as_float(v.a.x), acc[1] += __int_as_float(v.a.y);
    acc[2] += __int_as_float(v.a.z), acc[3] += __int_as_float(v.a.w);
    acc[4] += __int_as_float(v.b.x), acc[5] += __int_as_float(v.b.y);
    acc[6] += __int_as_float(v.b.z), acc[7] += __int_as_float(v.b.w);
  }
};

template <>
struct RowValues<false> {
  static constexpr int kBytes = 2;
  using Raw = int4;
  __device__ static void store(char* at, const float (&acc)[8]) {
    *reinterpret_cast<uint4*>(at) = pack_bf16x8<uint4>(acc);
  }
  template <Source kSource>
  __device__ static Raw load(const char* at) {
    return load16<kSource>(reinterpret_cast<const int4*>(at));
  }
  __device__ static void add(float (&acc)[8], Raw v) { accumulate(acc, v); }
};

// Vectors of eight channels a lane sums per pass, and rows per pass (f32 rows take two loads a
// vector). A lane issues every load of a pass (eight) before it adds the first, so a warp summing
// rows is not bound by the latency of one load after another.
constexpr int kSumUnroll = 4;
template <bool kF32>
constexpr int kRowsPerPass = kF32 ? 1 : 2;

// Whole warp, one pass: acc[u] += the vector first + 32 u (of `vectors`) of rows[0], then rows[1],
// ..., for every u; a null row adds nothing.
template <bool kF32, Source kSource = Source::kPeer>
__device__ __forceinline__ void add_rows(float (&acc)[kSumUnroll][8], const char* const (&rows)[kRowsPerPass<kF32>],
                                         int first, int vectors) {
  using V = RowValues<kF32>;
  typename V::Raw v[kRowsPerPass<kF32>][kSumUnroll];
#pragma unroll
  for (int r = 0; r < kRowsPerPass<kF32>; ++r)
#pragma unroll
    for (int u = 0; u < kSumUnroll; ++u) {
      const int i = first + kWarpSize * u;
      if (rows[r] != nullptr && i < vectors)
        v[r][u] = V::template load<kSource>(rows[r] + static_cast<size_t>(i) * 8 * V::kBytes);
    }
#pragma unroll
  for (int r = 0; r < kRowsPerPass<kF32>; ++r)
#pragma unroll
    for (int u = 0; u < kSumUnroll; ++u)
      if (rows[r] != nullptr && first + kWarpSize * u < vectors) V::add(acc[u], v[r][u]);
}

// Returners, reducers and finishers all walk a channel's tokens in windows of this many, from its first
// token. So each ring's producer puts, per window, exactly the rows its consumer takes next: a producer
// waiting for room for a window's rows waits only for windows before it, which its consumer finishes
// without it, and a window's rows fit every ring. (Windows of different sizes could deadlock: a consumer
// waiting for rows its producer may write only once the consumer frees more room than the ring has.)
__device__ __forceinline__ int combine_window(const InternodeRings& r) {
  return min(kWarpSize, static_cast<int>(min(r.nvl_slots, r.rdma_slots)));
}

// The received rows of source rank `src` this rank kept (below the capacity), [first, last): one run,
// ascending by the source's token.
struct SourceRows {
  int first, last;
};

__device__ __forceinline__ SourceRows kept_rows_of(const InternodeCombineShape& s, const InternodeCombineIn& in,
                                                   int src, int num_ranks) {
  const int received = max(*in.num_recv, 0), kept = min(received, s.capacity);
  const int end = src + 1 < num_ranks ? in.recv_rank_prefix[src + 1] : received;
  return {min(in.recv_rank_prefix[src], kept), min(end, kept)};
}

// A plain combine's reducer reads the rows this rank returns to itself (local rank `l` is this rank)
// straight from y: one copy less. A grouped combine's returned rows are sums the returner makes.
template <bool kGrouped>
__device__ __forceinline__ bool reducer_reads_y(const Topology& topo, int l) {
  return !kGrouped && l == topo.local;
}

// ---- block 2c: return and finish ----------------------------------------------------------------
// Whole warp, a grouped combine: at `dst`, the f32 sum over token-level row j's pairs of their row
// weight * y[pair row] (0 for none), then for each k the topk_weights of its pair's row (0 for none).
__device__ void return_pair_sum(const InternodeCombineShape& s, const InternodeCombineIn& in, char* dst, int j,
                                int lane) {
  const TokenPairs t = token_pairs(in.pair_row, in.row_weights, s.pair_top_k, j, lane);
  const __nv_bfloat16* y = reinterpret_cast<const __nv_bfloat16*>(in.y);
  for_each_pair_sum<kPairVectors>(y, s.hidden, t, [&](int i, float (&sum)[8]) {
    RowValues<true>::store(dst + static_cast<size_t>(i) * 8 * RowValues<true>::kBytes, sum);
  });
  // With N = 0 grouped rows no pair has a row, and topk_weights may read as absent.
  if (lane < s.top_k)
    reinterpret_cast<float*>(dst + s.hidden * RowValues<true>::kBytes)[lane] =
        t.row >= 0 && in.weights != nullptr ? in.weights[t.row] : 0.0f;
}

// Whole group: the received rows of sources (n, l) whose tokens are in the channel, into the ring to
// forwarder l of this node, a token window at a time (combine_window), in (window, n) order; none into
// the ring to this rank itself where its reducer reads y (reducer_reads_y), which still gets its tail.
template <bool kGrouped>
__device__ void return_to(const InternodeCombineCall& c, const InternodeCombineIn& in, const RingCall& call,
                          const OpRings& o, const WarpGroup& g, int l, int channel, TokenRange range, int* words) {
  const InternodeCombineShape& s = c.shape;
  const InternodeRings& r = c.rings;
  const Topology& topo = o.topo;
  const int lane = threadIdx.x % kWarpSize, R = topo.num_ranks;
  RingProducer p = o.to_local(l, channel, words);
  g.sync();  // the group is done with its words
  p.start(g, call);
  const int window = combine_window(r);
  for (int t0 = reducer_reads_y<kGrouped>(topo, l) ? range.last : range.first; t0 < range.last; t0 += window) {
    for (int n = 0; n < topo.nodes; ++n) {
      const SourceRows kept = kept_rows_of(s, in, n * topo.per_node + l, R);
      const int i = lower_bound_row(in.src_idx, kept.first, kept.last, t0);
      const int rows = lower_bound_row(in.src_idx, i, kept.last, min(t0 + window, range.last)) - i;
      if (rows == 0) continue;
      p.reserve(g, call, rows);
      for (int k = g.warp; k < rows; k += g.warps) {
        char* dst = p.slot(k);
        const int row = i + k;
        if constexpr (kGrouped) {
          return_pair_sum(s, in, dst, row, lane);
        } else {
          warp_copy<Source::kInput>(dst, in.y + static_cast<size_t>(row) * s.hidden, s.hidden * 2, lane);
          if (in.weights != nullptr && lane < s.top_k)
            reinterpret_cast<float*>(dst + s.hidden * 2)[lane] = in.weights[row * s.top_k + lane];
        }
      }
      p.advance(g, call, rows, static_cast<int>(r.nvl_batch));
    }
  }
  p.finish(g, call);
}

// Token t went to some rank of node m.
__device__ __forceinline__ bool went_to(const bool* is_token_in_rank, int t, int num_ranks, int m, int per_node) {
  bool any = false;
  for (int d = 0; d < per_node; ++d) any |= is_token_in_rank[static_cast<size_t>(t) * num_ranks + m * per_node + d];
  return any;
}

// Finisher group: this rank's tokens of the channel in order, each the sum of the partials of the nodes
// it went to (node order) and the biases, rounded once. `shared` [3 nodes]: per node the window's
// tokens going there (a ballot), the rows consumed and the rows seen in its ring.
template <bool kExact>
__device__ void finish(const InternodeCombineCall& c, const InternodeCombineIn& in, const InternodeCombineOut& out,
                       const RingCall& call, const OpRings& o, const WarpGroup& g, int channel, TokenRange range,
                       int* shared) {
  const InternodeCombineShape& s = c.shape;
  const Topology& topo = o.topo;
  const int lane = threadIdx.x % kWarpSize, nodes = topo.nodes, H = s.hidden, R = topo.num_ranks;
  unsigned* const went = reinterpret_cast<unsigned*>(shared);
  int* const consumed = shared + nodes;
  int* const seen = consumed + nodes;
  if (g.leader_warp()) {
    for (int m = lane; m < nodes; m += kWarpSize) {
      o.set_node_head(m, channel, call.signal(0));
      consumed[m] = seen[m] = 0;
    }
    __syncwarp();
  }
  const int window = combine_window(c.rings);
  for (int t0 = range.first; t0 < range.last; t0 += window) {
    const int tokens = min(window, range.last - t0);
    if (g.leader_warp()) {
      for (int m = 0; m < nodes; ++m) {
        const unsigned b = __ballot_sync(0xffffffffu, lane < tokens && went_to(in.is_token_in_rank, t0 + lane, R, m,
                                                                               topo.per_node));
        if (lane == 0) {
          went[m] = b;
          const int need = consumed[m] + __popc(b);
          if (need > seen[m]) {
            seen[m] =
                wait_ring_data(o.link(m, channel).tail, call, m == topo.node, need - 1, topo.rdma_peer(m), channel);
          }
        }
      }
    }
    g.sync();
    for (int j = g.warp; j < tokens; j += g.warps) {
      const int t = t0 + j;
      // Node m's partial of token j (null when the token did not go there): the tokens before it in the
      // window that went there follow the rows consumed.
      auto partial = [&](int m) -> const char* {
        const unsigned b = went[m];
        return (b >> j) & 1u ? o.from_node(m, channel).slot(consumed[m] + __popc(b & ((1u << j) - 1))) : nullptr;
      };
      const int vectors = H / 8;
      for (int first = lane; first < vectors; first += kWarpSize * kSumUnroll) {
        float acc[kSumUnroll][8] = {};
        for (int m = 0; m < nodes; m += kRowsPerPass<kExact>) {
          const char* pass[kRowsPerPass<kExact>];
#pragma unroll
          for (int x = 0; x < kRowsPerPass<kExact>; ++x) pass[x] = m + x < nodes ? partial(m + x) : nullptr;
          add_rows<kExact>(acc, pass, first, vectors);
        }
        const char* bias[2];
        for (int b = 0; b < 2; ++b)
          bias[b] = b < s.num_bias ? reinterpret_cast<const char*>(in.bias[b] + static_cast<size_t>(t) * H) : nullptr;
        add_rows<false, Source::kInput>(acc, bias, first, vectors);
#pragma unroll
        for (int u = 0; u < kSumUnroll; ++u) {
          const int i = first + kWarpSize * u;
          if (i < vectors)
            *reinterpret_cast<uint4*>(out.x + static_cast<size_t>(t) * H + i * 8) = pack_bf16x8<uint4>(acc[u]);
        }
      }
      if (out.weights != nullptr && lane < s.top_k) {
        float w = 0.0f;
        for (int m = 0; m < nodes; ++m) {
          const char* row = partial(m);
          if (row != nullptr) w += __ldcv(reinterpret_cast<const float*>(row + H * RowValues<kExact>::kBytes) + lane);
        }
        out.weights[static_cast<size_t>(t) * s.top_k + lane] = w;
      }
    }
    g.sync();  // every warp's loads of the slots returned, and it read went and consumed
    if (g.leader_warp()) {
      for (int m = lane; m < nodes; m += kWarpSize) {
        const int rows = __popc(went[m]);
        if (rows == 0) continue;
        consumed[m] += rows;
        o.set_node_head(m, channel, call.signal(consumed[m]));
      }
      __syncwarp();  // lane 0 reads the other lanes' counts next
    }
  }
  if (g.leader_warp()) {
    bool puts = false;
    for (int m = lane; m < nodes; m += kWarpSize) puts |= o.puts_to(topo.rdma_peer(m));
    if (puts) nvshmem_quiet();  // this lane's head puts are complete before the kernel ends
  }
}

// ---- block 2c + 1: reduce -----------------------------------------------------------------------
// What the reducer block keeps in shared memory (ints, one after the other).
struct ReduceTables {
  int* consumed;   // [L]: rows consumed of the ring from rank d of this node
  int* seen;       // [L]: rows seen in that ring
  int* heads;      // [nodes]: the head the producer of the ring to node n's rank saw last (its shared word)
  int* produced;   // [nodes]: rows written into the ring to node n's rank
  int* published;  // [nodes]: rows published there

  __device__ ReduceTables(int* at, int per_node, int nodes)
      : consumed(at), seen(at + per_node), heads(at + 2 * per_node), produced(heads + nodes),
        published(produced + nodes) {}
  static int ints(int per_node, int nodes) { return 2 * per_node + 3 * nodes; }
};

// The whole block: for each token window and each source node n in turn, the partial sums of n's tokens of
// the window that came to this node, into the ring to the source. Returners and finishers walk the same
// (window, node) order, so every source streams at once. The producers of the rings to the nodes keep
// their counts in the tables between steps: only the leader writes them, between two block barriers.
template <bool kExact, bool kGrouped>
__device__ void reduce(const InternodeCombineCall& c, const InternodeCombineIn& in, const RingCall& call,
                       const OpRings& o, int channel, TokenRange range, int* shared) {
  const InternodeCombineShape& s = c.shape;
  const InternodeRings& r = c.rings;
  const Topology& topo = o.topo;
  const WarpGroup g = warp_groups(0, kWarps, 1, 1);
  const int lane = threadIdx.x % kWarpSize, L = topo.per_node, H = s.hidden, T = s.num_tokens;
  const ReduceTables tables(shared, L, topo.nodes);
  constexpr bool kF32Returns = kGrouped;  // returned rows are sums of weighted pair rows
  int* const consumed = tables.consumed;
  int* const seen = tables.seen;
  if (g.leader_warp()) {
    if (lane < L) {
      store_release(o.local_head(lane, channel), call.signal(0));
      consumed[lane] = seen[lane] = 0;
    }
    for (int n = lane; n < topo.nodes; n += kWarpSize) tables.produced[n] = tables.published[n] = 0;
    __syncwarp();
  }
  for (int n = 0; n < topo.nodes; ++n) o.to_node(n, channel, tables.heads + n).start(g, call);
  const int window = combine_window(r);
  for (int t0 = range.first; t0 < range.last; t0 += window) {
    const int tokens = min(window, range.last - t0);
    for (int n = 0; n < topo.nodes; ++n) {
      const int f = lane < tokens ? in.forwarded[static_cast<size_t>(n) * T + t0 + lane] : 0;
      const unsigned came = __ballot_sync(0xffffffffu, f < 0);  // bit 31: the token came to this node
      const int rows = __popc(came);
      if (rows == 0) continue;
      RingProducer p = o.to_node(n, channel, tables.heads + n);
      p.rows = tables.produced[n];
      p.published = tables.published[n];
      // This rank's own rows of the window (reducer_reads_y): a run of y from its first.
      const SourceRows own = kept_rows_of(s, in, topo.rdma_peer(n), topo.num_ranks);
      const int own_first = lower_bound_row(in.src_idx, own.first, own.last, t0);
      if (g.leader_warp()) {
        for (int d = 0; d < L; ++d) {
          if (reducer_reads_y<kGrouped>(topo, d)) continue;
          const int need = consumed[d] + __popc(__ballot_sync(0xffffffffu, f < 0 && ((f >> d) & 1)));
          if (lane == 0 && need > seen[d]) {
            seen[d] = wait_ring_data(o.link(o.local_link(d), channel).tail, call, true, need - 1,
                                     topo.node_rank(d), channel);
          }
        }
      }
      p.reserve(g, call, rows);
      g.sync();  // the rows of this window are in every ring it reads
      for (int k = g.warp; k < rows; k += g.warps) {
        const int j = nth_set_lane(came, k, lane);
        const int fj = __shfl_sync(0xffffffffu, f, j);
        // Ring d's row of token j: the tokens before it in the window that rank d kept.
        // (This rank's own row, where its reducer reads y: its row of y.)
        const char* from[kInternodeMaxRanksPerNode];
        int own_row = -1;
#pragma unroll
        for (int d = 0; d < kInternodeMaxRanksPerNode; ++d) {
          const unsigned kept = __ballot_sync(0xffffffffu, d < L && f < 0 && ((f >> d) & 1));
          const int before = __popc(kept & ((1u << j) - 1));
          from[d] = nullptr;
          if (d >= L || !((fj >> d) & 1)) continue;
          if (reducer_reads_y<kGrouped>(topo, d)) {
            own_row = own_first + before;
            from[d] = reinterpret_cast<const char*>(in.y + static_cast<size_t>(own_row) * H);
          } else {
            from[d] = o.from_local(d, channel).slot(consumed[d] + before);
          }
        }
        char* out = p.slot(k);
        const int vectors = H / 8;
        for (int first = lane; first < vectors; first += kWarpSize * kSumUnroll) {
          float acc[kSumUnroll][8] = {};
#pragma unroll
          for (int d = 0; d < kInternodeMaxRanksPerNode; d += kRowsPerPass<kF32Returns>) {
            const char* pass[kRowsPerPass<kF32Returns>];
#pragma unroll
            for (int x = 0; x < kRowsPerPass<kF32Returns>; ++x) pass[x] = from[d + x];
            if (d < L) add_rows<kF32Returns>(acc, pass, first, vectors);
          }
#pragma unroll
          for (int u = 0; u < kSumUnroll; ++u) {
            const int i = first + kWarpSize * u;
            if (i < vectors)
              RowValues<kExact>::store(out + static_cast<size_t>(i) * 8 * RowValues<kExact>::kBytes, acc[u]);
          }
        }
        if (lane < s.top_k) {
          float w = 0.0f;
#pragma unroll
          for (int d = 0; d < kInternodeMaxRanksPerNode; ++d) {
            if (from[d] == nullptr) continue;
            if (reducer_reads_y<kGrouped>(topo, d)) {
              w += in.weights != nullptr ? in.weights[static_cast<size_t>(own_row) * s.top_k + lane] : 0.0f;
            } else {
              w += __ldcv(reinterpret_cast<const float*>(from[d] + H * RowValues<kF32Returns>::kBytes) + lane);
            }
          }
          reinterpret_cast<float*>(out + H * RowValues<kExact>::kBytes)[lane] = w;
        }
      }
      g.sync();  // every warp's loads of the rings' slots returned, and it read consumed
      if (g.leader_warp()) {
        for (int d = 0; d < L; ++d) {
          if (reducer_reads_y<kGrouped>(topo, d)) continue;
          const int taken = __popc(__ballot_sync(0xffffffffu, f < 0 && ((f >> d) & 1)));
          if (lane == 0 && taken > 0) {
            consumed[d] += taken;
            store_release(o.local_head(d, channel), call.signal(consumed[d]));
          }
        }
        __syncwarp();  // every lane reads the counts next
      }
      // Published at once, not by the batch: a reducer holding unpublished rows for one node while it
      // waits for room in another node's ring could wait on a cycle through the finishers.
      p.advance(g, call, rows, 1);
      if (g.leader()) {  // every warp read the tables before the barrier after reserve
        tables.produced[n] = p.rows;
        tables.published[n] = p.published;
      }
      g.sync();
    }
  }
  for (int n = 0; n < topo.nodes; ++n) {
    RingProducer p = o.to_node(n, channel, tables.heads + n);
    p.rows = tables.produced[n];
    p.published = tables.published[n];
    p.finish(g, call);
    if (!p.same_node && g.leader()) {
      atomicAdd(c.traffic.counters + 2, static_cast<unsigned long long>(p.rows));
      atomicAdd(c.traffic.counters + 3, static_cast<unsigned long long>(p.rows) * c.layout.partial_bytes);
    }
  }
}

template <bool kGrouped, bool kExact>
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(InternodeCombineCall c, InternodeCombineIn in,
                                                             InternodeCombineOut out, uint32_t signature) {
  __shared__ int words[kWarps][2];
  extern __shared__ int shared[];  // block 2c: the finisher's [3 nodes]; block 2c + 1: ReduceTables
  const OpRings o{c.mem, c.signals, c.rings, c.signals.combine_links, Topology(c.mem, c.shape.ranks_per_node)};
  const Topology& topo = o.topo;
  const RingCall call{wait_context(c.mem, op_kind(c.shape), signature), static_cast<uint32_t>(out.token[0])};
  const int channel = blockIdx.x / 2, warp = threadIdx.x / kWarpSize;
  const TokenRange range = channel_tokens(c.shape.num_tokens, channel, static_cast<int>(c.rings.channels));
  if (blockIdx.x % 2 == 1) {
    reduce<kExact, kGrouped>(c, in, call, o, channel, range, shared);
    return;
  }
  if (warp < kReturnerWarps) {
    const WarpGroup g = warp_groups(0, kReturnerWarps, topo.per_node, 1);
    if (g.index >= g.count) return;
    for (int l = g.index; l < topo.per_node; l += g.count)
      return_to<kGrouped>(c, in, call, o, g, l, channel, range, words[warp - g.warp]);
  } else {
    const WarpGroup g = warp_groups(kReturnerWarps, kWarps - kReturnerWarps, 1, 1 + kReturnerWarps / 2);
    finish<kExact>(c, in, out, call, o, g, channel, range, shared);
  }
}

template <bool kGrouped, bool kExact>
void launch_combine_kernel(const InternodeCombineCall& call, uint32_t signature, const InternodeCombineIn& in,
                           const InternodeCombineOut& out, cudaStream_t stream) {
  const int nodes = call.mem.num_ranks / call.shape.ranks_per_node;
  const size_t shared_bytes =
      static_cast<size_t>(std::max(3 * nodes, ReduceTables::ints(call.shape.ranks_per_node, nodes))) * sizeof(int);
  combine_kernel<kGrouped, kExact><<<2 * static_cast<int>(call.rings.channels), kThreads, shared_bytes, stream>>>(
      call, in, out, signature);
}

}  // namespace

cudaError_t launch_internode_combine(const InternodeCombineCall& call, const InternodeCombineIn& in,
                                     const InternodeCombineOut& out, cudaStream_t stream) {
  const InternodeCombineShape& s = call.shape;
  const uint32_t signature = signature_of(call).value;
  start_call_kernel<<<1, kWarpSize, 0, stream>>>(call.mem, kInternodeCombineCall, signature, out.token);
  if (is_grouped(s)) {
    if (s.exact_partials) {
      launch_combine_kernel<true, true>(call, signature, in, out, stream);
    } else {
      launch_combine_kernel<true, false>(call, signature, in, out, stream);
    }
  } else if (s.exact_partials) {
    launch_combine_kernel<false, true>(call, signature, in, out, stream);
  } else {
    launch_combine_kernel<false, false>(call, signature, in, out, stream);
  }
  return cudaGetLastError();
}

}  // namespace jax_deepep
