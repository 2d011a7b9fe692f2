"""Every size and offset of the kernels' buffers, computed here and only here.

The handlers receive the offsets they need as attributes and never derive them again, and the
user-facing "buffer too small" checks compare these sizes with the Buffer's at trace time. Pure
Python: the size hints work without the compiled modules (CPU CI calls them).

Three layouts:
  - intranode ring slots (`dispatch_slot`, `combine_slot`, and the expert-grouped
    `grouped_dispatch_slot`, `grouped_combine_slot`): one token in a ring of the communication
    buffer (cuda/intranode.h);
  - the low-latency half (`low_latency_layout`): one of the halves that calls take in turn
    (`low_latency_num_halves` of them) in the symmetric buffer (cuda/low_latency.cuh);
  - the internode halves (`internode_dispatch_layout`, `internode_combine_layout`) and where they
    lie (`internode_regions`): the dispatch and combine regions of the symmetric buffer
    (cuda/internode.cuh).

The handlers decode these dataclasses into the C++ structs of the same names and fields
(`gpu/ffi_call.struct_attribute`), and check that each piece fits before any kernel runs.
"""
from __future__ import annotations

import dataclasses

from .limits import FP8_BLOCK
from .logfmt import GROUP as LOGFMT_GROUP, meta_bytes as logfmt_meta_bytes

_ROW_HEADER_BYTES = 16  # low latency: the source token index before each dispatched row
_SIGNAL_BYTES = 8  # NVSHMEM modes: signature, call number and count (cuda/nvshmem_peers.cuh: call_signal)
MAX_LOW_LATENCY_HALVES = 8  # cuda/nvshmem_peers.cuh: kMaxLowLatencyHalves (a receipt per half)
_SLOT_META_BYTES = 16  # intranode: source token index and destination row before each slot
_INTERNODE_RETURN_BLOCKS = 32  # cuda/internode.cuh: kInternodeReturnBlocks


def align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


# ---- intranode ring slots ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DispatchSlot:
    part_offset: tuple  # (offset of part 0, offset of part 1)
    topk_idx_offset: int
    topk_weights_offset: int
    bytes: int


def dispatch_slot(part_bytes, num_topk: int) -> DispatchSlot:
    """A dispatch slot: meta, each part, K ids, K weights, each 16-byte aligned."""
    offsets, at = [], _SLOT_META_BYTES
    for n in part_bytes:
        offsets.append(at)
        at += align(n, 16)
    offsets += [at] * (2 - len(offsets))
    idx_at = at
    weights_at = idx_at + align(num_topk * 4, 16)
    return DispatchSlot(tuple(offsets), idx_at, weights_at, weights_at + align(num_topk * 4, 16))


def grouped_dispatch_slot(part_bytes, num_topk: int) -> tuple:
    """An expert-grouped dispatch slot: a dispatch slot, then K i32 prefixes (each pair's position among
    its sender's earlier tokens of that expert). Returns (the slot, its bytes covering the prefixes; the
    prefixes' offset)."""
    plain = dispatch_slot(part_bytes, num_topk)
    return dataclasses.replace(plain, bytes=plain.bytes + align(num_topk * 4, 16)), plain.bytes


@dataclasses.dataclass(frozen=True)
class CombineSlot:
    weights_offset: int
    bytes: int


def combine_slot(hidden: int, num_topk: int) -> CombineSlot:
    """A combine slot: bf16 [H], then K f32 weights, each 16-byte aligned."""
    weights_at = align(hidden * 2, 16)
    return CombineSlot(weights_at, weights_at + align(num_topk * 4, 16))


def grouped_combine_slot(hidden: int, num_topk: int) -> CombineSlot:
    """An expert-grouped combine slot: a token's f32 partial sum [H] on one rank, then K f32 weights."""
    weights_at = align(hidden * 4, 16)
    return CombineSlot(weights_at, weights_at + align(num_topk * 4, 16))


def intranode_ring_bytes(num_channels: int, num_ranks: int, slots: int, slot_bytes: int) -> int:
    """Bytes the rings of one rank's buffer take: `slots` slots of `slot_bytes` per channel and peer."""
    return num_channels * num_ranks * slots * slot_bytes


# ---- low latency -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LowLatencyLayout:
    dispatch_row_bytes: int
    combine_row_bytes: int
    logfmt_meta_bytes: int  # a LogFMT combine row's (amax, amin) pairs, before its group data (jax_deepep/logfmt.py)
    combine_offset: int  # within a half
    signal_offset: int   # within a half
    half_bytes: int


