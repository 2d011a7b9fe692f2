// The notify step of dispatch (count exchange, receive prefixes, per-expert counts) and the plain barrier that
// starts cached dispatch and combine. One block; each launch advances this rank's epoch.
#include "cuda/device_sync.cuh"
#include "cuda/intranode.h"

namespace jax_deepep {
namespace {

constexpr int kNotifyThreads = 256;

// Raises this rank's flag for `epoch` on every rank, then waits for every rank's flag.
// Whatever a thread wrote to peers before calling is visible to them once they pass.
__device__ void barrier_all(const RankInfo& info, uint32_t epoch) {
  CommHeader* mine = header_of(info.buffers[info.rank]);
  const int parity = epoch & 1;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x < info.num_ranks) {
    store_release(&header_of(info.buffers[threadIdx.x])->barrier_flag[parity][info.rank], epoch);
    wait_for(&mine->barrier_flag[parity][threadIdx.x],
             [epoch](uint32_t v) { return static_cast<int32_t>(v - epoch) >= 0; }, info, kBarrierTimeout,
             threadIdx.x, -1);
  }
  __syncthreads();
}

__device__ uint32_t next_epoch(const RankInfo& info) {
  __shared__ uint32_t epoch;
  if (threadIdx.x == 0) epoch = header_of(info.buffers[info.rank])->epoch + 1;
  __syncthreads();
  return epoch;
}

__device__ void finish_epoch(const RankInfo& info, uint32_t epoch) {
  __syncthreads();
  if (threadIdx.x == 0) header_of(info.buffers[info.rank])->epoch = epoch;
}

__global__ void __launch_bounds__(kNotifyThreads, 1) barrier_kernel(RankInfo info) {
  const uint32_t epoch = next_epoch(info);
  barrier_all(info, epoch);
  finish_epoch(info, epoch);
}

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_kernel(RankInfo info, NotifyArgs args) {
  const int num_ranks = info.num_ranks, me = info.rank;
  const int experts_per_rank = args.num_experts / num_ranks;
  const uint32_t epoch = next_epoch(info);
  const int parity = epoch & 1;

  // 1. Tell every rank how many tokens I send to each rank and to each of its experts.
  const int row = num_ranks + experts_per_rank;
  for (int i = threadIdx.x; i < num_ranks * row; i += blockDim.x) {
    const int dst = i / row, j = i % row;
    const int v = j < num_ranks ? args.num_tokens_per_rank[j]
                                : args.num_tokens_per_expert[dst * experts_per_rank + j - num_ranks];
    header_of(info.buffers[dst])->notify[parity][me][j] = v;
  }
  barrier_all(info, epoch);

  // 2. The count matrix counts[src][dst] and what follows from it.
  const volatile int32_t(*notify)[kMaxRanks + kMaxLocalExperts] = header_of(info.buffers[me])->notify[parity];
  __shared__ int counts[kMaxRanks][kMaxRanks];
  for (int i = threadIdx.x; i < num_ranks * num_ranks; i += blockDim.x)
    counts[i / num_ranks][i % num_ranks] = notify[i / num_ranks][i % num_ranks];
  __syncthreads();
  if (threadIdx.x < num_ranks) {
    const int r = threadIdx.x;
    int offset = 0, prefix = 0;
    for (int s = 0; s < me; ++s) offset += counts[s][r];
    for (int s = 0; s < r; ++s) prefix += counts[s][me];
    args.send_offset[r] = offset;
    args.recv_rank_prefix[r] = prefix;
  }
  int num_recv = 0;
  for (int s = 0; s < num_ranks; ++s) num_recv += counts[s][me];
  if (threadIdx.x == 0) *args.num_recv_tokens = num_recv;
  for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) {
    int n = 0;
    for (int s = 0; s < num_ranks; ++s) n += notify[s][num_ranks + e];
    const int a = args.expert_alignment;
    args.num_recv_tokens_per_expert[e] = (n + a - 1) / a * a;
  }
  finish_epoch(info, epoch);
}

}  // namespace

cudaError_t launch_barrier(const RankInfo& info, cudaStream_t stream) {
  barrier_kernel<<<1, kNotifyThreads, 0, stream>>>(info);
  return cudaGetLastError();
}

cudaError_t launch_notify(const RankInfo& info, const NotifyArgs& args, cudaStream_t stream) {
  notify_kernel<<<1, kNotifyThreads, 0, stream>>>(info, args);
  return cudaGetLastError();
}

}  // namespace jax_deepep
