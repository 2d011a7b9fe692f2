// The bounded rings of the internode kernels (internode_dispatch.cu, internode_combine.cu): where a
// ring's slots and signals lie, who writes them, and the warp groups that serve one ring each.
//
// Every hop of a row is a ring per channel: between nodes, from a rank's RDMA peer on a node (same
// local index) into `rdma_ring [source node][channel]` of the consumer's buffer; within a node, from
// a rank of the node into `nvl_ring [source local][channel]`. Each ring has three signals in the
// rank's `links` (one set per op family, dispatch or combine, since each family numbers its own calls):
//  - tail, in the consumer's buffer, written by the producer after the rows: rows written so far;
//  - end, in the consumer's buffer, written by the producer: the rows it sends this call (dispatch only;
//    a combine's consumers know what comes from the dispatch's routing);
//  - head, in the producer's buffer, written by the consumer: rows consumed so far. The consumer writes
//    head = 0 of call `seq` when its kernel starts, and a producer writes nothing into the ring or its
//    signals before it sees that (or a head of a later call: wait_ring_started): since a rank runs its
//    ops in order on one stream, it proves the consumer finished every earlier op, so every op may lay
//    its rings over the whole buffer.
// So every signal has one writer (the peer of its link), and every value carries the op's signature and
// the call number (call_signal): no one resets a signal, and a peer at another op fails the wait at once.
//
// A producer whose consumer's buffer NVSHMEM maps here writes rows and signals through the mapping
// with every warp of its group: always within a node, and across nodes where the nodes share NVLink or
// a GPU (unless the Buffer asked for puts only: PeerMemory::peer is null then). Any other producer
// puts: it stages rows in its own send ring (`staging`, symmetric memory, which the NIC can read; XLA's
// arrays are not registered) and puts a batch with one ordered put-with-signal (the tail lands after
// the rows), as DeepEP does. nvshmem_fence before every put signal keeps a link's signals in the
// order they were written, so a late value never overwrites a newer one; a quiet at the end of each
// putting warp completes its puts before the kernel ends, so the next op may reuse the staged rows.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/internode.cuh"
#include "cuda/memory_order.cuh"
#include "cuda/nvshmem_peers.cuh"
#include "cuda/toolbox.cuh"

namespace jax_deepep {

struct Topology {
  int rank, num_ranks, per_node, nodes, node, local;
  __device__ explicit Topology(const PeerMemory& mem, int ranks_per_node)
      : rank(mem.rank), num_ranks(mem.num_ranks), per_node(ranks_per_node), nodes(mem.num_ranks / ranks_per_node),
        node(mem.rank / ranks_per_node), local(mem.rank % ranks_per_node) {}
  __device__ int rdma_peer(int on_node) const { return on_node * per_node + local; }
  __device__ int node_rank(int local_rank) const { return node * per_node + local_rank; }
};

// Consecutive warps of a block serving one ring (or one instance of a role) each, in step through a
// named barrier (or __syncwarp when a group is one warp).
struct WarpGroup {
  int index;   // which instance the group serves first; it serves index, index + count, ...
  int count;   // groups of the role
  int warp;    // this warp within the group
  int warps;   // warps per group
  int barrier; // named barrier id of the group (groups of several warps)

