// Low-latency dispatch/combine kernels (layout and protocol: low_latency.cuh).
//
// Peers reachable over NVLink/P2P (mapped: nvshmem_ptr, or CUDA IPC within a node) get plain stores
// into their buffer and a release store of the signal; other peers get rows staged locally, puts,
// a quiet and then the signal put (remote_put.cuh; built with NVSHMEM only). Every wait gives up
// after mem.timeout_ns and fills the host-mapped error record instead of spinning forever (wait.cuh). Sends claim their half of each
// destination first, and the last block of each receive hands out the receipts that let the
// senders reuse it (low_latency.cuh).
#include "cuda/launch.h"

#include <cuda_fp8.h>

#include <algorithm>

#include "cuda/bf16x8.cuh"
#include "cuda/logfmt.cuh"
#include "cuda/memory_order.cuh"
#include "cuda/nvshmem_peers.cuh"
#include "cuda/remote_put.cuh"
#include "cuda/toolbox.cuh"
#include "cuda/wait.cuh"

namespace jax_deepep {
namespace {

constexpr int kChunkChannels = kWarpSize * 8;  // one warp chunk: 8 channels (16 bf16 bytes) per lane
// Chunks a warp loads before it stores any: several loads in flight per lane instead of one.
constexpr int kPassChunks = 4;
constexpr int kPassChannels = kPassChunks * kChunkChannels;
constexpr float kFp8Max = 448.0f;
constexpr float kInverseFp8Max = 1.0f / kFp8Max;
constexpr float kMinAmax = 1e-4f;  // keeps all-zero blocks from producing a zero scale

__device__ __forceinline__ size_t half_offset(uint32_t seq, const LowLatencyCall& c) {
  return static_cast<size_t>(seq % static_cast<uint32_t>(c.num_halves)) * c.layout.half_bytes;
}

__device__ __forceinline__ uint64_t* signals_at(char* base, uint32_t seq, const LowLatencyCall& c) {
  return reinterpret_cast<uint64_t*>(base + half_offset(seq, c) + c.layout.signal_offset);
}

// Receipts are kept per half (receipt_of): rank d's receipt of half seq % B holds the last call in
// that half d has received, whatever order the calls were received in.
__device__ __forceinline__ uint32_t* half_receipt(const LowLatencyCall& c, int kind, uint32_t seq, int rank) {
  return receipt_of(c.mem, kind, static_cast<int>(seq % static_cast<uint32_t>(c.num_halves)), rank);
}

// This rank's and a send's destination's receipts of every half (B at most), as a send reads them
// at its start (begin_send).
struct HalfReceipts {
  uint32_t own[kMaxLowLatencyHalves];
  uint32_t dst[kMaxLowLatencyHalves];
};

// Every send block, first: begin_call, then thread 0's check that call `seq` of `kind` may reuse the
// half of call seq - B, which this rank must have received already. If it has not, its receive runs
// after this send on the stream, and neither it nor any peer (every rank runs the same program) can
// ever hand out the receipt this send would wait for: fail now, naming the limit. The half depends on
// the call number, so the second warp reads the receipts of every half, this rank's (written by its
// earlier receives) and `dst`'s (for claim_half; acquired, as its wait does), beside thread 0's read
// of the number: the memory round trips before a send's work overlap. (Receipts start at 0, so the
// first B calls pass; the comparisons are of differences, so the call numbers may wrap.)
__device__ __forceinline__ uint32_t begin_send(const LowLatencyCall& c, int kind, const WaitContext& wait, int dst,
                                               HalfReceipts& receipts) {
  const int lane = static_cast<int>(threadIdx.x) - kWarpSize, half = lane % kMaxLowLatencyHalves;
  if (lane >= 0 && lane < kMaxLowLatencyHalves && half < c.num_halves) {
    receipts.own[half] = load_relaxed(receipt_of(c.mem, kind, half, c.mem.rank));
  } else if (lane >= kMaxLowLatencyHalves && lane < 2 * kMaxLowLatencyHalves && half < c.num_halves &&
             dst < c.mem.num_ranks) {
    receipts.dst[half] = load_acquire(receipt_of(c.mem, kind, half, dst));
  }
  const uint32_t seq = begin_call(c.mem, kind, c.signature);  // whose barrier covers the receipts too
  const uint32_t halves = static_cast<uint32_t>(c.num_halves);
  if (threadIdx.x == 0 && static_cast<int32_t>(receipts.own[seq % halves] - (seq - halves)) < 0) {
    fail_op(wait, WaitKind::kTooManyInFlight, c.mem.rank, -1, 0, c.num_halves);
  }
  return seq;
}

// Whole block, before writing into `dst`'s half of call `seq`: dst has received call seq - B, as its
// receipt read by begin_send already tells or thread 0 waits to see.
__device__ __forceinline__ void claim_half(const LowLatencyCall& c, int kind, uint32_t seq, int dst,
                                           const HalfReceipts& receipts, const WaitContext& wait) {
  const uint32_t halves = static_cast<uint32_t>(c.num_halves);
  if (threadIdx.x == 0) {
    const uint32_t previous = seq - halves;
    const auto received = [previous](uint32_t v) { return static_cast<int32_t>(v - previous) >= 0; };
    if (!received(receipts.dst[seq % halves])) {
      wait_until(half_receipt(c, kind, seq, dst), received, wait, WaitKind::kReceipt, dst, -1);
    }
  }
  __syncthreads();
}

// With one rank a receipt's only reader is this rank's later sends, kernels after the whole receive
// on the stream: the first block alone checks it and then writes it, with no count of finished blocks.
__device__ __forceinline__ bool is_solo_receipt_block(const LowLatencyCall& c) {
  return c.mem.num_ranks == 1 && blockIdx.x == 0 && blockIdx.y == 0;
}

// The last thread of every receive block (with one rank, of the first block), before reading: this
// rank has not received call `seq` yet (a second receive of one call could read a half that its
// senders already reuse). The last thread, so that the first ones (a token's top-k pairs, the signals
// of the first ranks) read meanwhile.
__device__ __forceinline__ void check_first_receive(const LowLatencyCall& c, int kind, uint32_t seq,
                                                    const WaitContext& wait) {
  if (threadIdx.x != blockDim.x - 1 || (c.mem.num_ranks == 1 && !is_solo_receipt_block(c))) return;
  const uint32_t own = load_relaxed(half_receipt(c, kind, seq, c.mem.rank));  // written by an earlier receive
  if (static_cast<int32_t>(own - seq) >= 0) fail_op(wait, WaitKind::kRepeatedReceive, c.mem.rank, -1);
}

// Whole block, last: the block has read what it needed of call `seq`; the launch's last block to
// finish gives every PE this rank's receipt of the call (after every block's reads: last_block_of_launch).
// This rank's own copy is read only by its later sends, later kernels of the stream: a plain store.
__device__ __forceinline__ void finish_receive(const LowLatencyCall& c, int kind, uint32_t seq) {
  __shared__ bool last;
  __syncthreads();  // with one rank: after the first block's check_first_receive
  if (c.mem.num_ranks == 1) {
    if (is_solo_receipt_block(c) && threadIdx.x == 0) *half_receipt(c, kind, seq, c.mem.rank) = seq;
    return;
  }
  if (threadIdx.x == 0) last = last_block_of_launch(c.mem.receive_blocks_done + kind);
  __syncthreads();
  if (!last) return;
  uint32_t* receipt = half_receipt(c, kind, seq, c.mem.rank);
  for (int pe = threadIdx.x; pe < c.mem.num_ranks; pe += blockDim.x) {
    if (pe == c.mem.rank) {
      *receipt = seq;
    } else {
      store_symmetric(c.mem, receipt, seq, pe);
    }
  }
}

// Smallest power of two >= s (s positive and normal), exactly.
__device__ __forceinline__ float round_up_pow2(float s) {
  uint32_t bits = __float_as_uint(s);
  if (bits & 0x7fffffu) bits = (bits & 0x7f800000u) + 0x800000u;
  return __uint_as_float(bits);
}

__device__ __forceinline__ uint32_t pack_fp8x2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}

// This lane's 8 channels of chunk `chunk` (channels [chunk * 256, +256)) of a bf16 row, zeros past
// the row's end.
__device__ __forceinline__ uint4 load_chunk(const __nv_bfloat16* row, int hidden, int chunk) {
  const int ch = chunk * kChunkChannels + threadIdx.x % kWarpSize * 8;
  return ch < hidden ? *reinterpret_cast<const uint4*>(row + ch) : make_uint4(0, 0, 0, 0);
}

// One lane's 8 channels of a chunk cast to e4m3 (a warp's chunk is two blocks of 128 channels, one
// per half-warp: every lane of a half gets its block's scale).
struct Fp8Piece {
  uint2 values;
  float scale;
};

// Whole warp: this lane's 8 channels (`raw`: its load_chunk) cast with the scale of its 128-channel
// block. The arithmetic of jax_deepep/fp8.py (and DeepEP): scale = amax * f32(1 / 448), values
// times 448 / amax (times 1 / scale, exact, when the scale is a power of two).
__device__ __forceinline__ Fp8Piece cast_piece(uint4 raw, bool round_scale) {
  float v[8];
  unpack_bf16x8(raw, v);
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) amax = fmaxf(amax, fmaxf(fabsf(v[2 * i]), fabsf(v[2 * i + 1])));
#pragma unroll
  for (int mask = 8; mask >= 1; mask /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, mask));
  amax = fmaxf(amax, kMinAmax);
  Fp8Piece p;
  p.scale = amax * kInverseFp8Max;
  float inverse = kFp8Max / amax;
  if (round_scale) {
    p.scale = round_up_pow2(p.scale);
    inverse = 1.0f / p.scale;
  }
  p.values.x = pack_fp8x2(v[0] * inverse, v[1] * inverse) | (pack_fp8x2(v[2] * inverse, v[3] * inverse) << 16);
  p.values.y = pack_fp8x2(v[4] * inverse, v[5] * inverse) | (pack_fp8x2(v[6] * inverse, v[7] * inverse) << 16);
  return p;
}

