// XLA FFI handlers of the normal (intranode) mode. Each looks up the communication buffer of
// its (Buffer id, device ordinal), decodes its operands and launches one kernel on XLA's stream;
// none of them synchronises with the host. The Bind lists at the bottom are the operand order;
// jax_deepep/gpu/backend.py calls each target once, in the same order.
#include <cuda_runtime.h>

#include <memory>
#include <string>

#include "cuda/launch.h"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/layout_check.h"
#include "xla_ffi/live_state.h"
#include "xla_ffi/operands.h"
#include "xla_ffi/runtime.h"

namespace ffi = xla::ffi;

namespace jax_deepep {

struct LayoutAttrs {
  int64_t num_experts;
  int64_t num_ranks;
};

// The rings an op moves tokens through (RingShape, as attributes).
struct RingAttrs {
  int64_t num_channels;
  int64_t slots;
  int64_t chunk_tokens;
};

struct DispatchAttrs {
  int64_t buffer_id;
  int64_t num_experts;
  int64_t expert_alignment;
  RingAttrs ring;
  DispatchSlot slot;
};

// An expert-grouped dispatch: a dispatch's attributes and where its slots' K prefixes start
// (jax_deepep/sizes.py grouped_dispatch_slot; `slot.bytes` covers them).
struct GroupedDispatchAttrs {
  int64_t buffer_id;
  int64_t num_experts;
  int64_t expert_alignment;
  RingAttrs ring;
  DispatchSlot slot;
  int64_t topk_prefix_offset;
};

// A cached dispatch (plain or grouped).
struct CachedDispatchAttrs {
  int64_t buffer_id;
  RingAttrs ring;
  DispatchSlot slot;
};

// A combine (plain or grouped).
struct CombineAttrs {
  int64_t buffer_id;
  RingAttrs ring;
  CombineSlot slot;
};

}  // namespace jax_deepep

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::LayoutAttrs, StructMember<int64_t>("num_experts"),
                                      StructMember<int64_t>("num_ranks"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::RingAttrs, StructMember<int64_t>("num_channels"),
                                      StructMember<int64_t>("slots"), StructMember<int64_t>("chunk_tokens"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::DispatchSlot, StructMember<int32_t>("part_offset0"),
                                      StructMember<int32_t>("part_offset1"), StructMember<int32_t>("topk_idx_offset"),
                                      StructMember<int32_t>("topk_weights_offset"), StructMember<int32_t>("bytes"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::CombineSlot, StructMember<int32_t>("weights_offset"),
                                      StructMember<int32_t>("bytes"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::DispatchAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("num_experts"),
                                      StructMember<int64_t>("expert_alignment"),
                                      StructMember<jax_deepep::RingAttrs>("ring"),
                                      StructMember<jax_deepep::DispatchSlot>("slot"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::GroupedDispatchAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("num_experts"),
                                      StructMember<int64_t>("expert_alignment"),
                                      StructMember<jax_deepep::RingAttrs>("ring"),
                                      StructMember<jax_deepep::DispatchSlot>("slot"),
                                      StructMember<int64_t>("topk_prefix_offset"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::CachedDispatchAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<jax_deepep::RingAttrs>("ring"),
                                      StructMember<jax_deepep::DispatchSlot>("slot"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::CombineAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<jax_deepep::RingAttrs>("ring"),
                                      StructMember<jax_deepep::CombineSlot>("slot"));

namespace jax_deepep {
namespace {

ffi::Error cuda_error(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal, std::string(what) + ": " + cudaGetErrorString(err));
}

ffi::Error invalid(const std::string& what) { return invalid_argument("jax_deepep: " + what); }

// The state of (buffer_id, device), or null with *error set (xla_ffi/live_state.h): no buffer, or an
// earlier kernel of the Buffer failed.
std::shared_ptr<RankState> live_state(int64_t buffer_id, int32_t device, ffi::Error* error) {
  return live_state_or_error(
      find_rank_state(buffer_id, device),
      [&] {
        return "jax_deepep: no communication buffer " + std::to_string(buffer_id) + " on device " +
               std::to_string(device) + " (was the Buffer destroyed?)";
      },
      error);
}

RingShape ring_shape(const RingAttrs& r) {
  return RingShape{static_cast<int>(r.num_channels), static_cast<int>(r.slots), static_cast<int>(r.chunk_tokens)};
}

// Ring shape checks shared by every op that uses the rings: slots of `slot_bytes` (16-byte
// aligned, so that every slot starts aligned) that fit the buffer.
ffi::Error check_ring(const RankState& s, RingShape ring, int slot_bytes) {
  if (ring.num_channels < 1 || 2 * ring.num_channels > kMaxChannels)
    return invalid("channel count out of range: " + std::to_string(ring.num_channels));
  if (slot_bytes < 16 || slot_bytes % 16 != 0) return invalid("bad ring slot size " + std::to_string(slot_bytes));
  if (s.num_ranks == 1) return ffi::Error::Success();
  if (ring.chunk_tokens < 1 || ring.slots < ring.chunk_tokens)
    return invalid("ring slots (" + std::to_string(ring.slots) + ") below the chunk size");
  const size_t need = static_cast<size_t>(ring.num_channels) * s.num_ranks * ring.slots * slot_bytes;
  if (need > s.ring_bytes())
    return invalid("rings need " + std::to_string(need) + " bytes, the buffer has " + std::to_string(s.ring_bytes()));
  return ffi::Error::Success();
}

// The dispatch slot from the attributes holds what the kernel writes into each piece, and the rings fit.
// `prefix_offset`: where a grouped slot's K prefixes start (-1: a plain slot, which has none).
ffi::Error check_dispatch_rings(const RankState& s, const DispatchArgs& d, int64_t prefix_offset = -1) {
  const DispatchSlot& slot = d.slot;
  const uint64_t topk_bytes = 4 * static_cast<uint64_t>(d.num_topk);
  auto at = [](int64_t offset) { return static_cast<uint64_t>(offset); };
  const uint64_t prefix_at = prefix_offset < 0 ? at(slot.bytes) : at(prefix_offset);
  return first_failure({check_layout("intranode dispatch slot",
                                     {{"source index and row", 0, 2 * sizeof(int32_t), 16},
                                      {"part 0", at(slot.part_offset[0]), at(d.parts[0].row_bytes), 16},
                                      {"part 1", at(slot.part_offset[1]), at(d.parts[1].row_bytes), 16},
                                      {"top-k ids", at(slot.topk_idx_offset), topk_bytes, 16},
                                      {"top-k weights", at(slot.topk_weights_offset), topk_bytes, 16},
                                      {"top-k prefixes", prefix_at, prefix_offset < 0 ? 0 : topk_bytes, 16}},
                                     at(slot.bytes)),
                        check_ring(s, d.ring, slot.bytes)});
}

// The combine slot from the attributes holds what the kernel writes into each piece, and the rings fit:
// a bf16 row, or with `f32_partials` (grouped) an f32 one.
ffi::Error check_combine_rings(const RankState& s, const CombineArgs& c, bool f32_partials = false) {
  auto at = [](int offset) { return static_cast<uint64_t>(offset); };
  return first_failure({check_layout("intranode combine slot",
                                     {{f32_partials ? "f32 partial row" : "bf16 row", 0,
                                       (f32_partials ? 4 : 2) * at(c.hidden), 16},
                                      {"top-k weights", at(c.slot.weights_offset), 4 * at(c.num_topk), 16}},
                                     at(c.slot.bytes)),
                        check_ring(s, c.ring, c.slot.bytes)});
}

// The token payload: x, and FP8 scales when given.
void set_parts(DispatchArgs& d, const ffi::AnyBuffer& x, const ffi::AnyBuffer& scales, ffi::AnyBuffer recv_x,
               ffi::AnyBuffer recv_scales) {
  d.num_parts = given(scales) ? 2 : 1;
  d.num_tokens = static_cast<int>(leading_dim(x));
  d.capacity = static_cast<int>(leading_dim(recv_x));
  const ffi::AnyBuffer send[2] = {x, scales};
  const ffi::AnyBuffer recv[2] = {recv_x, recv_scales};
  for (int p = 0; p < d.num_parts; ++p) {
    d.parts[p].send = static_cast<const char*>(send[p].untyped_data());
    d.parts[p].recv = static_cast<char*>(recv[p].untyped_data());
    d.parts[p].row_bytes = static_cast<int>(row_bytes(send[p]));
  }
}

// The token-level routing and count exchange of a first dispatch: the handle's arrays it fills.
void set_routing(DispatchArgs& d, Pred is_token_in_rank, I32 num_tokens_per_rank, I32 num_tokens_per_expert,
                 I32 recv_src_idx, I32 recv_src_rank, I32 send_row, I32 send_count_before, I32 send_offset,
                 I32 recv_rank_prefix, I32 num_recv_tokens, I32 num_recv_tokens_per_expert) {
  d.recv_src_idx = recv_src_idx.typed_data();
  d.recv_src_rank = recv_src_rank.typed_data();
  d.is_token_in_rank = is_token_in_rank.typed_data();
  d.positions.send_row = send_row.typed_data();
  d.positions.send_count_before = send_count_before.typed_data();
  d.send_row = d.positions.send_row;
  d.send_count_before = d.positions.send_count_before;
  NotifyArgs& n = d.notify;
  n.num_tokens_per_rank = num_tokens_per_rank.typed_data();
  n.num_tokens_per_expert = num_tokens_per_expert.typed_data();
  n.send_offset = send_offset.typed_data();
  n.recv_rank_prefix = recv_rank_prefix.typed_data();
  n.num_recv_tokens = num_recv_tokens.typed_data();
  n.num_recv_tokens_per_expert = num_recv_tokens_per_expert.typed_data();
}

ffi::Error Layout(cudaStream_t stream, I32Matrix topk_idx, ffi::Result<I32> num_tokens_per_rank,
                  ffi::Result<I32> num_tokens_per_expert, ffi::Result<Pred> is_token_in_rank, LayoutAttrs attrs) {
  LayoutArgs a{};
  a.topk_idx = topk_idx.typed_data();
  a.num_tokens = static_cast<int>(topk_idx.dimensions()[0]);
  a.num_topk = static_cast<int>(topk_idx.dimensions()[1]);
  a.num_experts = static_cast<int>(attrs.num_experts);
  a.num_ranks = static_cast<int>(attrs.num_ranks);
  a.num_tokens_per_rank = num_tokens_per_rank->typed_data();
  a.num_tokens_per_expert = num_tokens_per_expert->typed_data();
  a.is_token_in_rank = is_token_in_rank->typed_data();
  return cuda_error(launch_layout(a, stream), "layout kernel");
}

ffi::Error Dispatch(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer scales, I32 topk_idx,
                    F32 topk_weights, Pred is_token_in_rank, I32 num_tokens_per_rank, I32 num_tokens_per_expert,
                    ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::AnyBuffer> recv_scales,
                    ffi::Result<I32> recv_topk_idx, ffi::Result<F32> recv_topk_weights, ffi::Result<I32> recv_src_idx,
                    ffi::Result<I32> recv_src_rank, ffi::Result<I32> send_row, ffi::Result<I32> send_count_before,
                    ffi::Result<I32> send_offset, ffi::Result<I32> recv_rank_prefix, ffi::Result<I32> num_recv_tokens,
                    ffi::Result<I32> num_recv_tokens_per_expert, DispatchAttrs attrs) {
  ffi::Error error;
  std::shared_ptr<RankState> s = live_state(attrs.buffer_id, device, &error);
  if (!s) return error;
  DispatchArgs d{};
  set_parts(d, x, scales, *recv_x, *recv_scales);
  d.topk_idx = data_or_null<const int32_t>(topk_idx);
  d.num_topk = given(topk_idx) ? static_cast<int>(topk_idx.dimensions()[1]) : 0;
  d.topk_weights = data_or_null<const float>(topk_weights);
  d.recv_topk_idx = data_or_null<int32_t>(*recv_topk_idx);
  d.recv_topk_weights = data_or_null<float>(*recv_topk_weights);
  set_routing(d, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, *recv_src_idx, *recv_src_rank, *send_row,
              *send_count_before, *send_offset, *recv_rank_prefix, *num_recv_tokens, *num_recv_tokens_per_expert);
  d.notify.num_experts = d.num_experts = static_cast<int>(attrs.num_experts);
  d.notify.expert_alignment = static_cast<int>(attrs.expert_alignment);
  d.ring = ring_shape(attrs.ring);
  d.slot = attrs.slot;
  if (d.num_experts / s->num_ranks > kMaxLocalExperts) return invalid("too many local experts");
  if (ffi::Error e = check_dispatch_rings(*s, d); e.failure()) return e;
  return cuda_error(launch_dispatch(s->info(), d, stream), "dispatch kernel");
}

// An expert-grouped dispatch: the token-level routing (capacity R * T) as a dispatch's, the rows
// grouped. `topk_idx` are checked ids whose repeats within a token count once in
// `num_tokens_per_expert`, `topk_weights` always given, `topk_prefix` each pair's prefix.
ffi::Error GroupedDispatch(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer scales,
                           I32Matrix topk_idx, F32 topk_weights, I32 topk_prefix, Pred is_token_in_rank,
                           I32 num_tokens_per_rank, I32 num_tokens_per_expert, ffi::Result<ffi::AnyBuffer> recv_x,
                           ffi::Result<ffi::AnyBuffer> recv_scales, ffi::Result<I32> recv_expert,
                           ffi::Result<F32> recv_weight, ffi::Result<I32> token_row, ffi::Result<I32> pair_row,
                           ffi::Result<I32> recv_src_idx, ffi::Result<I32> recv_src_rank, ffi::Result<I32> send_row,
                           ffi::Result<I32> send_count_before, ffi::Result<I32> send_offset,
                           ffi::Result<I32> recv_rank_prefix, ffi::Result<I32> num_recv_tokens,
                           ffi::Result<I32> num_recv_tokens_per_expert, ffi::Result<I32> num_grouped_rows,
                           ffi::Result<I32> grouped_per_expert, GroupedDispatchAttrs attrs) {
  ffi::Error error;
  std::shared_ptr<RankState> s = live_state(attrs.buffer_id, device, &error);
  if (!s) return error;
  GroupedDispatchArgs g{};
  set_parts(g, x, scales, *recv_x, *recv_scales);
  g.grouped_capacity = g.capacity;
  g.capacity = static_cast<int>(recv_src_idx->element_count());
  g.topk_idx = topk_idx.typed_data();
  g.num_topk = static_cast<int>(topk_idx.dimensions()[1]);
  g.topk_weights = topk_weights.typed_data();
  g.topk_prefix = topk_prefix.typed_data();
  set_routing(g, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, *recv_src_idx, *recv_src_rank,
              *send_row, *send_count_before, *send_offset, *recv_rank_prefix, *num_recv_tokens,
              *num_recv_tokens_per_expert);
  g.notify.num_experts = g.num_experts = static_cast<int>(attrs.num_experts);
  g.notify.expert_alignment = 1;  // the token-level handle's counts; the groups are padded by the kernel
  g.expert_alignment = static_cast<int>(attrs.expert_alignment);
  g.pair_row = pair_row->typed_data();
  g.token_row = token_row->typed_data();
  g.recv_expert = recv_expert->typed_data();
  g.recv_weight = recv_weight->typed_data();
  g.num_grouped_rows = num_grouped_rows->typed_data();
  g.grouped_per_expert = grouped_per_expert->typed_data();
  g.ring = ring_shape(attrs.ring);
  g.slot = attrs.slot;
  g.topk_prefix_offset = static_cast<int>(attrs.topk_prefix_offset);
  if (g.num_experts > kMaxGroupedExperts) return invalid("too many experts for an expert-grouped dispatch");
  if (g.expert_alignment < 1) return invalid("expert_alignment must be at least 1");
  if (ffi::Error e = check_dispatch_rings(*s, g, attrs.topk_prefix_offset); e.failure()) return e;
  return cuda_error(launch_grouped_dispatch(s->info(), g, stream), "expert-grouped dispatch kernel");
}

ffi::Error CachedDispatch(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer scales,
                          F32 topk_weights, Pred is_token_in_rank, I32 send_row, I32 send_count_before,
                          I32 num_recv_tokens, ffi::Result<ffi::AnyBuffer> recv_x,
                          ffi::Result<ffi::AnyBuffer> recv_scales, ffi::Result<F32> recv_topk_weights,
                          CachedDispatchAttrs attrs) {
  ffi::Error error;
  std::shared_ptr<RankState> s = live_state(attrs.buffer_id, device, &error);
  if (!s) return error;
  DispatchArgs d{};
  set_parts(d, x, scales, *recv_x, *recv_scales);
  d.topk_weights = data_or_null<const float>(topk_weights);
  d.num_topk = given(topk_weights) ? static_cast<int>(topk_weights.dimensions()[1]) : 0;
  d.recv_topk_weights = data_or_null<float>(*recv_topk_weights);
  d.is_token_in_rank = is_token_in_rank.typed_data();
  d.send_row = send_row.typed_data();
  d.send_count_before = send_count_before.typed_data();
  d.num_recv_tokens = num_recv_tokens.typed_data();
  d.num_experts = s->num_ranks;  // unused without expert ids; keeps experts_per_rank nonzero
  d.ring = ring_shape(attrs.ring);
  d.slot = attrs.slot;
  if (ffi::Error e = check_dispatch_rings(*s, d); e.failure()) return e;
  return cuda_error(launch_dispatch(s->info(), d, stream), "cached dispatch kernel");
}

// A cached expert-grouped dispatch: the token-level routing as a cached dispatch's, and the handle's
// pair rows [R * T, K] and token rows [N] (its padding rows).
ffi::Error GroupedCachedDispatch(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer scales,
                                 F32 topk_weights, Pred is_token_in_rank, I32 send_row, I32 send_count_before,
                                 I32 num_recv_tokens, I32Matrix pair_row, I32 token_row,
                                 ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::AnyBuffer> recv_scales,
                                 ffi::Result<F32> recv_weight, CachedDispatchAttrs attrs) {
  ffi::Error error;
  std::shared_ptr<RankState> s = live_state(attrs.buffer_id, device, &error);
  if (!s) return error;
  GroupedDispatchArgs g{};
  set_parts(g, x, scales, *recv_x, *recv_scales);
  g.grouped_capacity = g.capacity;
  g.capacity = static_cast<int>(pair_row.dimensions()[0]);
  g.num_topk = static_cast<int>(pair_row.dimensions()[1]);
  if (given(topk_weights) && topk_weights.element_count() != static_cast<size_t>(g.num_tokens) * g.num_topk)
    return invalid("cached expert-grouped dispatch: topk_weights must be [T, K] with the handle's K");
  g.topk_weights = data_or_null<const float>(topk_weights);
  g.recv_weight = data_or_null<float>(*recv_weight);
  g.is_token_in_rank = is_token_in_rank.typed_data();
  g.send_row = send_row.typed_data();
  g.send_count_before = send_count_before.typed_data();
  g.num_recv_tokens = num_recv_tokens.typed_data();
  g.num_experts = s->num_ranks;  // unused without expert ids; keeps experts_per_rank nonzero
  g.pair_row = pair_row.typed_data();
  g.token_row = token_row.typed_data();
  g.ring = ring_shape(attrs.ring);
  g.slot = attrs.slot;
  if (ffi::Error e = check_dispatch_rings(*s, g); e.failure()) return e;
  return cuda_error(launch_grouped_dispatch(s->info(), g, stream), "cached expert-grouped dispatch kernel");
}

// What a combine and an expert-grouped combine take alike: rows, weights, biases, the token-level
// routing, outputs and rings (the caller sets its capacity and K, which come from different operands).
void set_combine(CombineArgs& c, BF16Matrix y, F32 topk_weights, BF16 bias0, BF16 bias1, PredMatrix is_token_in_rank,
                 I32 send_row, I32 send_count_before, I32 send_offset, I32 recv_src_idx, I32 recv_rank_prefix,
                 I32 num_recv_tokens, BF16 combined_x, F32 combined_topk_weights, const CombineAttrs& attrs) {
  c.y = reinterpret_cast<const __nv_bfloat16*>(y.typed_data());
  c.hidden = static_cast<int>(y.dimensions()[1]);
  c.topk_weights = data_or_null<const float>(topk_weights);
  c.bias[0] = data_or_null<const __nv_bfloat16>(bias0);
  c.bias[1] = data_or_null<const __nv_bfloat16>(bias1);
  c.is_token_in_rank = is_token_in_rank.typed_data();
  c.num_tokens = static_cast<int>(is_token_in_rank.dimensions()[0]);
  c.send_row = send_row.typed_data();
  c.send_count_before = send_count_before.typed_data();
  c.send_offset = send_offset.typed_data();
  c.recv_src_idx = recv_src_idx.typed_data();
  c.recv_rank_prefix = recv_rank_prefix.typed_data();
  c.num_recv_tokens = num_recv_tokens.typed_data();
  c.combined_x = reinterpret_cast<__nv_bfloat16*>(combined_x.typed_data());
  c.combined_topk_weights = data_or_null<float>(combined_topk_weights);
  c.ring = ring_shape(attrs.ring);
  c.slot = attrs.slot;
}

ffi::Error Combine(cudaStream_t stream, int32_t device, BF16Matrix y, F32 topk_weights, BF16 bias0,
                   BF16 bias1, PredMatrix is_token_in_rank, I32 send_row, I32 send_count_before,
                   I32 send_offset, I32 recv_src_idx, I32 recv_rank_prefix, I32 num_recv_tokens,
                   ffi::Result<BF16> combined_x, ffi::Result<F32> combined_topk_weights, CombineAttrs attrs) {
  ffi::Error error;
  std::shared_ptr<RankState> s = live_state(attrs.buffer_id, device, &error);
  if (!s) return error;
  CombineArgs c{};
  set_combine(c, y, topk_weights, bias0, bias1, is_token_in_rank, send_row, send_count_before, send_offset,
              recv_src_idx, recv_rank_prefix, num_recv_tokens, *combined_x, *combined_topk_weights, attrs);
  c.capacity = static_cast<int>(y.dimensions()[0]);
  c.num_topk = given(topk_weights) ? static_cast<int>(topk_weights.dimensions()[1]) : 0;
  if (c.hidden % 8) return invalid("combine needs a hidden size divisible by 8");
  if (ffi::Error e = check_combine_rings(*s, c); e.failure()) return e;
  return cuda_error(launch_combine(s->info(), c, stream), "combine kernel");
}

// An expert-grouped combine: `y` [N, H] grouped rows, `row_weights` and `topk_weights` [N] or absent,
// the handle's token-level routing (capacity R * T) and pair rows [R * T, K].
ffi::Error GroupedCombine(cudaStream_t stream, int32_t device, BF16Matrix y, F32 row_weights, F32 topk_weights,
                          BF16 bias0, BF16 bias1, PredMatrix is_token_in_rank, I32 send_row, I32 send_count_before,
                          I32 send_offset, I32 recv_src_idx, I32 recv_rank_prefix, I32 num_recv_tokens,
                          I32Matrix pair_row, ffi::Result<BF16> combined_x, ffi::Result<F32> combined_topk_weights,
                          CombineAttrs attrs) {
  ffi::Error error;
  std::shared_ptr<RankState> s = live_state(attrs.buffer_id, device, &error);
  if (!s) return error;
  GroupedCombineArgs c{};
  set_combine(c, y, topk_weights, bias0, bias1, is_token_in_rank, send_row, send_count_before, send_offset,
              recv_src_idx, recv_rank_prefix, num_recv_tokens, *combined_x, *combined_topk_weights, attrs);
  c.capacity = static_cast<int>(pair_row.dimensions()[0]);
  c.num_topk = static_cast<int>(pair_row.dimensions()[1]);
  c.row_weights = data_or_null<const float>(row_weights);
  c.pair_row = pair_row.typed_data();
  if (c.hidden % 8) return invalid("combine needs a hidden size divisible by 8");
  // With N = 0 grouped rows an [N] topk_weights reads as absent; no pair row then points into it.
  if (c.combined_topk_weights && !c.topk_weights && y.dimensions()[0] > 0)
    return invalid("expert-grouped combine: combined_topk_weights needs topk_weights");
  if (recv_src_idx.element_count() != static_cast<size_t>(c.capacity))
    return invalid("expert-grouped combine: pair_row must have a row per token-level receive row");
  if (ffi::Error e = check_combine_rings(*s, c, true); e.failure()) return e;
  return cuda_error(launch_grouped_combine(s->info(), c, stream), "expert-grouped combine kernel");
}

}  // namespace
}  // namespace jax_deepep

namespace jd = jax_deepep;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_layout, jd::Layout,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<jd::I32Matrix>()   // topk_idx [T, K]
                                  .Ret<jd::I32>()         // num_tokens_per_rank [R]
                                  .Ret<jd::I32>()         // num_tokens_per_expert [E]
                                  .Ret<jd::Pred>()        // is_token_in_rank [T, R]
                                  .Attrs<jd::LayoutAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_dispatch, jd::Dispatch,
                              jd::bind_on_device()
                                  .Arg<ffi::AnyBuffer>()  // x [T, H] (bf16, or FP8 values)
                                  .Arg<ffi::AnyBuffer>()  // FP8 scales [T, S] or absent
                                  .Arg<jd::I32>()         // topk_idx [T, K] or absent
                                  .Arg<jd::F32>()         // topk_weights [T, K] or absent
                                  .Arg<jd::Pred>()        // is_token_in_rank [T, R]
                                  .Arg<jd::I32>()         // num_tokens_per_rank [R]
                                  .Arg<jd::I32>()         // num_tokens_per_expert [E]
                                  .Ret<ffi::AnyBuffer>()  // recv_x [N, H]
                                  .Ret<ffi::AnyBuffer>()  // recv scales [N, S] or absent
                                  .Ret<jd::I32>()         // recv_topk_idx [N, K] or absent
                                  .Ret<jd::F32>()         // recv_topk_weights [N, K] or absent
                                  .Ret<jd::I32>()         // recv_src_idx [N]
                                  .Ret<jd::I32>()         // recv_src_rank [N]
                                  .Ret<jd::I32>()         // send_row [T, R]
                                  .Ret<jd::I32>()         // send_count_before [T, R]
                                  .Ret<jd::I32>()         // send_offset [R]
                                  .Ret<jd::I32>()         // recv_rank_prefix [R]
                                  .Ret<jd::I32>()         // num_recv_tokens []
                                  .Ret<jd::I32>()         // num_recv_tokens_per_expert [E / R]
                                  .Attrs<jd::DispatchAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_cached_dispatch, jd::CachedDispatch,
                              jd::bind_on_device()
                                  .Arg<ffi::AnyBuffer>()  // x [T, H]
                                  .Arg<ffi::AnyBuffer>()  // FP8 scales [T, S] or absent
                                  .Arg<jd::F32>()         // topk_weights [T, K] or absent
                                  .Arg<jd::Pred>()        // is_token_in_rank [T, R]
                                  .Arg<jd::I32>()         // send_row [T, R]
                                  .Arg<jd::I32>()         // send_count_before [T, R]
                                  .Arg<jd::I32>()         // num_recv_tokens []
                                  .Ret<ffi::AnyBuffer>()  // recv_x [N, H]
                                  .Ret<ffi::AnyBuffer>()  // recv scales [N, S] or absent
                                  .Ret<jd::F32>()         // recv_topk_weights [N, K] or absent
                                  .Attrs<jd::CachedDispatchAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_combine, jd::Combine,
                              jd::bind_on_device()
                                  .Arg<jd::BF16Matrix>()  // y [N, H]
                                  .Arg<jd::F32>()         // topk_weights [N, K] or absent
                                  .Arg<jd::BF16>()        // bias [T, H] or absent
                                  .Arg<jd::BF16>()        // second bias [T, H] or absent
                                  .Arg<jd::PredMatrix>()  // is_token_in_rank [T, R]
                                  .Arg<jd::I32>()         // send_row [T, R]
                                  .Arg<jd::I32>()         // send_count_before [T, R]
                                  .Arg<jd::I32>()         // send_offset [R]
                                  .Arg<jd::I32>()         // recv_src_idx [N]
                                  .Arg<jd::I32>()         // recv_rank_prefix [R]
                                  .Arg<jd::I32>()         // num_recv_tokens []
                                  .Ret<jd::BF16>()        // combined_x [T, H]
                                  .Ret<jd::F32>()         // combined_topk_weights [T, K] or absent
                                  .Attrs<jd::CombineAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_grouped_dispatch, jd::GroupedDispatch,
                              jd::bind_on_device()
                                  .Arg<ffi::AnyBuffer>()  // x [T, H] (bf16, or FP8 values)
                                  .Arg<ffi::AnyBuffer>()  // FP8 scales [T, S] or absent
                                  .Arg<jd::I32Matrix>()   // topk_idx [T, K], checked
                                  .Arg<jd::F32>()         // topk_weights [T, K]
                                  .Arg<jd::I32>()         // topk_prefix [T, K]
                                  .Arg<jd::Pred>()        // is_token_in_rank [T, R]
                                  .Arg<jd::I32>()         // num_tokens_per_rank [R]
                                  .Arg<jd::I32>()         // num_tokens_per_expert [E], repeats once
                                  .Ret<ffi::AnyBuffer>()  // recv_x [N, H]
                                  .Ret<ffi::AnyBuffer>()  // recv scales [N, S] or absent
                                  .Ret<jd::I32>()         // recv_expert [N]
                                  .Ret<jd::F32>()         // recv_weight [N]
                                  .Ret<jd::I32>()         // token_row [N]
                                  .Ret<jd::I32>()         // pair_row [R * T, K]
                                  .Ret<jd::I32>()         // recv_src_idx [R * T]
                                  .Ret<jd::I32>()         // recv_src_rank [R * T]
                                  .Ret<jd::I32>()         // send_row [T, R]
                                  .Ret<jd::I32>()         // send_count_before [T, R]
                                  .Ret<jd::I32>()         // send_offset [R]
                                  .Ret<jd::I32>()         // recv_rank_prefix [R]
                                  .Ret<jd::I32>()         // num_recv_tokens [] (token-level)
                                  .Ret<jd::I32>()         // num_recv_tokens_per_expert [E / R] (token-level)
                                  .Ret<jd::I32>()         // grouped rows needed []
                                  .Ret<jd::I32>()         // held group sizes [E / R]
                                  .Attrs<jd::GroupedDispatchAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_grouped_cached_dispatch, jd::GroupedCachedDispatch,
                              jd::bind_on_device()
                                  .Arg<ffi::AnyBuffer>()  // x [T, H]
                                  .Arg<ffi::AnyBuffer>()  // FP8 scales [T, S] or absent
                                  .Arg<jd::F32>()         // topk_weights [T, K] or absent
                                  .Arg<jd::Pred>()        // is_token_in_rank [T, R]
                                  .Arg<jd::I32>()         // send_row [T, R]
                                  .Arg<jd::I32>()         // send_count_before [T, R]
                                  .Arg<jd::I32>()         // num_recv_tokens [] (token-level)
                                  .Arg<jd::I32Matrix>()   // pair_row [R * T, K]
                                  .Arg<jd::I32>()         // token_row [N]
                                  .Ret<ffi::AnyBuffer>()  // recv_x [N, H]
                                  .Ret<ffi::AnyBuffer>()  // recv scales [N, S] or absent
                                  .Ret<jd::F32>()         // recv_weight [N] or absent
                                  .Attrs<jd::CachedDispatchAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_grouped_combine, jd::GroupedCombine,
                              jd::bind_on_device()
                                  .Arg<jd::BF16Matrix>()  // y [N, H]
                                  .Arg<jd::F32>()         // row_weights [N] or absent
                                  .Arg<jd::F32>()         // topk_weights [N] or absent
                                  .Arg<jd::BF16>()        // bias [T, H] or absent
                                  .Arg<jd::BF16>()        // second bias [T, H] or absent
                                  .Arg<jd::PredMatrix>()  // is_token_in_rank [T, R]
                                  .Arg<jd::I32>()         // send_row [T, R]
                                  .Arg<jd::I32>()         // send_count_before [T, R]
                                  .Arg<jd::I32>()         // send_offset [R]
                                  .Arg<jd::I32>()         // recv_src_idx [R * T]
                                  .Arg<jd::I32>()         // recv_rank_prefix [R]
                                  .Arg<jd::I32>()         // num_recv_tokens [] (token-level)
                                  .Arg<jd::I32Matrix>()   // pair_row [R * T, K]
                                  .Ret<jd::BF16>()        // combined_x [T, H]
                                  .Ret<jd::F32>()         // combined_topk_weights [T, K] or absent
                                  .Attrs<jd::CombineAttrs>());

std::vector<jd::FfiTarget> jd::intranode_ffi_targets() {
  return {{"jax_deepep_layout", reinterpret_cast<void*>(jax_deepep_layout)},
          {"jax_deepep_dispatch", reinterpret_cast<void*>(jax_deepep_dispatch)},
          {"jax_deepep_cached_dispatch", reinterpret_cast<void*>(jax_deepep_cached_dispatch)},
          {"jax_deepep_combine", reinterpret_cast<void*>(jax_deepep_combine)},
          {"jax_deepep_grouped_dispatch", reinterpret_cast<void*>(jax_deepep_grouped_dispatch)},
          {"jax_deepep_grouped_cached_dispatch", reinterpret_cast<void*>(jax_deepep_grouped_cached_dispatch)},
          {"jax_deepep_grouped_combine", reinterpret_cast<void*>(jax_deepep_grouped_combine)}};
}
