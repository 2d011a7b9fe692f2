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
  - the internode geometry of each op (`internode_dispatch_geometry`, `internode_combine_geometry`):
    its rows, the signals at offsets R and L alone set, and its rings from the op's `Config`, all in
    the symmetric buffer (cuda/internode.cuh, cuda/internode_rings.cuh).

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
INTERNODE_MAX_RANKS_PER_NODE = 8  # cuda/internode.cuh: kInternodeMaxRanksPerNode
INTERNODE_MAX_CHANNELS = 64  # cuda/internode.cuh: kInternodeMaxChannels (signals of every channel lie apart)
INTERNODE_MAX_EXPERTS = 16384  # cuda/internode.cuh: kInternodeMaxExperts (room for the per-expert counts)


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


# Bytes per channel of an expert-grouped combine's rows: f32 partial sums (a plain combine's are bf16).
GROUPED_COMBINE_CHANNEL_BYTES = 4


def grouped_combine_slot(hidden: int, num_topk: int) -> CombineSlot:
    """An expert-grouped combine slot: a token's f32 partial sum [H] on one rank, then K f32 weights."""
    weights_at = align(hidden * GROUPED_COMBINE_CHANNEL_BYTES, 16)
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
class InternodeSignals:
    """Where the internode signals lie in every rank's buffer, at offsets that R and L alone set, so a
    peer's signal lands where this rank waits for it whatever the shapes or Config of the peer's call, and
    its signature fails the op at once (cuda/internode_rings.cuh says who writes each)."""

    link_bytes: int      # one (link, channel): tail, head, then 1 + 2 L end counts (8-byte signals)
    combine_links: int   # [nodes RDMA peers + L local ranks][INTERNODE_MAX_CHANNELS] of link_bytes
    dispatch_links: int  # the same for dispatch
    counts: int          # [2 parities][R src][R dst]: tokens src sends to dst
    expert_counts: int   # [2 parities][INTERNODE_MAX_EXPERTS]: [R src][E / R] tokens (grouped: pairs)
    rings: int           # where every op's rings start


