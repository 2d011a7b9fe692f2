// XLA FFI handlers of the normal (intranode) mode. Each looks up the communication buffer of
// its (Buffer id, device ordinal), decodes its buffers and launches one kernel on XLA's stream;
// none of them synchronises with the host.
//
// Argument order (optional ones present when the matching attribute says so) is documented at
// each handler and mirrored by jax_deepep/gpu/backend.py.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/intranode.h"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/ffi_readers.h"
#include "xla_ffi/runtime.h"

namespace ffi = xla::ffi;

namespace jax_deepep {

// Aliases keep commas out of the handler-definition macros.
using I32Vector = ffi::Buffer<ffi::S32, 1>;
using I32Matrix = ffi::Buffer<ffi::S32, 2>;
using BoolMatrix = ffi::Buffer<ffi::PRED, 2>;

namespace {

ffi::Error cuda_error(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal, std::string(what) + ": " + cudaGetErrorString(err));
}

ffi::Error invalid(const std::string& what) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, what); }

int64_t row_bytes(const ffi::AnyBuffer& b) {
  auto dims = b.dimensions();
  return dims.size() < 1 || dims[0] == 0 ? 0 : static_cast<int64_t>(b.size_bytes() / dims[0]);
}

ffi::Error no_state(int64_t buffer_id, int32_t device) {
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    "jax_deepep: no communication buffer " + std::to_string(buffer_id) + " on device " +
                        std::to_string(device) + " (was the Buffer destroyed?)");
}

// Ring shape checks shared by every op that uses the rings.
ffi::Error check_ring(const RankState& s, RingShape ring, int slot_bytes) {
  if (ring.num_channels < 1 || 2 * ring.num_channels > kMaxChannels)
    return invalid("jax_deepep: channel count out of range: " + std::to_string(ring.num_channels));
  if (s.num_ranks == 1) return ffi::Error::Success();
  if (ring.chunk_tokens < 1 || ring.slots < ring.chunk_tokens)
    return invalid("jax_deepep: ring slots (" + std::to_string(ring.slots) + ") below the chunk size");
  const size_t need = static_cast<size_t>(ring.num_channels) * s.num_ranks * ring.slots * slot_bytes;
  if (need > s.ring_bytes())
    return invalid("jax_deepep: rings need " + std::to_string(need) + " bytes, the buffer has " +
                   std::to_string(s.ring_bytes()));
  return ffi::Error::Success();
}

ffi::Error layout_impl(cudaStream_t stream, int64_t num_experts, int64_t num_ranks, I32Matrix topk_idx,
                       ffi::Result<I32Vector> num_tokens_per_rank, ffi::Result<I32Vector> num_tokens_per_expert,
                       ffi::Result<BoolMatrix> is_token_in_rank) {
  LayoutArgs a{};
  a.topk_idx = topk_idx.typed_data();
  a.num_tokens = static_cast<int>(topk_idx.dimensions()[0]);
  a.num_topk = static_cast<int>(topk_idx.dimensions()[1]);
  a.num_experts = static_cast<int>(num_experts);
  a.num_ranks = static_cast<int>(num_ranks);
  a.num_tokens_per_rank = num_tokens_per_rank->typed_data();
  a.num_tokens_per_expert = num_tokens_per_expert->typed_data();
  a.is_token_in_rank = is_token_in_rank->typed_data();
  return cuda_error(launch_layout(a, stream), "layout kernel");
}