// Writes chunk `chunk` of a token (`raw`: this lane's load_chunk) into the staged row `dst`: bf16
// copied, or cast to e4m3 with one scale per 128 channels (16 lanes). The whole warp calls it.
__device__ void write_token_chunk(uint4 raw, char* dst, int hidden, int chunk, bool use_fp8, bool round_scale) {
  const int lane = threadIdx.x % kWarpSize;
  const int ch = chunk * kChunkChannels + lane * 8;
  const bool valid = ch < hidden;
  char* payload = dst + kRowHeaderBytes;
  if (!use_fp8) {
    if (valid) *reinterpret_cast<uint4*>(payload + ch * 2) = raw;
    return;
  }
  const Fp8Piece p = cast_piece(raw, round_scale);
  if (valid) {
    *reinterpret_cast<uint2*>(payload + ch) = p.values;
    if (lane % 16 == 0) reinterpret_cast<float*>(payload + hidden)[ch / kFp8Block] = p.scale;
  }
}

// Whole warp: pass `first / kPassChunks` of token t's row (the header with the first pass), bf16
// or FP8, written into `row` with every lane's kPassChunks loads in flight before any store.
__device__ __forceinline__ void write_token_pass(const __nv_bfloat16* x, int hidden, int t, int first, char* row,
                                                 bool use_fp8, bool round_scale) {
  const int chunks = (hidden + kChunkChannels - 1) / kChunkChannels;
  if (first == 0 && threadIdx.x % kWarpSize == 0) *reinterpret_cast<int4*>(row) = make_int4(t, 0, 0, 0);
  const __nv_bfloat16* src = x + static_cast<size_t>(t) * hidden;
  uint4 raw[kPassChunks];
#pragma unroll
  for (int u = 0; u < kPassChunks; ++u) raw[u] = load_chunk(src, hidden, first + u);
#pragma unroll
  for (int u = 0; u < kPassChunks; ++u)
    if (first + u < chunks) write_token_chunk(raw[u], row, hidden, first + u, use_fp8, round_scale);
}

// Grid-stride over (token, pass of kPassChunks chunks): each token's FP8 row as every expert it goes
// to receives it (header, e4m3 values, f32 scales), into `rows` [T] of `row_bytes`. Cast once per
// token here, the send copies the row to each of its experts instead of casting it once per expert.
// Small blocks: a decode step's few tokens (T = 128: 896 items) then reach every SM (in blocks of
// 512 threads, 56 of an H100's 132), so no SM's share of the memory traffic sets the time.
constexpr int kCastThreads = 128;
constexpr int kCastWarps = kCastThreads / kWarpSize;
__global__ void __launch_bounds__(kCastThreads) cast_tokens_kernel(LowLatencyShape s, const __nv_bfloat16* x,
                                                                   char* rows, size_t row_bytes, bool round_scale) {
  const int warps = gridDim.x * kCastWarps, passes = (s.hidden + kPassChannels - 1) / kPassChannels;
  for (int item = blockIdx.x * kCastWarps + threadIdx.x / kWarpSize; item < s.num_tokens * passes; item += warps) {
    const int t = item / passes;
    write_token_pass(x, s.hidden, t, item % passes * kPassChunks, rows + static_cast<size_t>(t) * row_bytes, true,
                     round_scale);
  }
}

// Whole block: rows [0, count) of `rows` become the cast rows of the slots' tokens, `vectors` 16-byte
// pieces each, a warp per (row, part of kPassChunks pieces per lane), so several loads are in flight.
__device__ __forceinline__ void copy_cast_rows(const char* cast_rows, const int* slot_token, int count, char* rows,
                                               size_t row_bytes, int vectors) {
  constexpr int kPartVectors = kPassChunks * kWarpSize;
  const int lane = threadIdx.x % kWarpSize, parts = (vectors + kPartVectors - 1) / kPartVectors;
  for (int item = threadIdx.x / kWarpSize; item < count * parts; item += kWarps) {
    const int j = item / parts, first = item % parts * kPartVectors + lane;
    const uint4* src = reinterpret_cast<const uint4*>(cast_rows + static_cast<size_t>(slot_token[j]) * row_bytes);
    uint4* dst = reinterpret_cast<uint4*>(rows + static_cast<size_t>(j) * row_bytes);
    uint4 piece[kPassChunks];
#pragma unroll
    for (int u = 0; u < kPassChunks; ++u)
      if (first + u * kWarpSize < vectors) piece[u] = src[first + u * kWarpSize];
#pragma unroll
    for (int u = 0; u < kPassChunks; ++u)
      if (first + u * kWarpSize < vectors) dst[first + u * kWarpSize] = piece[u];
  }
}

