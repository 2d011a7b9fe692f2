// XLA FFI handlers of the internode normal mode (cuda/internode.cu): dispatch (cached dispatch is
// the same call without ids) and combine, each one custom call launching its kernels on XLA's
// stream, on the process's NVSHMEM buffer (xla_ffi/nvshmem_runtime.cc). No host synchronisation.
// The Bind lists at the bottom are the operand order; jax_deepep/gpu/internode.py calls each
// target once, in the same order.
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>

#include "cuda/internode.cuh"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/nvshmem_ffi.h"
#include "xla_ffi/nvshmem_runtime.h"
#include "xla_ffi/operands.h"

namespace ffi = xla::ffi;

namespace jax_deepep {

struct InternodeDispatchAttrs {
  int64_t buffer_id;
  int64_t num_experts;  // 0 without ids
  int64_t ranks_per_node;
  int64_t expert_alignment;
};

struct InternodeCombineAttrs {
  int64_t buffer_id;
  int64_t ranks_per_node;
};

}  // namespace jax_deepep

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::InternodeDispatchAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("num_experts"),
                                      StructMember<int64_t>("ranks_per_node"),
                                      StructMember<int64_t>("expert_alignment"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::InternodeCombineAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("ranks_per_node"));

namespace jax_deepep {
namespace {

ffi::Error invalid(const std::string& message) { return invalid_argument("jax_deepep internode: " + message); }

// The Buffer's state, checked for an internode op over `num_ranks` ranks in nodes of `ranks_per_node`.
std::shared_ptr<NvshmemState> usable_state(int64_t buffer_id, int32_t device, int64_t num_ranks,
                                           int64_t ranks_per_node, ffi::Error* error) {
  std::shared_ptr<NvshmemState> rt = live_nvshmem_state(buffer_id, device, "internode",
                                                        "a Buffer with num_rdma_bytes > 0 over several nodes "
                                                        "sets it up", error);
  if (rt == nullptr) return nullptr;
  if (num_ranks != rt->memory.num_ranks || ranks_per_node < 1 || ranks_per_node > kInternodeMaxRanksPerNode ||
      num_ranks % ranks_per_node != 0 || ranks_per_node != rt->direct_group) {
    *error = invalid("the op runs over " + std::to_string(num_ranks) + " ranks in nodes of " +
                     std::to_string(ranks_per_node) + "; NVSHMEM has " + std::to_string(rt->memory.num_ranks) +
                     " PEs in nodes of " + std::to_string(rt->direct_group) + " (at most " +
                     std::to_string(kInternodeMaxRanksPerNode) + ")");
    return nullptr;
  }
  if (!rt->group_mapped) {
    *error = invalid("the ranks of this node are not all mapped by NVSHMEM (NVLink/P2P needed inside a node)");
    return nullptr;
  }
  *error = ffi::Error::Success();
  return rt;
}

ffi::Error fits(const NvshmemState& rt, size_t half_bytes, size_t staging_bytes) {
  const size_t region = internode_region_bytes(rt.num_bytes);
  if (2 * half_bytes > region || staging_bytes > rt.num_bytes / 2) {
    return invalid("num_rdma_bytes=" + std::to_string(rt.num_bytes) + " is too small: these sizes need " +
                   std::to_string(4 * half_bytes) + " bytes of halves and " + std::to_string(2 * staging_bytes) +
                   " for staging (jax_deepep.gpu.internode.rdma_bytes_hint)");
  }
  return ffi::Error::Success();
}

ffi::Error launched(cudaError_t status, const char* what) { return launch_status(status, "internode", what); }

ffi::Error Dispatch(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer scales, I32 ids, F32 weights,
                    PredMatrix is_token_in_rank, I32 tokens_per_rank, I32 tokens_per_expert,
                    ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::AnyBuffer> recv_scales,
                    ffi::Result<I32> recv_ids, ffi::Result<F32> recv_weights, ffi::Result<I32> src_rank,
                    ffi::Result<I32> src_idx, ffi::Result<I32> send_row, ffi::Result<I32> recv_rank_prefix,
                    ffi::Result<I32> num_recv, ffi::Result<I32> per_expert, ffi::Result<I32> forwarded,
                    ffi::Result<I32> token, InternodeDispatchAttrs attrs) {
  InternodeDispatchShape s{};
  InternodeDispatchIn in{};
  InternodeDispatchOut out{};
  s.num_parts = given(scales) ? 2 : 1;
  s.has_ids = given(ids);
  s.has_weights = given(weights);
  s.num_experts = s.has_ids ? static_cast<int>(attrs.num_experts) : 0;
  s.ranks_per_node = static_cast<int>(attrs.ranks_per_node);
  const ffi::AnyBuffer send[2] = {x, scales};
  const ffi::AnyBuffer recv[2] = {*recv_x, *recv_scales};
  for (int p = 0; p < s.num_parts; ++p) {
    s.part_bytes[p] = static_cast<int>(row_bytes(send[p]));
    in.part[p] = send[p].untyped_data();
    out.part[p] = recv[p].untyped_data();
  }
  const int64_t num_tokens = leading_dim(x);
  s.capacity = static_cast<int>(leading_dim(*recv_x));
  if (s.has_ids) s.top_k = static_cast<int>(ids.dimensions()[1]);
  if (s.has_weights) s.top_k = static_cast<int>(weights.dimensions()[1]);
  in.ids = data_or_null<const int>(ids);
  in.weights = data_or_null<const float>(weights);
  in.is_token_in_rank = is_token_in_rank.typed_data();
  in.tokens_per_rank = tokens_per_rank.typed_data();
  in.tokens_per_expert = data_or_null<const int>(tokens_per_expert);
  const int64_t num_ranks = is_token_in_rank.dimensions()[1];
  if (num_tokens > kInternodeMaxTokens || s.top_k > kInternodeMaxTopk || attrs.expert_alignment < 1 ||
      (s.has_ids && (attrs.num_experts <= 0 || attrs.num_experts % num_ranks != 0))) {
    return invalid("unsupported sizes: T=" + std::to_string(num_tokens) + " (at most " +
                   std::to_string(kInternodeMaxTokens) + "), top-k " + std::to_string(s.top_k) + " (at most " +
                   std::to_string(kInternodeMaxTopk) + "), num_experts " + std::to_string(attrs.num_experts));
  }
  s.num_tokens = static_cast<int>(num_tokens);
  out.ids = data_or_null<int>(*recv_ids);
  out.weights = data_or_null<float>(*recv_weights);
  out.src_rank = src_rank->typed_data();
  out.src_idx = src_idx->typed_data();
  out.send_row = send_row->typed_data();
  out.recv_rank_prefix = recv_rank_prefix->typed_data();
  out.num_recv = num_recv->typed_data();
  out.per_expert = s.has_ids ? per_expert->typed_data() : nullptr;
  out.forwarded = forwarded->typed_data();
  out.token = token->typed_data();

  ffi::Error error;
  std::shared_ptr<NvshmemState> rt = usable_state(attrs.buffer_id, device, num_ranks, attrs.ranks_per_node, &error);
  if (rt == nullptr) return error;
  const InternodeDispatchLayout layout = make_internode_dispatch_layout(s, static_cast<int>(num_ranks));
  if (ffi::Error e = fits(*rt, layout.half_bytes, layout.staging_bytes); e.failure()) return e;
  return launched(launch_internode_dispatch(stream, rt->memory, InternodeTraffic{rt->traffic},
                                            internode_region_bytes(rt->num_bytes), s, in, out,
                                            static_cast<int>(attrs.expert_alignment)),
                  "dispatch");
}

ffi::Error Combine(cudaStream_t stream, int32_t device, BF16Matrix y, F32 weights, BF16 bias0, BF16 bias1, I32 src_rank, I32 src_idx,
                   I32 num_recv, PredMatrix is_token_in_rank, I32 forwarded, ffi::Result<BF16> combined_x,
                   ffi::Result<F32> combined_weights, ffi::Result<I32> token, InternodeCombineAttrs attrs) {
  InternodeCombineShape s{};
  InternodeCombineIn in{};
  InternodeCombineOut out{};
  const auto y_dims = y.dimensions();
  if (y_dims[1] % 8 != 0) return invalid("combine expects y bf16 [N, H] with H a multiple of 8");
  s.capacity = static_cast<int>(y_dims[0]);
  s.hidden = static_cast<int>(y_dims[1]);
  in.y = reinterpret_cast<const uint16_t*>(y.typed_data());
  s.top_k = given(weights) ? static_cast<int>(weights.dimensions()[1]) : 0;
  in.weights = data_or_null<const float>(weights);
  s.num_bias = given(bias0) + given(bias1);
  in.bias[0] = data_or_null<const uint16_t>(bias0);
  in.bias[1] = data_or_null<const uint16_t>(bias1);
  in.src_rank = src_rank.typed_data();
  in.src_idx = src_idx.typed_data();
  in.num_recv = num_recv.typed_data();
  in.is_token_in_rank = is_token_in_rank.typed_data();
  in.forwarded = forwarded.typed_data();
  s.num_tokens = static_cast<int>(is_token_in_rank.dimensions()[0]);
  s.ranks_per_node = static_cast<int>(attrs.ranks_per_node);
  const int64_t num_ranks = is_token_in_rank.dimensions()[1];
  if (s.num_tokens > kInternodeMaxTokens || s.top_k > kInternodeMaxTopk) {
    return invalid("unsupported sizes: T=" + std::to_string(s.num_tokens) + ", top-k " + std::to_string(s.top_k));
  }
  out.x = reinterpret_cast<uint16_t*>(combined_x->typed_data());
  out.weights = data_or_null<float>(*combined_weights);
  out.token = token->typed_data();

  ffi::Error error;
  std::shared_ptr<NvshmemState> rt = usable_state(attrs.buffer_id, device, num_ranks, attrs.ranks_per_node, &error);
  if (rt == nullptr) return error;
  const InternodeCombineLayout layout = make_internode_combine_layout(s, static_cast<int>(num_ranks));
  if (ffi::Error e = fits(*rt, layout.half_bytes, layout.staging_bytes); e.failure()) return e;
  return launched(launch_internode_combine(stream, rt->memory, InternodeTraffic{rt->traffic},
                                           internode_region_bytes(rt->num_bytes), s, in, out),
                  "combine");
}

}  // namespace
}  // namespace jax_deepep