  __device__ bool leader() const { return warp == 0 && threadIdx.x % kWarpSize == 0; }
  __device__ bool leader_warp() const { return warp == 0; }
  __device__ void sync() const {
    if (warps == 1) {
      __syncwarp();
    } else {
      __syncwarp();  // bar.sync is warp-aligned: the warp reconverges first
      named_barrier(barrier, warps * kWarpSize);
    }
  }
};

// Warps [first, first + total) of the block as min(instances, total) equal groups (warps past the last
// group idle: index >= count); groups of several warps take barriers first_barrier + index.
__device__ __forceinline__ WarpGroup warp_groups(int first, int total, int instances, int first_barrier) {
  WarpGroup g;
  g.count = max(1, min(instances, total));
  g.warps = total / g.count;
  const int w = static_cast<int>(threadIdx.x) / kWarpSize - first;
  g.index = w / g.warps;
  g.warp = w % g.warps;
  g.barrier = first_barrier + g.index;
  return g;
}

// Whole warp: the lane of the k-th (from 0) set bit of `mask`, alike on every lane.
__device__ __forceinline__ int nth_set_lane(unsigned mask, int k, int lane) {
  const bool it = ((mask >> lane) & 1u) != 0 && __popc(mask & ((1u << lane) - 1u)) == k;
  return __ffs(__ballot_sync(0xffffffffu, it)) - 1;
}

// The signals of link `link` (an RDMA peer's node, or nodes + a local rank) and channel `channel` in
// the buffer at `base` (this rank's, a mapped peer's, or this rank's address of a remote peer's).
struct LinkSignals {
  uint64_t* tail;
  uint64_t* head;
  uint64_t* end;  // [1 + 2 L]
};

__device__ __forceinline__ LinkSignals link_signals(char* base, size_t links, const InternodeSignals& s, int link,
                                                    int channel) {
  uint64_t* words = reinterpret_cast<uint64_t*>(
      base + links + (static_cast<size_t>(link) * kInternodeMaxChannels + channel) * s.link_bytes);
  return {words, words + 1, words + 2};
}

// The slots of one ring, addressed by row (rows count from 0 in each call).
struct RingSlots {
  char* first;
  int slots;
  size_t bytes;
  __device__ char* slot(int row) const { return first + static_cast<size_t>(row % slots) * bytes; }
};

// Ring [source][channel] of `slots` slots of `bytes` at `base + offset`.
__device__ __forceinline__ RingSlots ring_slots(char* base, size_t offset, int source, int channel, int channels,
                                                int slots, size_t bytes) {
  return {base + offset + (static_cast<size_t>(source) * channels + channel) * slots * bytes, slots, bytes};
}

// The address of `local` (in this PE's buffer) in the buffer of PE `pe`, which NVSHMEM maps here
// (any rank of this node; a rank of another node where the Buffer maps other nodes).
template <typename T>
__device__ __forceinline__ T* mapped(const PeerMemory& mem, int pe, T* local) {
  return reinterpret_cast<T*>(mem.peer[pe] + (reinterpret_cast<char*>(local) - mem.local));
}

// The address through which this PE writes `word` (its address in this PE's buffer) of PE `pe`'s
// buffer: the symmetric address itself for puts, else the mapping.
template <typename T>
__device__ __forceinline__ T* signal_address(const PeerMemory& mem, T* word, int pe, bool puts) {
  return puts ? word : mapped(mem, pe, word);
}

// Sets a signal at `at` (from signal_address) of PE `pe`: a put fenced after this thread's earlier
// puts to pe, else a release store through the mapping.
__device__ __forceinline__ void set_signal(uint64_t* at, uint64_t value, int pe, bool puts) {
  if (puts) {
    nvshmem_fence();
    put_value(at, value, pe);
  } else {
    store_release(at, value);
  }
}

// What a ring's waits and signals carry: the op's wait context (with its signature) and the call.
struct RingCall {
  WaitContext wait;
  uint32_t seq;
  __device__ uint64_t signal(int count) const { return call_signal(wait.signature, seq, count); }

  // The context of a wait on a role of a rank of this node (`same_node`, this rank included) or of
  // another node. A wait on this node gives up after twice the timeout: every role waits on other
  // nodes itself (with the timeout), so when a rank stalls, the wait on that rank gives up first and
  // the error names it, not a rank of this node that waits on it in turn. (Token counts need none of
  // this: nobody waits before writing them.)
  __device__ WaitContext on(bool same_node) const {
    WaitContext w = wait;
    if (same_node) w.timeout_ns *= 2;
    return w;
  }
};

// Leader: waits until the ring whose head is `head` (in this rank's buffer, written by its consumer
// `peer`) has room for rows up to `rows` (of `slots`); returns the head seen.
__device__ __forceinline__ int wait_ring_space(const uint64_t* head, const RingCall& call, bool same_node, int rows,
                                               int slots, int peer, int channel) {
  return wait_call_count(head, call.seq, call.wait.signature, rows - slots, call.on(same_node),
                         WaitKind::kInternodeRingSpace, peer, channel);
}

// Leader: waits until the consumer of the ring whose head is `head` (in this rank's buffer, written by
// `peer`) has started this call or a later one, and returns the rows it has freed in this call. A
// consumer that expects no rows of this producer in a call (a combine's finisher or reducer skips the
// rings that have none for it) may finish the call and start the next before this producer reads its
// head 0: its newer head then stands for this call too, and this producer has no rows to put.
__device__ __forceinline__ int wait_ring_started(const uint64_t* head, const RingCall& call, bool same_node, int peer,
                                                 int channel) {
  const uint32_t seq = call.seq;
  const auto ahead = [seq](uint64_t v) { return static_cast<uint32_t>((v >> 16) - seq) & 0xffffu; };
  const uint64_t value = wait_until(
      head, [&ahead](uint64_t v) { return ahead(v) < 0x8000u; }, call.on(same_node), WaitKind::kInternodeRingSpace,
      peer, channel);
  return ahead(value) != 0 ? 0 : checked_signal_count(value, call.wait.signature, call.wait, peer);
}

// Leader: waits until the ring whose tail is `tail` (in this rank's buffer, written by its producer
// `peer`) holds more than `rows` rows; returns how many it holds.
__device__ __forceinline__ int wait_ring_data(const uint64_t* tail, const RingCall& call, bool same_node, int rows,
                                              int peer, int channel) {
  return wait_call_count(tail, call.seq, call.wait.signature, rows + 1, call.on(same_node),
                         WaitKind::kInternodeRingData, peer, channel);
}

// Waits for the end count `end` (in this rank's buffer, written by the ring's producer `peer`) of this
// call and returns it (dispatch: what a ring carries).
__device__ __forceinline__ int wait_ring_end(const uint64_t* end, const RingCall& call, bool same_node, int peer,
                                             int channel) {
  return wait_call_count(end, call.seq, call.wait.signature, 0, call.on(same_node), WaitKind::kInternodeRingEnd,
                         peer, channel);
}

// A producer's side of one ring, held alike by every warp of the group that fills it. Rows are
// written at slot(k) (the consumer's ring through the mapping, or this PE's send ring in staging when
// it `puts`) and become the consumer's once published: a stored tail, or a put-with-signal. `shared`
// is the group's word in shared memory through which the leader hands the head it saw to the group.
struct RingProducer {
  RingSlots write;        // where this PE writes rows
  RingSlots target;       // the consumer's ring, as this PE addresses it (symmetric: puts)
  uint64_t* tail;         // the tail in the consumer's buffer (signal_address)
  const uint64_t* head;   // in this PE's buffer, written by the consumer
  int pe, channel;
  bool same_node;         // the consumer is on this node (its waits: RingCall::on)
  bool puts;              // rows and signals go as nvshmem puts, not through a mapping
  int* shared;
  int rows, published;    // rows written and rows published in this call