def internode_node_sizes(num_ranks: int) -> list:
    """The ranks per node an axis of `num_ranks` may have in internode mode: at most 8, and two nodes or more."""
    return [n for n in range(1, INTERNODE_MAX_RANKS_PER_NODE + 1) if num_ranks % n == 0 and num_ranks // n >= 2]


def internode_signals(num_ranks: int, ranks_per_node: int) -> InternodeSignals:
    nodes = num_ranks // ranks_per_node
    link_bytes = (3 + 2 * ranks_per_node) * _SIGNAL_BYTES
    links = (nodes + ranks_per_node) * INTERNODE_MAX_CHANNELS * link_bytes
    counts = 2 * links
    expert_counts = counts + 2 * num_ranks * num_ranks * _SIGNAL_BYTES
    rings = align(expert_counts + 2 * INTERNODE_MAX_EXPERTS * _SIGNAL_BYTES, 256)
    return InternodeSignals(link_bytes, 0, links, counts, expert_counts, rings)


@dataclasses.dataclass(frozen=True)
class InternodeRings:
    """One op's rings (from its Config): every op starts them at `InternodeSignals.rings`, since a
    producer writes into a ring only once its consumer started the same call (cuda/internode_rings.cuh)."""

    channels: int
    rdma_slots: int       # rows of a ring from an RDMA peer (num_max_rdma_chunked_recv_tokens)
    rdma_batch: int       # rows a producer stages before it puts them (num_max_rdma_chunked_send_tokens)
    rdma_slot_bytes: int
    nvl_slots: int        # rows of a ring from a rank of the own node (num_max_nvl_chunked_recv_tokens)
    nvl_batch: int        # rows a producer writes before it publishes them (num_max_nvl_chunked_send_tokens)
    nvl_slot_bytes: int
    rdma_ring: int        # [nodes source][channels][rdma_slots] rows
    nvl_ring: int         # [L source][channels][nvl_slots] rows
    receive_bytes: int    # where the rings end
    staging_bytes: int    # the send rings, at the start of staging: [nodes destination][channels][rdma_slots]


def internode_rings(signals: InternodeSignals, num_ranks: int, ranks_per_node: int, config, rdma_slot_bytes: int,
                    nvl_slot_bytes: int) -> InternodeRings:
    """The rings of an op whose rows are `rdma_slot_bytes` between nodes and `nvl_slot_bytes` within one,
    with `config`'s channels, ring slots and batches."""
    nodes, c = num_ranks // ranks_per_node, config.num_channels
    rdma_slots, nvl_slots = config.num_max_rdma_chunked_recv_tokens, config.num_max_nvl_chunked_recv_tokens
    rdma_bytes = nodes * c * rdma_slots * rdma_slot_bytes
    nvl_ring = signals.rings + rdma_bytes
    receive = align(nvl_ring + ranks_per_node * c * nvl_slots * nvl_slot_bytes, 256)
    return InternodeRings(c, rdma_slots, config.num_max_rdma_chunked_send_tokens, rdma_slot_bytes, nvl_slots,
                          config.num_max_nvl_chunked_send_tokens, nvl_slot_bytes, signals.rings, nvl_ring, receive,
                          rdma_bytes)


@dataclasses.dataclass(frozen=True)
class InternodeDispatchLayout:
    """A dispatched row, in every ring: a 16-byte header (source rank, source token, mask of the
    destination node's ranks it goes to, its row there (-1: dropped) once forwarded), K ids, K weights,
    K i32 pair prefixes (a first expert-grouped dispatch), then each part, each 16-byte aligned."""

    row_bytes: int
    ids_at: int
    weights_at: int
    prefix_at: int
    part_at: tuple


def internode_dispatch_layout(top_k: int, has_ids: bool, has_weights: bool, part_bytes,
                              has_prefixes: bool = False) -> InternodeDispatchLayout:
    ids_at = 16
    weights_at = ids_at + (top_k * 4 if has_ids else 0)
    prefix_at = weights_at + (top_k * 4 if has_weights else 0)
    at = align(prefix_at + (top_k * 4 if has_prefixes else 0), 16)
    part_at = []
    for p in range(2):
        part_at.append(at)
        at = align(at + (part_bytes[p] if p < len(part_bytes) else 0), 16)
    return InternodeDispatchLayout(at, ids_at, weights_at, prefix_at, tuple(part_at))


@dataclasses.dataclass(frozen=True)
class InternodeCombineLayout:
    """A row returned to its forwarder (bf16 [H], or f32 for an expert-grouped combine's sums of pair rows,
    then K f32 weights) and a node's partial sum for a token (f32 [H] when exact, else bf16, then K f32
    weights), the rows of combine's rings within a node and between nodes."""

    return_bytes: int
    partial_bytes: int


def internode_combine_layout(hidden: int, top_k: int, *, exact_partials: bool,
                             f32_returns: bool = False) -> InternodeCombineLayout:
    return InternodeCombineLayout(align(hidden * (4 if f32_returns else 2) + top_k * 4, 16),
                                  align(hidden * (4 if exact_partials else 2) + top_k * 4, 16))


@dataclasses.dataclass(frozen=True)
class InternodeGeometry:
    """Everything an internode op's handler takes about where its rows and signals lie."""

    layout: object  # InternodeDispatchLayout or InternodeCombineLayout
    signals: InternodeSignals
    rings: InternodeRings

    @property
    def rdma_bytes(self) -> int:
        """`num_rdma_bytes` the op needs: its rings, and its send rings in the staging half as much again
        (xla_ffi/nvshmem_runtime.h)."""
        return max(self.rings.receive_bytes, 2 * self.rings.staging_bytes)


def internode_dispatch_geometry(num_ranks: int, ranks_per_node: int, config, top_k: int, has_ids: bool,
                                has_weights: bool, part_bytes, has_prefixes: bool = False) -> InternodeGeometry:
    """A dispatch: its rows travel whole between nodes and within one."""
    layout = internode_dispatch_layout(top_k, has_ids, has_weights, part_bytes, has_prefixes)
    signals = internode_signals(num_ranks, ranks_per_node)
    return InternodeGeometry(layout, signals, internode_rings(signals, num_ranks, ranks_per_node, config,
                                                              layout.row_bytes, layout.row_bytes))


def internode_combine_geometry(num_ranks: int, ranks_per_node: int, config, hidden: int, top_k: int, *,
                               exact_partials: bool, f32_returns: bool = False) -> InternodeGeometry:
    """A combine: returned rows within a node, partial sums between nodes."""
    layout = internode_combine_layout(hidden, top_k, exact_partials=exact_partials, f32_returns=f32_returns)
    signals = internode_signals(num_ranks, ranks_per_node)
    return InternodeGeometry(layout, signals, internode_rings(signals, num_ranks, ranks_per_node, config,
                                                              layout.partial_bytes, layout.return_bytes))