namespace jd = jax_deepep;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_internode_dispatch, jd::Dispatch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // x [T, H] (bf16, or FP8 values)
                                  .Arg<ffi::AnyBuffer>()  // FP8 scales [T, S] or absent
                                  .Arg<jd::I32>()         // ids [T, K] or absent
                                  .Arg<jd::F32>()         // weights [T, K] or absent
                                  .Arg<jd::PredMatrix>()  // is_token_in_rank [T, R]
                                  .Arg<jd::I32>()         // tokens_per_rank [R]
                                  .Arg<jd::I32>()         // tokens_per_expert [E], absent without ids
                                  .Ret<ffi::AnyBuffer>()  // recv_x [N, H]
                                  .Ret<ffi::AnyBuffer>()  // recv scales [N, S] or absent
                                  .Ret<jd::I32>()         // recv ids [N, K] or absent
                                  .Ret<jd::F32>()         // recv weights [N, K] or absent
                                  .Ret<jd::I32>()         // src_rank [N]
                                  .Ret<jd::I32>()         // src_idx [N]
                                  .Ret<jd::I32>()         // send_row [T, R]
                                  .Ret<jd::I32>()         // recv_rank_prefix [R]
                                  .Ret<jd::I32>()         // num_recv []
                                  .Ret<jd::I32>()         // per_expert [E / R], absent without ids
                                  .Ret<jd::I32>()         // forwarded [nodes, T]
                                  .Ret<jd::I32>()         // token [1]
                                  .Attrs<jd::InternodeDispatchAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_internode_combine, jd::Combine,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<jd::BF16Matrix>()  // y [N, H]
                                  .Arg<jd::F32>()         // weights [N, K] or absent
                                  .Arg<jd::BF16>()        // bias [T, H] or absent
                                  .Arg<jd::BF16>()        // second bias [T, H] or absent
                                  .Arg<jd::I32>()         // src_rank [N]
                                  .Arg<jd::I32>()         // src_idx [N]
                                  .Arg<jd::I32>()         // num_recv []
                                  .Arg<jd::PredMatrix>()  // is_token_in_rank [T, R]
                                  .Arg<jd::I32>()         // forwarded [nodes, T]
                                  .Ret<jd::BF16>()        // x [T, H]
                                  .Ret<jd::F32>()         // weights [T, K] or absent
                                  .Ret<jd::I32>()         // token [1]
                                  .Attrs<jd::InternodeCombineAttrs>());

std::vector<jd::FfiTarget> jd::internode_ffi_targets() {
  return {{"jax_deepep_internode_dispatch", reinterpret_cast<void*>(jax_deepep_internode_dispatch)},
          {"jax_deepep_internode_combine", reinterpret_cast<void*>(jax_deepep_internode_combine)}};
}