def low_latency_layout(num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> LowLatencyLayout:
    """One half: the dispatch receive area ([E][M] rows of header + payload, big enough for bf16
    and FP8 rows), the combine receive area ([E][M] rows big enough for bf16, and where H is a multiple
    of 128 for a LogFMT row's (amax, amin) pairs and its groups, bf16 at worst), then E dispatch counts
    and E combine flags (64-bit signals)."""
    m = num_max_dispatch_tokens_per_rank
    dispatch_row = _ROW_HEADER_BYTES + max(hidden * 2, hidden + (hidden // FP8_BLOCK) * 4)
    meta = logfmt_meta_bytes(hidden) if hidden % LOGFMT_GROUP == 0 else 0
    combine_row = meta + hidden * 2
    combine_offset = align(num_experts * m * dispatch_row, 128)
    signal_offset = combine_offset + align(num_experts * m * combine_row, 128)
    half = signal_offset + align(num_experts * _SIGNAL_BYTES * 2, 128)
    return LowLatencyLayout(dispatch_row, combine_row, meta, combine_offset, signal_offset, half)


def low_latency_num_halves(num_rdma_bytes: int, layout: LowLatencyLayout) -> int:
    """B: how many halves of `layout` a symmetric buffer of `num_rdma_bytes` holds, rounded down to a
    power of two (so that n % B stays in step when the 32-bit call number n wraps), at most
    MAX_LOW_LATENCY_HALVES. Call n of an op uses half n % B, so a rank may have up to B sends of one op
    in flight (cuda/low_latency.cuh)."""
    fits = min(num_rdma_bytes // layout.half_bytes, MAX_LOW_LATENCY_HALVES)
    return 1 << (fits.bit_length() - 1) if fits > 0 else 0


# ---- internode ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InternodeDispatchLayout:
    row_bytes: int
    ids_at: int
    weights_at: int
    prefix_at: int
    part_at: tuple
    counts: int
    expert_counts: int
    inbox: int
    inbox_signals: int
    landing: int
    forward_signals: int
    half_bytes: int
    staging_bytes: int


def internode_dispatch_layout(num_tokens: int, capacity: int, top_k: int, has_ids: bool, has_weights: bool,
                              part_bytes, num_experts: int, ranks_per_node: int, num_ranks: int,
                              has_prefixes: bool = False) -> InternodeDispatchLayout:
    """A dispatched row (16-byte header, K ids, K weights, K i32 pair prefixes with `has_prefixes` (a
    first expert-grouped dispatch), each part; 16-byte aligned), one half of the dispatch region
    (cuda/internode.cuh says what each piece holds; signals are 8 bytes) and the staging of its puts.
    The signals come first, at offsets set by the ranks and experts alone, so a peer's signal lands
    where this rank waits for it even when the peer's call has other shapes: its signature then
    fails the op at once."""
    nodes, t = num_ranks // ranks_per_node, num_tokens
    ids_at = 16
    weights_at = ids_at + (top_k * 4 if has_ids else 0)
    prefix_at = weights_at + (top_k * 4 if has_weights else 0)
    at = align(prefix_at + (top_k * 4 if has_prefixes else 0), 16)
    part_at = []
    for p in range(2):
        part_at.append(at)
        at = align(at + (part_bytes[p] if p < len(part_bytes) else 0), 16)
    row = at
    experts_per_rank = num_experts // num_ranks if has_ids else 0
    counts = 0
    inbox_signals = counts + num_ranks * num_ranks * _SIGNAL_BYTES
    forward_signals = inbox_signals + nodes * _SIGNAL_BYTES
    expert_counts = forward_signals + ranks_per_node * nodes * _SIGNAL_BYTES
    inbox = align(expert_counts + num_ranks * experts_per_rank * _SIGNAL_BYTES, 16)
    landing = inbox + nodes * t * row
    half = align(landing + capacity * row, 256)
    staging = nodes * t * row
    return InternodeDispatchLayout(row, ids_at, weights_at, prefix_at, tuple(part_at), counts, expert_counts, inbox,
                                   inbox_signals, landing, forward_signals, half, staging)


@dataclasses.dataclass(frozen=True)
class InternodeCombineLayout:
    return_bytes: int
    partial_bytes: int
    returns: int
    return_signals: int
    partials: int
    partial_signals: int
    half_bytes: int
    staging_bytes: int


def internode_combine_layout(num_tokens: int, hidden: int, top_k: int, ranks_per_node: int, num_ranks: int, *,
                             exact_partials: bool, f32_returns: bool = False) -> InternodeCombineLayout:
    """A returned row (bf16 [H], or f32 with `f32_returns` (an expert-grouped combine's sums of pair
    rows), + K f32 weights), a node's partial ([H] f32 with `exact_partials`, else bf16, then K f32
    weights), and one half of the combine region: its signals first, at offsets set by the ranks alone
    (as in `internode_dispatch_layout`), then the rows."""
    nodes, t = num_ranks // ranks_per_node, num_tokens
    return_bytes = align(hidden * (4 if f32_returns else 2) + top_k * 4, 16)
    partial_bytes = align(hidden * (4 if exact_partials else 2) + top_k * 4, 16)
    return_signals = 0
    partial_signals = return_signals + ranks_per_node * _INTERNODE_RETURN_BLOCKS * _SIGNAL_BYTES
    returns = align(partial_signals + nodes * _SIGNAL_BYTES, 16)
    partials = returns + ranks_per_node * nodes * t * return_bytes
    half = align(partials + nodes * t * partial_bytes, 256)
    return InternodeCombineLayout(return_bytes, partial_bytes, returns, return_signals, partials, partial_signals,
                                  half, nodes * t * partial_bytes)


@dataclasses.dataclass(frozen=True)
class InternodeRegion:
    offset: int       # where the op's region starts in the symmetric buffer
    half_stride: int  # where its second half starts: half the region, whatever a call's sizes


def internode_regions(num_rdma_bytes: int) -> tuple:
    """The dispatch region [0, region) and the combine region [region, 2 * region) of the symmetric
    buffer. Each holds two halves used by alternate calls, so consecutive calls of different sizes
    never overlap."""
    region = num_rdma_bytes // 2 // 256 * 256
    return InternodeRegion(0, region // 2), InternodeRegion(region, region // 2)


def internode_rdma_bytes(half_bytes: int, staging_bytes: int) -> int:
    """`num_rdma_bytes` a call with these halves and staging needs: its region holds two halves
    and staging is half the buffer."""
    return max(4 * half_bytes, 2 * staging_bytes)
