// What the NVSHMEM kernels (low_latency.cu, internode_*.cu) share: where this PE's symmetric memory is
// and how to reach the other PEs, the call numbers that tag every signal, and the kinds of signal
// they wait for (wait.cuh's wait_until underneath). The low-latency kernels also run without
// NVSHMEM within one node, on a communication buffer's low-latency area mapped over CUDA IPC or
// peer access (xla_ffi/ipc_low_latency_memory.cc): the same PeerMemory, every peer mapped.
//
// Peers whose buffer nvshmem_ptr maps (NVLink/P2P, or the same GPU) inside this PE's group, and
// outside it where the buffer was made with map_other_groups, get plain stores; every other peer
// gets nvshmem puts from the symmetric staging area. Signals carry
// the call number that wrote them, so nobody resets them and any number of blocks may poll them, and
// the signature of the op that wrote them, so a signal from a peer at another op or with other shapes
// fails the op where it lands.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/memory_order.cuh"
#include "cuda/wait.cuh"

#ifdef __CUDACC__
#include "cuda/remote_put.cuh"
#endif

namespace jax_deepep {

struct PeerMemory {
  char* local;                // this PE's symmetric buffer
  char* staging;              // symmetric: the source of nvshmem puts
  char* const* peer;          // device array [R]: peer's buffer mapped here (NVLink/P2P), or null
  ErrorRecord* error;         // device pointer of the process's host-mapped record
  long long timeout_ns;
  int rank;
  int num_ranks;
  // Device memory [kNumCallKinds]: the last call number of each op kind. Each op counts its call on
  // the device, so no host state ties a launch to its call and XLA may treat the ops as pure.
  uint32_t* call_numbers;
  // Symmetric [R]: op_stamps[p] is the stamp of the op peer p started last (its OpSignature),
  // written by p as each of its ops starts. A wait that times out names the
  // peer's op and whether its shapes differ, so ranks at different ops learn both.
  int* op_stamps;
  // Symmetric [kNumReceiptKinds][kMaxLowLatencyHalves][R] (low latency): receipts[kind][h][d] is the
  // last call of that op kind in half h whose rows rank d has finished reading, written by d; a sender
  // reuses a half only once every destination has received the call that used it before. One per
  // half, so calls may be received in any order.
  uint32_t* receipts;
  // Device [kNumReceiptKinds]: blocks of the running receive kernel that are done (the last one
  // writes the receipts and resets it).
  uint32_t* receive_blocks_done;
  // Device [kNumCallKinds]: blocks of the running launch that numbers a call (begin_call) that are
  // done (the last one publishes the number and resets it).
  uint32_t* numbering_blocks_done;
};

// Indices into PeerMemory::call_numbers.
constexpr int kDispatchCall = 0;           // low-latency dispatch
constexpr int kCombineCall = 1;            // low-latency combine
constexpr int kInternodeDispatchCall = 2;  // internode dispatch and cached dispatch
constexpr int kInternodeCombineCall = 3;   // internode combine
constexpr int kNumCallKinds = 4;
constexpr int kNumReceiptKinds = 2;        // the low-latency kinds: kDispatchCall and kCombineCall
constexpr int kMaxLowLatencyHalves = 8;    // B at most (jax_deepep/sizes.py:low_latency_num_halves)

// Rank `rank`'s receipt of half `half` of op kind `kind` (a kDispatchCall or kCombineCall).
inline JDEEP_HOST_DEVICE uint32_t* receipt_of(const PeerMemory& mem, int kind, int half, int rank) {
  return mem.receipts + (static_cast<size_t>(kind) * kMaxLowLatencyHalves + half) * mem.num_ranks + rank;
}

// `signature`: the op's OpSignature, which its stamps and signals carry.
inline JDEEP_HOST_DEVICE WaitContext wait_context(const PeerMemory& mem, OpKind op, uint32_t signature) {
  return {mem.error, mem.timeout_ns, mem.rank, op, mem.op_stamps, signature};
}

#ifdef __CUDACC__
// An op's call numbering alone, where its first kernel is of another kind (internode: one warp).
__global__ void start_call_kernel(PeerMemory mem, int call_kind, uint32_t stamp, int* token);

// Writes `value` to `field`, an address in this PE's symmetric memory, as PE `pe` holds it: a
// release store where pe's memory is mapped here, a put otherwise.
template <typename T>
__device__ __forceinline__ void store_symmetric(const PeerMemory& mem, T* field, T value, int pe) {
  if (mem.peer[pe] != nullptr) {
    store_release(reinterpret_cast<T*>(mem.peer[pe] + (reinterpret_cast<char*>(field) - mem.local)), value);
  } else {
    put_value(field, value, pe);
  }
}

// Every op numbers its call on the device, in the blocks of its first kernel, with no launch of its
// own. Each block starts with begin_call, which reads the kind's last call number (published by an
// earlier launch, so all blocks of this one read the same) and returns the next; block 0 also
// writes `stamp` (the op's OpSignature) into every peer's op_stamps. Each block ends with end_call,
// every thread of it: the last block to finish publishes the number, into call_numbers for the
// kind's next call and into token[0] for the kernels after it on the stream.
__device__ __forceinline__ uint32_t begin_call(const PeerMemory& mem, int kind, uint32_t stamp) {
  __shared__ uint32_t seq;
  if (threadIdx.x == 0) seq = *reinterpret_cast<volatile uint32_t*>(mem.call_numbers + kind) + 1;
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    for (int pe = threadIdx.x; pe < mem.num_ranks; pe += blockDim.x) {
      if (pe != mem.rank) store_symmetric(mem, mem.op_stamps + mem.rank, static_cast<int>(stamp), pe);
    }
  }
  __syncthreads();
  return seq;
}