// Whether the token of pair i names expert `id` at an earlier k too: a token is sent to an expert
// once, at its first pair naming it; later repeats act like -1 (docs/API.md).
__device__ __forceinline__ bool names_expert_earlier(const int* topk_idx, int i, int top_k, int id) {
  for (int j = i - i % top_k; j < i; ++j)
    if (topk_idx[j] == id) return true;
  return false;
}

// One block per global expert e: finds the (t, k) pairs routed to e in (t, k) order (a token's
// first pair naming e; slot = rank among them), writes those tokens into slots [0, count) of (e's
// local index, this rank) on e's rank (bf16 rows from x, FP8 rows copied from cast_rows), then
// publishes count tagged with the call number. To this rank's own experts only each slot's header
// (the token index) goes: the receive reads those rows from x or cast_rows itself, one copy instead
// of two.
// The block begins the call (begin_send) and gives its number to `seq`.
__device__ __forceinline__ void dispatch_send_block(const LowLatencyCall& c, const __nv_bfloat16* x,
                                                    const char* cast_rows, const int* topk_idx, int* send_slot,
                                                    bool use_fp8, uint32_t& seq) {
  extern __shared__ int slot_token[];  // [M]: the token in each slot
  __shared__ BlockPrefix<1> matches;
  __shared__ HalfReceipts receipts;
  const PeerMemory& mem = c.mem;
  const LowLatencyShape& s = c.shape;
  const int e = blockIdx.x, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int experts_per_rank = s.num_experts / mem.num_ranks;
  const int dst = e / experts_per_rank, local = e % experts_per_rank;
  const int entries = s.num_tokens * s.top_k;
  const WaitContext wait = wait_context(mem, OpKind::kLowLatencyDispatch, c.signature);
  seq = begin_send(c, kDispatchCall, wait, dst, receipts);

  if (threadIdx.x == 0) matches.running[0] = 0;
  __syncthreads();
  // Each round's ids are loaded a round ahead, so the loads do not wait behind the rounds' barriers.
  int next_id = threadIdx.x < entries ? topk_idx[threadIdx.x] : -1;
  for (int start = 0; start < entries; start += kThreads) {
    const int i = start + threadIdx.x;
    const int id = next_id;
    next_id = i + kThreads < entries ? topk_idx[i + kThreads] : -1;
    const bool named = i < entries && id == e;
    const bool repeat = named && names_expert_earlier(topk_idx, i, s.top_k, id);
    const bool mine[1] = {named && !repeat};
    int slot[1];
    block_prefix(matches, mine, slot);
    if (mine[0]) {
      if (slot[0] < s.max_tokens) slot_token[slot[0]] = i / s.top_k;
      send_slot[i] = slot[0] < s.max_tokens ? slot[0] : -1;
    } else if (repeat || (e == 0 && i < entries && (id < 0 || id >= s.num_experts))) {
      send_slot[i] = -1;  // a repeat, and ids outside [0, E), go nowhere
    }
  }
  claim_half(c, kDispatchCall, seq, dst, receipts, wait);  // and slot_token is complete
  const int count = min(matches.running[0], s.max_tokens);

  const size_t row_bytes = c.layout.dispatch_row_bytes;
  const size_t half = half_offset(seq, c);
  const size_t first_row = (static_cast<size_t>(local) * mem.num_ranks + mem.rank) * s.max_tokens;
  const uint64_t signal = call_signal(c.signature, seq, count);
  const int signal_index = local * mem.num_ranks + mem.rank;
  if (dst == mem.rank) {  // read by this rank's receive, a later kernel of the stream: plain stores suffice
    char* const own = mem.local + half + first_row * row_bytes;
    for (int j = threadIdx.x; j < count; j += kThreads) {
      *reinterpret_cast<int4*>(own + j * row_bytes) = make_int4(slot_token[j], 0, 0, 0);
    }
    if (threadIdx.x == 0) signals_at(mem.local, seq, c)[signal_index] = signal;
    return;
  }
  char* const peer = mem.peer[dst];
  char* const rows = peer != nullptr ? peer + half + first_row * row_bytes
                                     : mem.staging + static_cast<size_t>(e) * s.max_tokens * row_bytes;
  const size_t bytes = dispatch_payload_bytes(s.hidden, use_fp8);
  if (use_fp8) {
    copy_cast_rows(cast_rows, slot_token, count, rows, row_bytes, static_cast<int>((bytes + 15) / 16));
  } else {
    const int passes = (s.hidden + kPassChannels - 1) / kPassChannels;
    for (int item = warp; item < count * passes; item += kWarps) {
      const int j = item / passes;
      write_token_pass(x, s.hidden, slot_token[j], item % passes * kPassChunks, rows + j * row_bytes, false, false);
    }
  }

  if (peer != nullptr) {
    __syncthreads();  // the release store of one thread covers the rows the whole block wrote
    if (threadIdx.x == 0) store_release(signals_at(peer, seq, c) + signal_index, signal);
    return;
  }
  __syncthreads();
  for (int j = warp; j < count; j += kWarps) {
    put_warp(mem.local + half + (first_row + j) * row_bytes, rows + j * row_bytes, bytes, dst);
  }
  __syncwarp();
  if (lane == 0) put_quiet();
  __syncthreads();
  if (threadIdx.x == 0) put_value(signals_at(mem.local, seq, c) + signal_index, signal, dst);
}

// Blocks of a send or dispatch receive resident on an SM at once, which their registers are capped
// to fit (the NVSHMEM build's 72-92 registers a thread left room for one block of kThreads, so a
// grid of E blocks ran in two waves); the dispatch receive's grid is one wave of them.
constexpr int kBlocksPerSm = 2;

// The block's send, which numbers the call (begin_send), and end_call after it.
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    dispatch_send_kernel(LowLatencyCall c, const __nv_bfloat16* x, const char* cast_rows, const int* topk_idx,
                         int* send_slot, int* token, bool use_fp8) {
  uint32_t seq;
  dispatch_send_block(c, x, cast_rows, topk_idx, send_slot, use_fp8, seq);
  end_call(c.mem, kDispatchCall, seq, token);
}

