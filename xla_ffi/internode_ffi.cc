// XLA FFI handlers of the internode normal mode (cuda/internode.cu): dispatch (cached dispatch is
// the same call without ids) and combine, each one custom call launching its kernels on XLA's
// stream, on the process's NVSHMEM buffer (xla_ffi/nvshmem_runtime.cc). No host synchronisation.
//
// Operand order (optional ones present when the attribute says so), mirrored by
// jax_deepep/gpu/internode.py:
//   dispatch: parts..., [ids i32 [T, K]], [weights f32 [T, K]], is_token_in_rank bool [T, R],
//             num_tokens_per_rank i32 [R], [num_tokens_per_expert i32 [E] (with ids)]
//          -> parts [N, ...]..., [ids [N, K]], [weights [N, K]], src_rank [N], src_idx [N],
//             send_row [T, R], recv_rank_prefix [R], num_recv [], per_expert [E / R or 0],
//             forwarded [nodes, T], token [1]
//   combine: y bf16 [N, H], [weights f32 [N, K]], bias bf16 [T, H] x num_bias, src_rank [N],
//            src_idx [N], num_recv [], is_token_in_rank [T, R], forwarded [nodes, T]
//          -> x bf16 [T, H], [weights [T, K]], token [1]
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/internode.cuh"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/ffi_readers.h"
#include "xla_ffi/nvshmem_ffi.h"
#include "xla_ffi/nvshmem_runtime.h"

namespace ffi = xla::ffi;

