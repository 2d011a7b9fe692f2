// Every host launcher of every mode, each taking a few small structs: where the op runs (the
// rank's peers and memory), its sizes and layout, its arrays, and XLA's stream. The structs live
// in the mode's header (included below); the layouts come from jax_deepep/sizes.py through the
// handlers (xla_ffi/*_ffi.cc), which check them against the real buffer first. No launcher
// synchronises with the host.
#pragma once

#include <cuda_runtime.h>

#include "cuda/internode.cuh"
#include "cuda/intranode.h"
#include "cuda/low_latency.cuh"
#include "cuda/rank_info.h"

namespace jax_deepep {

// ---- intranode (cuda/layout.cu, cuda/intranode_dispatch.cu, cuda/intranode_combine.cu) ---------
// Raise the kernels' shared-memory limits on the current device. Called once per Buffer and
// device, so the handlers spend no host call on it per launch.
cudaError_t prepare_layout();
cudaError_t prepare_dispatch();
cudaError_t prepare_combine();

cudaError_t launch_layout(const LayoutArgs& args, cudaStream_t stream);
// One kernel per op: each starts with the barrier over all ranks (cuda/op_sync.cuh), and a first
// dispatch also exchanges the counts and fills the handle's arrays.
cudaError_t launch_dispatch(const RankInfo& info, const DispatchArgs& args, cudaStream_t stream);
cudaError_t launch_combine(const RankInfo& info, const CombineArgs& args, cudaStream_t stream);
// The expert-grouped instantiations of the same kernels (their own OpKinds, so a rank running one
// never pairs with a peer running the plain op); prepare_dispatch / prepare_combine prepare them too.
cudaError_t launch_grouped_dispatch(const RankInfo& info, const GroupedDispatchArgs& args, cudaStream_t stream);
cudaError_t launch_grouped_combine(const RankInfo& info, const GroupedCombineArgs& args, cudaStream_t stream);

// ---- low latency (cuda/low_latency.cu) -----------------------------------------------------------
// Sends this rank's tokens (FP8-cast in flight when use_fp8) to every expert's rank and signals
// each expert's count. Writes send_slot [T, K] (row of (t, k) in its expert block, -1 when not
// sent) and token[0] = this call's number, which the recv call reads.
cudaError_t launch_low_latency_dispatch_send(const LowLatencyCall& call, const LowLatencyDispatchSendArgs& args,
                                             cudaStream_t stream);

// Waits for every source rank's counts, then packs the rows of each local expert in
// (source rank, source token) order into recv_x [E_l, R*M, H] (bf16 or fp8 + scales).
cudaError_t launch_low_latency_dispatch_recv(const LowLatencyCall& call, const LowLatencyDispatchRecvArgs& args,
                                             cudaStream_t stream);

// Sends each local expert's rows back to the other source ranks and flags each expert as done
// there (this rank's own rows stay in y for the recv). token[0] = this call's number, as in dispatch.
cudaError_t launch_low_latency_combine_send(const LowLatencyCall& call, const LowLatencyCombineSendArgs& args,
                                            cudaStream_t stream);

// Waits for every other rank's experts' flags, then out[t] = sum_k w[t, k] * row of (t, k), in f32;
// the rows of this rank's experts come straight from y (the send's input) and recv_layout_range.
cudaError_t launch_low_latency_combine_recv(const LowLatencyCall& call, const LowLatencyCombineRecvArgs& args,
                                            cudaStream_t stream);

// ---- internode (cuda/internode_dispatch.cu, cuda/internode_combine.cu) ----------------------------
// Dispatch (and cached dispatch, without ids): one kernel in which notify, network send, forward and
// receive run at once, through rings (cuda/internode_rings.cuh).
cudaError_t launch_internode_dispatch(const InternodeDispatchCall& call, const InternodeDispatchIn& in,
                                      const InternodeDispatchOut& out, cudaStream_t stream);

// Combine: one kernel in which return to the forwarders, reduce per node and finish at the source run
// at once, through rings.
cudaError_t launch_internode_combine(const InternodeCombineCall& call, const InternodeCombineIn& in,
                                     const InternodeCombineOut& out, cudaStream_t stream);

}  // namespace jax_deepep
