// What the intranode kernels (dispatch, combine) share beyond cuda/toolbox.cuh: their launch
// shape, the warp groups serving one peer each, ring slot addresses, row copies and a sender
// group's two ring steps (wait for space, publish the tail).
#pragma once

#include <cstdint>

#include "cuda/bulk_copy.cuh"
#include "cuda/comm_layout.h"
#include "cuda/intranode.h"
#include "cuda/memory_order.cuh"
#include "cuda/rank_info.h"
#include "cuda/toolbox.cuh"
#include "cuda/wait.cuh"
#include "cuda/warp_copy.cuh"

namespace jax_deepep {

constexpr int kIntranodeSharedBytes = kWarps * kBulkWarpBytes;  // every warp's bulk-copy staging

// Blocks of a dispatch or combine launch: a sender and a receiver block per channel, or with one
// rank (nothing crosses ranks) one block per channel and twice the channels.
inline int intranode_blocks(const RankInfo& info, RingShape& ring) {
  if (info.num_ranks > 1) return 2 * ring.num_channels;
  ring.num_channels *= 2;
  return ring.num_channels;
}

// The dispatch and combine kernels each take every warp's bulk-copy staging in shared memory.
template <typename Args>
cudaError_t allow_intranode_shared_memory(void (*kernel)(RankInfo, Args)) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kIntranodeSharedBytes);
}

// A dispatch or combine launch: intranode_blocks blocks, each of kThreads with that staging.
template <typename Args>
cudaError_t launch_intranode(void (*kernel)(RankInfo, Args), const RankInfo& info, Args args, cudaStream_t stream) {
  const int blocks = intranode_blocks(info, args.ring);
  kernel<<<blocks, kThreads, kIntranodeSharedBytes, stream>>>(info, args);
  return cudaGetLastError();
}

// Number of tokens before `t` (t may equal T) that this rank sends to rank `dst`.
__device__ __forceinline__ int sent_before(const int32_t* send_count_before, const bool* is_token_in_rank,
                                           int num_tokens, int num_ranks, int t, int dst) {
  if (t < num_tokens) return send_count_before[static_cast<int64_t>(t) * num_ranks + dst];
  if (num_tokens == 0) return 0;
  const int64_t last = static_cast<int64_t>(num_tokens - 1) * num_ranks + dst;
  return send_count_before[last] + (is_token_in_rank[last] ? 1 : 0);
}

// Warp role inside a block: warps are split into groups, each serving one rank.
struct PeerGroup {
  int peer;            // the rank this group serves; >= num_ranks for idle warps
  int warp_in_group;
  int warps;           // warps per group
  int barrier_id;      // named barrier of the group (1..kMaxRanks)
  bool leader;         // lane 0 of the group's first warp

  __device__ __forceinline__ int threads() const { return warps * 32; }
};

// Group g of `groups` equal groups (the warps past the last one are idle), serving rank g.
__device__ __forceinline__ PeerGroup warp_group(int groups) {
  const int warp = threadIdx.x / 32;
  PeerGroup g;
  g.warps = kWarps / groups;
  g.peer = warp / g.warps;
  g.warp_in_group = warp % g.warps;
  g.barrier_id = g.peer + 1;
  g.leader = g.warp_in_group == 0 && threadIdx.x % 32 == 0;
  return g;
}

// One group per rank, this one's included.
__device__ __forceinline__ PeerGroup peer_group(int num_ranks) { return warp_group(num_ranks); }

// One group per peer (num_ranks > 1): a sender block spends no warp on this rank.
__device__ __forceinline__ PeerGroup peer_group_without(int num_ranks, int me) {
  PeerGroup g = warp_group(num_ranks - 1);
  if (g.peer >= me) ++g.peer;  // idle warps stay >= num_ranks
  return g;
}

// Runs body(load(i)) for i = first, first + step, ... < last, calling load(i + step) before body(i):
// the next item's loads are in flight while the current one is copied.
template <typename Load, typename Body>
__device__ __forceinline__ void for_each_ahead(int first, int last, int step, Load load, Body body) {
  if (first >= last) return;
  auto next = load(first);
  for (int i = first; i < last; i += step) {
    const auto current = next;
    if (i + step < last) next = load(i + step);
    body(current);
  }
}

// Address of slot `index` (a monotonic total, wrapped here) of ring (channel, src) in `buffer`.
__device__ __forceinline__ char* ring_slot(char* buffer, int channel, int src, int num_ranks, int slots,
                                           int slot_bytes, uint64_t index) {
  return buffer + ring_position(channel, src, num_ranks, slots, slot_bytes) +
         static_cast<size_t>(index % static_cast<uint64_t>(slots)) * slot_bytes;
}

// One payload row: the bulk-copy engine when alignment allows, else the warp's own loads.
template <Source kSource>
__device__ __forceinline__ void copy_row(BulkPipe& pipe, char* dst, const char* src, int bytes, int lane) {
  if (bulk_copyable(dst, src, bytes)) {
    if (lane == 0) pipe.copy(dst, src, bytes);
  } else {
    warp_copy<kSource>(dst, src, bytes, lane);
  }
}

// Sender group, whole group: waits until the ring of (channel, this rank) on the group's peer has
// room for the slots up to total `end` (the peer publishes its head in this rank's header).
__device__ __forceinline__ void wait_ring_space(const WaitContext& wait, const PeerGroup& g, CommHeader* mine,
                                                int channel, uint64_t end, int slots) {
  if (g.leader) {
    wait_until(&mine->head[channel][g.peer], [&](uint64_t head) { return end <= head + slots; }, wait,
               WaitKind::kRingSpace, g.peer, channel);
  }
  named_barrier(g.barrier_id, g.threads());
}

// Sender group, whole group: once every warp's copies into the peer's ring have landed, publishes
// the slots up to total `end` as this rank's tail there.
__device__ __forceinline__ void publish_tail(BulkPipe& pipe, const PeerGroup& g, CommHeader* theirs, int channel,
                                             int me, uint64_t end) {
  if (threadIdx.x % 32 == 0) pipe.drain();  // its bulk stores are complete and ordered with generic ones
  __syncwarp();  // bar.sync is warp-aligned: the warp reconverges first
  named_barrier(g.barrier_id, g.threads());
  // The barrier orders every write of the group before the leader's fence (fences are cumulative),
  // so one system-scope fence makes them all visible before the tail that announces them.
  if (g.leader) {
    __threadfence_system();
    store_release(&theirs->tail[channel][me], end);
  }
}

}  // namespace jax_deepep
