// Internode normal mode (docs/API.md, across several nodes) on NVSHMEM: a token crosses the
// network once per destination node, to its "RDMA peer" there (same local index), which forwards
// it over NVLink to the ranks of that node that need it. Combine runs the other way: each rank
// returns its rows to the forwarder over NVLink, the forwarder sums its node's rows in f32 and
// puts one partial per (token, node) back, rounded to bf16 as in DeepEP (or kept in f32 with
// exact_partials); the source sums the partials in f32 and rounds once.
//
// Every row's place is a pure function of the counts every rank notifies: receive order is
// (source rank, source token), as in intranode mode. The symmetric buffer holds a dispatch region
// and a combine region, each of two halves used by alternate calls (call number & 1); signals are
// 64-bit and carry the op's signature and the call number (nvshmem_peers.cuh: call_signal), so a
// rank whose peer runs another op or the same op with other shapes (anything that sizes the halves
// or says what a row holds: launch_internode_dispatch and _combine compute it) fails at the first
// signal of that peer, before reading any of its rows. Ranks of one node must be mapped (nvshmem_ptr).
//
// Expert-grouped dispatch and combine (docs/API.md, "Expert-grouped dispatch") are the same
// kernels: the dispatch moves tokens (room for all of them: capacity R * T) and its final receiver
// writes each landed row straight to its grouped rows, one per (token, local expert) pair; the
// combine returns, per token-level row, the f32 sum of its weighted pair rows instead of a bf16 row.
// They have OpKinds of their own, which their signatures carry: a grouped op meeting a plain one on
// another rank fails at once, naming both.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/nvshmem_peers.cuh"

namespace jax_deepep {

constexpr int kInternodeMaxTopk = 32;
constexpr int kInternodeMaxRanksPerNode = 8;
constexpr int kInternodeMaxTokens = 32767;  // counts travel in 16 bits of a signal (call_signal)
constexpr int kInternodeReturnBlocks = 32;  // blocks of the combine's return kernel (each signals)
// Every receive block of a first grouped dispatch keeps a table of (R + 1) * E_l row bases in shared
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

// One dispatched token (inbox and landing rows): a 16-byte header (source rank, source token,
// mask of the node's ranks it goes to), K ids, K weights, K prefixes (a first grouped dispatch:
// each pair's position among its source's earlier tokens of that expert), then each part, each
// 16-byte aligned. As jax_deepep/sizes.py:internode_dispatch_layout computes it (the handler
// passes it on).
struct InternodeDispatchLayout {
  size_t row_bytes, ids_at, weights_at, prefix_at, part_at[2];
  // Within one half of the dispatch region: the signals (64-bit, call_signal) first, in the order
  // counts, inbox_signals, forward_signals, expert_counts, at offsets set by R, L and E alone, so a
  // peer's signal lands where this rank waits for it whatever its call's shapes; then the rows.
  size_t counts;           // signals [R src][R dst]: tokens src sends to dst
  size_t expert_counts;    // signals [R src][E / R]: tokens src sends to each of this rank's experts
                           // (grouped: its pairs, a token's repeats of an expert once)
  size_t inbox;            // rows [nodes][T]: tokens from this rank's RDMA peer on each node
  size_t inbox_signals;    // signals [nodes]: row counts
  size_t landing;          // rows [N]: the received tokens in their final order
  size_t forward_signals;  // signals [L forwarder][nodes source node]: forwarded
  size_t half_bytes;       // what one call uses
  size_t staging_bytes;    // put sources: rows [nodes][T]
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

// As jax_deepep/sizes.py:internode_combine_layout computes it.
struct InternodeCombineLayout {
  size_t return_bytes;   // a row returned to its forwarder: bf16 [H] (grouped: f32), then f32 weights [K]
  size_t partial_bytes;  // a node's partial sum for a token: f32 or bf16 [H], then f32 weights [K]
  // Within one half of the combine region: the signals (64-bit, call_signal) first, at offsets set
  // by R and L alone (return_signals, partial_signals), then the rows.
  size_t returns;         // rows [L returning rank][nodes][T]
  size_t return_signals;  // signals [L][kInternodeReturnBlocks]
  size_t partials;        // rows [nodes][T]
  size_t partial_signals; // signals [nodes]
  size_t half_bytes;
  size_t staging_bytes;   // partial rows [nodes][T]
};

// Where an op's region lies in the symmetric buffer (jax_deepep/sizes.py:internode_regions): the
// dispatch region starts it, the combine region follows. Each holds two halves used by alternate
// calls; the second starts half_stride in, whatever the call's sizes, so consecutive calls of
// different sizes never overlap.
struct InternodeRegion {
  size_t offset;
  size_t half_stride;
};

// Device counters of this PE's network traffic: dispatch rows and bytes, combine rows and bytes.
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
  const int* src_rank;            // [N]
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
  InternodeRegion region;
  InternodeDispatchShape shape;
  InternodeDispatchLayout layout;
  int expert_alignment;  // per-expert counts are rounded up to a multiple of it
};

struct InternodeCombineCall {
  PeerMemory mem;
  InternodeTraffic traffic;
  InternodeRegion region;
  InternodeCombineShape shape;
  InternodeCombineLayout layout;
};

}  // namespace jax_deepep
