// XLA FFI handlers of the internode normal mode (cuda/internode_dispatch.cu, cuda/internode_combine.cu):
// dispatch (cached dispatch is the same call without ids) and combine, and their expert-grouped twins
// (a cached grouped dispatch has its own), each one custom call launching its kernel on XLA's stream,
// on the process's NVSHMEM buffer (xla_ffi/nvshmem_runtime.cc), with the geometry jax_deepep/sizes.py
// computes from the op's shapes and Config. No host synchronisation.
// The Bind lists at the bottom are the operand order; jax_deepep/gpu/internode.py calls each
// target once, in the same order.
#include <cuda_runtime.h>

#include <algorithm>
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
  InternodeSignals signals;
  InternodeRings rings;
  InternodeDispatchLayout layout;
};

struct InternodeCombineAttrs {
  int64_t buffer_id;
  int64_t ranks_per_node;
  bool exact_partials;  // f32 partials, else bf16 (the layout's partial rows are sized for it)
  InternodeSignals signals;
  InternodeRings rings;
  InternodeCombineLayout layout;
};

}  // namespace jax_deepep

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::InternodeSignals, StructMember<uint64_t>("link_bytes"),
                                      StructMember<uint64_t>("combine_links"),
                                      StructMember<uint64_t>("dispatch_links"), StructMember<uint64_t>("counts"),
                                      StructMember<uint64_t>("expert_counts"), StructMember<uint64_t>("rings"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::InternodeRings, StructMember<uint64_t>("channels"),
                                      StructMember<uint64_t>("rdma_slots"), StructMember<uint64_t>("rdma_batch"),
                                      StructMember<uint64_t>("rdma_slot_bytes"), StructMember<uint64_t>("nvl_slots"),
                                      StructMember<uint64_t>("nvl_batch"), StructMember<uint64_t>("nvl_slot_bytes"),
                                      StructMember<uint64_t>("rdma_ring"), StructMember<uint64_t>("nvl_ring"),
                                      StructMember<uint64_t>("receive_bytes"),
                                      StructMember<uint64_t>("staging_bytes"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::InternodeDispatchLayout, StructMember<uint64_t>("row_bytes"),
                                      StructMember<uint64_t>("ids_at"), StructMember<uint64_t>("weights_at"),
                                      StructMember<uint64_t>("prefix_at"), StructMember<uint64_t>("part_at0"),
                                      StructMember<uint64_t>("part_at1"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::InternodeCombineLayout, StructMember<uint64_t>("return_bytes"),
                                      StructMember<uint64_t>("partial_bytes"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::InternodeDispatchAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("num_experts"),
                                      StructMember<int64_t>("ranks_per_node"),
                                      StructMember<int64_t>("expert_alignment"),
                                      StructMember<jax_deepep::InternodeSignals>("signals"),
                                      StructMember<jax_deepep::InternodeRings>("rings"),
                                      StructMember<jax_deepep::InternodeDispatchLayout>("layout"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::InternodeCombineAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("ranks_per_node"), StructMember<bool>("exact_partials"),
                                      StructMember<jax_deepep::InternodeSignals>("signals"),
                                      StructMember<jax_deepep::InternodeRings>("rings"),
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

// The signals and rings lie in the buffer (the send rings in the staging half, xla_ffi/nvshmem_runtime.h),
// in the places jax_deepep/sizes.py gives them; the message names the size hint when the buffer is too small.
// A ring carries at most a channel's tokens of every node in a call, a count that must fit a signal.
ffi::Error check_rings(const NvshmemState& rt, const InternodeSignals& sig, const InternodeRings& r,
                       uint64_t num_ranks, uint64_t per_node, uint64_t num_tokens) {
  const uint64_t nodes = num_ranks / per_node, signal = sizeof(uint64_t);  // call_signal
  if (r.receive_bytes > rt.num_bytes || 2 * r.staging_bytes > rt.num_bytes) {
    return invalid("num_rdma_bytes=" + std::to_string(rt.num_bytes) + " is too small: these sizes and Config need " +
                   std::to_string(std::max(r.receive_bytes, 2 * r.staging_bytes)) +
                   " (jax_deepep.gpu.internode.rdma_bytes_hint)");
  }
  if (r.channels < 1 || r.channels > kInternodeMaxChannels || r.rdma_batch < 1 || r.rdma_batch > r.rdma_slots ||
      r.nvl_batch < 1 || r.nvl_batch > r.nvl_slots) {
    return invalid("unsupported rings: " + std::to_string(r.channels) + " channels (at most " +
                   std::to_string(kInternodeMaxChannels) + "), batches of " + std::to_string(r.rdma_batch) + " and " +
                   std::to_string(r.nvl_batch) + " rows in rings of " + std::to_string(r.rdma_slots) + " and " +
                   std::to_string(r.nvl_slots));
  }
  const uint64_t ring_rows = nodes * ((num_tokens + r.channels - 1) / r.channels);
  if (ring_rows > kInternodeMaxTokens) {
    return invalid("T=" + std::to_string(num_tokens) + " over " + std::to_string(r.channels) + " channels and " +
                   std::to_string(nodes) + " nodes puts up to " + std::to_string(ring_rows) +
                   " rows through one ring in one call (at most " + std::to_string(kInternodeMaxTokens) + ")");
  }
  const uint64_t links = (nodes + per_node) * kInternodeMaxChannels * sig.link_bytes;
  const uint64_t rdma = nodes * r.channels * r.rdma_slots * r.rdma_slot_bytes;
  return first_failure({
      check_layout("internode signals",
                   {{"combine links", sig.combine_links, links, signal},
                    {"dispatch links", sig.dispatch_links, links, signal},
                    {"counts", sig.counts, 2 * num_ranks * num_ranks * signal, signal},
                    {"expert counts", sig.expert_counts, 2 * kInternodeMaxExperts * signal, signal},
                    {"rings", sig.rings, 0, 256}},
                   sig.rings),
      check_layout("internode link", {{"words", 0, (3 + 2 * per_node) * signal, signal}}, sig.link_bytes),
      check_layout("internode rings",
                   {{"rdma rings", r.rdma_ring, rdma, 16},
                    {"nvl rings", r.nvl_ring, per_node * r.channels * r.nvl_slots * r.nvl_slot_bytes, 16}},
                   r.receive_bytes),
      check_layout("internode send rings", {{"rows", 0, rdma, 16}}, r.staging_bytes),
      r.rdma_ring >= sig.rings ? ffi::Error::Success() : invalid("the rings overlap the signals")});
}

// The dispatch layout fits the buffer, and each piece holds what the kernels write into it.
ffi::Error check_fit(const NvshmemState& rt, const InternodeDispatchAttrs& attrs, const InternodeDispatchShape& s,
                     int64_t num_ranks) {
  const InternodeDispatchLayout& l = attrs.layout;
  const uint64_t topk_bytes = 4 * static_cast<uint64_t>(s.top_k);
  const uint64_t part_bytes[2] = {static_cast<uint64_t>(s.part_bytes[0]),
                                  s.num_parts == 2 ? static_cast<uint64_t>(s.part_bytes[1]) : 0};
  return first_failure({
      check_rings(rt, attrs.signals, attrs.rings, num_ranks, s.ranks_per_node, s.num_tokens),
      check_layout("internode dispatch row",
                   {{"header", 0, 16, 16},
                    {"ids", l.ids_at, s.has_ids ? topk_bytes : 0, 4},
                    {"weights", l.weights_at, s.has_weights ? topk_bytes : 0, 4},
                    {"prefixes", l.prefix_at, s.grouped && s.has_ids ? topk_bytes : 0, 4},
                    {"part 0", l.part_at[0], part_bytes[0], 16},
                    {"part 1", l.part_at[1], part_bytes[1], 16},
                    {"next row", l.row_bytes, 0, 16}},
                   l.row_bytes),
      attrs.rings.rdma_slot_bytes == l.row_bytes && attrs.rings.nvl_slot_bytes == l.row_bytes
          ? ffi::Error::Success()
          : invalid("dispatch ring slots must be dispatched rows")});
}

// The combine layout fits the buffer, and each piece holds what the kernels write into it.
ffi::Error check_fit(const NvshmemState& rt, const InternodeCombineAttrs& attrs, const InternodeCombineShape& s,
                     int64_t num_ranks) {
  const InternodeCombineLayout& l = attrs.layout;
  const uint64_t hidden = s.hidden, topk_bytes = 4 * static_cast<uint64_t>(s.top_k);
  const uint64_t partial_values = (s.exact_partials ? 4 : 2) * hidden;
  const uint64_t returned_values = (s.pair_top_k > 0 ? 4 : 2) * hidden;
  return first_failure({
      check_rings(rt, attrs.signals, attrs.rings, num_ranks, s.ranks_per_node, s.num_tokens),
      check_layout("internode return row",
                   {{s.pair_top_k > 0 ? "f32 values" : "bf16 values", 0, returned_values, 16},
                    {"weights", returned_values, topk_bytes, 4},
                    {"next row", l.return_bytes, 0, 16}},
                   l.return_bytes),
      check_layout("internode partial row",
                   {{s.exact_partials ? "f32 values" : "bf16 values", 0, partial_values, 16},
                    {"weights", partial_values, topk_bytes, 4},
                    {"next row", l.partial_bytes, 0, 16}},
                   l.partial_bytes),
      attrs.rings.rdma_slot_bytes == l.partial_bytes && attrs.rings.nvl_slot_bytes == l.return_bytes
          ? ffi::Error::Success()
          : invalid("combine ring slots must be partial rows between nodes and returned rows within one")});
}

ffi::Error launched(cudaError_t status, const char* what) { return launch_status(status, "internode", what); }

// The token-level outputs of every dispatch (a cached dispatch's are scratch its caller drops).
void set_token_outputs(InternodeDispatchOut& out, ffi::Result<I32> src_rank, ffi::Result<I32> src_idx,
                       ffi::Result<I32> send_row, ffi::Result<I32> recv_rank_prefix, ffi::Result<I32> num_recv,
                       ffi::Result<I32> forwarded, ffi::Result<I32> token) {
  out.src_rank = src_rank->typed_data();
  out.src_idx = src_idx->typed_data();
  out.send_row = send_row->typed_data();
  out.recv_rank_prefix = recv_rank_prefix->typed_data();
  out.num_recv = num_recv->typed_data();
  out.forwarded = forwarded->typed_data();
  out.token = token->typed_data();
}

// What every dispatch handler does once it set `s`, `in` and `out` (ids, weights, K, capacities and
// the grouped arrays): the parts, the routing, the size checks, then the launch.
ffi::Error run_dispatch(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer scales,
                        ffi::AnyBuffer recv_x, ffi::AnyBuffer recv_scales, PredMatrix is_token_in_rank,
                        I32 tokens_per_rank, const InternodeDispatchAttrs& attrs, InternodeDispatchShape s,
                        InternodeDispatchIn in, InternodeDispatchOut out) {
  s.num_parts = given(scales) ? 2 : 1;
  s.num_experts = s.has_ids ? static_cast<int>(attrs.num_experts) : 0;
  s.ranks_per_node = static_cast<int>(attrs.ranks_per_node);
  const ffi::AnyBuffer send[2] = {x, scales};
  const ffi::AnyBuffer recv[2] = {recv_x, recv_scales};
  for (int p = 0; p < s.num_parts; ++p) {
    s.part_bytes[p] = static_cast<int>(row_bytes(send[p]));
    in.part[p] = send[p].untyped_data();
    out.part[p] = recv[p].untyped_data();
  }
  const int64_t num_tokens = leading_dim(x);
  in.is_token_in_rank = is_token_in_rank.typed_data();
  in.tokens_per_rank = tokens_per_rank.typed_data();
  const int64_t num_ranks = is_token_in_rank.dimensions()[1];
  if (num_tokens > kInternodeMaxTokens || s.top_k > kInternodeMaxTopk || attrs.expert_alignment < 1 ||
      (s.has_ids && (attrs.num_experts <= 0 || attrs.num_experts > kInternodeMaxExperts ||
                     attrs.num_experts % num_ranks != 0))) {
    return invalid("unsupported sizes: T=" + std::to_string(num_tokens) + " (at most " +
                   std::to_string(kInternodeMaxTokens) + "), top-k " + std::to_string(s.top_k) + " (at most " +
                   std::to_string(kInternodeMaxTopk) + "), num_experts " + std::to_string(attrs.num_experts) +
                   " (at most " + std::to_string(kInternodeMaxExperts) + ")");
  }
  s.num_tokens = static_cast<int>(num_tokens);

  ffi::Error error;
  std::shared_ptr<NvshmemState> rt = usable_state(attrs.buffer_id, device, num_ranks, attrs.ranks_per_node, &error);
  if (rt == nullptr) return error;
  if (ffi::Error e = check_fit(*rt, attrs, s, num_ranks); e.failure()) return e;
  const InternodeDispatchCall call{rt->memory,  InternodeTraffic{rt->traffic}, attrs.signals, attrs.rings, s,
                                   attrs.layout, static_cast<int>(attrs.expert_alignment)};
  return launched(launch_internode_dispatch(call, in, out, stream), s.grouped ? "expert-grouped dispatch" : "dispatch");
}

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
  s.has_ids = given(ids);
  s.has_weights = given(weights);
  s.capacity = static_cast<int>(leading_dim(*recv_x));
  if (s.has_ids) s.top_k = static_cast<int>(ids.dimensions()[1]);
  if (s.has_weights) s.top_k = static_cast<int>(weights.dimensions()[1]);
  in.ids = data_or_null<const int>(ids);
  in.weights = data_or_null<const float>(weights);
  in.tokens_per_expert = data_or_null<const int>(tokens_per_expert);
  out.ids = data_or_null<int>(*recv_ids);
  out.weights = data_or_null<float>(*recv_weights);
  out.per_expert = s.has_ids ? per_expert->typed_data() : nullptr;
  set_token_outputs(out, src_rank, src_idx, send_row, recv_rank_prefix, num_recv, forwarded, token);
  return run_dispatch(stream, device, x, scales, *recv_x, *recv_scales, is_token_in_rank, tokens_per_rank, attrs, s,
                      in, out);
}

// The checks of an expert-grouped dispatch's shapes: room for every token at the token level
// (capacity R * T), pair rows of K columns and as many token rows as grouped rows.
ffi::Error check_grouped(const InternodeDispatchShape& s, int64_t num_tokens, int64_t num_ranks, I32Matrix pair_row,
                         int64_t token_rows) {
  if (s.capacity != num_ranks * num_tokens || pair_row.dimensions()[0] != s.capacity ||
      pair_row.dimensions()[1] != s.top_k || token_rows != s.grouped_capacity) {
    return invalid("expert-grouped dispatch: the token level needs R * T rows and pair_row [R * T, K], token_row [N]");
  }
  return ffi::Error::Success();
}

// A first expert-grouped dispatch: ids are checked ids (-1 for none), `prefix` each pair's position
// among this rank's earlier tokens of its expert, `pairs_per_expert` [E] the pairs (a token's
// repeats of an expert once) this rank sends to each expert.
ffi::Error GroupedDispatch(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer scales, I32Matrix ids,
                           F32 weights, I32Matrix prefix, PredMatrix is_token_in_rank, I32 tokens_per_rank,
                           I32 pairs_per_expert, ffi::Result<ffi::AnyBuffer> recv_x,
                           ffi::Result<ffi::AnyBuffer> recv_scales, ffi::Result<I32> expert, ffi::Result<F32> weight,
                           ffi::Result<I32> token_row, ffi::Result<I32Matrix> pair_row, ffi::Result<I32> src_rank,
                           ffi::Result<I32> src_idx, ffi::Result<I32> send_row, ffi::Result<I32> recv_rank_prefix,
                           ffi::Result<I32> num_recv, ffi::Result<I32> token_per_expert, ffi::Result<I32> num_rows,
                           ffi::Result<I32> held, ffi::Result<I32> forwarded, ffi::Result<I32> token,
                           InternodeDispatchAttrs attrs) {
  InternodeDispatchShape s{};
  InternodeDispatchIn in{};
  InternodeDispatchOut out{};
  s.grouped = true;
  s.has_ids = s.has_weights = true;
  s.top_k = static_cast<int>(ids.dimensions()[1]);
  s.capacity = static_cast<int>(src_rank->element_count());
  s.grouped_capacity = static_cast<int>(leading_dim(*recv_x));
  if (ffi::Error e = check_grouped(s, leading_dim(x), is_token_in_rank.dimensions()[1], *pair_row,
                                   static_cast<int64_t>(token_row->element_count()));
      e.failure())
    return e;
  if (attrs.num_experts > kInternodeMaxGroupedExperts || weights.dimensions().size() != 2 ||
      weights.dimensions()[1] != s.top_k || prefix.dimensions()[1] != s.top_k) {
    return invalid("expert-grouped dispatch: at most " + std::to_string(kInternodeMaxGroupedExperts) +
                   " experts, and ids, weights and prefixes all [T, K]");
  }
  in.ids = ids.typed_data();
  in.weights = weights.typed_data();
  in.prefix = prefix.typed_data();
  in.tokens_per_expert = pairs_per_expert.typed_data();
  out.per_expert = token_per_expert->typed_data();
  out.grouped = {pair_row->typed_data(), token_row->typed_data(), expert->typed_data(), weight->typed_data(),
                 num_rows->typed_data(), held->typed_data()};
  set_token_outputs(out, src_rank, src_idx, send_row, recv_rank_prefix, num_recv, forwarded, token);
  return run_dispatch(stream, device, x, scales, *recv_x, *recv_scales, is_token_in_rank, tokens_per_rank, attrs, s,
                      in, out);
}

// A cached expert-grouped dispatch: the token-level routing of the handle (`tokens_per_rank` from
// its is_token_in_rank) and its pair and token rows; `weights` [T, K] or absent.
ffi::Error GroupedCachedDispatch(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer scales,
                                 F32 weights, PredMatrix is_token_in_rank, I32 tokens_per_rank, I32Matrix pair_row,
                                 I32 token_row, ffi::Result<ffi::AnyBuffer> recv_x,
                                 ffi::Result<ffi::AnyBuffer> recv_scales, ffi::Result<F32> weight,
                                 ffi::Result<I32> src_rank, ffi::Result<I32> src_idx, ffi::Result<I32> send_row,
                                 ffi::Result<I32> recv_rank_prefix, ffi::Result<I32> num_recv,
                                 ffi::Result<I32> forwarded, ffi::Result<I32> token, InternodeDispatchAttrs attrs) {
  InternodeDispatchShape s{};
  InternodeDispatchIn in{};
  InternodeDispatchOut out{};
  s.grouped = true;
  s.has_weights = given(weights);
  s.top_k = static_cast<int>(pair_row.dimensions()[1]);
  s.capacity = static_cast<int>(src_rank->element_count());
  s.grouped_capacity = static_cast<int>(leading_dim(*recv_x));
  if (ffi::Error e = check_grouped(s, leading_dim(x), is_token_in_rank.dimensions()[1], pair_row,
                                   static_cast<int64_t>(token_row.element_count()));
      e.failure())
    return e;
  if (s.has_weights && (weights.dimensions().size() != 2 || weights.dimensions()[1] != s.top_k))
    return invalid("cached expert-grouped dispatch: topk_weights must be [T, K] with the handle's K");
  in.weights = data_or_null<const float>(weights);
  // Inputs the cached dispatch only reads (InternodeGroupedOut: written by a first dispatch).
  out.grouped.pair_row = const_cast<int*>(pair_row.typed_data());
  out.grouped.token_row = const_cast<int*>(token_row.typed_data());
  out.grouped.weight = s.has_weights ? weight->typed_data() : nullptr;
  set_token_outputs(out, src_rank, src_idx, send_row, recv_rank_prefix, num_recv, forwarded, token);
  return run_dispatch(stream, device, x, scales, *recv_x, *recv_scales, is_token_in_rank, tokens_per_rank, attrs, s,
                      in, out);
}

// What both combine handlers do once they set the rows' shape and weights in `s` and `in`: the
// biases, the token-level routing, the size checks, then the launch.
ffi::Error run_combine(cudaStream_t stream, int32_t device, BF16Matrix y, BF16 bias0, BF16 bias1,
                       I32 recv_rank_prefix, I32 src_idx, I32 num_recv, PredMatrix is_token_in_rank, I32 forwarded,
                       ffi::Result<BF16> combined_x, ffi::Result<F32> combined_weights, ffi::Result<I32> token,
                       const InternodeCombineAttrs& attrs, InternodeCombineShape s, InternodeCombineIn in) {
  InternodeCombineOut out{};
  const auto y_dims = y.dimensions();
  if (y_dims[1] % 8 != 0) return invalid("combine expects y bf16 [N, H] with H a multiple of 8");
  s.hidden = static_cast<int>(y_dims[1]);
  in.y = reinterpret_cast<const uint16_t*>(y.typed_data());
  s.num_bias = given(bias0) + given(bias1);
  in.bias[0] = data_or_null<const uint16_t>(bias0);
  in.bias[1] = data_or_null<const uint16_t>(bias1);
  in.recv_rank_prefix = recv_rank_prefix.typed_data();
  in.src_idx = src_idx.typed_data();
  in.num_recv = num_recv.typed_data();
  in.is_token_in_rank = is_token_in_rank.typed_data();
  in.forwarded = forwarded.typed_data();
  s.num_tokens = static_cast<int>(is_token_in_rank.dimensions()[0]);
  s.ranks_per_node = static_cast<int>(attrs.ranks_per_node);
  s.exact_partials = attrs.exact_partials;
  const int64_t num_ranks = is_token_in_rank.dimensions()[1];
  if (s.num_tokens > kInternodeMaxTokens || s.top_k > kInternodeMaxTopk || s.pair_top_k > kInternodeMaxTopk) {
    return invalid("unsupported sizes: T=" + std::to_string(s.num_tokens) + ", top-k " +
                   std::to_string(std::max(s.top_k, s.pair_top_k)));
  }
  if (static_cast<int64_t>(recv_rank_prefix.element_count()) != num_ranks ||
      static_cast<int64_t>(src_idx.element_count()) != s.capacity)
    return invalid("combine expects the handle's recv_rank_prefix [R] and recv_src_idx [N]");
  out.x = reinterpret_cast<uint16_t*>(combined_x->typed_data());
  out.weights = data_or_null<float>(*combined_weights);
  out.token = token->typed_data();

  ffi::Error error;
  std::shared_ptr<NvshmemState> rt = usable_state(attrs.buffer_id, device, num_ranks, attrs.ranks_per_node, &error);
  if (rt == nullptr) return error;
  if (ffi::Error e = check_fit(*rt, attrs, s, num_ranks); e.failure()) return e;
  const InternodeCombineCall call{rt->memory, InternodeTraffic{rt->traffic}, attrs.signals, attrs.rings, s,
                                  attrs.layout};
  return launched(launch_internode_combine(call, in, out, stream),
                  s.pair_top_k > 0 ? "expert-grouped combine" : "combine");
}

ffi::Error Combine(cudaStream_t stream, int32_t device, BF16Matrix y, F32 weights, BF16 bias0, BF16 bias1,
                   I32 recv_rank_prefix, I32 src_idx, I32 num_recv, PredMatrix is_token_in_rank, I32 forwarded,
                   ffi::Result<BF16> combined_x, ffi::Result<F32> combined_weights, ffi::Result<I32> token,
                   InternodeCombineAttrs attrs) {
  InternodeCombineShape s{};
  InternodeCombineIn in{};
  s.capacity = static_cast<int>(y.dimensions()[0]);
  s.top_k = given(weights) ? static_cast<int>(weights.dimensions()[1]) : 0;
  in.weights = data_or_null<const float>(weights);
  return run_combine(stream, device, y, bias0, bias1, recv_rank_prefix, src_idx, num_recv, is_token_in_rank,
                     forwarded, combined_x, combined_weights, token, attrs, s, in);
}

// An expert-grouped combine: `y` [N, H] grouped rows, `row_weights` and `topk_weights` [N] or absent,
// the handle's token-level routing (capacity R * T) and pair rows [R * T, K].
ffi::Error GroupedCombine(cudaStream_t stream, int32_t device, BF16Matrix y, F32 row_weights, F32 topk_weights,
                          BF16 bias0, BF16 bias1, I32 recv_rank_prefix, I32 src_idx, I32 num_recv,
                          PredMatrix is_token_in_rank,
                          I32 forwarded, I32Matrix pair_row, ffi::Result<BF16> combined_x,
                          ffi::Result<F32> combined_weights, ffi::Result<I32> token, InternodeCombineAttrs attrs) {
  InternodeCombineShape s{};
  InternodeCombineIn in{};
  s.capacity = static_cast<int>(src_idx.element_count());
  s.pair_top_k = static_cast<int>(pair_row.dimensions()[1]);
  // The combined weights are [T, K]: each k's weight is topk_weights at its pair's row.
  s.top_k = given(*combined_weights) ? s.pair_top_k : 0;
  in.weights = data_or_null<const float>(topk_weights);
  in.row_weights = data_or_null<const float>(row_weights);
  in.pair_row = pair_row.typed_data();
  if (pair_row.dimensions()[0] != s.capacity || s.pair_top_k < 1)
    return invalid("expert-grouped combine: pair_row must be [R * T, K], a row per token-level receive row");
  // With N = 0 grouped rows an [N] topk_weights reads as absent; no pair row then points into it.
  if (s.top_k > 0 && in.weights == nullptr && y.dimensions()[0] > 0)
    return invalid("expert-grouped combine: combined_topk_weights needs topk_weights");
  return run_combine(stream, device, y, bias0, bias1, recv_rank_prefix, src_idx, num_recv, is_token_in_rank,
                     forwarded, combined_x, combined_weights, token, attrs, s, in);
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
                                  .Arg<jd::I32>()         // recv_rank_prefix [R]
                                  .Arg<jd::I32>()         // src_idx [N]
                                  .Arg<jd::I32>()         // num_recv []
                                  .Arg<jd::PredMatrix>()  // is_token_in_rank [T, R]
                                  .Arg<jd::I32>()         // forwarded [nodes, T]
                                  .Ret<jd::BF16>()        // x [T, H]
                                  .Ret<jd::F32>()         // weights [T, K] or absent
                                  .Ret<jd::I32>()         // token [1]
                                  .Attrs<jd::InternodeCombineAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_internode_grouped_dispatch, jd::GroupedDispatch,
                              jd::bind_on_device()
                                  .Arg<ffi::AnyBuffer>()  // x [T, H] (bf16, or FP8 values)
                                  .Arg<ffi::AnyBuffer>()  // FP8 scales [T, S] or absent
                                  .Arg<jd::I32Matrix>()   // checked ids [T, K]
                                  .Arg<jd::F32>()         // weights [T, K] (ones without topk_weights)
                                  .Arg<jd::I32Matrix>()   // pair prefixes [T, K]
                                  .Arg<jd::PredMatrix>()  // is_token_in_rank [T, R]
                                  .Arg<jd::I32>()         // tokens_per_rank [R]
                                  .Arg<jd::I32>()         // pairs_per_expert [E]
                                  .Ret<ffi::AnyBuffer>()  // grouped rows [N, H]
                                  .Ret<ffi::AnyBuffer>()  // their FP8 scales [N, S] or absent
                                  .Ret<jd::I32>()         // local expert [N]
                                  .Ret<jd::F32>()         // pair weight [N]
                                  .Ret<jd::I32>()         // token_row [N]
                                  .Ret<jd::I32Matrix>()   // pair_row [R * T, K]
                                  .Ret<jd::I32>()         // src_rank [R * T]
                                  .Ret<jd::I32>()         // src_idx [R * T]
                                  .Ret<jd::I32>()         // send_row [T, R]
                                  .Ret<jd::I32>()         // recv_rank_prefix [R]
                                  .Ret<jd::I32>()         // num_recv []
                                  .Ret<jd::I32>()         // token-level per_expert [E / R]
                                  .Ret<jd::I32>()         // grouped rows needed []
                                  .Ret<jd::I32>()         // held group sizes [E / R]
                                  .Ret<jd::I32>()         // forwarded [nodes, T]
                                  .Ret<jd::I32>()         // token [1]
                                  .Attrs<jd::InternodeDispatchAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_internode_grouped_cached_dispatch, jd::GroupedCachedDispatch,
                              jd::bind_on_device()
                                  .Arg<ffi::AnyBuffer>()  // x [T, H] (bf16, or FP8 values)
                                  .Arg<ffi::AnyBuffer>()  // FP8 scales [T, S] or absent
                                  .Arg<jd::F32>()         // weights [T, K] or absent
                                  .Arg<jd::PredMatrix>()  // is_token_in_rank [T, R]
                                  .Arg<jd::I32>()         // tokens_per_rank [R]
                                  .Arg<jd::I32Matrix>()   // pair_row [R * T, K]
                                  .Arg<jd::I32>()         // token_row [N]
                                  .Ret<ffi::AnyBuffer>()  // grouped rows [N, H]
                                  .Ret<ffi::AnyBuffer>()  // their FP8 scales [N, S] or absent
                                  .Ret<jd::F32>()         // pair weight [N] or absent
                                  .Ret<jd::I32>()         // src_rank [R * T] (scratch)
                                  .Ret<jd::I32>()         // src_idx [R * T] (scratch)
                                  .Ret<jd::I32>()         // send_row [T, R] (scratch)
                                  .Ret<jd::I32>()         // recv_rank_prefix [R] (scratch)
                                  .Ret<jd::I32>()         // num_recv [] (scratch)
                                  .Ret<jd::I32>()         // forwarded [nodes, T] (scratch)
                                  .Ret<jd::I32>()         // token [1]
                                  .Attrs<jd::InternodeDispatchAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_internode_grouped_combine, jd::GroupedCombine,
                              jd::bind_on_device()
                                  .Arg<jd::BF16Matrix>()  // y [N, H] grouped rows
                                  .Arg<jd::F32>()         // row weights [N] or absent (1)
                                  .Arg<jd::F32>()         // topk_weights [N] or absent
                                  .Arg<jd::BF16>()        // bias [T, H] or absent
                                  .Arg<jd::BF16>()        // second bias [T, H] or absent
                                  .Arg<jd::I32>()         // recv_rank_prefix [R]
                                  .Arg<jd::I32>()         // src_idx [R * T]
                                  .Arg<jd::I32>()         // num_recv []
                                  .Arg<jd::PredMatrix>()  // is_token_in_rank [T, R]
                                  .Arg<jd::I32>()         // forwarded [nodes, T]
                                  .Arg<jd::I32Matrix>()   // pair_row [R * T, K]
                                  .Ret<jd::BF16>()        // x [T, H]
                                  .Ret<jd::F32>()         // weights [T, K] or absent
                                  .Ret<jd::I32>()         // token [1]
                                  .Attrs<jd::InternodeCombineAttrs>());

std::vector<jd::FfiTarget> jd::internode_ffi_targets() {
  return {{"jax_deepep_internode_dispatch", reinterpret_cast<void*>(jax_deepep_internode_dispatch)},
          {"jax_deepep_internode_combine", reinterpret_cast<void*>(jax_deepep_internode_combine)},
          {"jax_deepep_internode_grouped_dispatch", reinterpret_cast<void*>(jax_deepep_internode_grouped_dispatch)},
          {"jax_deepep_internode_grouped_cached_dispatch",
           reinterpret_cast<void*>(jax_deepep_internode_grouped_cached_dispatch)},
          {"jax_deepep_internode_grouped_combine", reinterpret_cast<void*>(jax_deepep_internode_grouped_combine)}};
}
