// Layout of one rank's communication buffer (shared by the host runtime and the kernels).
//
// The buffer starts with a header of counters and notify slots, followed by the token rings.
// "Local" fields are only touched by the owning rank; "remote" fields are written by peers
// through their mapping of this buffer (CUDA IPC or peer access).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/toolbox.cuh"

namespace jax_deepep {

constexpr int kMaxRanks = 8;          // intranode NVLink peers
constexpr int kMaxChannels = 160;     // one channel per SM pair (per SM when R == 1); Hopper has 132 SMs
constexpr int kMaxLocalExperts = 4096;
constexpr size_t kRingAlignment = 4096;

struct CommHeader {
  // Local: ops this rank finished (tags barrier flags and channel announcements), and the blocks
  // of the running op that finished (the last one advances the epoch; cuda/op_sync.cuh).
  uint32_t epoch;
  uint32_t blocks_done;
  uint32_t pad0[62];
  // Local: totals of ring slots this rank pushed to / consumed from each peer, per channel.
  // Every op drains its rings, so sender and receiver totals agree at each op's start.
  uint64_t sent_total[kMaxChannels][kMaxRanks];
  uint64_t consumed_total[kMaxChannels][kMaxRanks];
  // Remote: barrier flag of each source rank, by epoch parity, and the signature (op and shapes,
  // cuda/op_sync.cuh) of the op it started.
  uint32_t barrier_flag[2][kMaxRanks];
  uint32_t barrier_signature[2][kMaxRanks];
  // Remote: (epoch << 32 | slot count) a sender announces for its ring of each channel.
  uint64_t channel_count[kMaxChannels][kMaxRanks];
  // Remote: slots pushed into my ring by each source rank (tail) and slots each destination
  // consumed of what I pushed (head), as monotonic totals.
  uint64_t tail[kMaxChannels][kMaxRanks];
  uint64_t head[kMaxChannels][kMaxRanks];
  // Remote: notify data of each source rank by epoch parity: tokens it sends to every rank,
  // then its token counts for my local experts.
  int32_t notify[2][kMaxRanks][kMaxRanks + kMaxLocalExperts];
};

inline JDEEP_HOST_DEVICE CommHeader* header_of(char* buffer) { return reinterpret_cast<CommHeader*>(buffer); }

JDEEP_HOST_DEVICE constexpr size_t ring_offset() {
  return (sizeof(CommHeader) + kRingAlignment - 1) / kRingAlignment * kRingAlignment;
}

// jax_deepep/config.py (NVL_HEADER_BYTES) sizes buffers with room for this header.
static_assert(ring_offset() <= 320 * 1024, "update NVL_HEADER_BYTES in jax_deepep/config.py");

// Ring of (channel, source rank) inside the receiver's buffer: `slots` slots of `slot_bytes`.
inline JDEEP_HOST_DEVICE size_t ring_position(int channel, int src, int num_ranks, int slots,
                                                int slot_bytes) {
  return ring_offset() + (static_cast<size_t>(channel) * num_ranks + src) * slots * slot_bytes;
}

}  // namespace jax_deepep
