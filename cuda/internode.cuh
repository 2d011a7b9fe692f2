// Internode normal mode (docs/API.md, across several nodes; docs/INTERNODE.md) on NVSHMEM: a token
// crosses the network once per destination node, to its "RDMA peer" there (same local index), which
// forwards it over NVLink to the ranks of that node that need it. Combine runs the other way: each rank
// returns its rows to the forwarder over NVLink, the forwarder sums its node's rows in f32 and puts one
// partial per (token, node) back, rounded to bf16 as in DeepEP (or kept in f32 with exact_partials);
// the source sums the partials in f32 and rounds once.
//
// One persistent kernel per op (cuda/internode_dispatch.cu, cuda/internode_combine.cu): every hop is a
// bounded ring per channel (cuda/internode_rings.cuh), so the producer, the forwarder and the receiver
// of a row run at once and the symmetric buffer holds rings, not every row. Every row's final place
// is a pure function of the counts every rank notifies: receive order is (source rank, source token),
// as in intranode mode. Signals are 64-bit and carry the op's signature and the call number
// (nvshmem_peers.cuh: call_signal), so a rank whose peer runs another op or the same op with other
// shapes or Config (anything that places a row or says what it holds: launch_internode_dispatch and
// _combine compute it) fails at the first signal of that peer, before reading any of its rows. Ranks
// of one node must be mapped (nvshmem_ptr); a rank of another node that is mapped too (NVLink between
// nodes, or one GPU) is written through the mapping like them, unless the Buffer asked for puts only.
//
// Expert-grouped dispatch and combine (docs/API.md, "Expert-grouped dispatch") are the same kernels:
// the dispatch moves tokens (room for all of them: capacity R * T) and its final receiver writes each
// row straight to its grouped rows, one per (token, local expert) pair; the combine returns, per
// token-level row, the f32 sum of its weighted pair rows instead of a bf16 row. They have OpKinds of
// their own, which their signatures carry: a grouped op meeting a plain one on another rank fails at
// once, naming both.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/nvshmem_peers.cuh"

