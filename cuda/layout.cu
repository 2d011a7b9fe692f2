// get_dispatch_layout: per-rank and per-expert token counts and the token-to-rank mask.
#include "cuda/launch.h"

namespace jax_deepep {
namespace {

constexpr int kLayoutThreads = 256;  // one token per thread

__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(LayoutArgs args) {
  extern __shared__ int32_t counts[];  // [E] experts, then [R] ranks
  int32_t* rank_counts = counts + args.num_experts;
  for (int i = threadIdx.x; i < args.num_experts + args.num_ranks; i += blockDim.x) counts[i] = 0;
  __syncthreads();

  const int experts_per_rank = args.num_experts / args.num_ranks;
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < args.num_tokens) {
    bool* in_rank = args.is_token_in_rank + static_cast<int64_t>(t) * args.num_ranks;
    for (int r = 0; r < args.num_ranks; ++r) in_rank[r] = false;
    for (int k = 0; k < args.num_topk; ++k) {
      const int e = args.topk_idx[static_cast<int64_t>(t) * args.num_topk + k];
      if (e < 0 || e >= args.num_experts) continue;  // -1 and bad ids mean "no expert"
      atomicAdd(&counts[e], 1);
      in_rank[e / experts_per_rank] = true;
    }
    for (int r = 0; r < args.num_ranks; ++r) {
      if (in_rank[r]) atomicAdd(&rank_counts[r], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < args.num_experts; i += blockDim.x) {
    if (counts[i]) atomicAdd(&args.num_tokens_per_expert[i], counts[i]);
  }
  for (int i = threadIdx.x; i < args.num_ranks; i += blockDim.x) {
    if (rank_counts[i]) atomicAdd(&args.num_tokens_per_rank[i], rank_counts[i]);
  }
}

}  // namespace

cudaError_t prepare_layout() {
  int device = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaFuncSetAttribute(layout_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
  return err;
}

cudaError_t launch_layout(const LayoutArgs& args, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(args.num_tokens_per_expert, 0, sizeof(int32_t) * args.num_experts, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(args.num_tokens_per_rank, 0, sizeof(int32_t) * args.num_ranks, stream);
  if (err != cudaSuccess || args.num_tokens == 0) return err;
  const size_t shared = sizeof(int32_t) * (args.num_experts + args.num_ranks);
  const int blocks = (args.num_tokens + kLayoutThreads - 1) / kLayoutThreads;
  layout_kernel<<<blocks, kLayoutThreads, shared, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace jax_deepep
