// Internode dispatch/combine kernels (protocol and layout: internode.cuh).
//
// Dispatch: (1) send: one block per destination node stages the tokens bound there and puts
// them into the inbox of this rank's RDMA peer on that node (a local copy for its own node); one
// more block notifies every rank of this rank's counts. (2) forward: one block per source node
// places each inbox row at its final row on every rank of this node that it goes to. (3) recv:
// copies the landed rows into XLA's outputs (grouped: each to its pairs' grouped rows) and builds
// the handle.
// Combine: (1) return: rows (grouped: each token-level row's f32 sum of its weighted pair rows)
// back to their forwarder over NVLink; (2) reduce: one block per source node sums them per token
// in f32 and puts the partial (bf16, or f32 when exact) to the source; (3) finish: sums partials.
#include "cuda/launch.h"

#include <cuda_bf16.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>

#include "cuda/bf16x8.cuh"
#include "cuda/grouped_rows.cuh"
#include "cuda/memory_order.cuh"
#include "cuda/nvshmem_peers.cuh"
#include "cuda/toolbox.cuh"
#include "cuda/wait.cuh"
#include "cuda/warp_copy.cuh"

namespace jax_deepep {
namespace {

struct Topology {
  int rank, num_ranks, per_node, nodes, node, local;
  __device__ explicit Topology(const PeerMemory& mem, int ranks_per_node)
      : rank(mem.rank), num_ranks(mem.num_ranks), per_node(ranks_per_node), nodes(mem.num_ranks / ranks_per_node),
        node(mem.rank / ranks_per_node), local(mem.rank % ranks_per_node) {}
};

__host__ __device__ bool is_grouped(const InternodeCombineShape& s) { return s.pair_top_k > 0; }

__host__ __device__ OpKind op_kind(const InternodeDispatchShape& s) {
  return s.grouped ? OpKind::kInternodeGroupedDispatch : OpKind::kInternodeDispatch;
}
__host__ __device__ OpKind op_kind(const InternodeCombineShape& s) {
  return is_grouped(s) ? OpKind::kInternodeGroupedCombine : OpKind::kInternodeCombine;
}

template <typename T>
uint32_t word(T value) {
  return static_cast<uint32_t>(value);
}

// What two ranks' calls of one op must agree on (the signature their stamps and signals carry): the
// op, and every size that places a row or a signal in a peer's buffer or says what a row holds.
// (Only this rank reads the grouped capacity, the alignment and the biases.)
OpSignature signature_of(const InternodeDispatchCall& c) {
  const InternodeDispatchShape& s = c.shape;
  return OpSignature(op_kind(s), {word(s.num_tokens), word(s.capacity), word(s.top_k), word(s.has_ids),
                                  word(s.has_weights), word(s.num_parts), word(s.part_bytes[0]),
                                  word(s.num_parts == 2 ? s.part_bytes[1] : 0), word(s.num_experts),
                                  word(s.ranks_per_node), word(c.layout.row_bytes), word(c.layout.half_bytes)});
}

OpSignature signature_of(const InternodeCombineCall& c) {
  const InternodeCombineShape& s = c.shape;
  return OpSignature(op_kind(s), {word(s.num_tokens), word(s.hidden), word(s.top_k), word(s.pair_top_k),
                                  word(s.exact_partials), word(s.ranks_per_node), word(c.layout.return_bytes),
                                  word(c.layout.partial_bytes), word(c.layout.half_bytes)});
}

// ---- dispatch -------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) dispatch_send_kernel(PeerMemory mem, InternodeTraffic traffic,
                                                                 InternodeRegion region, InternodeDispatchShape s,
                                                                 InternodeDispatchLayout l, InternodeDispatchIn in,
                                                                 const int* token, uint32_t signature) {
  extern __shared__ int scratch[];  // [T]: token | mask << 16
  __shared__ BlockPrefix<1> sending;
  const Topology topo(mem, s.ranks_per_node);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, T = s.num_tokens, R = topo.num_ranks;
  const uint32_t seq = static_cast<uint32_t>(token[0]);
  const size_t half = (seq & 1u) * region.half_stride;

  if (blockIdx.x == topo.nodes) {  // notify: this rank's counts per rank and per expert, to every rank
    const int experts_per_rank = s.has_ids ? s.num_experts / R : 0;
    char* const mine = mem.local + region.offset + half;
    uint64_t* const counts = reinterpret_cast<uint64_t*>(mine + l.counts) + static_cast<size_t>(topo.rank) * R;
    uint64_t* const experts =
        reinterpret_cast<uint64_t*>(mine + l.expert_counts) + static_cast<size_t>(topo.rank) * experts_per_rank;
    // One signal each, so that a reader never sees half of one (a put of the whole row may tear).
    for (int d = warp; d < R; d += kWarps) {
      for (int i = lane; i < R + experts_per_rank; i += kWarpSize) {
        const int count = i < R ? in.tokens_per_rank[i] : in.tokens_per_expert[d * experts_per_rank + i - R];
        store_symmetric(mem, i < R ? counts + i : experts + (i - R), call_signal(signature, seq, count), d);
      }
    }
    __syncwarp();
    if (lane == 0) nvshmem_quiet();
    return;
  }

  // Send block for node m: tokens going to any rank of node m, in token order.
  const int m = blockIdx.x, dst = m * topo.per_node + topo.local;
  if (threadIdx.x == 0) sending.running[0] = 0;
  __syncthreads();
  for (int start = 0; start < T; start += kThreads) {
    const int t = start + threadIdx.x;
    int mask = 0;
    if (t < T)
      for (int j = 0; j < topo.per_node; ++j) mask |= in.is_token_in_rank[t * R + m * topo.per_node + j] ? 1 << j : 0;
    const bool sent[1] = {mask != 0};
    int slot[1];
    block_prefix(sending, sent, slot);
    if (sent[0]) scratch[slot[0]] = t | mask << 16;
  }
  __syncthreads();
  const int count = sending.running[0];
  char* const peer = mem.peer[dst];
  const size_t inbox_at = region.offset + half + l.inbox + static_cast<size_t>(topo.node) * T * l.row_bytes;
  char* const rows = peer != nullptr ? peer + inbox_at : mem.staging + static_cast<size_t>(m) * T * l.row_bytes;
  for (int j = warp; j < count; j += kWarps) {
    const int t = scratch[j] & 0xffff, mask = scratch[j] >> 16;
    char* row = rows + j * l.row_bytes;
    if (lane == 0) *reinterpret_cast<int4*>(row) = make_int4(topo.rank, t, mask, 0);
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
  const size_t signal_at = region.offset + half + l.inbox_signals + topo.node * sizeof(uint64_t);
  const uint64_t signal = call_signal(signature, seq, count);
  if (peer != nullptr) {
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) store_release(reinterpret_cast<uint64_t*>(peer + signal_at), signal);
    return;
  }
  __syncthreads();
  const int first = count * warp / kWarps, end = count * (warp + 1) / kWarps;
  if (end > first) {
    nvshmemx_putmem_nbi_warp(mem.local + inbox_at + first * l.row_bytes, rows + first * l.row_bytes,
                             (end - first) * l.row_bytes, dst);
    __syncwarp();
    if (lane == 0) nvshmem_quiet();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(traffic.counters + 0, static_cast<unsigned long long>(count));
    atomicAdd(traffic.counters + 1, static_cast<unsigned long long>(count) * l.row_bytes);
    put_value(reinterpret_cast<uint64_t*>(mem.local + signal_at), signal, dst);
  }
}

// One block per source node n: the inbox rows from rank (n, this local index) go to their final
// rows on every rank of this node they are bound for.
__global__ void __launch_bounds__(kThreads) forward_kernel(PeerMemory mem, InternodeRegion region,
                                                           InternodeDispatchShape s, InternodeDispatchLayout l,
                                                           const int* token, uint32_t signature, int* forwarded) {
  __shared__ int base[kInternodeMaxRanksPerNode];
  __shared__ BlockPrefix<1> bound_rows[kInternodeMaxRanksPerNode];  // rows bound for each local rank
  __shared__ int dest_row[kThreads][kInternodeMaxRanksPerNode];
  __shared__ int count;
  const Topology topo(mem, s.ranks_per_node);
  const int n = blockIdx.x, src = n * topo.per_node + topo.local, T = s.num_tokens, R = topo.num_ranks;
  const int L = topo.per_node;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const uint32_t seq = static_cast<uint32_t>(token[0]);
  const WaitContext wait = wait_context(mem, op_kind(s), signature);
  const char* half = mem.local + region.offset + (seq & 1u) * region.half_stride;
  const uint64_t* counts = reinterpret_cast<const uint64_t*>(half + l.counts);
  if (threadIdx.x < kInternodeMaxRanksPerNode) bound_rows[threadIdx.x].running[0] = 0;
  if (threadIdx.x < L) {  // first row of source `src` on each rank of this node
    int sum = 0;
    for (int s2 = 0; s2 < src; ++s2)
      sum += wait_call_signal(counts + s2 * R + topo.node * L + threadIdx.x, seq, signature, wait,
                              WaitKind::kTokenCounts, s2);
    base[threadIdx.x] = sum;
  }
  if (threadIdx.x == 0)
    count = min(wait_call_signal(reinterpret_cast<const uint64_t*>(half + l.inbox_signals) + n, seq, signature, wait,
                                 WaitKind::kInboxRows, src),
                T);
  for (int t = threadIdx.x; t < T; t += kThreads) forwarded[n * T + t] = 0;
  __syncthreads();
  const char* inbox = half + l.inbox + static_cast<size_t>(n) * T * l.row_bytes;
  for (int start = 0; start < count; start += kThreads) {
    const int j = start + threadIdx.x;
    const int mask = j < count ? reinterpret_cast<const int*>(inbox + j * l.row_bytes)[2] : 0;
    int kept = 0;
    for (int d = 0; d < L; ++d) {  // rank of row j among the rows bound for local rank d
      const bool bound[1] = {((mask >> d) & 1) != 0};
      int position[1];
      block_prefix(bound_rows[d], bound, position);
      const int row = base[d] + position[0];
      dest_row[threadIdx.x][d] = bound[0] && row < s.capacity ? row : -1;
      kept |= bound[0] && row < s.capacity ? 1 << d : 0;
    }
    if (j < count) {
      const int t = reinterpret_cast<const int*>(inbox + j * l.row_bytes)[1];
      if (t >= 0 && t < T) forwarded[n * T + t] = static_cast<int>(0x80000000u | kept);
    }
    __syncthreads();
    const int rows_here = min(kThreads, count - start);
    for (int p = warp; p < rows_here * L; p += kWarps) {
      const int jj = p / L, d = p % L, row = dest_row[jj][d];
      if (row < 0) continue;
      char* peer = mem.peer[topo.node * L + d];
      char* landing = peer + region.offset + (seq & 1u) * region.half_stride + l.landing;
      warp_copy<Source::kPeer>(landing + static_cast<size_t>(row) * l.row_bytes,
                               inbox + static_cast<size_t>(start + jj) * l.row_bytes, l.row_bytes, lane);
    }
    __syncthreads();
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x < L) {
    char* peer = mem.peer[topo.node * L + threadIdx.x];
    store_release(reinterpret_cast<uint64_t*>(peer + region.offset + (seq & 1u) * region.half_stride +
                                              l.forward_signals) +
                      topo.local * topo.nodes + n,
                  call_signal(signature, seq, 0));
  }
}

// Waits until every forwarder of this node is done with every source node; true on every thread.
__device__ void wait_forwarded(const WaitContext& wait, const Topology& topo, const char* half,
                               const InternodeDispatchLayout& l, uint32_t seq) {
  const uint64_t* signals = reinterpret_cast<const uint64_t*>(half + l.forward_signals);
  for (int i = threadIdx.x; i < topo.per_node * topo.nodes; i += blockDim.x)
    wait_call_signal(signals + i, seq, wait.signature, wait, WaitKind::kForwardedRows,
                     topo.node * topo.per_node + i / topo.nodes);
  __syncthreads();
}

// ---- expert-grouped receive ----------------------------------------------------------------
// Whole block, a first grouped dispatch: fills `bases` [(R + 1) * E_l] from the pairs per local
// expert each source notified: bases[src * E_l + e] is the first grouped row of source src's pairs
// of expert e (the padded groups of the experts before e, then the pairs of the sources before
// src), bases[R * E_l + e] the end of e's pairs. Block 0 also writes the held group sizes and the
// rows needed. Returns the rows needed.
__device__ int build_bases(const WaitContext& wait, int num_ranks, const uint64_t* pair_counts, uint32_t seq,
                           int experts_per_rank, int alignment, int capacity, const InternodeGroupedOut& out,
                           int* bases) {
  const int experts = experts_per_rank;
  for (int i = threadIdx.x; i < num_ranks * experts; i += kThreads)
    bases[i] = wait_call_signal(pair_counts + i, seq, wait.signature, wait, WaitKind::kTokenCounts, i / experts);
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

// Whole grid: the grouped rows no pair fills. A first dispatch: each group's padding and the rows
// past every group (`bases` [(R + 1) * E_l] and `total` from build_bases); a cached one: the
// handle's padding rows.
__device__ void fill_grouped_padding(const InternodeDispatchShape& s, const InternodeDispatchOut& out,
                                     const int* bases, int num_ranks, int experts_per_rank, int total, bool first) {
  const int lane = threadIdx.x % kWarpSize, warps = gridDim.x * kWarps;
  const int warp = blockIdx.x * kWarps + threadIdx.x / kWarpSize, N = s.grouped_capacity;
  if (!first) {
    for (int row = warp; row < N; row += warps) {
      if (out.grouped.token_row[row] < 0) clear_grouped_row(s, out, row, false, lane);
    }
    return;
  }
  const int* pairs_end = bases + num_ranks * experts_per_rank;
  for (int e = warp; e < experts_per_rank; e += warps) {
    const int end = min(e + 1 < experts_per_rank ? bases[e + 1] : total, N);
    for (int row = pairs_end[e]; row < end; ++row) clear_grouped_row(s, out, row, true, lane);
  }
  for (int row = total + warp; row < N; row += warps) clear_grouped_row(s, out, row, true, lane);
}

// Whole warp: landed token-level row `i` (at `row`; `live`: within the received rows) to its
// grouped rows. A first dispatch finds them from `bases` and the row's prefixes and writes them as
// the row's pair rows; a cached one reads them there.
__device__ void deliver_pairs(const InternodeDispatchShape& s, const InternodeDispatchLayout& l,
                              const InternodeDispatchOut& out, const int* bases, int num_ranks, int rank, int i,
                              const char* row, bool live, int lane) {
  const bool first = s.has_ids;
  const int experts_per_rank = first ? s.num_experts / num_ranks : 0;
  const size_t at = static_cast<size_t>(i) * s.top_k + lane;
  int local = -1, pair = -1;
  if (lane < s.top_k) {
    if (first) {
      const int e = live ? reinterpret_cast<const int*>(row + l.ids_at)[lane] : -1;
      if (e >= 0 && e < s.num_experts && e / experts_per_rank == rank) {
        local = e % experts_per_rank;
        const int src = reinterpret_cast<const int*>(row)[0];
        pair = bases[src * experts_per_rank + local] + reinterpret_cast<const int*>(row + l.prefix_at)[lane];
        if (pair >= s.grouped_capacity) pair = -1;  // dropped (past capacity)
      }
      out.grouped.pair_row[at] = pair;
    } else if (live) {
      pair = out.grouped.pair_row[at];
    }
  }
  const bool has_weight = s.has_weights && live && lane < s.top_k;
  const float weight = has_weight ? reinterpret_cast<const float*>(row + l.weights_at)[lane] : 0.0f;
  const PairLanes pairs = pair_lanes(pair, weight, s.top_k, lane);
  if (!live) return;
  for (unsigned rest = pairs.owners; rest; rest &= rest - 1) {
    const int r = __shfl_sync(0xffffffffu, pair, __ffs(rest) - 1);
    for (int p = 0; p < s.num_parts; ++p)
      warp_copy<Source::kPeer>(static_cast<char*>(out.part[p]) + static_cast<size_t>(r) * s.part_bytes[p],
                               row + l.part_at[p], s.part_bytes[p], lane);
  }
  if (!pairs.owner) return;
  if (out.grouped.weight != nullptr) out.grouped.weight[pair] = pairs.weight;
  if (first) {
    out.grouped.expert[pair] = local;
    out.grouped.token_row[pair] = i;
  }
}

// Block 0: handle metadata; every block: copies of the landed rows into the outputs (grouped: into
// their grouped rows).
template <bool kGrouped>
__global__ void __launch_bounds__(kThreads) dispatch_recv_kernel(PeerMemory mem, InternodeRegion region,
                                                                 InternodeDispatchShape s, InternodeDispatchLayout l,
                                                                 const bool* is_token_in_rank, const int* token,
                                                                 uint32_t signature, InternodeDispatchOut out,
                                                                 int expert_alignment) {
  // [R + 1]: first row of each source rank, then the total; a first grouped dispatch's bases follow
  extern __shared__ int prefix[];
  __shared__ BlockPrefix<1> rows_on_d;
  const Topology topo(mem, s.ranks_per_node);
  const int R = topo.num_ranks, T = s.num_tokens, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const uint32_t seq = static_cast<uint32_t>(token[0]);
  const WaitContext wait = wait_context(mem, op_kind(s), signature);
  const char* half = mem.local + region.offset + (seq & 1u) * region.half_stride;
  const uint64_t* counts = reinterpret_cast<const uint64_t*>(half + l.counts);
  wait_forwarded(wait, topo, half, l, seq);
  for (int src = threadIdx.x; src < R; src += kThreads)
    prefix[src + 1] = wait_call_signal(counts + src * R + topo.rank, seq, signature, wait, WaitKind::kTokenCounts, src);
  __syncthreads();
  if (threadIdx.x == 0) {
    prefix[0] = 0;
    for (int src = 0; src < R; ++src) prefix[src + 1] += prefix[src];
  }
  __syncthreads();
  const int total = prefix[R], kept = min(total, s.capacity);
  const int experts_per_rank = s.has_ids ? s.num_experts / R : 0;

  if (blockIdx.x == 0) {
    for (int src = threadIdx.x; src < R; src += kThreads) out.recv_rank_prefix[src] = prefix[src];
    if (threadIdx.x == 0) *out.num_recv = total;
    const uint64_t* expert_counts = reinterpret_cast<const uint64_t*>(half + l.expert_counts);
    for (int e = threadIdx.x; e < experts_per_rank && out.per_expert != nullptr; e += kThreads) {
      int sum = 0;
      for (int src = 0; src < R; ++src)
        sum += wait_call_signal(expert_counts + src * experts_per_rank + e, seq, signature, wait,
                                WaitKind::kTokenCounts, src);
      out.per_expert[e] = (sum + expert_alignment - 1) / expert_alignment * expert_alignment;
    }
    for (int d = 0; d < R; ++d) {  // this rank's rows on rank d: its first row there, then in token order
      if (threadIdx.x == 0) {
        int row = 0;
        for (int src = 0; src < topo.rank; ++src)
          row += wait_call_signal(counts + src * R + d, seq, signature, wait, WaitKind::kTokenCounts, src);
        rows_on_d.running[0] = row;
      }
      __syncthreads();
      for (int start = 0; start < T; start += kThreads) {
        const int t = start + threadIdx.x;
        const bool sent[1] = {t < T && is_token_in_rank[t * R + d]};
        int row[1];
        block_prefix(rows_on_d, sent, row);
        if (t < T) out.send_row[t * R + d] = sent[0] ? row[0] : -1;
      }
    }
  }

  int* const bases = prefix + R + 1;
  if constexpr (kGrouped) {
    const uint64_t* pair_counts = reinterpret_cast<const uint64_t*>(half + l.expert_counts);
    const int rows_needed = s.has_ids ? build_bases(wait, R, pair_counts, seq, experts_per_rank, expert_alignment,
                                                    s.grouped_capacity, out.grouped, bases)
                                      : 0;
    fill_grouped_padding(s, out, bases, R, experts_per_rank, rows_needed, s.has_ids);
  }
  for (int i = blockIdx.x * kWarps + warp; i < s.capacity; i += gridDim.x * kWarps) {
    const char* row = half + l.landing + static_cast<size_t>(i) * l.row_bytes;
    const bool live = i < kept;
    if (lane == 0) {
      out.src_rank[i] = live ? reinterpret_cast<const int*>(row)[0] : -1;
      out.src_idx[i] = live ? reinterpret_cast<const int*>(row)[1] : -1;
    }
    if constexpr (kGrouped) {
      deliver_pairs(s, l, out, bases, R, topo.rank, i, row, live, lane);
      continue;
    }
    int local = -1;
    if (s.has_ids && lane < s.top_k) {
      const int e = live ? reinterpret_cast<const int*>(row + l.ids_at)[lane] : -1;
      local = e >= 0 && e < s.num_experts && e / experts_per_rank == topo.rank ? e % experts_per_rank : -1;
      out.ids[i * s.top_k + lane] = local;
    }
    if (s.has_weights && lane < s.top_k) {
      const float w = live ? reinterpret_cast<const float*>(row + l.weights_at)[lane] : 0.0f;
      out.weights[i * s.top_k + lane] = s.has_ids && local < 0 ? 0.0f : w;
    }
    if (!live) continue;
    for (int p = 0; p < s.num_parts; ++p)
      warp_copy<Source::kPeer>(static_cast<char*>(out.part[p]) + static_cast<size_t>(i) * s.part_bytes[p],
                               row + l.part_at[p], s.part_bytes[p], lane);
  }
}

// ---- combine --------------------------------------------------------------------------------
// Eight channels of a row of values in f32 or bf16. A node's partial travels to the source in f32
// when exact (the sum is rounded once, at the source), else rounded to bf16 at the forwarder as
// DeepEP does, which halves the network bytes of combine. A row returned to its forwarder is bf16
// (plain: a row of y) or f32 (grouped: a sum of weighted pair rows, rounded once at the source).
template <bool kF32>
struct RowValues;

template <>
struct RowValues<true> {
  static constexpr int kBytes = 4;  // per channel
  __device__ static void store(char* at, const float (&acc)[8]) {
    reinterpret_cast<float4*>(at)[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    reinterpret_cast<float4*>(at)[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
  }
  __device__ static void add_to(float (&acc)[8], const char* at) {
    const float4* p = reinterpret_cast<const float4*>(at);
    const float4 a = p[0], b = p[1];
    acc[0] += a.x, acc[1] += a.y, acc[2] += a.z, acc[3] += a.w;
    acc[4] += b.x, acc[5] += b.y, acc[6] += b.z, acc[7] += b.w;
  }
};

template <>
struct RowValues<false> {
  static constexpr int kBytes = 2;
  __device__ static void store(char* at, const float (&acc)[8]) {
    *reinterpret_cast<uint4*>(at) = pack_bf16x8<uint4>(acc);
  }
  __device__ static void add_to(float (&acc)[8], const char* at) {
    accumulate(acc, *reinterpret_cast<const uint4*>(at));
  }
};

// Whole warp, a grouped combine: at `dst`, the f32 sum over token-level row j's pairs of their row
// weight * y[pair row] (0 for none), then for each k the topk_weights of its pair's row (0 for none).
__device__ void return_pair_sum(const InternodeCombineShape& s, const InternodeCombineIn& in, char* dst, int j,
                                int lane) {
  const TokenPairs t = token_pairs(in.pair_row, in.row_weights, s.pair_top_k, j, lane);
  const __nv_bfloat16* y = reinterpret_cast<const __nv_bfloat16*>(in.y);
  const int vectors = s.hidden / 8;
  for (int first = 0; first < vectors; first += kWarpSize) {
    const int i = first + lane;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    add_pair_rows(acc, y, s.hidden, t.owners, t.row, t.weight, i, i < vectors);
    if (i < vectors) RowValues<true>::store(dst + static_cast<size_t>(i) * 8 * RowValues<true>::kBytes, acc);
  }
  // With N = 0 grouped rows no pair has a row, and topk_weights may read as absent.
  if (lane < s.top_k)
    reinterpret_cast<float*>(dst + s.hidden * RowValues<true>::kBytes)[lane] =
        t.row >= 0 && in.weights != nullptr ? in.weights[t.row] : 0.0f;
}

// Rows back to their forwarder (rank (this node, source's local index)), at [this local][n][t]
// (grouped: each token-level row's sum of its pairs).
template <bool kGrouped>
__global__ void __launch_bounds__(kThreads) combine_return_kernel(PeerMemory mem, InternodeRegion region,
                                                                  InternodeCombineShape s, InternodeCombineLayout l,
                                                                  InternodeCombineIn in, const int* token,
                                                                  uint32_t signature) {
  const Topology topo(mem, s.ranks_per_node);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, T = s.num_tokens, L = topo.per_node;
  const uint32_t seq = static_cast<uint32_t>(token[0]);
  const size_t half = (seq & 1u) * region.half_stride;
  const int rows = min(max(*in.num_recv, 0), s.capacity);
  for (int i = blockIdx.x * kWarps + warp; i < rows; i += gridDim.x * kWarps) {
    const int src = in.src_rank[i], t = in.src_idx[i];
    if (src < 0 || src >= topo.num_ranks || t < 0 || t >= T) continue;
    char* peer = mem.peer[topo.node * L + src % L];
    char* dst = peer + region.offset + half + l.returns +
                ((static_cast<size_t>(topo.local) * topo.nodes + src / L) * T + t) * l.return_bytes;
    if constexpr (kGrouped) {
      return_pair_sum(s, in, dst, i, lane);
      continue;
    }
    warp_copy<Source::kInput>(dst, in.y + static_cast<size_t>(i) * s.hidden, s.hidden * 2, lane);
    if (in.weights != nullptr && lane < s.top_k)
      reinterpret_cast<float*>(dst + s.hidden * 2)[lane] = in.weights[i * s.top_k + lane];
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x < L) {
    char* peer = mem.peer[topo.node * L + threadIdx.x];
    store_release(reinterpret_cast<uint64_t*>(peer + region.offset + half + l.return_signals) +
                      topo.local * kInternodeReturnBlocks + blockIdx.x,
                  call_signal(signature, seq, 0));
  }
}

// One block per source node n: per token of source (n, this local index) that this node got,
// the f32 sum of the rows its ranks returned (f32 rows when kF32Returns, else bf16), put to the
// source as partial [this node][t] (in f32 when kExact, else rounded to bf16).
template <bool kExact, bool kF32Returns>
__global__ void __launch_bounds__(kThreads) combine_reduce_kernel(PeerMemory mem, InternodeTraffic traffic,
                                                                  InternodeRegion region, InternodeCombineShape s,
                                                                  InternodeCombineLayout l, const int* forwarded,
                                                                  const int* token, uint32_t signature) {
  __shared__ int sent;
  const Topology topo(mem, s.ranks_per_node);
  const int n = blockIdx.x, src = n * topo.per_node + topo.local, T = s.num_tokens, L = topo.per_node, H = s.hidden;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const uint32_t seq = static_cast<uint32_t>(token[0]);
  const WaitContext wait = wait_context(mem, op_kind(s), signature);
  const size_t half = (seq & 1u) * region.half_stride;
  const char* mine = mem.local + region.offset + half;
  const uint64_t* signals = reinterpret_cast<const uint64_t*>(mine + l.return_signals);
  for (int i = threadIdx.x; i < L * kInternodeReturnBlocks; i += kThreads)
    wait_call_signal(signals + i, seq, signature, wait, WaitKind::kReturnedRows,
                     topo.node * L + i / kInternodeReturnBlocks);
  if (threadIdx.x == 0) sent = 0;
  __syncthreads();
  const bool local_source = src == topo.rank;
  const size_t partial_at = region.offset + half + l.partials + static_cast<size_t>(topo.node) * T * l.partial_bytes;
  char* const partials = local_source ? mem.local + partial_at
                                      : mem.staging + static_cast<size_t>(n) * T * l.partial_bytes;
  int my_rows = 0;
  for (int t = warp; t < T; t += kWarps) {
    const int f = forwarded[n * T + t];
    if (f >= 0) continue;  // bit 31 clear: the token did not come to this node
    char* out = partials + static_cast<size_t>(t) * l.partial_bytes;
    for (int ch = lane * 8; ch < H; ch += kWarpSize * 8) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int d = 0; d < L; ++d) {
        if (!((f >> d) & 1)) continue;
        const char* row = mine + l.returns + ((static_cast<size_t>(d) * topo.nodes + n) * T + t) * l.return_bytes;
        RowValues<kF32Returns>::add_to(acc, row + ch * RowValues<kF32Returns>::kBytes);
      }
      RowValues<kExact>::store(out + ch * RowValues<kExact>::kBytes, acc);
    }
    if (lane < s.top_k) {
      float w = 0.0f;
      for (int d = 0; d < L; ++d) {
        if (!((f >> d) & 1)) continue;
        const char* row = mine + l.returns + ((static_cast<size_t>(d) * topo.nodes + n) * T + t) * l.return_bytes;
        w += reinterpret_cast<const float*>(row + H * RowValues<kF32Returns>::kBytes)[lane];
      }
      reinterpret_cast<float*>(out + H * RowValues<kExact>::kBytes)[lane] = w;
    }
    __syncwarp();
    if (!local_source) {
      nvshmemx_putmem_nbi_warp(mem.local + partial_at + static_cast<size_t>(t) * l.partial_bytes, out, l.partial_bytes,
                               src);
      ++my_rows;
    }
  }
  if (!local_source) {
    __syncwarp();
    if (lane == 0) {
      nvshmem_quiet();
      atomicAdd(&sent, my_rows);
    }
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x != 0) return;
  uint64_t* signal = reinterpret_cast<uint64_t*>(mem.local + region.offset + half + l.partial_signals) + topo.node;
  if (local_source) {
    store_release(signal, call_signal(signature, seq, 0));
  } else {
    atomicAdd(traffic.counters + 2, static_cast<unsigned long long>(sent));
    atomicAdd(traffic.counters + 3, static_cast<unsigned long long>(sent) * l.partial_bytes);
    put_value(signal, call_signal(signature, seq, 0), src);
  }
}

// One block per token: the partials of the nodes it went to, in node order, plus biases, rounded once.
template <bool kExact>
__global__ void __launch_bounds__(kThreads) combine_finish_kernel(PeerMemory mem, InternodeRegion region,
                                                                  InternodeCombineShape s, InternodeCombineLayout l,
                                                                  InternodeCombineIn in, InternodeCombineOut out,
                                                                  const int* token, uint32_t signature) {
  __shared__ int went[64];
  __shared__ int num_went;
  const Topology topo(mem, s.ranks_per_node);
  const int t = blockIdx.x, T = s.num_tokens, H = s.hidden, L = topo.per_node, R = topo.num_ranks;
  const uint32_t seq = static_cast<uint32_t>(token[0]);
  const WaitContext wait = wait_context(mem, op_kind(s), signature);
  const char* half = mem.local + region.offset + (seq & 1u) * region.half_stride;
  const uint64_t* signals = reinterpret_cast<const uint64_t*>(half + l.partial_signals);
  for (int m = threadIdx.x; m < topo.nodes; m += blockDim.x)
    wait_call_signal(signals + m, seq, signature, wait, WaitKind::kPartialSums, m * L + topo.local);
  if (threadIdx.x == 0) {
    num_went = 0;
    for (int m = 0; m < topo.nodes && num_went < 64; ++m) {
      bool any = false;
      for (int d = 0; d < L; ++d) any |= in.is_token_in_rank[t * R + m * L + d];
      if (any) went[num_went++] = m;
    }
  }
  __syncthreads();
  for (int ch = threadIdx.x * 8; ch < H; ch += blockDim.x * 8) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < num_went; ++i) {
      RowValues<kExact>::add_to(acc, half + l.partials + (static_cast<size_t>(went[i]) * T + t) * l.partial_bytes +
                                             ch * RowValues<kExact>::kBytes);
    }
    for (int b = 0; b < s.num_bias; ++b) {
      accumulate(acc, *reinterpret_cast<const uint4*>(in.bias[b] + static_cast<size_t>(t) * H + ch));
    }
    *reinterpret_cast<uint4*>(out.x + static_cast<size_t>(t) * H + ch) = pack_bf16x8<uint4>(acc);
  }
  if (out.weights != nullptr && threadIdx.x < s.top_k) {
    float w = 0.0f;
    for (int i = 0; i < num_went; ++i)
      w += reinterpret_cast<const float*>(half + l.partials + (static_cast<size_t>(went[i]) * T + t) * l.partial_bytes +
                                          H * RowValues<kExact>::kBytes)[threadIdx.x];
    out.weights[t * s.top_k + threadIdx.x] = w;
  }
}