// args: parts..., [topk_idx], [topk_weights], is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert
// rets: recv parts..., [recv_topk_idx], [recv_topk_weights], recv_src_idx, recv_src_rank, send_row,
//       send_count_before, send_offset, recv_rank_prefix, num_recv_tokens, num_recv_tokens_per_expert
ffi::Error dispatch_impl(cudaStream_t stream, int32_t device, int64_t buffer_id, int64_t num_parts, bool has_topk,
                         bool has_weights, int64_t num_experts, int64_t expert_alignment, int64_t num_channels,
                         int64_t ring_slots, int64_t chunk_tokens, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  RankState* s = find_rank_state(buffer_id, device);
  if (!s) return no_state(buffer_id, device);
  try {
    ArgReader in(args);
    RetReader out(rets);
    DispatchArgs d{};
    d.num_parts = static_cast<int>(num_parts);
    ffi::AnyBuffer first = in.next();
    d.num_tokens = static_cast<int>(first.dimensions()[0]);
    for (int p = 0; p < d.num_parts; ++p) {
      ffi::AnyBuffer b = p == 0 ? first : in.next();
      d.parts[p].send = static_cast<const char*>(b.untyped_data());
      d.parts[p].row_bytes = static_cast<int>(row_bytes(b));
    }
    ffi::AnyBuffer topk = has_topk ? in.next() : first;
    d.topk_idx = has_topk ? static_cast<const int32_t*>(topk.untyped_data()) : nullptr;
    d.num_topk = has_topk ? static_cast<int>(topk.dimensions()[1]) : 0;
    d.topk_weights = has_weights ? in.next_data<float>() : nullptr;
    NotifyArgs n{};
    d.is_token_in_rank = in.next_data<bool>();
    n.num_tokens_per_rank = in.next_data<int32_t>();
    n.num_tokens_per_expert = in.next_data<int32_t>();

    for (int p = 0; p < d.num_parts; ++p) {
      ffi::AnyBuffer b = out.next();
      d.parts[p].recv = static_cast<char*>(b.untyped_data());
      d.capacity = static_cast<int>(b.dimensions()[0]);
    }
    d.recv_topk_idx = has_topk ? out.next_data<int32_t>() : nullptr;
    d.recv_topk_weights = has_weights ? out.next_data<float>() : nullptr;
    d.recv_src_idx = out.next_data<int32_t>();
    d.recv_src_rank = out.next_data<int32_t>();
    d.positions.send_row = out.next_data<int32_t>();
    d.positions.send_count_before = out.next_data<int32_t>();
    n.send_offset = out.next_data<int32_t>();
    n.recv_rank_prefix = out.next_data<int32_t>();
    n.num_recv_tokens = out.next_data<int32_t>();
    n.num_recv_tokens_per_expert = out.next_data<int32_t>();

    n.num_experts = static_cast<int>(num_experts);
    n.expert_alignment = static_cast<int>(expert_alignment);
    d.num_experts = n.num_experts;
    d.notify = n;
    d.send_row = d.positions.send_row;
    d.send_count_before = d.positions.send_count_before;
    d.ring = RingShape{static_cast<int>(num_channels), static_cast<int>(ring_slots), static_cast<int>(chunk_tokens)};
    const int part_bytes[2] = {d.parts[0].row_bytes, d.parts[1].row_bytes};
    d.slot = dispatch_slot(part_bytes, d.num_parts, d.num_topk);
    if (n.num_experts / s->num_ranks > kMaxLocalExperts) return invalid("jax_deepep: too many local experts");
    if (ffi::Error e = check_ring(*s, d.ring, d.slot.bytes); e.failure()) return e;

    return cuda_error(launch_dispatch(s->info(), d, stream), "dispatch kernel");
  } catch (const std::exception& e) {
    return invalid(e.what());
  }
}

// args: parts..., [topk_weights], is_token_in_rank, send_row, send_count_before, num_recv_tokens
// rets: recv parts..., [recv_topk_weights]
ffi::Error cached_dispatch_impl(cudaStream_t stream, int32_t device, int64_t buffer_id, int64_t num_parts,
                                bool has_weights, int64_t num_channels, int64_t ring_slots, int64_t chunk_tokens,
                                ffi::RemainingArgs args, ffi::RemainingRets rets) {
  RankState* s = find_rank_state(buffer_id, device);
  if (!s) return no_state(buffer_id, device);
  try {
    ArgReader in(args);
    RetReader out(rets);
    DispatchArgs d{};
    d.num_parts = static_cast<int>(num_parts);
    for (int p = 0; p < d.num_parts; ++p) {
      ffi::AnyBuffer b = in.next();
      if (p == 0) d.num_tokens = static_cast<int>(b.dimensions()[0]);
      d.parts[p].send = static_cast<const char*>(b.untyped_data());
      d.parts[p].row_bytes = static_cast<int>(row_bytes(b));
    }
    if (has_weights) {
      ffi::AnyBuffer w = in.next();
      d.topk_weights = static_cast<const float*>(w.untyped_data());
      d.num_topk = static_cast<int>(w.dimensions()[1]);
    }
    d.is_token_in_rank = in.next_data<bool>();
    d.send_row = in.next_data<int32_t>();
    d.send_count_before = in.next_data<int32_t>();
    d.num_recv_tokens = in.next_data<int32_t>();
    for (int p = 0; p < d.num_parts; ++p) {
      ffi::AnyBuffer b = out.next();
      d.parts[p].recv = static_cast<char*>(b.untyped_data());
      d.capacity = static_cast<int>(b.dimensions()[0]);
    }
    d.recv_topk_weights = has_weights ? out.next_data<float>() : nullptr;
    d.num_experts = s->num_ranks;  // unused without expert ids; keeps experts_per_rank nonzero
    d.ring = RingShape{static_cast<int>(num_channels), static_cast<int>(ring_slots), static_cast<int>(chunk_tokens)};
    const int part_bytes[2] = {d.parts[0].row_bytes, d.parts[1].row_bytes};
    d.slot = dispatch_slot(part_bytes, d.num_parts, d.num_topk);
    if (ffi::Error e = check_ring(*s, d.ring, d.slot.bytes); e.failure()) return e;

    return cuda_error(launch_dispatch(s->info(), d, stream), "cached dispatch kernel");
  } catch (const std::exception& e) {
    return invalid(e.what());
  }
}