  __device__ char* slot(int k) const { return write.slot(rows + k); }

  // Whole group, first: waits for the consumer's head of this call or a later one (it has started the
  // call, so it is done with every earlier op), before anything of this call goes into the ring.
  __device__ void start(const WarpGroup& g, const RingCall& call) {
    rows = published = 0;
    if (g.leader()) *shared = wait_ring_started(head, call, same_node, pe, channel);
    g.sync();
  }

  // Whole group: room for `n` more rows (n <= slots). Publishes what is written first, so that a
  // consumer holding every published row can free the slots this waits for.
  __device__ void reserve(const WarpGroup& g, const RingCall& call, int n) {
    if (rows + n <= *shared + write.slots) return;
    g.sync();  // every warp has read *shared and written its rows
    if (published < rows) publish(g, call);
    if (g.leader()) *shared = wait_ring_space(head, call, same_node, rows + n, write.slots, pe, channel);
    g.sync();
  }

  // Whole group, once every warp wrote the rows of this step: `n` more rows, published once a batch
  // of them is waiting.
  __device__ void advance(const WarpGroup& g, const RingCall& call, int n, int batch) {
    rows += n;
    if (rows - published < batch) return;
    g.sync();
    publish(g, call);
  }

  // Whole group, last: publishes the rest; a putting producer's puts complete before it returns, so the
  // next op may reuse its staged rows. A ring that got no rows gets its tail too: every tail is written
  // in every call, so a consumer never finds one so old that its 16-bit call number passes for this call's.
  __device__ void finish(const WarpGroup& g, const RingCall& call) {
    if (published < rows) {
      g.sync();
      publish(g, call);
    } else if (rows == 0 && g.leader()) {
      set_signal(tail, call.signal(0), pe, puts);
    }
    if (puts && g.leader()) nvshmem_quiet();
  }

  // Leader warp, after a group sync: rows [published, rows) become the consumer's.
  __device__ void publish(const WarpGroup& g, const RingCall& call) {
    if (g.leader_warp()) {
      if (!puts) {
        // The barrier ordered the group's writes before the leader's fence (fences are cumulative).
        if (g.leader()) {
          __threadfence_system();
          store_release(tail, call.signal(rows));
        }
      } else {
        if (threadIdx.x % kWarpSize == 0) {
          __threadfence_system();  // the staged rows before the NIC reads them
          nvshmem_fence();         // after this link's earlier signals
        }
        __syncwarp();
        // Up to the end of the ring, then from its start: each piece signals the tail it completes.
        for (int from = published; from < rows;) {
          const int to = min(rows, (from / write.slots + 1) * write.slots);
          nvshmemx_putmem_signal_nbi_warp(target.slot(from), write.slot(from), (to - from) * write.bytes, tail,
                                          call.signal(to), NVSHMEM_SIGNAL_SET, pe);
          if (to < rows && threadIdx.x % kWarpSize == 0) nvshmem_fence();
          __syncwarp();
          from = to;
        }
      }
    }
    published = rows;
  }
};

// A consumer's side of one ring from a rank of this node (the forwarders read the rings from other
// nodes through their own tables), held alike by every warp of the group that drains it.
struct RingConsumer {
  RingSlots read;         // the ring, in this PE's buffer
  const uint64_t* tail;   // in this PE's buffer, written by the producer
  uint64_t* head;         // the head in the producer's buffer, through the mapping
  int pe, channel;
  int* shared;            // the group's word through which the leader hands on the tail it saw
  int consumed;           // rows released in this call