__device__ __forceinline__ void end_call(const PeerMemory& mem, int kind, uint32_t seq, int* token) {
  __syncthreads();
  if (threadIdx.x != 0 || !last_block_of_launch(mem.numbering_blocks_done + kind)) return;
  mem.call_numbers[kind] = seq;
  token[0] = static_cast<int>(seq);
}

// Every signal is 64-bit: the op's signature (OpSignature: op and shapes) above the low 16 bits of
// the call number above a 16-bit count (0 for a done signal), so a receiver learns in one load that
// the peer's rows of this call are there and that the peer ran the same op with the same shapes.
__device__ __forceinline__ uint64_t call_signal(uint32_t signature, uint32_t seq, int count) {
  return static_cast<uint64_t>(signature) << 32 | (seq & 0xffffu) << 16 | static_cast<uint32_t>(count & 0xffff);
}

// The count of `value`, a peer's signal of this call; fails the op at once when the peer's signature
// (the op and shapes it ran) differs from `signature`.
__device__ __forceinline__ int checked_signal_count(uint64_t value, uint32_t signature, const WaitContext& wait,
                                                    int peer) {
  const uint32_t theirs = static_cast<uint32_t>(value >> 32);
  if (theirs != signature) fail_op(wait, WaitKind::kOpMismatch, peer, -1, static_cast<int>(theirs >> 24));
  return static_cast<int>(value & 0xffffu);
}

// Waits for the signal of call `seq` at `p` with a count of at least `count` (a ring's head or tail:
// rows so far) and returns its count; fails the op at once when the peer's signature differs.
__device__ __forceinline__ int wait_call_count(const uint64_t* p, uint32_t seq, uint32_t signature, int count,
                                               const WaitContext& wait, WaitKind what, int peer, int channel) {
  const uint64_t value = wait_until(
      p,
      [seq, signature, count](uint64_t v) {
        return ((v >> 16) & 0xffffu) == (seq & 0xffffu) &&
               (static_cast<uint32_t>(v >> 32) != signature || static_cast<int>(v & 0xffffu) >= count);
      },
      wait, what, peer, channel);
  return checked_signal_count(value, signature, wait, peer);
}

// Waits for the signal of call `seq` at `p` and returns its count; fails the op at once when the
// peer's signature differs from `signature`.
__device__ __forceinline__ int wait_call_signal(const uint64_t* p, uint32_t seq, uint32_t signature,
                                                const WaitContext& wait, WaitKind what, int peer) {
  return wait_call_count(p, seq, signature, 0, wait, what, peer, -1);
}

#endif  // __CUDACC__

}  // namespace jax_deepep