namespace jax_deepep {

constexpr int kInternodeMaxTopk = 32;
constexpr int kInternodeMaxRanksPerNode = 8;
constexpr int kInternodeMaxTokens = 32767;  // counts travel in 16 bits of a signal (call_signal)
// Signals of every channel up to this lie apart (jax_deepep/sizes.py INTERNODE_MAX_CHANNELS).
constexpr int kInternodeMaxChannels = 64;
// Room for the per-expert counts (jax_deepep/sizes.py INTERNODE_MAX_EXPERTS).
constexpr int kInternodeMaxExperts = 16384;
// Every sender block of a first grouped dispatch keeps a table of (R + 1) * E_l row bases in shared
// memory (jax_deepep/gpu/internode.py MAX_GROUPED_EXPERTS).
constexpr int kInternodeMaxGroupedExperts = 4096;

struct InternodeDispatchShape {
  int num_tokens;     // T per rank
  int capacity;       // N receive rows
  int top_k;          // K ids and/or weights per token (0: neither)
  bool has_ids, has_weights;
  int num_parts;      // 1 (bf16) or 2 (FP8 values + scales)
  int part_bytes[2];  // bytes per token of each part
  int num_experts;    // E (0 without ids)
  int ranks_per_node; // L
  bool grouped;       // expert-grouped: the outputs' parts are the grouped rows (InternodeGroupedOut)
  int grouped_capacity;  // N grouped rows (grouped), capacity being R * T token-level rows
};

// One dispatched token, in every ring: a 16-byte header (source rank, source token, mask of the
// destination node's ranks it goes to, its row there once forwarded (-1: dropped past the capacity)),
// K ids, K weights, K prefixes (a first grouped dispatch: each pair's position among its source's
// earlier tokens of that expert), then each part, each 16-byte aligned. As
// jax_deepep/sizes.py:internode_dispatch_layout computes it (the handler passes it on).
struct InternodeDispatchLayout {
  size_t row_bytes, ids_at, weights_at, prefix_at, part_at[2];
};

struct InternodeCombineShape {
  int num_tokens;  // T per rank
  int capacity;    // N
  int hidden;      // H (bf16 channels, a multiple of 8)
  int top_k;       // K weights per row (0: none)
  int num_bias;    // 0, 1 or 2 bf16 [T, H]
  int ranks_per_node;
  bool exact_partials;  // f32 partials (Buffer(exact_internode_combine=True)), else bf16
  int pair_top_k;       // expert-grouped: K pair rows per token-level row (f32 returned rows); 0: plain
};

// A row returned to its forwarder: bf16 [H] (grouped: f32), then f32 weights [K]; a node's partial
// sum for a token: f32 or bf16 [H], then f32 weights [K]. As jax_deepep/sizes.py:internode_combine_layout
// computes it.
struct InternodeCombineLayout {
  size_t return_bytes;
  size_t partial_bytes;
};

// Where the signals lie in every rank's symmetric buffer, at offsets that R and L alone set (so a
// peer's signal lands where this rank waits for it whatever its call's shapes and Config):
// jax_deepep/sizes.py:internode_signals. internode_rings.cuh says who writes which.
struct InternodeSignals {
  size_t link_bytes;      // one (link, channel): tail, head, then 1 + 2 L end counts
  size_t combine_links;   // [nodes RDMA peers + L local ranks][kInternodeMaxChannels] links of combine
  size_t dispatch_links;  // the same for dispatch
  size_t counts;          // [2 call parities][R src][R dst]: tokens src sends to dst
  size_t expert_counts;   // [2 call parities][kInternodeMaxExperts]: [R src][E / R] tokens src sends to
                          // each of this rank's experts (grouped: its pairs, a token's repeats of an expert once)
  size_t rings;           // where every op's rings start
};

// One op's rings, from its Config (jax_deepep/sizes.py:internode_rings).
struct InternodeRings {
  size_t channels;
  size_t rdma_slots, rdma_batch, rdma_slot_bytes;  // a ring from an RDMA peer, per channel
  size_t nvl_slots, nvl_batch, nvl_slot_bytes;     // a ring from a rank of this node, per channel
  size_t rdma_ring;      // [nodes source][channels][rdma_slots] rows
  size_t nvl_ring;       // [L source][channels][nvl_slots] rows
  size_t receive_bytes;  // where the rings end
  size_t staging_bytes;  // the send rings at the start of staging: [nodes destination][channels][rdma_slots] rows
};

// Device counters of what this PE sends to other nodes (put, or written through the mapping): dispatch
// rows and bytes, combine rows and bytes.
struct InternodeTraffic {
  unsigned long long* counters;  // [4]
};

struct InternodeDispatchIn {
  const void* part[2];
  const int* ids;                 // [T, K] or null
  const float* weights;           // [T, K] or null
  const int* prefix;              // [T, K]: a first grouped dispatch's pair prefixes, else null
  const bool* is_token_in_rank;   // [T, R]
  const int* tokens_per_rank;     // [R]: the layout's count of tokens bound for each rank
  const int* tokens_per_expert;   // [E]: the layout's count per expert (grouped: pairs), or null without ids
};

// The grouped arrays of an expert-grouped dispatch (N grouped rows, R * T token-level rows).
struct InternodeGroupedOut {
  int* pair_row;   // [R * T, K]: grouped row of (token-level row, k), -1 for none (repeats share
                   // their expert's row): written by a first dispatch, read by a cached one
  int* token_row;  // [N]: token-level row of each grouped row, -1 for padding: written by a first
                   // dispatch, read by a cached one
  int* expert;     // [N]: local expert of each row, -1 for padding (first dispatch), else null
  float* weight;   // [N]: the pair's weight (its token's weights for the expert, summed), or null
  int* num_rows;   // []: grouped rows needed, padding included (first dispatch), else null
  int* held;       // [E / R]: padded group sizes held within the N rows (first dispatch), else null
};

struct InternodeDispatchOut {
  void* part[2];            // [N, part bytes] (grouped: [grouped_capacity, part bytes])
  int* ids;                 // [N, K] local expert ids (-1 elsewhere), or null
  float* weights;           // [N, K], or null
  int* src_rank;            // [N] (-1 past the received rows)
  int* src_idx;             // [N]
  int* send_row;            // [T, R]: row of each token on each rank (-1 when not sent)
  int* recv_rank_prefix;    // [R]
  int* num_recv;            // []
  int* per_expert;          // [E / R] (rounded up to expert_alignment), or null
  int* forwarded;           // [nodes, T]: bit 31 when forwarded to this node, bits of the ranks that kept it
  int* token;               // [1]: the call number
  InternodeGroupedOut grouped;  // expert-grouped only
};

struct InternodeCombineIn {
  const uint16_t* y;              // bf16 [N, H] (grouped: the grouped rows)
  const float* weights;           // [N, K] (grouped: [grouped rows]) or null
  const float* row_weights;       // grouped: [grouped rows], what each pair row is weighted by, or null (1)
  const int* pair_row;            // grouped: [N, pair_top_k], else null
  const uint16_t* bias[2];        // bf16 [T, H] or null
  const int* recv_rank_prefix;    // [R]: the first received row of each source rank
  const int* src_idx;             // [N]
  const int* num_recv;            // []
  const bool* is_token_in_rank;   // [T, R]
  const int* forwarded;           // [nodes, T]
};

struct InternodeCombineOut {
  uint16_t* x;       // bf16 [T, H]
  float* weights;    // [T, K] or null
  int* token;        // [1]
};

// What an internode launch needs besides its arrays (launchers: cuda/launch.h).
struct InternodeDispatchCall {
  PeerMemory mem;
  InternodeTraffic traffic;
  InternodeSignals signals;
  InternodeRings rings;
  InternodeDispatchShape shape;
  InternodeDispatchLayout layout;
  int expert_alignment;  // per-expert counts are rounded up to a multiple of it
};

struct InternodeCombineCall {
  PeerMemory mem;
  InternodeTraffic traffic;
  InternodeSignals signals;
  InternodeRings rings;
  InternodeCombineShape shape;
  InternodeCombineLayout layout;
};

}  // namespace jax_deepep
