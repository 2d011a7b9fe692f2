// Row copies through the bulk-copy engine (TMA): lane 0 of a warp moves a row global -> shared ->
// global in pieces, with up to kBulkStages pieces in flight and no registers held, so a few SMs
// keep enough bytes in flight to approach memory (or NVLink) bandwidth.
//
// Each warp owns kBulkStages staging pieces and mbarriers in dynamic shared memory. A piece's
// load completes on its mbarrier; its store is a bulk group; a stage is reloaded once the store
// that read it has finished reading shared memory (wait_group.read), which is quick.
#pragma once

#include <cstdint>

namespace jax_deepep {

constexpr int kBulkStages = 3;
constexpr int kBulkPieceBytes = 4096;
// One warp's share: the pieces, then the mbarriers, rounded so every warp's pieces stay 128-byte aligned.
constexpr int kBulkWarpBytes = (kBulkStages * (kBulkPieceBytes + 8) + 127) / 128 * 128;

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Per-warp pipeline state; only lane 0 uses it.
struct BulkPipe {
  char* stage;        // kBulkStages pieces
  uint64_t* barrier;  // kBulkStages mbarriers
  uint32_t parity;    // bit s: the phase stage s waits for next

  // Carves warp `warp`'s part out of `shared` and initialises its barriers (whole warp calls).
  __device__ __forceinline__ void init(char* shared, int warp) {
    char* base = shared + static_cast<size_t>(warp) * kBulkWarpBytes;
    stage = base;
    barrier = reinterpret_cast<uint64_t*>(base + kBulkStages * kBulkPieceBytes);
    parity = 0;
    if (threadIdx.x % 32 == 0) {
      for (int s = 0; s < kBulkStages; ++s)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(barrier + s)));
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
  }

  __device__ __forceinline__ void load(int s, const char* src, int bytes) {
    const uint32_t bar = shared_address(barrier + s);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     shared_address(stage + s * kBulkPieceBytes)),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
  }

  __device__ __forceinline__ void wait_loaded(int s) {
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
  }

  __device__ __forceinline__ void store(int s, char* dst, int bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst),
                 "r"(shared_address(stage + s * kBulkPieceBytes)), "r"(bytes)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  }

  // Every earlier store has read its stage (the stages may be refilled).
  __device__ __forceinline__ void stages_free() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }

  // Every earlier store has landed in global memory (call before publishing it).
  __device__ __forceinline__ void drain() {
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    asm volatile("fence.proxy.async.global;" ::: "memory");
  }

  // Copies `bytes` (a multiple of 16, both ends 16-byte aligned) from `src` to `dst`. Lane 0 only.
  __device__ __forceinline__ void copy(char* dst, const char* src, int bytes) {
    const int pieces = (bytes + kBulkPieceBytes - 1) / kBulkPieceBytes;
    auto piece_bytes = [&](int k) { return min(kBulkPieceBytes, bytes - k * kBulkPieceBytes); };
    stages_free();
    for (int k = 0; k < pieces && k < kBulkStages; ++k) load(k, src + k * kBulkPieceBytes, piece_bytes(k));
    for (int k = 0; k < pieces; ++k) {
      const int s = k % kBulkStages;
      wait_loaded(s);
      store(s, dst + static_cast<size_t>(k) * kBulkPieceBytes, piece_bytes(k));
      const int next = k + kBulkStages;
      if (next < pieces) {
        stages_free();
        load(s, src + static_cast<size_t>(next) * kBulkPieceBytes, piece_bytes(next));
      }
    }
  }
};

__device__ __forceinline__ bool bulk_copyable(const void* dst, const void* src, int bytes) {
  return ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(bytes)) &
          15) == 0;
}

}  // namespace jax_deepep