// Whole warp: pass `first / kPassChunks` of FP8 row `out_row` (`v`: this lane's pieces) into recv_x
// and its scales: f32, or UE8M0 bytes (the f32 exponents) four blocks to an int32, lowest block in
// the lowest byte (H is then a multiple of 512, so a pass holds whole words).
__device__ __forceinline__ void store_fp8_pass(const Fp8Piece (&v)[kPassChunks], const LowLatencyDispatchRecvArgs& a,
                                               size_t out_row, int hidden, int first) {
  const int lane = threadIdx.x % kWarpSize, groups = hidden / kFp8Block;
#pragma unroll
  for (int u = 0; u < kPassChunks; ++u) {
    const int ch = (first + u) * kChunkChannels + lane * 8;
    if (ch < hidden) *reinterpret_cast<uint2*>(static_cast<uint8_t*>(a.recv_x) + out_row * hidden + ch) = v[u].values;
    if (!a.use_ue8m0) {
      if (ch < hidden && lane % 16 == 0) static_cast<float*>(a.recv_scales)[out_row * groups + ch / kFp8Block] = v[u].scale;
    } else if (u % 2 == 1) {  // chunks u - 1 and u: a chunk's first block is its lanes 0-15, its second 16-31
      const uint32_t low = __float_as_uint(v[u - 1].scale) >> 23 & 0xffu;
      const uint32_t high = __float_as_uint(v[u].scale) >> 23 & 0xffu;
      const uint32_t word = low | __shfl_xor_sync(0xffffffffu, low, 16) << 8 | high << 16 |
                            __shfl_xor_sync(0xffffffffu, high, 16) << 24;
      if (ch < hidden && lane == 0)
        static_cast<int*>(a.recv_scales)[out_row * (groups / 4) + (ch - kChunkChannels) / (4 * kFp8Block)] =
            static_cast<int>(word);
    }
  }
}

// Whole grid, a one-rank FP8 receive (no cast rows: every row is this rank's own): warps take
// (token, pass) items, cast the pass of x once and write it to the row of each expert the token
// went to (its send_slot), instead of casting every (token, expert) row on its own.
__device__ void pack_own_tokens_fp8(const LowLatencyCall& c, const LowLatencyDispatchRecvArgs& a) {
  const int lane = threadIdx.x % kWarpSize, hidden = c.shape.hidden, top_k = c.shape.top_k;
  const int m = c.shape.max_tokens, experts = c.shape.num_experts;  // one rank: every expert is local
  const int passes = (hidden + kPassChannels - 1) / kPassChannels;
  // Items go round the blocks before the warps of a block, so that few tokens still reach every SM.
  const int blocks = gridDim.x * gridDim.y, warps = blocks * kWarps;
  const int first_warp = threadIdx.x / kWarpSize * blocks + blockIdx.y * gridDim.x + blockIdx.x;
  for (int item = first_warp; item < c.shape.num_tokens * passes; item += warps) {
    const int t = item / passes, first = item % passes * kPassChunks;
    // Lane k < K: the expert and slot of pair (t, k); -1 where it was not sent (repeats, ids out of
    // range, slots past M), and wherever the send's handle says something no receive could hold.
    int expert = -1, slot = -1;
    if (lane < top_k) {
      expert = a.topk_idx[t * top_k + lane];
      slot = a.send_slot[t * top_k + lane];
      if (expert < 0 || expert >= experts || slot < 0 || slot >= m) slot = -1;
    }
    uint4 raw[kPassChunks];
#pragma unroll
    for (int u = 0; u < kPassChunks; ++u) raw[u] = load_chunk(a.x + static_cast<size_t>(t) * hidden, hidden, first + u);
    Fp8Piece v[kPassChunks];
#pragma unroll
    for (int u = 0; u < kPassChunks; ++u) v[u] = cast_piece(raw[u], a.round_scale);
    for (int k = 0; k < top_k; ++k) {
      const int row = __shfl_sync(0xffffffffu, slot, k);
      if (row < 0) continue;
      const size_t out_row = static_cast<size_t>(__shfl_sync(0xffffffffu, expert, k)) * m + row;
      store_fp8_pass(v, a, out_row, hidden, first);
      if (first == 0 && lane == 0) a.recv_src_info[out_row] = t;
    }
  }
}

// Blocks (local expert, part): wait for every source rank's count of that expert, then pack the
// rows in (source rank, slot) order; the parts of one expert share its rows. This rank's own rows
// come from the send's x (bf16) or cast_rows (FP8), at the token their header names; a one-rank FP8
// receive packs them token by token instead (pack_own_tokens_fp8).
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    dispatch_recv_kernel(LowLatencyCall c, LowLatencyDispatchRecvArgs a) {
  extern __shared__ int offsets[];  // [R + 1]
  const PeerMemory& mem = c.mem;
  const int local = blockIdx.x, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int num_ranks = mem.num_ranks, m = c.shape.max_tokens, hidden = c.shape.hidden;
  const uint32_t seq = static_cast<uint32_t>(a.token[0]);
  const WaitContext wait = wait_context(mem, OpKind::kLowLatencyDispatch, c.signature);
  check_first_receive(c, kDispatchCall, seq, wait);
  const uint64_t* signals = signals_at(mem.local, seq, c) + local * num_ranks;
  for (int src = threadIdx.x; src < num_ranks; src += kThreads)
    offsets[src + 1] = min(wait_call_signal(signals + src, seq, c.signature, wait, WaitKind::kTokenCounts, src), m);
  __syncthreads();
  if (threadIdx.x == 0) {
    offsets[0] = 0;
    for (int src = 0; src < num_ranks; ++src) offsets[src + 1] += offsets[src];
  }
  __syncthreads();
  const int total = offsets[num_ranks];
  const size_t rows_per_expert = static_cast<size_t>(num_ranks) * m;
  if (blockIdx.y == 0) {
    for (int src = threadIdx.x; src < num_ranks; src += kThreads) {
      a.recv_layout_range[(local * num_ranks + src) * 2] = offsets[src];
      a.recv_layout_range[(local * num_ranks + src) * 2 + 1] = offsets[src + 1] - offsets[src];
    }
    if (threadIdx.x == 0) a.recv_count[local] = total;
    for (size_t i = total + threadIdx.x; i < rows_per_expert; i += kThreads) {
      a.recv_src_info[local * rows_per_expert + i] = -1;
    }
  }
  if (a.use_fp8 && num_ranks == 1) {
    pack_own_tokens_fp8(c, a);
    finish_receive(c, kDispatchCall, seq);
    return;
  }

  const char* area = mem.local + half_offset(seq, c);
  const int passes = (hidden + kPassChannels - 1) / kPassChannels;
  for (int item = blockIdx.y * kWarps + warp; item < total * passes; item += gridDim.y * kWarps) {
    const int i = item / passes, first = item % passes * kPassChunks;
    int src = 0;  // the last source rank whose range starts at or before row i: it holds row i
    for (int lo = 0, hi = num_ranks - 1; lo <= hi;) {
      const int mid = (lo + hi) / 2;
      if (offsets[mid] <= i) {
        src = mid;
        lo = mid + 1;
      } else {
        hi = mid - 1;
      }
    }
    const int j = i - offsets[src];
    const char* row = area + ((static_cast<size_t>(local) * num_ranks + src) * m + j) * c.layout.dispatch_row_bytes;
    const size_t out_row = local * rows_per_expert + i;
    if (first == 0 && lane == 0) a.recv_src_info[out_row] = *reinterpret_cast<const int*>(row);
    const char* payload = row + kRowHeaderBytes;
    if (src == mem.rank) {  // clamped: the header is this rank's own, but a bad one must not read out of bounds
      const size_t t = min(max(*reinterpret_cast<const int*>(row), 0), c.shape.num_tokens - 1);
      payload = a.use_fp8 ? a.cast_rows + t * c.layout.dispatch_row_bytes + kRowHeaderBytes
                          : reinterpret_cast<const char*>(a.x + t * hidden);
    }
    int channel[kPassChunks];
#pragma unroll
    for (int u = 0; u < kPassChunks; ++u) channel[u] = (first + u) * kChunkChannels + lane * 8;
    if (!a.use_fp8) {
      uint4 v[kPassChunks];
#pragma unroll
      for (int u = 0; u < kPassChunks; ++u)
        if (channel[u] < hidden) v[u] = *reinterpret_cast<const uint4*>(payload + channel[u] * 2);
#pragma unroll
      for (int u = 0; u < kPassChunks; ++u)
        if (channel[u] < hidden)
          *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(a.recv_x) + out_row * hidden + channel[u]) = v[u];
      continue;
    }
    Fp8Piece v[kPassChunks] = {};
    const float* scales = reinterpret_cast<const float*>(payload + hidden);
#pragma unroll
    for (int u = 0; u < kPassChunks; ++u) {
      if (channel[u] >= hidden) continue;
      v[u].values = *reinterpret_cast<const uint2*>(payload + channel[u]);
      v[u].scale = scales[channel[u] / kFp8Block];
    }
    store_fp8_pass(v, a, out_row, hidden, first);
  }
  finish_receive(c, kDispatchCall, seq);
}