namespace jax_deepep {
namespace {

ffi::Error invalid(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_deepep internode: " + message);
}

// The runtime, checked for an internode op over `num_ranks` ranks in nodes of `ranks_per_node`.
NvshmemRuntime* usable_runtime(int64_t num_ranks, int64_t ranks_per_node, ffi::Error* error) {
  NvshmemRuntime* rt = live_nvshmem_runtime("internode", "a Buffer with num_rdma_bytes > 0 over several nodes "
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

ffi::Error fits(const NvshmemRuntime& rt, size_t half_bytes, size_t staging_bytes) {
  const size_t region = internode_region_bytes(rt.num_bytes);
  if (2 * half_bytes > region || staging_bytes > rt.num_bytes / 2) {
    return invalid("num_rdma_bytes=" + std::to_string(rt.num_bytes) + " is too small: these sizes need " +
                   std::to_string(4 * half_bytes) + " bytes of halves and " + std::to_string(2 * staging_bytes) +
                   " for staging (Buffer.get_internode_rdma_size_hint)");
  }
  return ffi::Error::Success();
}

ffi::Error launched(cudaError_t status, const char* what) { return launch_status(status, "internode", what); }

int64_t per_token_bytes(const ffi::AnyBuffer& b) {
  const auto dims = b.dimensions();
  return dims.size() == 0 || dims[0] == 0 ? 0 : static_cast<int64_t>(b.size_bytes() / dims[0]);
}

ffi::Error Dispatch(cudaStream_t stream, int64_t num_parts, bool has_ids, bool has_weights, int64_t num_experts,
                    int64_t ranks_per_node, int64_t expert_alignment, ffi::RemainingArgs args,
                    ffi::RemainingRets rets) {
  try {
    ArgReader in_args(args);
    RetReader out_rets(rets);
    if (num_parts < 1 || num_parts > 2) return invalid("one or two payload parts");
    InternodeDispatchShape s{};
    InternodeDispatchIn in{};
    s.num_parts = static_cast<int>(num_parts);
    s.has_ids = has_ids;
    s.has_weights = has_weights;
    s.num_experts = has_ids ? static_cast<int>(num_experts) : 0;
    s.ranks_per_node = static_cast<int>(ranks_per_node);
    int64_t num_tokens = 0;
    for (int p = 0; p < num_parts; ++p) {
      const ffi::AnyBuffer part = in_args.next();
      num_tokens = part.dimensions().size() == 0 ? 0 : part.dimensions()[0];
      s.part_bytes[p] = static_cast<int>(per_token_bytes(part));
      in.part[p] = part.untyped_data();
    }
    if (has_ids) {
      const ffi::AnyBuffer ids = in_args.next();
      s.top_k = static_cast<int>(ids.dimensions()[1]);
      in.ids = static_cast<const int*>(ids.untyped_data());
    }
    if (has_weights) {
      const ffi::AnyBuffer weights = in_args.next();
      s.top_k = static_cast<int>(weights.dimensions()[1]);
      in.weights = static_cast<const float*>(weights.untyped_data());
    }
    const ffi::AnyBuffer in_rank = in_args.next();
    in.is_token_in_rank = static_cast<const bool*>(in_rank.untyped_data());
    in.tokens_per_rank = in_args.next_data<int>();
    in.tokens_per_expert = has_ids ? in_args.next_data<int>() : nullptr;
    const int64_t num_ranks = in_rank.dimensions()[1];
    if (num_tokens > kInternodeMaxTokens || s.top_k > kInternodeMaxTopk || expert_alignment < 1 ||
        (has_ids && (num_experts <= 0 || num_experts % num_ranks != 0))) {
      return invalid("unsupported sizes: T=" + std::to_string(num_tokens) + " (at most " +
                     std::to_string(kInternodeMaxTokens) + "), top-k " + std::to_string(s.top_k) + " (at most " +
                     std::to_string(kInternodeMaxTopk) + "), num_experts " + std::to_string(num_experts));
    }
    s.num_tokens = static_cast<int>(num_tokens);

    InternodeDispatchOut out{};
    for (int p = 0; p < num_parts; ++p) {
      const ffi::AnyBuffer part = out_rets.next();
      s.capacity = part.dimensions().size() == 0 ? 0 : static_cast<int>(part.dimensions()[0]);
      out.part[p] = part.untyped_data();
    }
    out.ids = has_ids ? out_rets.next_data<int>() : nullptr;
    out.weights = has_weights ? out_rets.next_data<float>() : nullptr;
    out.src_rank = out_rets.next_data<int>();
    out.src_idx = out_rets.next_data<int>();
    out.send_row = out_rets.next_data<int>();
    out.recv_rank_prefix = out_rets.next_data<int>();
    out.num_recv = out_rets.next_data<int>();
    const ffi::AnyBuffer per_expert = out_rets.next();
    out.per_expert = has_ids ? static_cast<int*>(per_expert.untyped_data()) : nullptr;
    out.forwarded = out_rets.next_data<int>();
    out.token = out_rets.next_data<int>();

    ffi::Error error;
    NvshmemRuntime* rt = usable_runtime(num_ranks, ranks_per_node, &error);
    if (rt == nullptr) return error;
    const InternodeDispatchLayout layout = make_internode_dispatch_layout(s, static_cast<int>(num_ranks));
    if (ffi::Error e = fits(*rt, layout.half_bytes, layout.staging_bytes); e.failure()) return e;
    return launched(launch_internode_dispatch(stream, rt->memory, InternodeTraffic{rt->traffic},
                                              internode_region_bytes(rt->num_bytes), s, in, out,
                                              static_cast<int>(expert_alignment)),
                    "dispatch");
  } catch (const std::exception& e) {
    return invalid(e.what());
  }
}

ffi::Error Combine(cudaStream_t stream, bool has_weights, int64_t num_bias, int64_t ranks_per_node,
                   ffi::RemainingArgs args, ffi::RemainingRets rets) {
  try {
    ArgReader in_args(args);
    RetReader out_rets(rets);
    if (num_bias < 0 || num_bias > 2) return invalid("zero, one or two biases");
    InternodeCombineShape s{};
    InternodeCombineIn in{};
    const ffi::AnyBuffer y = in_args.next();
    const auto y_dims = y.dimensions();
    if (y_dims.size() != 2 || y_dims[1] % 8 != 0) {
      return invalid("combine expects y bf16 [N, H] with H a multiple of 8");
    }
    s.capacity = static_cast<int>(y_dims[0]);
    s.hidden = static_cast<int>(y_dims[1]);
    in.y = static_cast<const uint16_t*>(y.untyped_data());
    if (has_weights) {
      const ffi::AnyBuffer weights = in_args.next();
      s.top_k = static_cast<int>(weights.dimensions()[1]);
      in.weights = static_cast<const float*>(weights.untyped_data());
    }
    s.num_bias = static_cast<int>(num_bias);
    for (int b = 0; b < num_bias; ++b) in.bias[b] = in_args.next_data<uint16_t>();
    in.src_rank = in_args.next_data<int>();
    in.src_idx = in_args.next_data<int>();
    in.num_recv = in_args.next_data<int>();
    const ffi::AnyBuffer in_rank = in_args.next();
    in.is_token_in_rank = static_cast<const bool*>(in_rank.untyped_data());
    in.forwarded = in_args.next_data<int>();
    s.num_tokens = static_cast<int>(in_rank.dimensions()[0]);
    s.ranks_per_node = static_cast<int>(ranks_per_node);
    const int64_t num_ranks = in_rank.dimensions()[1];
    if (s.num_tokens > kInternodeMaxTokens || s.top_k > kInternodeMaxTopk) {
      return invalid("unsupported sizes: T=" + std::to_string(s.num_tokens) + ", top-k " + std::to_string(s.top_k));
    }
    InternodeCombineOut out{};
    out.x = out_rets.next_data<uint16_t>();
    out.weights = has_weights ? out_rets.next_data<float>() : nullptr;
    out.token = out_rets.next_data<int>();

    ffi::Error error;
    NvshmemRuntime* rt = usable_runtime(num_ranks, ranks_per_node, &error);
    if (rt == nullptr) return error;
    const InternodeCombineLayout layout = make_internode_combine_layout(s, static_cast<int>(num_ranks));
    if (ffi::Error e = fits(*rt, layout.half_bytes, layout.staging_bytes); e.failure()) return e;
    return launched(launch_internode_combine(stream, rt->memory, InternodeTraffic{rt->traffic},
                                             internode_region_bytes(rt->num_bytes), s, in, out),
                    "combine");
  } catch (const std::exception& e) {
    return invalid(e.what());
  }
}

}  // namespace
}  // namespace jax_deepep

namespace jd = jax_deepep;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_internode_dispatch, jd::Dispatch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<int64_t>("num_parts")
                                  .Attr<bool>("has_ids")
                                  .Attr<bool>("has_weights")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("ranks_per_node")
                                  .Attr<int64_t>("expert_alignment")
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_deepep_internode_combine, jd::Combine,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<bool>("has_weights")
                                  .Attr<int64_t>("num_bias")
                                  .Attr<int64_t>("ranks_per_node")
                                  .RemainingArgs()
                                  .RemainingRets());

extern "C" {

// Bytes of symmetric buffer (num_rdma_bytes) an internode dispatch or combine of these sizes needs.
uint64_t jax_deepep_internode_dispatch_bytes(int num_tokens, int capacity, int top_k, int has_ids, int has_weights,
                                             int num_parts, int part0_bytes, int part1_bytes, int num_experts,
                                             int ranks_per_node, int num_ranks) {
  jd::InternodeDispatchShape s{num_tokens, capacity, top_k, has_ids != 0, has_weights != 0, num_parts,
                               {part0_bytes, part1_bytes}, num_experts, ranks_per_node};
  const jd::InternodeDispatchLayout l = jd::make_internode_dispatch_layout(s, num_ranks);
  const uint64_t halves = 4 * l.half_bytes, staging = 2 * l.staging_bytes;
  return halves > staging ? halves : staging;
}

uint64_t jax_deepep_internode_combine_bytes(int num_tokens, int capacity, int hidden, int top_k, int ranks_per_node,
                                            int num_ranks) {
  jd::InternodeCombineShape s{num_tokens, capacity, hidden, top_k, 0, ranks_per_node};
  const jd::InternodeCombineLayout l = jd::make_internode_combine_layout(s, num_ranks);
  const uint64_t halves = 4 * l.half_bytes, staging = 2 * l.staging_bytes;
  return halves > staging ? halves : staging;
}

}  // extern "C"