// args: y, [topk_weights], bias x num_bias, is_token_in_rank, send_row, send_count_before, send_offset,
//       recv_src_idx, recv_rank_prefix, num_recv_tokens
// rets: combined_x, [combined_topk_weights]
ffi::Error combine_impl(cudaStream_t stream, int32_t device, int64_t buffer_id, int64_t num_bias, bool has_weights,
                        int64_t num_channels, int64_t ring_slots, int64_t chunk_tokens, ffi::RemainingArgs args,
                        ffi::RemainingRets rets) {
  RankState* s = find_rank_state(buffer_id, device);
  if (!s) return no_state(buffer_id, device);
  try {
    ArgReader in(args);
    RetReader out(rets);
    CombineArgs c{};
    ffi::AnyBuffer y = in.next();
    c.y = static_cast<const __nv_bfloat16*>(y.untyped_data());
    c.capacity = static_cast<int>(y.dimensions()[0]);
    c.hidden = static_cast<int>(y.dimensions()[1]);
    if (c.hidden % 8) return invalid("jax_deepep: combine needs a hidden size divisible by 8");
    if (has_weights) {
      ffi::AnyBuffer w = in.next();
      c.topk_weights = static_cast<const float*>(w.untyped_data());
      c.num_topk = static_cast<int>(w.dimensions()[1]);
    }
    for (int b = 0; b < num_bias; ++b) c.bias[b] = in.next_data<__nv_bfloat16>();
    ffi::AnyBuffer in_rank = in.next();
    c.is_token_in_rank = static_cast<const bool*>(in_rank.untyped_data());
    c.num_tokens = static_cast<int>(in_rank.dimensions()[0]);
    c.send_row = in.next_data<int32_t>();
    c.send_count_before = in.next_data<int32_t>();
    c.send_offset = in.next_data<int32_t>();
    c.recv_src_idx = in.next_data<int32_t>();
    c.recv_rank_prefix = in.next_data<int32_t>();
    c.num_recv_tokens = in.next_data<int32_t>();
    c.combined_x = out.next_data<__nv_bfloat16>();
    c.combined_topk_weights = has_weights ? out.next_data<float>() : nullptr;
    // A receiver waits for up to a chunk of slots past its head; the sender's chunk holding the
    // last of them must fit in the ring, hence chunks of at most half the ring.
    const int chunk = static_cast<int>(std::min<int64_t>(chunk_tokens, std::max<int64_t>(ring_slots / 2, 1)));
    c.ring = RingShape{static_cast<int>(num_channels), static_cast<int>(ring_slots), chunk};
    c.slot = combine_slot(c.hidden, c.num_topk);
    if (ffi::Error e = check_ring(*s, c.ring, c.slot.bytes); e.failure()) return e;

    return cuda_error(launch_combine(s->info(), c, stream), "combine kernel");
  } catch (const std::exception& e) {
    return invalid(e.what());
  }
}

}  // namespace
}  // namespace jax_deepep

JAX_DEEPEP_EXPORT XLA_FFI_Error* jax_deepep_layout_ffi(XLA_FFI_CallFrame* call_frame);
JAX_DEEPEP_EXPORT XLA_FFI_Error* jax_deepep_dispatch_ffi(XLA_FFI_CallFrame* call_frame);
JAX_DEEPEP_EXPORT XLA_FFI_Error* jax_deepep_cached_dispatch_ffi(XLA_FFI_CallFrame* call_frame);
JAX_DEEPEP_EXPORT XLA_FFI_Error* jax_deepep_combine_ffi(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_layout_ffi, jax_deepep::layout_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("num_ranks")
                                  .Arg<jax_deepep::I32Matrix>()
                                  .Ret<jax_deepep::I32Vector>()
                                  .Ret<jax_deepep::I32Vector>()
                                  .Ret<jax_deepep::BoolMatrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_dispatch_ffi, jax_deepep::dispatch_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_parts")
                                  .Attr<bool>("has_topk")
                                  .Attr<bool>("has_weights")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("expert_alignment")
                                  .Attr<int64_t>("num_channels")
                                  .Attr<int64_t>("ring_slots")
                                  .Attr<int64_t>("chunk_tokens")
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_cached_dispatch_ffi, jax_deepep::cached_dispatch_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_parts")
                                  .Attr<bool>("has_weights")
                                  .Attr<int64_t>("num_channels")
                                  .Attr<int64_t>("ring_slots")
                                  .Attr<int64_t>("chunk_tokens")
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_combine_ffi, jax_deepep::combine_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_bias")
                                  .Attr<bool>("has_weights")
                                  .Attr<int64_t>("num_channels")
                                  .Attr<int64_t>("ring_slots")
                                  .Attr<int64_t>("chunk_tokens")
                                  .RemainingArgs()
                                  .RemainingRets());

// Ring slot sizes, so Python can size rings at trace time.
JAX_DEEPEP_EXPORT int jax_deepep_dispatch_slot_bytes(int part0_bytes, int part1_bytes, int num_parts, int num_topk) {
  const int part_bytes[2] = {part0_bytes, part1_bytes};
  return jax_deepep::dispatch_slot(part_bytes, num_parts, num_topk).bytes;
}

JAX_DEEPEP_EXPORT int jax_deepep_combine_slot_bytes(int hidden, int num_topk) {
  return jax_deepep::combine_slot(hidden, num_topk).bytes;
}