// Whole warp: chunk `chunk` of a row (`raw`: this lane's load_chunk) as LogFMT groups (cuda/logfmt.cuh):
// the two groups' (amax, amin) into `meta`, their data from byte `offset` of `data` on. Returns the
// bytes of group data written (the same in every lane).
__device__ int logfmt_encode_chunk(const LogfmtTables& t, uint4 raw, uint32_t* meta, char* data, int offset,
                                   int hidden, int chunk) {
  const int lane = threadIdx.x % kWarpSize, piece = lane % 16;
  const int ch = chunk * kChunkChannels + lane * 8;
  const bool valid = ch < hidden;  // hidden is a multiple of 128: a whole half-warp (group) or none
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(&raw);
  int magnitude[8], amax = 0, amin = 0x7FFF;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    magnitude[i] = logfmt_magnitude(bits[i]);
    amax = max(amax, magnitude[i]);
    amin = min(amin, magnitude[i]);
  }
#pragma unroll
  for (int mask = 8; mask >= 1; mask /= 2) {
    amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, mask));
    amin = min(amin, __shfl_xor_sync(0xffffffffu, amin, mask));
  }
  const LogfmtGroup g = logfmt_group(t, amax, amin);
  const uint32_t encoded = __ballot_sync(0xffffffffu, valid && g.encoded);
  const uint32_t present = __ballot_sync(0xffffffffu, valid);
  const int first_bytes = encoded & 1u ? kEncodedGroupBytes : kBf16GroupBytes;
  const int second_bytes = !(present >> 16 & 1u) ? 0 : encoded >> 16 & 1u ? kEncodedGroupBytes : kBf16GroupBytes;
  // Ten bits a value: this lane's 80 bits (values 8 piece .. + 7 of the group) as lo (0-63) and hi (64-79).
  uint32_t field[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) field[i] = logfmt_code(t, g, magnitude[i]) | (bits[i] >> 15) << 9;
  uint64_t lo = 0;
#pragma unroll
  for (int i = 0; i < 6; ++i) lo |= static_cast<uint64_t>(field[i]) << (10 * i);
  lo |= static_cast<uint64_t>(field[6] & 0xFu) << 60;
  const uint32_t hi = field[6] >> 4 | field[7] << 6;
  const uint32_t partner_hi = __shfl_xor_sync(0xffffffffu, hi, 1);
  if (!valid) return first_bytes + second_bytes;
  if (piece == 0) meta[ch / kLogfmtGroup] = static_cast<uint32_t>(amax) | static_cast<uint32_t>(amin) << 16;
  char* group = data + offset + (lane < 16 ? 0 : first_bytes);
  if (!g.encoded) {
    *reinterpret_cast<uint4*>(group + piece * 16) = raw;
  } else {  // pieces 2q and 2q + 1 share the five words at 20 q: 0-1 (even lane), 2-4 (odd lane)
    uint32_t* words = reinterpret_cast<uint32_t*>(group + piece / 2 * 20);
    if (piece % 2 == 0) {
      words[0] = static_cast<uint32_t>(lo);
      words[1] = static_cast<uint32_t>(lo >> 32);
    } else {
      words[2] = partner_hi | static_cast<uint32_t>(lo & 0xFFFFu) << 16;
      words[3] = static_cast<uint32_t>(lo >> 16);
      words[4] = static_cast<uint32_t>(lo >> 48) | hi << 16;
    }
  }
  return first_bytes + second_bytes;
}

// Whole warp: bf16 row `src` as a LogFMT row at `dst`; returns its bytes (meta and group data).
__device__ int logfmt_encode_row(const LogfmtTables& t, const __nv_bfloat16* src, char* dst, int hidden,
                                 int meta_bytes) {
  const int chunks = (hidden + kChunkChannels - 1) / kChunkChannels;
  uint32_t* meta = reinterpret_cast<uint32_t*>(dst);
  int offset = 0;
  for (int first = 0; first < chunks; first += kPassChunks) {
    uint4 raw[kPassChunks];
#pragma unroll
    for (int u = 0; u < kPassChunks; ++u) raw[u] = load_chunk(src, hidden, first + u);
#pragma unroll
    for (int u = 0; u < kPassChunks; ++u)
      if (first + u < chunks) offset += logfmt_encode_chunk(t, raw[u], meta, dst + meta_bytes, offset, hidden, first + u);
  }
  return meta_bytes + offset;
}

// This thread's 8 channels (piece `piece` of 16 in its group) of a LogFMT group `group` (its data),
// decoded, times `weight`, added to acc.
__device__ __forceinline__ void logfmt_accumulate(const LogfmtTables& t, float (&acc)[8], const char* group,
                                                  int piece, int log_amin, int span, float weight) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(group + piece / 2 * 20);
  uint64_t lo;
  uint32_t hi;
  if (piece % 2 == 0) {
    lo = words[0] | static_cast<uint64_t>(words[1]) << 32;
    hi = words[2] & 0xFFFFu;
  } else {
    lo = words[2] >> 16 | static_cast<uint64_t>(words[3]) << 16 | static_cast<uint64_t>(words[4]) << 48;
    hi = words[4] >> 16;
  }
  uint32_t field[8];
#pragma unroll
  for (int i = 0; i < 6; ++i) field[i] = static_cast<uint32_t>(lo >> (10 * i)) & 0x3FFu;
  field[6] = (static_cast<uint32_t>(lo >> 60) | hi << 4) & 0x3FFu;
  field[7] = hi >> 6 & 0x3FFu;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float value = logfmt_decode(t, log_amin, span, static_cast<int>(field[i] & 0x1FFu));
    acc[i] += weight * (field[i] >> 9 ? -value : value);
  }
}

// Rows [offset, offset + count) of local expert `local`'s block in y hold the tokens of source
// rank `src`, clamped so that a foreign handle cannot make us read or write out of bounds.
struct SourceRows {
  int offset, count;
};

__device__ __forceinline__ SourceRows source_rows(const int* recv_layout_range, int local, int src, int num_ranks,
                                                  int m) {
  const int rows_per_expert = num_ranks * m;
  const int offset = min(max(recv_layout_range[(local * num_ranks + src) * 2], 0), rows_per_expert);
  const int count = min(max(recv_layout_range[(local * num_ranks + src) * 2 + 1], 0), min(m, rows_per_expert - offset));
  return {offset, count};
}