// Combine's kernels after the call starts: rows returned in f32 (kGrouped: pair sums) or bf16, and
// partials in f32 (kExact) or bf16.
template <bool kGrouped, bool kExact>
void launch_combine_kernels(const InternodeCombineCall& call, uint32_t signature, const InternodeCombineIn& in,
                            const InternodeCombineOut& out, cudaStream_t stream) {
  const InternodeCombineShape& s = call.shape;
  combine_return_kernel<kGrouped><<<kInternodeReturnBlocks, kThreads, 0, stream>>>(
      call.mem, call.region, s, call.layout, in, out.token, signature);
  combine_reduce_kernel<kExact, kGrouped><<<call.mem.num_ranks / s.ranks_per_node, kThreads, 0, stream>>>(
      call.mem, call.traffic, call.region, s, call.layout, in.forwarded, out.token, signature);
  if (s.num_tokens > 0) {
    const int lanes = (s.hidden / 8 + kWarpSize - 1) / kWarpSize * kWarpSize;
    const int threads = std::max(kWarpSize, std::min(kThreads, lanes));
    combine_finish_kernel<kExact><<<s.num_tokens, threads, 0, stream>>>(call.mem, call.region, s, call.layout, in,
                                                                        out, out.token, signature);
  }
}

}  // namespace