  // Whole group, first: tells the producer that this call started (head 0).
  __device__ void start(const WarpGroup& g, const RingCall& call) {
    consumed = 0;
    if (g.leader()) store_release(head, call.signal(0));
  }

  // Whole group: waits until the ring holds more than `rows` rows; returns how many it holds.
  __device__ int wait_rows(const WarpGroup& g, const RingCall& call, int rows) {
    g.sync();  // every warp has read *shared
    if (g.leader()) *shared = wait_ring_data(tail, call, true, rows, pe, channel);
    g.sync();
    return *shared;
  }

  // Leader: rows up to `rows` are read; the producer may refill their slots.
  __device__ void release(const RingCall& call, int rows) {
    if (rows > consumed) store_release(head, call.signal(rows));
    consumed = rows;
  }
};

// One op's rings as this rank sees them: the link signals of its family (dispatch or combine) and the
// rings of its Config. Rings from other nodes are indexed by the source node, rings within a node by
// the source's local index.
struct OpRings {
  const PeerMemory& mem;
  const InternodeSignals& signals;
  const InternodeRings& rings;
  size_t links;  // signals.dispatch_links or signals.combine_links
  Topology topo;

  // Link `link` of channel `channel` as this rank addresses it (in any rank's buffer, mapped or put).
  __device__ LinkSignals link(int link, int channel) const {
    return link_signals(mem.local, links, signals, link, channel);
  }
  __device__ int local_link(int local) const { return topo.nodes + local; }

  // Whether this rank reaches PE `pe` by nvshmem puts: NVSHMEM maps no buffer of it here (a peer on
  // another node, across a network or with Buffer(internode_puts_only=True)).
  __device__ bool puts_to(int pe) const { return mem.peer[pe] == nullptr; }

  // The ring from node n's RDMA peer, and from rank l of this node, in this rank's buffer.
  __device__ RingSlots from_node(int n, int channel) const {
    return ring_slots(mem.local, rings.rdma_ring, n, channel, rings.channels, rings.rdma_slots, rings.rdma_slot_bytes);
  }
  __device__ RingSlots from_local(int l, int channel) const {
    return ring_slots(mem.local, rings.nvl_ring, l, channel, rings.channels, rings.nvl_slots, rings.nvl_slot_bytes);
  }

  // Sets the head of the ring from node n's RDMA peer (in that peer's buffer) to `value`.
  __device__ void set_node_head(int n, int channel, uint64_t value) const {
    const int pe = topo.rdma_peer(n);
    const bool puts = puts_to(pe);
    set_signal(signal_address(mem, link(topo.node, channel).head, pe, puts), value, pe, puts);
  }
  // Where this rank writes the head of the ring from rank l of this node.
  __device__ uint64_t* local_head(int l, int channel) const {
    return mapped(mem, topo.node_rank(l), link(local_link(topo.local), channel).head);
  }

  // The producer of the ring from this rank to its RDMA peer on node m: written through the mapping
  // where there is one (always for its own node), else staged and put.
  __device__ RingProducer to_node(int m, int channel, int* shared) const {
    const int pe = topo.rdma_peer(m);
    const bool puts = puts_to(pe);
    const RingSlots target = ring_slots(puts ? mem.local : mem.peer[pe], rings.rdma_ring, topo.node, channel,
                                        rings.channels, rings.rdma_slots, rings.rdma_slot_bytes);
    const RingSlots staged =
        ring_slots(mem.staging, 0, m, channel, rings.channels, rings.rdma_slots, rings.rdma_slot_bytes);
    return {puts ? staged : target, target, signal_address(mem, link(topo.node, channel).tail, pe, puts),
            link(m, channel).head, pe, channel, m == topo.node, puts, shared, 0, 0};
  }

  // The producer of the ring from this rank to rank d of its node.
  __device__ RingProducer to_local(int d, int channel, int* shared) const {
    const int pe = topo.node_rank(d);
    const RingSlots target = ring_slots(mem.peer[pe], rings.nvl_ring, topo.local, channel, rings.channels,
                                        rings.nvl_slots, rings.nvl_slot_bytes);
    return {target, target, mapped(mem, pe, link(local_link(topo.local), channel).tail),
            link(local_link(d), channel).head, pe, channel, true, false, shared, 0, 0};
  }

  // The consumer of the ring from rank l of this node.
  __device__ RingConsumer consumer_of_local(int l, int channel, int* shared) const {
    return {from_local(l, channel), link(local_link(l), channel).tail, local_head(l, channel), topo.node_rank(l),
            channel, shared, 0};
  }
};

}  // namespace jax_deepep