// Blocks (local expert, destination rank other than this one): send the expert's rows of that source
// rank back into slots [0, count) of the global expert on the destination, then flag the expert done
// there. Rows for this rank itself stay in y: the recv kernel reads them there. A mapped peer gets the
// rows stored straight from y (use_logfmt: encoded on the way, a warp per row); any other peer gets
// puts, from a staged copy of the rows (use_logfmt: a put of each encoded row, as long as it came out),
// or with `zero_copy` straight from y (registered with NVSHMEM by the handler): those rows are
// contiguous in y and in the destination, so each warp puts one run of them.
// The block begins the call (begin_send) and gives its number to `seq`.
__device__ __forceinline__ void combine_send_block(const LowLatencyCall& c, const __nv_bfloat16* y,
                                                   const int* recv_layout_range, bool zero_copy, bool use_logfmt,
                                                   uint32_t& seq) {
  __shared__ LogfmtTables tables;
  __shared__ HalfReceipts receipts;
  const PeerMemory& mem = c.mem;
  const LowLatencyLayout& layout = c.layout;
  // Row y of the grid: the other ranks in order, this rank skipped.
  const int local = blockIdx.x, dst = blockIdx.y + (blockIdx.y >= mem.rank ? 1 : 0);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const WaitContext wait = wait_context(mem, OpKind::kLowLatencyCombine, c.signature);
  seq = begin_send(c, kCombineCall, wait, dst, receipts);
  const int num_ranks = mem.num_ranks, m = c.shape.max_tokens, hidden = c.shape.hidden;
  const int experts_per_rank = c.shape.num_experts / num_ranks;
  const int e = mem.rank * experts_per_rank + local;
  const int rows_per_expert = num_ranks * m;
  const auto [offset, count] = source_rows(recv_layout_range, local, dst, num_ranks, m);
  if (use_logfmt) fill_logfmt_tables(tables);
  claim_half(c, kCombineCall, seq, dst, receipts, wait);  // and the tables are filled

  const size_t row_bytes = layout.combine_row_bytes;
  const size_t half = half_offset(seq, c);
  char* const peer = mem.peer[dst];
  const __nv_bfloat16* src = y + (static_cast<size_t>(local) * rows_per_expert + offset) * hidden;
  const bool put_from_y = peer == nullptr && zero_copy && !use_logfmt;
  char* const rows =
      peer != nullptr
          ? peer + half + layout.combine_offset + static_cast<size_t>(e) * m * row_bytes
          : mem.staging + layout.combine_offset + (static_cast<size_t>(dst) * experts_per_rank + local) * m * row_bytes;
  char* const dst_rows = mem.local + half + layout.combine_offset + static_cast<size_t>(e) * m * row_bytes;
  for (int j = warp; use_logfmt && j < count; j += kWarps) {
    const int bytes = logfmt_encode_row(tables, src + static_cast<size_t>(j) * hidden, rows + j * row_bytes, hidden,
                                        static_cast<int>(layout.logfmt_meta_bytes));
    if (peer == nullptr) {
      __syncwarp();
      put_warp(dst_rows + j * row_bytes, rows + j * row_bytes, bytes, dst);
    }
  }
  const int passes = (hidden + kPassChannels - 1) / kPassChannels;
  for (int item = warp; !put_from_y && !use_logfmt && item < count * passes; item += kWarps) {
    const int j = item / passes, first = item % passes * kPassChunks;
    uint4 v[kPassChunks];
#pragma unroll
    for (int u = 0; u < kPassChunks; ++u) v[u] = load_chunk(src + static_cast<size_t>(j) * hidden, hidden, first + u);
#pragma unroll
    for (int u = 0; u < kPassChunks; ++u) {
      const int ch = (first + u) * kChunkChannels + lane * 8;
      if (ch < hidden) *reinterpret_cast<uint4*>(rows + j * row_bytes + ch * 2) = v[u];
    }
  }

  const int flag_index = c.shape.num_experts + e;
  const uint64_t flag = call_signal(c.signature, seq, count);
  if (peer != nullptr) {
    __syncthreads();  // the release store of one thread covers the rows the whole block wrote
    if (threadIdx.x == 0) store_release(signals_at(peer, seq, c) + flag_index, flag);
    return;
  }
  __syncthreads();
  const int first_row = count * warp / kWarps, end_row = count * (warp + 1) / kWarps;
  if (!use_logfmt && end_row > first_row) {
    const size_t y_row_bytes = static_cast<size_t>(hidden) * 2;
    if (put_from_y && y_row_bytes != row_bytes) {  // the buffer's rows keep room for LogFMT's meta: row by row
      for (int j = first_row; j < end_row; ++j)
        put_warp(dst_rows + j * row_bytes, reinterpret_cast<const char*>(src) + j * y_row_bytes, y_row_bytes, dst);
    } else {
      const char* source = put_from_y ? reinterpret_cast<const char*>(src) : rows;
      put_warp(dst_rows + first_row * row_bytes, source + first_row * row_bytes, (end_row - first_row) * row_bytes,
               dst);
    }
  }
  __syncwarp();
  if (lane == 0 && (use_logfmt ? warp < count : end_row > first_row)) put_quiet();
  __syncthreads();
  if (threadIdx.x == 0) put_value(signals_at(mem.local, seq, c) + flag_index, flag, dst);
}

// The block's send, which numbers the call (begin_send), and end_call after it.
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    combine_send_kernel(LowLatencyCall c, const __nv_bfloat16* y, const int* recv_layout_range, int* token,
                        bool zero_copy, bool use_logfmt) {
  uint32_t seq;
  combine_send_block(c, y, recv_layout_range, zero_copy, use_logfmt, seq);
  end_call(c.mem, kCombineCall, seq, token);
}

// A received LogFMT row's group, as the receive decodes it: its log_amin and span (0: bf16 data), and
// where its data starts in the row.
struct LogfmtRowGroup {
  int log_amin, span, offset;
};

