// How every normal-mode kernel (dispatch, cached dispatch, combine) enters and leaves its op,
// with no separate barrier or notify launch:
//  - each block reads this rank's epoch (ops finished so far) and works on op `epoch + 1`;
//  - block 0 raises this rank's flag for the op on every peer, after writing what the peers may
//    read once they see it (a first dispatch's counts) and the op's signature;
//  - each block waits for every peer's flag: a peer raises it when its kernel for this op starts,
//    so its kernel for the previous op has finished (rings drained, single-slot state read); a
//    peer whose signature differs (another op, or other shapes) fails the op before any byte moves;
//  - the last block to finish stores the new epoch, once every block has read the old one.
// A rank waits for no flag of its own (stream order covers it): with one rank nothing waits.
// Flags are kept by epoch parity, so a fast rank can be at most one op ahead of the others.
#pragma once

#include <cstdint>

#include "cuda/comm_layout.h"
#include "cuda/memory_order.cuh"
#include "cuda/rank_info.h"
#include "cuda/toolbox.cuh"
#include "cuda/wait.cuh"

namespace jax_deepep {

// The op this launch runs (whole block).
__device__ __forceinline__ uint32_t op_epoch(const RankInfo& info) {
  __shared__ uint32_t epoch;
  if (threadIdx.x == 0) epoch = header_of(info.buffers[info.rank])->epoch + 1;
  __syncthreads();
  return epoch;
}

// Block 0, whole block: raise this rank's flag for `epoch` on every peer. Whatever the block
// wrote to peers before is visible to them once they see the flag.
__device__ __forceinline__ void announce_op(const RankInfo& info, uint32_t epoch, OpSignature signature) {
  if (info.num_ranks == 1) return;  // no peer to tell
  __threadfence_system();
  __syncthreads();
  const int peer = threadIdx.x;
  if (peer < info.num_ranks && peer != info.rank) {
    CommHeader* theirs = header_of(info.buffers[peer]);
    theirs->barrier_signature[epoch & 1][info.rank] = signature.value;
    store_release(&theirs->barrier_flag[epoch & 1][info.rank], epoch);
  }
}

// Whole block: every peer has started op `epoch`, with the same signature.
__device__ __forceinline__ void wait_for_peers(const RankInfo& info, const WaitContext& wait, uint32_t epoch,
                                               OpSignature signature) {
  const int peer = threadIdx.x;
  if (peer < info.num_ranks && peer != info.rank) {
    CommHeader* mine = header_of(info.buffers[info.rank]);
    wait_until(&mine->barrier_flag[epoch & 1][peer], [epoch](uint32_t v) { return static_cast<int32_t>(v - epoch) >= 0; },
               wait, WaitKind::kOpBarrier, peer, -1);
    const uint32_t theirs = *reinterpret_cast<volatile uint32_t*>(&mine->barrier_signature[epoch & 1][peer]);
    if (theirs != signature.value) fail_op(wait, WaitKind::kOpMismatch, peer, -1, static_cast<int>(theirs >> 24));
  }
  __syncthreads();
}

// Whole block, last: the block is done; the last block of the launch advances the epoch.
__device__ __forceinline__ void finish_op(const RankInfo& info, uint32_t epoch) {
  __syncthreads();
  CommHeader* h = header_of(info.buffers[info.rank]);
  if (threadIdx.x == 0 && last_block_of_launch(&h->blocks_done)) h->epoch = epoch;
}

}  // namespace jax_deepep
