// XLA FFI handlers of the low-latency kernels (cuda/low_latency.cu), one per custom call.
//
// The send and recv halves of each op are separate custom calls so that XLA may schedule other
// work between them (SPEC.md's return_recv_hook). The send launch numbers the op on the device (a
// counter per kind and process: every rank runs the same program, so the same sequence of ops) and
// writes that number into a small `token` output; the recv call takes the token as an input, which
// both orders the two calls and tells the recv kernels which buffer half and signal tag to wait for.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/low_latency.cuh"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/nvshmem_ffi.h"
#include "xla_ffi/nvshmem_runtime.h"

namespace ffi = xla::ffi;

namespace jax_deepep {
namespace {

constexpr int64_t kMaxTopk = 32;
constexpr int64_t kMaxTokensPerRank = 8192;  // slot table in shared memory; 16-bit counts in signals

ffi::Error invalid(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_deepep low-latency: " + message);
}

// The runtime, checked against the op's static sizes; `error` set when unusable.
NvshmemRuntime* checked_runtime(int64_t num_ranks, int64_t max_tokens, int64_t hidden, int64_t num_experts,
                                ffi::Error* error) {
  NvshmemRuntime* rt = live_nvshmem_runtime("low-latency", "create the Buffer with low_latency_mode=True and "
                                             "num_rdma_bytes > 0 first", error);
  if (rt == nullptr) return nullptr;
  if (num_ranks != rt->memory.num_ranks) {
    *error = invalid("the op runs over " + std::to_string(num_ranks) + " ranks but NVSHMEM has " +
                     std::to_string(rt->memory.num_ranks) + " PEs");
    return nullptr;
  }
  if (max_tokens <= 0 || max_tokens > kMaxTokensPerRank || hidden <= 0 || hidden % 8 ||
      num_experts % num_ranks != 0 || num_experts <= 0) {
    *error = invalid("unsupported sizes: num_max_dispatch_tokens_per_rank=" + std::to_string(max_tokens) +
                     " (1.." + std::to_string(kMaxTokensPerRank) + "), hidden=" + std::to_string(hidden) +
                     " (a multiple of 8), num_experts=" + std::to_string(num_experts) + " (a multiple of ranks)");
    return nullptr;
  }
  const LowLatencyLayout layout = make_low_latency_layout(max_tokens, hidden, num_experts);
  if (2 * layout.half_bytes > rt->num_bytes) {
    *error = invalid("num_rdma_bytes=" + std::to_string(rt->num_bytes) + " is too small, these sizes need " +
                     std::to_string(2 * layout.half_bytes));
    return nullptr;
  }
  *error = ffi::Error::Success();
  return rt;
}

ffi::Error launched(cudaError_t status, const char* what) { return launch_status(status, "low-latency", what); }

ffi::Error DispatchSend(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S32> topk_idx,
                        ffi::ResultBuffer<ffi::S32> send_slot, ffi::ResultBuffer<ffi::S32> token, int64_t num_ranks,
                        int64_t max_tokens, int64_t num_experts, int64_t use_fp8, int64_t round_scale) {
  const auto x_dims = x.dimensions();
  const auto idx_dims = topk_idx.dimensions();
  if (x_dims.size() != 2 || idx_dims.size() != 2 || idx_dims[0] != x_dims[0] || idx_dims[1] > kMaxTopk) {
    return invalid("dispatch expects x [T, H] and topk_idx [T, K <= 32]");
  }
  ffi::Error error;
  NvshmemRuntime* rt = checked_runtime(num_ranks, max_tokens, x_dims[1], num_experts, &error);
  if (rt == nullptr) return error;
  if (x_dims[0] > max_tokens) return invalid("more tokens than num_max_dispatch_tokens_per_rank");
  if (use_fp8 && x_dims[1] % kFp8Block) return invalid("FP8 needs a hidden size that is a multiple of 128");
  const LowLatencyShape shape{static_cast<int>(x_dims[0]), static_cast<int>(idx_dims[1]),
                              static_cast<int>(x_dims[1]), static_cast<int>(max_tokens),
                              static_cast<int>(num_experts)};
  return launched(launch_low_latency_dispatch_send(
                      stream, rt->memory, shape, reinterpret_cast<const __nv_bfloat16*>(x.typed_data()),
                      topk_idx.typed_data(), send_slot->typed_data(), token->typed_data(), use_fp8 != 0,
                      round_scale != 0),
                  "dispatch send");
}

// recv_scales is null for bf16.
ffi::Error DispatchRecv(cudaStream_t stream, ffi::Buffer<ffi::S32> token, ffi::Result<ffi::AnyBuffer> recv_x,
                        ffi::Result<ffi::AnyBuffer>* recv_scales, ffi::ResultBuffer<ffi::S32> recv_count,
                        ffi::ResultBuffer<ffi::S32> recv_src_info, ffi::ResultBuffer<ffi::S32> recv_layout_range,
                        int64_t num_ranks, int64_t max_tokens, int64_t num_experts, bool use_ue8m0) {
  const auto dims = recv_x->dimensions();
  if (dims.size() != 3 || dims[0] * num_ranks != num_experts || dims[1] != num_ranks * max_tokens) {
    return invalid("dispatch recv_x must be [E / R, R * M, H]");
  }
  ffi::Error error;
  NvshmemRuntime* rt = checked_runtime(num_ranks, max_tokens, dims[2], num_experts, &error);
  if (rt == nullptr) return error;
  const bool use_fp8 = recv_scales != nullptr;
  if (use_ue8m0 && dims[2] % (4 * kFp8Block)) return invalid("UE8M0 scales need a hidden size that is a multiple of 512");
  const LowLatencyShape shape{0, 0, static_cast<int>(dims[2]), static_cast<int>(max_tokens),
                              static_cast<int>(num_experts)};
  return launched(launch_low_latency_dispatch_recv(stream, rt->memory, shape, token.typed_data(),
                                                   recv_x->untyped_data(),
                                                   use_fp8 ? (*recv_scales)->untyped_data() : nullptr,
                                                   recv_count->typed_data(), recv_src_info->typed_data(),
                                                   recv_layout_range->typed_data(), use_fp8, use_ue8m0),
                  "dispatch recv");
}

ffi::Error DispatchRecvBf16(cudaStream_t stream, ffi::Buffer<ffi::S32> token, ffi::Result<ffi::AnyBuffer> recv_x,
                            ffi::ResultBuffer<ffi::S32> recv_count, ffi::ResultBuffer<ffi::S32> recv_src_info,
                            ffi::ResultBuffer<ffi::S32> recv_layout_range, int64_t num_ranks, int64_t max_tokens,
                            int64_t num_experts) {
  return DispatchRecv(stream, token, recv_x, nullptr, recv_count, recv_src_info, recv_layout_range, num_ranks,
                      max_tokens, num_experts, false);
}

ffi::Error DispatchRecvFp8(cudaStream_t stream, ffi::Buffer<ffi::S32> token, ffi::Result<ffi::AnyBuffer> recv_x,
                           ffi::Result<ffi::AnyBuffer> recv_scales, ffi::ResultBuffer<ffi::S32> recv_count,
                           ffi::ResultBuffer<ffi::S32> recv_src_info, ffi::ResultBuffer<ffi::S32> recv_layout_range,
                           int64_t num_ranks, int64_t max_tokens, int64_t num_experts, int64_t use_ue8m0) {
  return DispatchRecv(stream, token, recv_x, &recv_scales, recv_count, recv_src_info, recv_layout_range, num_ranks,
                      max_tokens, num_experts, use_ue8m0 != 0);
}

ffi::Error CombineSend(cudaStream_t stream, ffi::Buffer<ffi::BF16> y, ffi::Buffer<ffi::S32> recv_layout_range,
                       ffi::ResultBuffer<ffi::S32> token, int64_t num_ranks, int64_t max_tokens, int64_t num_experts,
                       int64_t zero_copy) {
  const auto dims = y.dimensions();
  if (dims.size() != 3 || dims[0] * num_ranks != num_experts || dims[1] != num_ranks * max_tokens) {
    return invalid("combine y must be [E / R, R * M, H]");
  }
  ffi::Error error;
  NvshmemRuntime* rt = checked_runtime(num_ranks, max_tokens, dims[2], num_experts, &error);
  if (rt == nullptr) return error;
  // Puts read y itself: its allocation must be registered with NVSHMEM (a host call, once per allocation).
  const bool put_from_y = zero_copy != 0 && rt->has_put_peers;
  if (std::string why; put_from_y && !register_put_source(y.untyped_data(), y.size_bytes(), &why)) {
    return ffi::Error(ffi::ErrorCode::kInternal, "jax_deepep low-latency: zero_copy combine: " + why);
  }
  const LowLatencyShape shape{0, 0, static_cast<int>(dims[2]), static_cast<int>(max_tokens),
                              static_cast<int>(num_experts)};
  return launched(launch_low_latency_combine_send(stream, rt->memory, shape,
                                                  reinterpret_cast<const __nv_bfloat16*>(y.typed_data()),
                                                  recv_layout_range.typed_data(), token->typed_data(), put_from_y),
                  "combine send");
}

ffi::Error CombineRecv(cudaStream_t stream, ffi::Buffer<ffi::S32> token, ffi::Buffer<ffi::BF16> y,
                       ffi::Buffer<ffi::S32> recv_layout_range, ffi::Buffer<ffi::S32> topk_idx,
                       ffi::Buffer<ffi::F32> topk_weights, ffi::Buffer<ffi::S32> send_slot,
                       ffi::ResultBuffer<ffi::BF16> out, int64_t num_ranks, int64_t max_tokens, int64_t num_experts) {
  const auto idx_dims = topk_idx.dimensions();
  const auto out_dims = out->dimensions();
  if (idx_dims.size() != 2 || out_dims.size() != 2 || idx_dims[0] != out_dims[0] || idx_dims[1] > kMaxTopk) {
    return invalid("combine expects topk_idx [T, K <= 32] and an output [T, H]");
  }
  const auto y_dims = y.dimensions();
  if (y_dims.size() != 3 || y_dims[0] * num_ranks != num_experts || y_dims[1] != num_ranks * max_tokens ||
      y_dims[2] != out_dims[1] || recv_layout_range.element_count() != y_dims[0] * num_ranks * 2) {
    return invalid("combine recv expects y [E / R, R * M, H] and recv_layout_range [E / R, R, 2]");
  }
  ffi::Error error;
  NvshmemRuntime* rt = checked_runtime(num_ranks, max_tokens, out_dims[1], num_experts, &error);
  if (rt == nullptr) return error;
  const LowLatencyShape shape{static_cast<int>(idx_dims[0]), static_cast<int>(idx_dims[1]),
                              static_cast<int>(out_dims[1]), static_cast<int>(max_tokens),
                              static_cast<int>(num_experts)};
  return launched(launch_low_latency_combine_recv(stream, rt->memory, shape, token.typed_data(),
                                                  reinterpret_cast<const __nv_bfloat16*>(y.typed_data()),
                                                  recv_layout_range.typed_data(), topk_idx.typed_data(), topk_weights.typed_data(),
                                                  send_slot.typed_data(),
                                                  reinterpret_cast<__nv_bfloat16*>(out->typed_data())),
                  "combine recv");
}

}  // namespace
}  // namespace jax_deepep

namespace jd = jax_deepep;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_ll_dispatch_send, jd::DispatchSend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("num_ranks")
                                  .Attr<int64_t>("num_max_dispatch_tokens_per_rank")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("use_fp8")
                                  .Attr<int64_t>("round_scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_ll_dispatch_recv_bf16, jd::DispatchRecvBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("num_ranks")
                                  .Attr<int64_t>("num_max_dispatch_tokens_per_rank")
                                  .Attr<int64_t>("num_experts"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_ll_dispatch_recv_fp8, jd::DispatchRecvFp8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("num_ranks")
                                  .Attr<int64_t>("num_max_dispatch_tokens_per_rank")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("use_ue8m0"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_ll_combine_send, jd::CombineSend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("num_ranks")
                                  .Attr<int64_t>("num_max_dispatch_tokens_per_rank")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("zero_copy"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_ll_combine_recv, jd::CombineRecv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("num_ranks")
                                  .Attr<int64_t>("num_max_dispatch_tokens_per_rank")
                                  .Attr<int64_t>("num_experts"));