// Whole block, where rows[k] (with encoded[k]) is a LogFMT row: every group's decoding parameters and
// data offset (the groups before it, 160 or 256 bytes each) into params[k * groups + g].
__device__ void read_logfmt_rows(const LogfmtTables& t, const char* const* rows, const bool* encoded, int top_k,
                                 int groups, int meta_bytes, LogfmtRowGroup* params) {
  for (int i = threadIdx.x; i < top_k * groups; i += blockDim.x) {
    if (!encoded[i / groups]) continue;
    const uint32_t meta = reinterpret_cast<const uint32_t*>(rows[i / groups])[i % groups];
    const LogfmtGroup g = logfmt_group(t, static_cast<int>(meta & 0xFFFFu), static_cast<int>(meta >> 16));
    params[i] = {g.log_amin, g.encoded ? g.span : 0, 0};
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize;
  constexpr int kSaved = kBf16GroupBytes - kEncodedGroupBytes;
  for (int k = threadIdx.x / kWarpSize; k < top_k; k += blockDim.x / kWarpSize) {
    if (!encoded[k]) continue;
    int data = meta_bytes;
    for (int first = 0; first < groups; first += kWarpSize) {
      const int g = first + lane;
      const uint32_t compact = __ballot_sync(0xffffffffu, g < groups && params[k * groups + g].span != 0);
      if (g < groups) params[k * groups + g].offset = data + lane * kBf16GroupBytes - __popc(compact & ((1u << lane) - 1)) * kSaved;
      data += min(kWarpSize, groups - first) * kBf16GroupBytes - __popc(compact) * kSaved;
    }
  }
  __syncthreads();
}

// Token t's k-th (expert, weight) pair as far as the op's inputs tell, with no signal needed, so a
// receive reads it before it waits: this rank's expert's row in y, or a peer's row as its index in the
// call's half (whose place depends on the call number).
struct TopkRow {
  const char* own;  // this rank's expert's row in y, or null
  int64_t remote;   // a peer's row: id * M + slot in the call's half, or -1
  float weight;
};

__device__ __forceinline__ TopkRow topk_row(const LowLatencyCall& c, int t, int k, const __nv_bfloat16* y,
                                            const int* recv_layout_range, const int* topk_idx,
                                            const float* topk_weights, const int* send_slot) {
  const LowLatencyShape& s = c.shape;
  const int num_ranks = c.mem.num_ranks, m = s.max_tokens, experts_per_rank = s.num_experts / num_ranks;
  const int id = topk_idx[t * s.top_k + k], slot = send_slot[t * s.top_k + k];
  TopkRow row{nullptr, -1, topk_weights[t * s.top_k + k]};
  if (id < 0 || id >= s.num_experts || slot < 0 || slot >= m) return row;
  if (id / experts_per_rank != c.mem.rank) {
    row.remote = static_cast<int64_t>(id) * m + slot;
    return row;
  }
  const int local = id - c.mem.rank * experts_per_rank;
  const SourceRows own = source_rows(recv_layout_range, local, c.mem.rank, num_ranks, m);
  if (slot < own.count) {
    row.own = reinterpret_cast<const char*>(y + (static_cast<size_t>(local) * num_ranks * m + own.offset + slot) *
                                                    s.hidden);
  }
  return row;
}

// Whole block: token t's output, the sum over its top-k rows (`mine`: thread k's pair, k < top_k;
// received rows from this call's half, LogFMT rows decoded; this rank's experts' rows straight from y)
// times their weights in f32, rounded to bf16 once. `params`: top_k * hidden / 128 entries for LogFMT rows.
__device__ __forceinline__ void reduce_token(const LowLatencyCall& c, int t, uint32_t seq, const TopkRow& mine,
                                             __nv_bfloat16* out, bool use_logfmt, LogfmtTables& tables,
                                             LogfmtRowGroup* params) {
  __shared__ const char* rows[32];
  __shared__ bool encoded[32];
  __shared__ float weights[32];
  const LowLatencyShape& s = c.shape;
  const int top_k = s.top_k, hidden = s.hidden, groups = hidden / kLogfmtGroup;
  if (threadIdx.x < top_k) {
    const char* area = c.mem.local + half_offset(seq, c) + c.layout.combine_offset;
    rows[threadIdx.x] = mine.remote >= 0 ? area + mine.remote * c.layout.combine_row_bytes : mine.own;
    encoded[threadIdx.x] = use_logfmt && mine.remote >= 0;
    weights[threadIdx.x] = mine.weight;
  }
  if (use_logfmt) fill_logfmt_tables(tables);
  __syncthreads();
  // This block's channels: part blockIdx.y of gridDim.y, 8 channels a thread.
  const int first_ch = (blockIdx.y * blockDim.x + threadIdx.x) * 8, ch_stride = gridDim.y * blockDim.x * 8;
  if (!use_logfmt) {
    // Plain rows: a batch of rows' loads in flight before the first add, in k order all the same.
    constexpr int kBatch = 8;
    for (int ch = first_ch; ch < hidden; ch += ch_stride) {
      float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      for (int k0 = 0; k0 < top_k; k0 += kBatch) {
        uint4 v[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u)
          if (k0 + u < top_k && rows[k0 + u] != nullptr) v[u] = *reinterpret_cast<const uint4*>(rows[k0 + u] + ch * 2);
#pragma unroll
        for (int u = 0; u < kBatch; ++u)
          if (k0 + u < top_k && rows[k0 + u] != nullptr) accumulate(acc, v[u], weights[k0 + u]);
      }
      *reinterpret_cast<uint4*>(out + static_cast<size_t>(t) * hidden + ch) = pack_bf16x8<uint4>(acc);
    }
    return;
  }
  read_logfmt_rows(tables, rows, encoded, top_k, groups, static_cast<int>(c.layout.logfmt_meta_bytes), params);
  for (int ch = first_ch; ch < hidden; ch += ch_stride) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int k = 0; k < top_k; ++k) {
      if (rows[k] == nullptr) continue;
      if (!encoded[k]) {
        accumulate(acc, *reinterpret_cast<const uint4*>(rows[k] + ch * 2), weights[k]);
        continue;
      }
      const LogfmtRowGroup& g = params[k * groups + ch / kLogfmtGroup];
      const int piece = ch % kLogfmtGroup / 8;
      if (g.span != 0) {
        logfmt_accumulate(tables, acc, rows[k] + g.offset, piece, g.log_amin, g.span, weights[k]);
      } else {
        accumulate(acc, *reinterpret_cast<const uint4*>(rows[k] + g.offset + piece * 16), weights[k]);
      }
    }
    *reinterpret_cast<uint4*>(out + static_cast<size_t>(t) * hidden + ch) = pack_bf16x8<uint4>(acc);
  }
}

// One rank, every thread: token t's output as reduce_token sums it (every row is this rank's own, in
// y). With one source rank each expert's rows start at row 0 of its block (recv_layout_range's
// offsets are 0; a handle that says otherwise did not come from a one-rank dispatch and is read as
// if they were), so a thread finds a pair's row from the pair alone and loads it beside its expert's
// count and its weight: one memory round trip, and no barrier, before the rows go out. The loads are
// unconditional (a pair with no row reads expert 0's first row, unused) so that all of them are in
// flight at once; a row past its expert's count is skipped.
__device__ __forceinline__ void reduce_own_token(const LowLatencyShape& s, int t, const __nv_bfloat16* y,
                                                 const int* recv_layout_range, const int* topk_idx,
                                                 const float* topk_weights, const int* send_slot,
                                                 __nv_bfloat16* out) {
  const int top_k = s.top_k, hidden = s.hidden, m = s.max_tokens;
  const int first_ch = (blockIdx.y * blockDim.x + threadIdx.x) * 8, ch_stride = gridDim.y * blockDim.x * 8;
  constexpr int kBatch = 8;
  for (int ch = first_ch; ch < hidden; ch += ch_stride) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < top_k; k0 += kBatch) {
      uint4 v[kBatch];
      int slot[kBatch], count[kBatch];  // slot -1: the pair has no row
      float weight[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = t * top_k + min(k0 + u, top_k - 1), expert = topk_idx[i];
        slot[u] = send_slot[i];
        const bool named = k0 + u < top_k && expert >= 0 && expert < s.num_experts && slot[u] >= 0 && slot[u] < m;
        const int e = named ? expert : 0;
        slot[u] = named ? slot[u] : -1;
        v[u] = *reinterpret_cast<const uint4*>(y + (static_cast<size_t>(e) * m + max(slot[u], 0)) * hidden + ch);
        count[u] = recv_layout_range[e * 2 + 1];
        weight[u] = topk_weights[i];
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (slot[u] >= 0 && slot[u] < count[u]) accumulate(acc, v[u], weight[u]);
      }
    }
    *reinterpret_cast<uint4*>(out + static_cast<size_t>(t) * hidden + ch) = pack_bf16x8<uint4>(acc);
  }
}

