// XLA FFI handlers of the internode normal mode (cuda/internode.cu): dispatch (cached dispatch is
// the same call without ids) and combine, each one custom call launching its kernels on XLA's
// stream, on the process's NVSHMEM buffer (xla_ffi/nvshmem_runtime.cc). No host synchronisation.
// The Bind lists at the bottom are the operand order; jax_deepep/gpu/internode.py calls each
// target once, in the same order.
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>

#include "cuda/launch.h"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/layout_check.h"
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
  InternodeRegion region;
  InternodeDispatchLayout layout;
};

struct InternodeCombineAttrs {
  int64_t buffer_id;
  int64_t ranks_per_node;
  bool exact_partials;  // f32 partials, else bf16 (the layout's partial rows are sized for it)
  InternodeRegion region;
  InternodeCombineLayout layout;
};

}  // namespace jax_deepep

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::InternodeRegion, StructMember<uint64_t>("offset"),
                                      StructMember<uint64_t>("half_stride"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::InternodeDispatchLayout, StructMember<uint64_t>("row_bytes"),
                                      StructMember<uint64_t>("ids_at"), StructMember<uint64_t>("weights_at"),
                                      StructMember<uint64_t>("part_at0"), StructMember<uint64_t>("part_at1"),
                                      StructMember<uint64_t>("counts"), StructMember<uint64_t>("expert_counts"),
                                      StructMember<uint64_t>("inbox"), StructMember<uint64_t>("inbox_signals"),
                                      StructMember<uint64_t>("landing"), StructMember<uint64_t>("forward_signals"),
                                      StructMember<uint64_t>("half_bytes"), StructMember<uint64_t>("staging_bytes"),
                                      StructMember<uint64_t>("staged_counts"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::InternodeCombineLayout, StructMember<uint64_t>("return_bytes"),
                                      StructMember<uint64_t>("partial_bytes"), StructMember<uint64_t>("returns"),
                                      StructMember<uint64_t>("return_signals"), StructMember<uint64_t>("partials"),
                                      StructMember<uint64_t>("partial_signals"), StructMember<uint64_t>("half_bytes"),
                                      StructMember<uint64_t>("staging_bytes"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::InternodeDispatchAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("num_experts"),
                                      StructMember<int64_t>("ranks_per_node"),
                                      StructMember<int64_t>("expert_alignment"),
                                      StructMember<jax_deepep::InternodeRegion>("region"),
                                      StructMember<jax_deepep::InternodeDispatchLayout>("layout"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::InternodeCombineAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("ranks_per_node"), StructMember<bool>("exact_partials"),
                                      StructMember<jax_deepep::InternodeRegion>("region"),
                                      StructMember<jax_deepep::InternodeCombineLayout>("layout"));

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

// The op's two halves lie in the buffer at its region, and its staging in the staging half
// (xla_ffi/nvshmem_runtime.h); the message names the size hint when the buffer is too small.
ffi::Error check_region(const NvshmemState& rt, const InternodeRegion& region, uint64_t half_bytes,
                        uint64_t staging_bytes) {
  if (half_bytes > region.half_stride || staging_bytes > rt.num_bytes / 2) {
    return invalid("num_rdma_bytes=" + std::to_string(rt.num_bytes) + " is too small: these sizes need " +
                   std::to_string(4 * half_bytes) + " bytes of halves and " + std::to_string(2 * staging_bytes) +
                   " for staging (jax_deepep.gpu.internode.rdma_bytes_hint)");
  }
  return check_layout("internode region", {{"first half", region.offset, half_bytes, 256},
                                           {"second half", region.offset + region.half_stride, half_bytes, 16}},
                      rt.num_bytes);
}

// The dispatch layout fits the buffer at its region, and each piece holds what the kernels write into it.
ffi::Error check_fit(const NvshmemState& rt, const InternodeDispatchAttrs& attrs, const InternodeDispatchShape& s,
                     int64_t num_ranks) {
  const InternodeDispatchLayout& l = attrs.layout;
  const uint64_t ranks = num_ranks, per_node = s.ranks_per_node, nodes = ranks / per_node, tokens = s.num_tokens;
  const uint64_t topk_bytes = 4 * static_cast<uint64_t>(s.top_k), experts = s.num_experts;
  const uint64_t part_bytes[2] = {static_cast<uint64_t>(s.part_bytes[0]),
                                  s.num_parts == 2 ? static_cast<uint64_t>(s.part_bytes[1]) : 0};
  return first_failure({
      check_region(rt, attrs.region, l.half_bytes, l.staging_bytes),
      check_layout("internode dispatch row",
                   {{"header", 0, 16, 16},
                    {"ids", l.ids_at, s.has_ids ? topk_bytes : 0, 4},
                    {"weights", l.weights_at, s.has_weights ? topk_bytes : 0, 4},
                    {"part 0", l.part_at[0], part_bytes[0], 16},
                    {"part 1", l.part_at[1], part_bytes[1], 16},
                    {"next row", l.row_bytes, 0, 16}},
                   l.row_bytes),
      check_layout("internode dispatch half",
                   {{"counts", l.counts, 4 * ranks * ranks, 16},
                    {"expert counts", l.expert_counts, 4 * experts, 16},  // [R][E / R]
                    {"inbox", l.inbox, nodes * tokens * l.row_bytes, 16},
                    {"inbox signals", l.inbox_signals, 4 * nodes, 4},
                    {"landing", l.landing, static_cast<uint64_t>(s.capacity) * l.row_bytes, 16},
                    {"forward signals", l.forward_signals, 4 * per_node * nodes, 4}},
                   l.half_bytes),
      check_layout("internode dispatch staging",
                   {{"rows", 0, nodes * tokens * l.row_bytes, 16},
                    {"counts", l.staged_counts, 4 * (ranks + experts), 4}},
                   l.staging_bytes)});
}

// The combine layout fits the buffer at its region, and each piece holds what the kernels write into it.
ffi::Error check_fit(const NvshmemState& rt, const InternodeCombineAttrs& attrs, const InternodeCombineShape& s,
                     int64_t num_ranks) {
  const InternodeCombineLayout& l = attrs.layout;
  const uint64_t per_node = s.ranks_per_node, nodes = num_ranks / per_node, tokens = s.num_tokens;
  const uint64_t hidden = s.hidden, topk_bytes = 4 * static_cast<uint64_t>(s.top_k);
  const uint64_t partial_values = (s.exact_partials ? 4 : 2) * hidden;
  return first_failure({
      check_region(rt, attrs.region, l.half_bytes, l.staging_bytes),
      check_layout("internode return row",
                   {{"bf16 values", 0, 2 * hidden, 16}, {"weights", 2 * hidden, topk_bytes, 4},
                    {"next row", l.return_bytes, 0, 16}},
                   l.return_bytes),
      check_layout("internode partial row",
                   {{s.exact_partials ? "f32 values" : "bf16 values", 0, partial_values, 16},
                    {"weights", partial_values, topk_bytes, 4},
                    {"next row", l.partial_bytes, 0, 16}},
                   l.partial_bytes),
      check_layout("internode combine half",
                   {{"returns", l.returns, per_node * nodes * tokens * l.return_bytes, 16},
                    {"return signals", l.return_signals, 4 * per_node * kInternodeReturnBlocks, 4},
                    {"partials", l.partials, nodes * tokens * l.partial_bytes, 16},
                    {"partial signals", l.partial_signals, 4 * nodes, 4}},
                   l.half_bytes),
      check_layout("internode combine staging", {{"partial rows", 0, nodes * tokens * l.partial_bytes, 16}},
                   l.staging_bytes)});
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
  if (ffi::Error e = check_fit(*rt, attrs, s, num_ranks); e.failure()) return e;
  const InternodeDispatchCall call{rt->memory, InternodeTraffic{rt->traffic}, attrs.region, s, attrs.layout,
                                   static_cast<int>(attrs.expert_alignment)};
  return launched(launch_internode_dispatch(call, in, out, stream), "dispatch");
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
  s.exact_partials = attrs.exact_partials;
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
  if (ffi::Error e = check_fit(*rt, attrs, s, num_ranks); e.failure()) return e;
  const InternodeCombineCall call{rt->memory, InternodeTraffic{rt->traffic}, attrs.region, s, attrs.layout};
  return launched(launch_internode_combine(call, in, out, stream), "combine");
}

}  // namespace
}  // namespace jax_deepep

namespace jd = jax_deepep;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_internode_dispatch, jd::Dispatch,
                              jd::bind_on_device()
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
                              jd::bind_on_device()
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