cudaError_t launch_internode_dispatch(const InternodeDispatchCall& call, const InternodeDispatchIn& in,
                                      const InternodeDispatchOut& out, cudaStream_t stream) {
  const InternodeDispatchShape& s = call.shape;
  const int nodes = call.mem.num_ranks / s.ranks_per_node;
  const int recv_blocks = std::max(1, std::min(64, (s.capacity + kWarps - 1) / kWarps));
  const uint32_t signature = signature_of(call).value;
  start_call_kernel<<<1, kWarpSize, 0, stream>>>(call.mem, kInternodeDispatchCall, signature, out.token);
  dispatch_send_kernel<<<nodes + 1, kThreads, s.num_tokens * sizeof(int), stream>>>(
      call.mem, call.traffic, call.region, s, call.layout, in, out.token, signature);
  forward_kernel<<<nodes, kThreads, 0, stream>>>(call.mem, call.region, s, call.layout, out.token, signature,
                                                 out.forwarded);
  // A first grouped dispatch's receive blocks also hold build_bases' table.
  const int bases = s.grouped && s.has_ids ? (call.mem.num_ranks + 1) * (s.num_experts / call.mem.num_ranks) : 0;
  const size_t shared_bytes = static_cast<size_t>(call.mem.num_ranks + 1 + bases) * sizeof(int);
  if (s.grouped) {
    dispatch_recv_kernel<true><<<recv_blocks, kThreads, shared_bytes, stream>>>(
        call.mem, call.region, s, call.layout, in.is_token_in_rank, out.token, signature, out, call.expert_alignment);
  } else {
    dispatch_recv_kernel<false><<<recv_blocks, kThreads, shared_bytes, stream>>>(
        call.mem, call.region, s, call.layout, in.is_token_in_rank, out.token, signature, out, call.expert_alignment);
  }
  return cudaGetLastError();
}

cudaError_t launch_internode_combine(const InternodeCombineCall& call, const InternodeCombineIn& in,
                                     const InternodeCombineOut& out, cudaStream_t stream) {
  const InternodeCombineShape& s = call.shape;
  const uint32_t signature = signature_of(call).value;
  start_call_kernel<<<1, kWarpSize, 0, stream>>>(call.mem, kInternodeCombineCall, signature, out.token);
  if (is_grouped(s)) {
    if (s.exact_partials) {
      launch_combine_kernels<true, true>(call, signature, in, out, stream);
    } else {
      launch_combine_kernels<true, false>(call, signature, in, out, stream);
    }
  } else if (s.exact_partials) {
    launch_combine_kernels<false, true>(call, signature, in, out, stream);
  } else {
    launch_combine_kernels<false, false>(call, signature, in, out, stream);
  }
  return cudaGetLastError();
}

}  // namespace jax_deepep