// A token's channels split over blocks of at most this many threads (8 channels each): with one
// block per token there are about as many blocks as SMs, too few warps per SM to keep the rows'
// loads in flight.
constexpr int kCombineRecvThreads = 256;

// Blocks (token, part of the channels) (one block when T = 0, to receive the call all the same):
// read the token's pairs (before any wait: they come from the op's inputs), wait until every other
// rank's experts have flagged this call, then reduce the token's top-k rows (this rank's experts' rows
// straight from y) with its weights in f32 and round to bf16 once.
// Dynamic shared memory: use_logfmt's LogfmtRowGroup per (k, group).
__global__ void __launch_bounds__(kCombineRecvThreads)
    combine_recv_kernel(LowLatencyCall c, const int* token, const __nv_bfloat16* y, const int* recv_layout_range,
                        const int* topk_idx, const float* topk_weights, const int* send_slot, __nv_bfloat16* out,
                        bool use_logfmt) {
  extern __shared__ LogfmtRowGroup logfmt_params[];
  __shared__ LogfmtTables tables;
  const PeerMemory& mem = c.mem;
  const LowLatencyShape& s = c.shape;
  const int t = blockIdx.x;
  TopkRow mine{nullptr, -1, 0.0f};
  if (t < s.num_tokens && threadIdx.x < s.top_k) {
    mine = topk_row(c, t, threadIdx.x, y, recv_layout_range, topk_idx, topk_weights, send_slot);
  }
  const uint32_t seq = static_cast<uint32_t>(token[0]);
  const int experts_per_rank = s.num_experts / mem.num_ranks;
  const WaitContext wait = wait_context(mem, OpKind::kLowLatencyCombine, c.signature);
  check_first_receive(c, kCombineCall, seq, wait);
  const uint64_t* flags = signals_at(mem.local, seq, c) + s.num_experts;
  for (int e = threadIdx.x; e < s.num_experts; e += blockDim.x) {
    const int owner = e / experts_per_rank;
    if (owner != mem.rank) wait_call_signal(flags + e, seq, c.signature, wait, WaitKind::kExpertRows, owner);
  }
  if (t < s.num_tokens) reduce_token(c, t, seq, mine, out, use_logfmt, tables, logfmt_params);
  finish_receive(c, kCombineCall, seq);
}

// One rank's combine, its receive call alone (no send, token, call number or half): blocks (token, part of
// the channels) as combine_recv_kernel's, each thread reducing its channels of the token (reduce_own_token).
__global__ void __launch_bounds__(kCombineRecvThreads)
    combine_own_kernel(LowLatencyShape s, const __nv_bfloat16* y, const int* recv_layout_range, const int* topk_idx,
                       const float* topk_weights, const int* send_slot, __nv_bfloat16* out) {
  if (static_cast<int>(blockIdx.x) < s.num_tokens) {
    reduce_own_token(s, blockIdx.x, y, recv_layout_range, topk_idx, topk_weights, send_slot, out);
  }
}

int num_sms() {
  static const int sms = [] {
    int device = 0, value = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device);
    return value > 0 ? value : 1;
  }();
  return sms;
}

}  // namespace

__global__ void start_call_kernel(PeerMemory mem, int call_kind, uint32_t stamp, int* token) {
  end_call(mem, call_kind, begin_call(mem, call_kind, stamp), token);
}

cudaError_t launch_low_latency_dispatch_send(const LowLatencyCall& call, const LowLatencyDispatchSendArgs& a,
                                             cudaStream_t stream) {
  const LowLatencyShape& s = call.shape;
  if (a.cast_rows && s.num_tokens > 0) {
    const int passes = (s.hidden + kPassChannels - 1) / kPassChannels;
    const int blocks = std::min((s.num_tokens * passes + kCastWarps - 1) / kCastWarps, 8 * num_sms());
    cast_tokens_kernel<<<blocks, kCastThreads, 0, stream>>>(s, a.x, a.cast_rows, call.layout.dispatch_row_bytes,
                                                            a.round_scale);
  }
  dispatch_send_kernel<<<s.num_experts, kThreads, s.max_tokens * sizeof(int), stream>>>(
      call, a.x, a.cast_rows, a.topk_idx, a.send_slot, a.token, a.use_fp8);
  return cudaGetLastError();
}

cudaError_t launch_low_latency_dispatch_recv(const LowLatencyCall& call, const LowLatencyDispatchRecvArgs& a,
                                             cudaStream_t stream) {
  const int num_ranks = call.mem.num_ranks, experts_per_rank = call.shape.num_experts / num_ranks;
  // One wave of blocks; the parts of one expert split its rows.
  const int parts = std::max(1, std::min(32, kBlocksPerSm * num_sms() / experts_per_rank));
  dispatch_recv_kernel<<<dim3(experts_per_rank, parts), kThreads, (num_ranks + 1) * sizeof(int), stream>>>(call, a);
  return cudaGetLastError();
}

cudaError_t launch_low_latency_combine_send(const LowLatencyCall& call, const LowLatencyCombineSendArgs& a,
                                            cudaStream_t stream) {
  const int num_ranks = call.mem.num_ranks, experts_per_rank = call.shape.num_experts / num_ranks;
  // Only a call of several ranks sends (the handler refuses one rank).
  combine_send_kernel<<<dim3(experts_per_rank, num_ranks - 1), kThreads, 0, stream>>>(
      call, a.y, a.recv_layout_range, a.token, a.zero_copy, a.use_logfmt);
  return cudaGetLastError();
}

cudaError_t launch_low_latency_combine_recv(const LowLatencyCall& call, const LowLatencyCombineRecvArgs& a,
                                            cudaStream_t stream) {
  const LowLatencyShape& s = call.shape;
  const int lanes = std::max(1, (s.hidden + 7) / 8);
  const int parts = (lanes + kCombineRecvThreads - 1) / kCombineRecvThreads;
  const int threads = std::max(kWarpSize, ((lanes + parts - 1) / parts + kWarpSize - 1) / kWarpSize * kWarpSize);
  if (a.token == nullptr) {
    combine_own_kernel<<<dim3(std::max(s.num_tokens, 1), parts), threads, 0, stream>>>(
        s, a.y, a.recv_layout_range, a.topk_idx, a.topk_weights, a.send_slot, a.out);
    return cudaGetLastError();
  }
  const size_t logfmt_bytes = a.use_logfmt ? sizeof(LogfmtRowGroup) * s.top_k * (s.hidden / kLogfmtGroup) : 0;
  combine_recv_kernel<<<dim3(std::max(s.num_tokens, 1), parts), threads, logfmt_bytes, stream>>>(
      call, a.token, a.y, a.recv_layout_range, a.topk_idx, a.topk_weights, a.send_slot, a.out, a.use_logfmt);
  return cudaGetLastError();
}

}  // namespace jax_deepep
