// Row copies through the bulk-copy engine (TMA): lane 0 of a warp streams rows global -> shared ->
// global in pieces, with up to kBulkStages pieces in flight and no registers held, so a few SMs
// keep enough bytes in flight to approach memory (or NVLink) bandwidth.
//
// Each warp owns kBulkStages staging pieces and mbarriers in dynamic shared memory. The pieces of
// all rows a warp copies form one stream: a piece's load completes on its mbarrier, its store is a
// bulk group, and a stage is reloaded (with the next piece, of the same row or the next one) once
// the store that read it has read it. So the pipeline stays full across rows; `flush` and `drain`
// empty it where the protocol needs the sources read or the destinations written.
#pragma once

#include <cstdint>

namespace jax_deepep {

constexpr int kBulkStages = 3;
constexpr int kBulkPieceBytes = 4096;
// One warp's share: the pieces, the mbarriers, each stage's destination and length, rounded so
// every warp's pieces stay 128-byte aligned.
constexpr int kBulkWarpBytes = (kBulkStages * (kBulkPieceBytes + 8 + 8 + 4) + 127) / 128 * 128;

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Per-warp pipeline state; only lane 0 uses it.
struct BulkPipe {
  char* stage;        // kBulkStages pieces
  uint64_t* barrier;  // kBulkStages mbarriers
  char** target;      // where each stage's piece goes
  int* length;        // and its bytes
  uint32_t parity;    // bit s: the phase stage s waits for next
  uint32_t loaded;    // pieces whose load was issued (monotonic)
  uint32_t stored;    // pieces whose store was issued

  // Carves warp `warp`'s part out of `shared` and initialises its barriers (whole warp calls).
  __device__ __forceinline__ void init(char* shared, int warp) {
    char* base = shared + static_cast<size_t>(warp) * kBulkWarpBytes;
    stage = base;
    barrier = reinterpret_cast<uint64_t*>(base + kBulkStages * kBulkPieceBytes);
    target = reinterpret_cast<char**>(barrier + kBulkStages);
    length = reinterpret_cast<int*>(target + kBulkStages);
    parity = 0;
    loaded = stored = 0;
    if (threadIdx.x % 32 == 0) {
      for (int s = 0; s < kBulkStages; ++s)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(barrier + s)));
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
  }

  // Copies `bytes` (a multiple of 16, both ends 16-byte aligned) from `src` to `dst`. Lane 0 only.
  // Returns with the last pieces possibly still in flight: `src` may be read and `dst` written later.
  __device__ __forceinline__ void copy(char* dst, const char* src, int bytes) {
    for (int at = 0; at < bytes; at += kBulkPieceBytes) {
      if (loaded - stored == kBulkStages) store_next();
      const int s = loaded % kBulkStages;
      wait_stage_read();
      target[s] = dst + at;
      length[s] = min(kBulkPieceBytes, bytes - at);
      load(s, src + at, length[s]);
      ++loaded;
    }
  }

  // Every source was read (its memory may be reused); stores may still be landing.
  __device__ __forceinline__ void flush() {
    while (stored < loaded) store_next();
  }

  // Every store has landed in global memory (call before publishing it).
  __device__ __forceinline__ void drain() {
    flush();
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    asm volatile("fence.proxy.async.global;" ::: "memory");
  }

 private:
  __device__ __forceinline__ void load(int s, const char* src, int bytes) {
    const uint32_t bar = shared_address(barrier + s);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     shared_address(stage + s * kBulkPieceBytes)),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
  }

  // Stores the oldest loaded piece once its load has completed.
  __device__ __forceinline__ void store_next() {
    const int s = stored % kBulkStages;
    const uint32_t bar = shared_address(barrier + s);
    const uint32_t phase = (parity >> s) & 1;
    uint32_t done = 0;
    while (!done) {
      asm volatile(
          "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
          : "=r"(done)
          : "r"(bar), "r"(phase)
          : "memory");
    }
    parity ^= 1u << s;
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(target[s]),
                 "r"(shared_address(stage + s * kBulkPieceBytes)), "r"(length[s])
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    ++stored;
  }

  // The stage the next load fills was last read by the store of piece `loaded - kBulkStages`;
  // wait until that store has read it, letting the stores issued after it run on.
  __device__ __forceinline__ void wait_stage_read() {
    static_assert(kBulkStages == 3, "wait_stage_read spells out the newer-store counts");
    if (loaded < kBulkStages) return;
    const uint32_t newer = stored - 1 - (loaded - kBulkStages);  // stores issued after that one
    if (newer >= 2) {
      asm volatile("cp.async.bulk.wait_group.read 2;" ::: "memory");
    } else if (newer == 1) {
      asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
    } else {
      asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
    }
  }
};

__device__ __forceinline__ bool bulk_copyable(const void* dst, const void* src, int bytes) {
  return ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(bytes)) &
          15) == 0;
}

}  // namespace jax_deepep
