// XLA FFI handlers of the low-latency kernels (cuda/low_latency.cu), one per custom call. Built into
// both libraries: over NVSHMEM in _nvshmem_lib, within one node over CUDA IPC in _intranode_lib; each
// links its own find_low_latency_memory and target names (xla_ffi/low_latency_memory.h).
//
// The send and recv halves of each op are separate custom calls so that XLA may schedule other
// work between them (docs/API.md's return_recv_hook); a one-rank combine moves nothing and is its recv
// call alone. The send launch numbers the op on the device (a
// counter per kind and process: every rank runs the same program, so the same sequence of ops) and
// writes that number into a small `token` output; the recv call takes the token as an input, which
// both orders the two calls and tells the recv kernels which buffer half and signal tag to wait for.
// Each send also carries a `call_site` attribute that the kernels never read: it differs between
// the sends of one program, so XLA cannot merge two equal sends into one feeding two receives.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>

#include "cuda/launch.h"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/layout_check.h"
#include "xla_ffi/low_latency_memory.h"
#include "xla_ffi/operands.h"

namespace ffi = xla::ffi;

namespace jax_deepep {

// The Buffer and static sizes every low-latency op runs with.
struct LowLatencySizes {
  int64_t buffer_id;
  int64_t num_ranks;
  int64_t num_max_dispatch_tokens_per_rank;  // M
  int64_t num_experts;
  int64_t num_halves;  // B: the halves of the layout that num_rdma_bytes holds
};

// Every op also takes the layout of a buffer half (jax_deepep/sizes.py:low_latency_layout).
struct DispatchSendAttrs {
  LowLatencySizes sizes;
  LowLatencyLayout layout;
  bool use_fp8;
  bool round_scale;
  int64_t call_site;
};

// round_scale: the send's (a one-rank FP8 receive casts this rank's own rows itself).
struct DispatchRecvAttrs {
  LowLatencySizes sizes;
  LowLatencyLayout layout;
  bool use_ue8m0;
  bool round_scale;
};

// use_logfmt: rows to other ranks travel as LogFMT rows (cuda/logfmt.cuh); a combine with it and one
// without are different ops (their signatures differ), so ranks that disagree fail, naming both.
struct CombineSendAttrs {
  LowLatencySizes sizes;
  LowLatencyLayout layout;
  bool zero_copy;
  bool use_logfmt;
  int64_t call_site;
};

struct CombineRecvAttrs {
  LowLatencySizes sizes;
  LowLatencyLayout layout;
  bool use_logfmt;
};

}  // namespace jax_deepep

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::LowLatencyLayout, StructMember<uint64_t>("dispatch_row_bytes"),
                                      StructMember<uint64_t>("combine_row_bytes"),
                                      StructMember<uint64_t>("logfmt_meta_bytes"),
                                      StructMember<uint64_t>("combine_offset"),
                                      StructMember<uint64_t>("signal_offset"), StructMember<uint64_t>("half_bytes"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::LowLatencySizes, StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("num_ranks"),
                                      StructMember<int64_t>("num_max_dispatch_tokens_per_rank"),
                                      StructMember<int64_t>("num_experts"), StructMember<int64_t>("num_halves"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::DispatchSendAttrs,
                                      StructMember<jax_deepep::LowLatencySizes>("sizes"),
                                      StructMember<jax_deepep::LowLatencyLayout>("layout"),
                                      StructMember<bool>("use_fp8"), StructMember<bool>("round_scale"),
                                      StructMember<int64_t>("call_site"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::DispatchRecvAttrs,
                                      StructMember<jax_deepep::LowLatencySizes>("sizes"),
                                      StructMember<jax_deepep::LowLatencyLayout>("layout"),
                                      StructMember<bool>("use_ue8m0"), StructMember<bool>("round_scale"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::CombineSendAttrs,
                                      StructMember<jax_deepep::LowLatencySizes>("sizes"),
                                      StructMember<jax_deepep::LowLatencyLayout>("layout"),
                                      StructMember<bool>("zero_copy"), StructMember<bool>("use_logfmt"),
                                      StructMember<int64_t>("call_site"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_deepep::CombineRecvAttrs,
                                      StructMember<jax_deepep::LowLatencySizes>("sizes"),
                                      StructMember<jax_deepep::LowLatencyLayout>("layout"),
                                      StructMember<bool>("use_logfmt"));

namespace jax_deepep {
namespace {

constexpr int64_t kMaxTopk = 32;
constexpr int64_t kMaxTokensPerRank = 8192;  // slot table in shared memory; 16-bit counts in signals
// use_logfmt: the combine receive's decoding parameters per (top-k row, group) in shared memory
// (jax_deepep/limits.py LOGFMT_MAX_DECODED_GROUPS).
constexpr int64_t kLogfmtMaxDecodedGroups = 3072;

ffi::Error invalid(const std::string& message) { return invalid_argument("jax_deepep low-latency: " + message); }

// The Buffer's memory, checked against the op's static sizes, layout and `hidden`; `error` set when unusable.
std::optional<LowLatencyMemory> checked_memory(int32_t device, const LowLatencySizes& sizes,
                                               const LowLatencyLayout& l, int64_t hidden, ffi::Error* error) {
  std::optional<LowLatencyMemory> rt = find_low_latency_memory(sizes.buffer_id, device, error);
  if (!rt) return std::nullopt;
  const int64_t num_ranks = sizes.num_ranks, max_tokens = sizes.num_max_dispatch_tokens_per_rank;
  const int64_t num_experts = sizes.num_experts;
  if (num_ranks != rt->memory.num_ranks) {
    *error = invalid("the op runs over " + std::to_string(num_ranks) + " ranks but the Buffer has " +
                     std::to_string(rt->memory.num_ranks));
    return std::nullopt;
  }
  if (max_tokens <= 0 || max_tokens > kMaxTokensPerRank || hidden <= 0 || hidden % 8 ||
      num_experts % num_ranks != 0 || num_experts <= 0) {
    *error = invalid("unsupported sizes: num_max_dispatch_tokens_per_rank=" + std::to_string(max_tokens) +
                     " (1.." + std::to_string(kMaxTokensPerRank) + "), hidden=" + std::to_string(hidden) +
                     " (a multiple of 8), num_experts=" + std::to_string(num_experts) + " (a multiple of ranks)");
    return std::nullopt;
  }
  const bool power_of_two = (sizes.num_halves & (sizes.num_halves - 1)) == 0;  // call numbers wrap in step
  if (sizes.num_halves < 2 || sizes.num_halves > kMaxLowLatencyHalves || !power_of_two ||
      sizes.num_halves * l.half_bytes > rt->num_bytes) {
    *error = invalid("num_rdma_bytes=" + std::to_string(rt->num_bytes) + " does not hold the " +
                     std::to_string(sizes.num_halves) + " halves of " + std::to_string(l.half_bytes) +
                     " bytes the op was traced with (2, 4 or 8 are served)");
    return std::nullopt;
  }
  const uint64_t rows = num_experts * max_tokens;
  const uint64_t dispatch_bytes =
      std::max(dispatch_payload_bytes(hidden, false), dispatch_payload_bytes(hidden, true));
  *error = first_failure({
      check_layout("low-latency dispatch row", {{"header and payload", 0, dispatch_bytes, 16},
                                                {"next row", l.dispatch_row_bytes, 0, 16}},
                   l.dispatch_row_bytes),
      check_layout("low-latency combine row", {{"bf16 row", 0, 2 * static_cast<uint64_t>(hidden), 16},
                                               {"next row", l.combine_row_bytes, 0, 16}},
                   l.combine_row_bytes),
      check_layout("low-latency half", {{"dispatch rows", 0, rows * l.dispatch_row_bytes, 16},
                                        {"combine rows", l.combine_offset, rows * l.combine_row_bytes, 16},
                                        {"signals", l.signal_offset, 2 * 8 * static_cast<uint64_t>(num_experts), 16}},
                   l.half_bytes),
      check_layout("low-latency buffer", {{"last half", (sizes.num_halves - 1) * l.half_bytes, l.half_bytes, 16}},
                   rt->num_bytes)});
  if (error->failure()) return std::nullopt;
  return rt;
}

// What the launch needs besides its arrays: the peers, the op's sizes, the checked layout, and the
// signature every rank's call of `op` must carry (the op, what sizes its buffer halves, and the row
// format: FP8 for dispatch, LogFMT for combine; the send and the receive of one op compute the same).
LowLatencyCall call_of(const LowLatencyMemory& rt, OpKind op, const LowLatencySizes& sizes,
                       const LowLatencyLayout& layout, int64_t num_tokens, int64_t top_k, int64_t hidden,
                       bool compact_rows) {
  const LowLatencyShape shape{static_cast<int>(num_tokens), static_cast<int>(top_k), static_cast<int>(hidden),
                              static_cast<int>(sizes.num_max_dispatch_tokens_per_rank),
                              static_cast<int>(sizes.num_experts)};
  const OpSignature signature(op, {static_cast<uint32_t>(shape.max_tokens), static_cast<uint32_t>(hidden),
                                   static_cast<uint32_t>(shape.num_experts), static_cast<uint32_t>(sizes.num_halves),
                                   static_cast<uint32_t>(layout.half_bytes), compact_rows ? 1u : 0u});
  return LowLatencyCall{rt.memory, shape, layout, static_cast<int>(sizes.num_halves), signature.value};
}

// use_logfmt: rows of whole groups, whose (amax, amin) pairs and bf16 data at worst fit a combine row,
// and a receive that keeps top_k * groups decoding parameters.
ffi::Error check_logfmt(const LowLatencyLayout& l, int64_t hidden, int64_t top_k) {
  if (hidden % kLogfmtGroup) return invalid("use_logfmt needs a hidden size that is a multiple of 128");
  if (top_k * (hidden / kLogfmtGroup) > kLogfmtMaxDecodedGroups) {
    return invalid("use_logfmt serves top_k * hidden / 128 <= " + std::to_string(kLogfmtMaxDecodedGroups));
  }
  return check_layout("low-latency LogFMT combine row",
                      {{"(amax, amin) pairs", 0, 4 * static_cast<uint64_t>(hidden / kLogfmtGroup), 16},
                       {"group data", l.logfmt_meta_bytes, 2 * static_cast<uint64_t>(hidden), 16}},
                      l.combine_row_bytes);
}

// y and recv_x are [E / R, R * M, H].
bool is_expert_rows(ffi::Span<const int64_t> dims, const LowLatencySizes& sizes) {
  return dims.size() == 3 && dims[0] * sizes.num_ranks == sizes.num_experts &&
         dims[1] == sizes.num_ranks * sizes.num_max_dispatch_tokens_per_rank;
}

ffi::Error launched(cudaError_t status, const char* what) { return launch_status(status, "low-latency", what); }

// The FP8 cast rows of a dispatch's T tokens (u8 [T, dispatch_row_bytes]): given exactly when use_fp8
// with other ranks to send to (with one rank the receive casts every row itself).
ffi::Error check_cast_rows(const ffi::AnyBuffer& cast_rows, bool use_fp8, int64_t num_ranks, int64_t num_tokens,
                           const LowLatencyLayout& layout, const char* op) {
  const bool wanted = use_fp8 && num_ranks > 1;
  const uint64_t bytes = wanted ? num_tokens * layout.dispatch_row_bytes : 0;
  if (given(cast_rows) == wanted && (!wanted || cast_rows.size_bytes() == bytes)) return ffi::Error::Success();
  return invalid(std::string(op) + " expects FP8 cast rows of " + std::to_string(bytes) + " bytes, got " +
                 std::to_string(given(cast_rows) ? cast_rows.size_bytes() : 0));
}

// cast_rows: FP8 with other ranks only, u8 [T, dispatch_row_bytes] of scratch; else absent.
ffi::Error DispatchSend(cudaStream_t stream, int32_t device, BF16 x, I32 topk_idx, ffi::Result<I32> send_slot,
                        ffi::Result<I32> token, ffi::Result<ffi::AnyBuffer> cast_rows, DispatchSendAttrs attrs) {
  const auto x_dims = x.dimensions();
  const auto idx_dims = topk_idx.dimensions();
  if (x_dims.size() != 2 || idx_dims.size() != 2 || idx_dims[0] != x_dims[0] || idx_dims[1] > kMaxTopk) {
    return invalid("dispatch expects x [T, H] and topk_idx [T, K <= 32]");
  }
  ffi::Error error;
  std::optional<LowLatencyMemory> rt = checked_memory(device, attrs.sizes, attrs.layout, x_dims[1], &error);
  if (!rt) return error;
  if (x_dims[0] > attrs.sizes.num_max_dispatch_tokens_per_rank) {
    return invalid("more tokens than num_max_dispatch_tokens_per_rank");
  }
  if (attrs.use_fp8 && x_dims[1] % kFp8Block) return invalid("FP8 needs a hidden size that is a multiple of 128");
  ffi::Error bad = check_cast_rows(*cast_rows, attrs.use_fp8, attrs.sizes.num_ranks, x_dims[0], attrs.layout, "dispatch send");
  if (bad.failure()) return bad;
  const LowLatencyCall call = call_of(*rt, OpKind::kLowLatencyDispatch, attrs.sizes, attrs.layout, x_dims[0],
                                      idx_dims[1], x_dims[1], attrs.use_fp8);
  const LowLatencyDispatchSendArgs args{reinterpret_cast<const __nv_bfloat16*>(x.typed_data()),
                                        topk_idx.typed_data(),
                                        send_slot->typed_data(),
                                        token->typed_data(),
                                        data_or_null<char>(*cast_rows),
                                        attrs.use_fp8,
                                        attrs.round_scale};
  return launched(launch_low_latency_dispatch_send(call, args, stream), "dispatch send");
}

// x, topk_idx, send_slot and cast_rows are the send's (this rank's own rows are read from them;
// cast_rows absent where the send has none); recv_scales is absent for bf16 rows.
ffi::Error DispatchRecv(cudaStream_t stream, int32_t device, I32 token, BF16 x, I32 topk_idx, I32 send_slot,
                        ffi::AnyBuffer cast_rows,
                        ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::AnyBuffer> recv_scales,
                        ffi::Result<I32> recv_count, ffi::Result<I32> recv_src_info,
                        ffi::Result<I32> recv_layout_range, DispatchRecvAttrs attrs) {
  const auto dims = recv_x->dimensions();
  if (!is_expert_rows(dims, attrs.sizes)) return invalid("dispatch recv_x must be [E / R, R * M, H]");
  const auto x_dims = x.dimensions();
  if (x_dims.size() != 2 || x_dims[0] < 1 || x_dims[0] > attrs.sizes.num_max_dispatch_tokens_per_rank ||
      x_dims[1] != dims[2]) {
    return invalid("dispatch recv expects the send's x [T, H] (1 <= T <= num_max_dispatch_tokens_per_rank)");
  }
  const auto idx_dims = topk_idx.dimensions();
  const auto slot_dims = send_slot.dimensions();
  if (idx_dims.size() != 2 || idx_dims[0] != x_dims[0] || idx_dims[1] > kMaxTopk || slot_dims.size() != 2 ||
      slot_dims[0] != idx_dims[0] || slot_dims[1] != idx_dims[1]) {
    return invalid("dispatch recv expects the send's topk_idx and send_slot [T, K <= 32]");
  }
  ffi::Error error;
  std::optional<LowLatencyMemory> rt = checked_memory(device, attrs.sizes, attrs.layout, dims[2], &error);
  if (!rt) return error;
  const bool use_fp8 = given(*recv_scales);
  if (attrs.use_ue8m0 && dims[2] % (4 * kFp8Block)) {
    return invalid("UE8M0 scales need a hidden size that is a multiple of 512");
  }
  ffi::Error bad = check_cast_rows(cast_rows, use_fp8, attrs.sizes.num_ranks, x_dims[0], attrs.layout, "dispatch recv");
  if (bad.failure()) return bad;
  const LowLatencyDispatchRecvArgs args{token.typed_data(),
                                        reinterpret_cast<const __nv_bfloat16*>(x.typed_data()),
                                        topk_idx.typed_data(),
                                        send_slot.typed_data(),
                                        data_or_null<const char>(cast_rows),
                                        recv_x->untyped_data(),
                                        data_or_null<void>(*recv_scales),
                                        recv_count->typed_data(),
                                        recv_src_info->typed_data(),
                                        recv_layout_range->typed_data(),
                                        use_fp8,
                                        attrs.use_ue8m0,
                                        attrs.round_scale};
  const LowLatencyCall call =
      call_of(*rt, OpKind::kLowLatencyDispatch, attrs.sizes, attrs.layout, x_dims[0], idx_dims[1], dims[2], use_fp8);
  return launched(launch_low_latency_dispatch_recv(call, args, stream), "dispatch recv");
}

ffi::Error CombineSend(cudaStream_t stream, int32_t device, BF16 y, I32 recv_layout_range, ffi::Result<I32> token,
                       CombineSendAttrs attrs) {
  const auto dims = y.dimensions();
  if (!is_expert_rows(dims, attrs.sizes)) return invalid("combine y must be [E / R, R * M, H]");
  if (attrs.sizes.num_ranks == 1) return invalid("a one-rank combine has no send call: its receive sums y alone");
  ffi::Error error;
  std::optional<LowLatencyMemory> rt = checked_memory(device, attrs.sizes, attrs.layout, dims[2], &error);
  if (!rt) return error;
  if (attrs.use_logfmt) {
    if (ffi::Error bad = check_logfmt(attrs.layout, dims[2], 1); bad.failure()) return bad;
  }
  // Puts read y itself: its allocation must be registered with NVSHMEM (a host call, once per allocation).
  // LogFMT rows are encoded into the staging buffer instead.
  const bool put_from_y = attrs.zero_copy && !attrs.use_logfmt && rt->has_put_peers;
  if (std::string why; put_from_y && !register_put_source(*rt, y.untyped_data(), y.size_bytes(), &why)) {
    return ffi::Error(ffi::ErrorCode::kInternal, "jax_deepep low-latency: zero_copy combine: " + why);
  }
  const LowLatencyCombineSendArgs args{reinterpret_cast<const __nv_bfloat16*>(y.typed_data()),
                                       recv_layout_range.typed_data(), token->typed_data(), put_from_y,
                                       attrs.use_logfmt};
  const LowLatencyCall call =
      call_of(*rt, OpKind::kLowLatencyCombine, attrs.sizes, attrs.layout, 0, 0, dims[2], attrs.use_logfmt);
  return launched(launch_low_latency_combine_send(call, args, stream), "combine send");
}

ffi::Error CombineRecv(cudaStream_t stream, int32_t device, I32 token, BF16 y, I32 recv_layout_range, I32 topk_idx, F32 topk_weights,
                       I32 send_slot, ffi::Result<BF16> out, CombineRecvAttrs attrs) {
  const auto idx_dims = topk_idx.dimensions();
  const auto out_dims = out->dimensions();
  if (idx_dims.size() != 2 || out_dims.size() != 2 || idx_dims[0] != out_dims[0] || idx_dims[1] > kMaxTopk) {
    return invalid("combine expects topk_idx [T, K <= 32] and an output [T, H]");
  }
  const auto y_dims = y.dimensions();
  if (!is_expert_rows(y_dims, attrs.sizes) || y_dims[2] != out_dims[1] ||
      static_cast<int64_t>(recv_layout_range.element_count()) != y_dims[0] * attrs.sizes.num_ranks * 2) {
    return invalid("combine recv expects y [E / R, R * M, H] and recv_layout_range [E / R, R, 2]");
  }
  if (given(token) != (attrs.sizes.num_ranks > 1) || (given(token) && token.element_count() != 1)) {
    return invalid("combine recv expects the send's token [1] with several ranks, and none with one");
  }
  ffi::Error error;
  std::optional<LowLatencyMemory> rt = checked_memory(device, attrs.sizes, attrs.layout, out_dims[1], &error);
  if (!rt) return error;
  if (attrs.use_logfmt) {
    if (ffi::Error bad = check_logfmt(attrs.layout, out_dims[1], idx_dims[1]); bad.failure()) return bad;
  }
  const LowLatencyCombineRecvArgs args{data_or_null<const int>(token),
                                       reinterpret_cast<const __nv_bfloat16*>(y.typed_data()),
                                       recv_layout_range.typed_data(),
                                       topk_idx.typed_data(),
                                       topk_weights.typed_data(),
                                       send_slot.typed_data(),
                                       reinterpret_cast<__nv_bfloat16*>(out->typed_data()),
                                       attrs.use_logfmt};
  const LowLatencyCall call = call_of(*rt, OpKind::kLowLatencyCombine, attrs.sizes, attrs.layout, idx_dims[0],
                                      idx_dims[1], out_dims[1], attrs.use_logfmt);
  return launched(launch_low_latency_combine_recv(call, args, stream), "combine recv");
}

}  // namespace
}  // namespace jax_deepep

namespace jd = jax_deepep;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_ll_dispatch_send, jd::DispatchSend,
                              jd::bind_on_device()
                                  .Arg<jd::BF16>()  // x [T, H]
                                  .Arg<jd::I32>()   // topk_idx [T, K]
                                  .Ret<jd::I32>()          // send_slot [T, K]
                                  .Ret<jd::I32>()          // token [1]
                                  .Ret<ffi::AnyBuffer>()   // FP8 scratch rows u8 [T, row bytes], or absent
                                  .Attrs<jd::DispatchSendAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_ll_dispatch_recv, jd::DispatchRecv,
                              jd::bind_on_device()
                                  .Arg<jd::I32>()         // token [1]
                                  .Arg<jd::BF16>()        // the send's x [T, H]
                                  .Arg<jd::I32>()         // the send's topk_idx [T, K]
                                  .Arg<jd::I32>()         // the send's send_slot [T, K]
                                  .Arg<ffi::AnyBuffer>()  // the send's FP8 rows u8 [T, row bytes], or absent
                                  .Ret<ffi::AnyBuffer>()  // recv_x [E / R, R * M, H] (bf16 or e4m3)
                                  .Ret<ffi::AnyBuffer>()  // FP8 scales [E / R, R * M, S] or absent
                                  .Ret<jd::I32>()         // recv_count [E / R]
                                  .Ret<jd::I32>()         // recv_src_info [E / R, R * M]
                                  .Ret<jd::I32>()         // recv_layout_range [E / R, R, 2]
                                  .Attrs<jd::DispatchRecvAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_ll_combine_send, jd::CombineSend,
                              jd::bind_on_device()
                                  .Arg<jd::BF16>()  // y [E / R, R * M, H]
                                  .Arg<jd::I32>()   // recv_layout_range [E / R, R, 2]
                                  .Ret<jd::I32>()   // token [1]
                                  .Attrs<jd::CombineSendAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_ll_combine_recv, jd::CombineRecv,
                              jd::bind_on_device()
                                  .Arg<jd::I32>()   // token [1], absent with one rank (no send)
                                  .Arg<jd::BF16>()  // y [E / R, R * M, H]
                                  .Arg<jd::I32>()   // recv_layout_range [E / R, R, 2]
                                  .Arg<jd::I32>()   // topk_idx [T, K]
                                  .Arg<jd::F32>()   // topk_weights [T, K]
                                  .Arg<jd::I32>()   // send_slot [T, K]
                                  .Ret<jd::BF16>()  // combined x [T, H]
                                  .Attrs<jd::CombineRecvAttrs>());

// Named with this library's prefix: jax_deepep_ll_dispatch_send (NVSHMEM), jax_deepep_ll_node_dispatch_send (one node).
std::vector<jd::FfiTarget> jd::low_latency_ffi_targets() {
  const std::string prefix = jd::low_latency_target_prefix();
  return {{prefix + "dispatch_send", reinterpret_cast<void*>(jax_deepep_ll_dispatch_send)},
          {prefix + "dispatch_recv", reinterpret_cast<void*>(jax_deepep_ll_dispatch_recv)},
          {prefix + "combine_send", reinterpret_cast<void*>(jax_deepep_ll_combine_send)},
          {prefix + "combine_recv", reinterpret_cast<void*>(jax_deepep_ll_combine_recv)}};
}
