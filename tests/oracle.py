"""An independent numpy model of docs/API.md, written from the spec with plain loops
(it shares no code with jax_deepep). Inputs and outputs hold every rank at once: `[R, ...]`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import ml_dtypes
import numpy as np

FP8_BLOCK = 128
FP8_MAX = 448.0
MIN_AMAX = 1e-4  # DeepEP clamps a block's amax so that an all-zero block gets a finite scale


def valid_ids(topk_idx, num_experts: int):
    """Ids outside [0, E) become -1 (that is how they must behave)."""
    idx = np.asarray(topk_idx).astype(np.int64)
    return np.where((idx >= 0) & (idx < num_experts), idx, -1)


# ---- normal mode ---------------------------------------------------------------------------
@dataclasses.dataclass
class Layout:
    num_tokens_per_rank: np.ndarray  # [R]
    num_tokens_per_rdma_rank: Optional[np.ndarray]  # [R // ranks_per_node] or None on one node
    num_tokens_per_expert: np.ndarray  # [E]
    is_token_in_rank: np.ndarray  # bool [T, R]


def layout(topk_idx, num_experts: int, num_ranks: int, ranks_per_node: Optional[int] = None) -> Layout:
    """Layout of one rank's `topk_idx [T, K]`."""
    idx = valid_ids(topk_idx, num_experts)
    experts_per_rank = num_experts // num_ranks
    num_tokens = idx.shape[0]
    per_expert = np.zeros(num_experts, np.int64)
    in_rank = np.zeros((num_tokens, num_ranks), bool)
    for t in range(num_tokens):
        for e in idx[t]:
            if e >= 0:
                per_expert[e] += 1
                in_rank[t, e // experts_per_rank] = True
    per_rdma_rank = None
    if ranks_per_node is not None and ranks_per_node < num_ranks:
        nodes = num_ranks // ranks_per_node
        per_rdma_rank = in_rank.reshape(num_tokens, nodes, ranks_per_node).any(axis=2).sum(axis=0)
    return Layout(in_rank.sum(axis=0), per_rdma_rank, per_expert, in_rank)


@dataclasses.dataclass
class Received:
    """What one rank receives in normal mode, in receive order (source rank, source token)."""

    src_rank: np.ndarray  # [n]: every arrival, also those past the capacity
    src_token: np.ndarray  # [n]
    capacity: int  # N

    @property
    def num_recv_tokens(self) -> int:
        return len(self.src_rank)

    @property
    def num_kept(self) -> int:
        return min(self.num_recv_tokens, self.capacity)


@dataclasses.dataclass
class Dispatched:
    """The spec'd result of a normal dispatch on one rank."""

    received: Received
    recv_parts: list  # one [N, ...] array per payload; rows past num_kept are zero
    recv_topk_idx: Optional[np.ndarray]  # [N, K] local expert ids, -1 elsewhere and in padding
    recv_topk_weights: Optional[np.ndarray]  # f32 [N, K], 0 where recv_topk_idx == -1
    num_recv_tokens_per_expert: np.ndarray  # [E_l], aligned


def receive_order(topk_idx, num_experts: int, capacity: int) -> list:
    """`Received` of every rank for routing `topk_idx [R, T, K]`."""
    num_ranks, num_tokens, _ = topk_idx.shape
    in_rank = [layout(topk_idx[s], num_experts, num_ranks).is_token_in_rank for s in range(num_ranks)]
    out = []
    for d in range(num_ranks):
        pairs = [(s, t) for s in range(num_ranks) for t in range(num_tokens) if in_rank[s][t, d]]
        src = np.array(pairs, np.int64).reshape(-1, 2)
        out.append(Received(src[:, 0], src[:, 1], capacity))
    return out


def dispatch(parts, topk_idx, topk_weights, num_experts: int, capacity: int, expert_alignment: int = 1) -> list:
    """Normal-mode dispatch of every rank.

    parts: payload arrays `[R, T, ...]` (x, or the FP8 values and scales); topk_idx `[R, T, K]`;
    topk_weights `[R, T, K]` or None. Returns one `Dispatched` per rank.
    """
    num_ranks = topk_idx.shape[0]
    experts_per_rank = num_experts // num_ranks
    idx = valid_ids(topk_idx, num_experts)
    per_expert = sum(layout(idx[s], num_experts, num_ranks).num_tokens_per_expert for s in range(num_ranks))
    results = []
    for d, received in enumerate(receive_order(idx, num_experts, capacity)):
        kept = received.num_kept
        rows = (received.src_rank[:kept], received.src_token[:kept])
        recv_parts = []
        for p in parts:
            p = np.asarray(p)
            buf = np.zeros((capacity,) + p.shape[2:], p.dtype)
            buf[:kept] = p[rows]
            recv_parts.append(buf)
        local = np.full((capacity, idx.shape[2]), -1, np.int64)
        ids = idx[rows]
        mine = (ids >= 0) & (ids // experts_per_rank == d)
        local[:kept] = np.where(mine, ids - d * experts_per_rank, -1)
        weights = None
        if topk_weights is not None:
            weights = np.zeros((capacity, idx.shape[2]), np.float32)
            weights[:kept] = np.where(mine, np.asarray(topk_weights, np.float32)[rows], 0.0)
        counts = per_expert[d * experts_per_rank:(d + 1) * experts_per_rank]
        aligned = -(-counts // expert_alignment) * expert_alignment
        results.append(Dispatched(received, recv_parts, local, weights, aligned))
    return results


def combine(rows, dispatched: list, num_tokens: int, bias=(), bf16_node_partials: Optional[int] = None):
    """Sum receive rows `rows [R, N, ...]` back onto their source tokens, in f64 (exact for a few
    bf16/f32 terms), plus each bias `[R, T, ...]`. Returns `[R, T, ...]` float64.

    `bf16_node_partials=L` is the internode combine's default over nodes of L ranks (several nodes):
    each node's partial of a token, the f32 sum of its ranks' rows in rank order, is rounded to bf16,
    and the partials are summed (in f64, plus the biases) instead of the rows."""
    num_ranks = len(dispatched)
    ranks_per_node = bf16_node_partials or num_ranks
    dtype = np.float64 if bf16_node_partials is None else np.float32
    rows = np.asarray(rows, dtype)
    partials = np.zeros((num_ranks // ranks_per_node, num_ranks, num_tokens) + rows.shape[2:], dtype)
    for d, result in enumerate(dispatched):
        received = result.received
        for i in range(received.num_kept):
            partials[d // ranks_per_node, received.src_rank[i], received.src_token[i]] += rows[d, i]
    if bf16_node_partials is not None:
        partials = partials.astype(ml_dtypes.bfloat16)
    out = np.sum(partials, axis=0, dtype=np.float64)
    for b in bias:
        out += np.asarray(b, np.float64)
    return out


def assert_rounded_once(got, exact, terms_magnitude):
    """`got` (bf16) is `exact` rounded to bf16 once, allowing f32 summation error.

    Round-to-nearest is within half a bf16 ulp, i.e. 2**-8 relative; summing in bf16 step by step
    would exceed that for many elements.
    """
    got = np.asarray(got).astype(np.float64)
    slack = np.abs(exact) * 2.0 ** -8 + terms_magnitude * 2.0 ** -20 + 1e-30
    excess = np.abs(got - exact) - slack
    assert np.all(excess <= 0), (
        f"{int(np.sum(excess > 0))} elements off by more than half a bf16 ulp; worst at "
        f"{np.unravel_index(np.argmax(excess), excess.shape)}")


# ---- FP8 ------------------------------------------------------------------------------------
def fp8_cast(x, *, round_scale: bool = False):
    """Per-128-channel e4m3 cast of `x [..., H]`: scale = amax * f32(1 / 448) (rounded up to a power
    of two with `round_scale`), values x * (448 / amax) (x * (1 / scale) with `round_scale`), each
    step rounded to f32. Returns (float8_e4m3fn [..., H], f32 scales [..., H // 128])."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(*x.shape[:-1], -1, FP8_BLOCK)
    amax = np.maximum(np.abs(blocks).max(axis=-1), np.float32(MIN_AMAX))
    scale = (amax * np.float32(1.0 / FP8_MAX)).astype(np.float32)
    if round_scale:
        scale = np.exp2(np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32)
        inverse = (np.float32(1.0) / scale).astype(np.float32)
    else:
        inverse = (np.float32(FP8_MAX) / amax).astype(np.float32)
    q = (blocks * inverse[..., None]).astype(ml_dtypes.float8_e4m3fn)
    return q.reshape(x.shape), scale


def assert_fp8_values_close(got, want):
    """e4m3 values equal up to the rounding of ties: where a platform rounds one step of the cast
    differently (say, a fused multiply), a value can land one e4m3 step away."""
    got, want = np.asarray(got).astype(np.float32), np.asarray(want).astype(np.float32)
    if not got.size:
        return
    one_step = np.maximum(np.abs(got), np.abs(want)) * 2.0 ** -3 + 2.0 ** -9
    assert np.all(np.abs(got - want) <= one_step), "FP8 values more than one e4m3 step apart"
    assert np.mean(got == want) >= 0.98, f"only {np.mean(got == want):.1%} of the FP8 values are identical"


def pack_ue8m0(scale):
    """Power-of-two f32 scales `[..., G]` -> int32 `[..., G // 4]`: the exponent bytes, block 4i
    in the lowest byte of word i."""
    exponent = (np.asarray(scale, np.float32).view(np.uint32) >> 23) & 0xFF
    exponent = exponent.reshape(*exponent.shape[:-1], -1, 4).astype(np.uint64)
    words = np.zeros(exponent.shape[:-1], np.uint64)
    for byte in range(4):
        words |= exponent[..., byte] << np.uint64(8 * byte)
    return words.astype(np.uint32).view(np.int32)


def unpack_ue8m0(words):
    words = np.asarray(words).view(np.uint32).astype(np.uint64)
    exponent = np.stack([(words >> np.uint64(8 * b)) & np.uint64(0xFF) for b in range(4)], axis=-1)
    scale = (exponent.astype(np.uint32) << 23).view(np.float32)
    return scale.reshape(*scale.shape[:-2], -1)


def fp8_dequant(q, scale):
    q = np.asarray(q).astype(np.float32)
    blocks = q.reshape(*q.shape[:-1], -1, FP8_BLOCK)
    return (blocks * np.asarray(scale, np.float32)[..., None]).reshape(q.shape)


# ---- low-latency mode ---------------------------------------------------------------------
@dataclasses.dataclass
class LowLatencyReceived:
    """What one rank receives in low-latency mode: per local expert, rows in (source rank,
    source token) order, each remembering the (rank, token, k) it came from."""

    rows: list  # per local expert: int array [count, 3] of (src_rank, src_token, k)
    recv_count: np.ndarray  # [E_l]
    recv_layout_range: np.ndarray  # [E_l, R, 2]: (offset, count) per source rank


def first_occurrences(idx):
    """Low latency: a token that names an expert twice is sent to it once; later repeats act like -1."""
    idx = np.array(idx)
    for row in np.ndindex(idx.shape[:-1]):
        seen = set()
        for k, expert in enumerate(idx[row]):
            if expert in seen:
                idx[row + (k,)] = -1
            seen.add(expert)
    return idx


def low_latency_receive(topk_idx, num_experts: int) -> list:
    """`LowLatencyReceived` of every rank for routing `topk_idx [R, T, K]`."""
    idx = first_occurrences(valid_ids(topk_idx, num_experts))
    num_ranks, num_tokens, top_k = idx.shape
    experts_per_rank = num_experts // num_ranks
    out = []
    for d in range(num_ranks):
        rows, counts, ranges = [], [], np.zeros((experts_per_rank, num_ranks, 2), np.int64)
        for local in range(experts_per_rank):
            expert = d * experts_per_rank + local
            block = []
            for s in range(num_ranks):
                start = len(block)
                block += [(s, t, k) for t in range(num_tokens) for k in range(top_k) if idx[s, t, k] == expert]
                ranges[local, s] = (start, len(block) - start)
            rows.append(np.array(block, np.int64).reshape(-1, 3))
            counts.append(len(block))
        out.append(LowLatencyReceived(rows, np.array(counts), ranges))
    return out


def low_latency_recv_x(x, received: LowLatencyReceived, num_rows: int):
    """Receive blocks `[E_l, R * M, ...]` of payload `x [R, T, ...]`; rows past the count are zero."""
    x = np.asarray(x)
    out = np.zeros((len(received.rows), num_rows) + x.shape[2:], x.dtype)
    for local, rows in enumerate(received.rows):
        out[local, :len(rows)] = x[rows[:, 0], rows[:, 1]]
    return out


def low_latency_combine(y, topk_weights, received: list, num_tokens: int):
    """`out[s, t] = sum_k w[s, t, k] * y[rank of expert][row of (s, t, k)]` in float64."""
    y = np.asarray(y, np.float64)
    w = np.asarray(topk_weights, np.float64)
    out = np.zeros((len(received), num_tokens, y.shape[-1]))
    for d, rec in enumerate(received):
        for local, rows in enumerate(rec.rows):
            for i, (s, t, k) in enumerate(rows):
                out[s, t] += w[s, t, k] * y[d, local, i]
    return out


# ---- expert-grouped normal mode -------------------------------------------------------------
@dataclasses.dataclass
class GroupedDispatched:
    """The spec'd result of an expert-grouped dispatch on one rank."""

    pairs: list  # per kept row: (src_rank, src_token, local expert), or None for a padding row
    recv_parts: list  # one [N, ...] array per payload; padding rows and rows past the groups are zero
    recv_topk_idx: np.ndarray  # [N]: the row's local expert, -1 for padding
    recv_topk_weights: np.ndarray  # f32 [N]: the pair's weight (its token's weights for that expert, summed)
    num_recv_tokens_per_expert: np.ndarray  # [E_l]: padded group sizes, cut at N
    num_recv_tokens: int  # rows needed, padding included


def grouped_dispatch(parts, topk_idx, topk_weights, num_experts: int, capacity: int,
                     expert_alignment: int = 1) -> list:
    """Expert-grouped dispatch of every rank: one row per (token, local expert) pair, by local expert,
    then source rank, then source token; each group padded with zero rows to `expert_alignment`. A pair
    weighs the sum of the `topk_weights` of the k naming its expert, or 1 without `topk_weights`."""
    idx = valid_ids(topk_idx, num_experts)
    num_ranks, num_tokens, top_k = idx.shape
    experts_per_rank = num_experts // num_ranks
    weights = None if topk_weights is None else np.asarray(topk_weights, np.float32)
    results = []
    for d in range(num_ranks):
        rows, pair_weights, sizes = [], [], []
        for local in range(experts_per_rank):
            expert = d * experts_per_rank + local
            group = [(s, t) for s in range(num_ranks) for t in range(num_tokens) if expert in idx[s, t]]
            padding = -len(group) % expert_alignment
            rows += [(s, t, local) for s, t in group] + [None] * padding
            pair_weights += [1.0 if weights is None else
                             sum(weights[s, t, k] for k in range(top_k) if idx[s, t, k] == expert)
                             for s, t in group] + [0.0] * padding
            sizes.append(len(group) + padding)
        kept = rows[:capacity]
        recv_parts = []
        for p in parts:
            p = np.asarray(p)
            buf = np.zeros((capacity,) + p.shape[2:], p.dtype)
            for i, pair in enumerate(kept):
                if pair is not None:
                    buf[i] = p[pair[0], pair[1]]
            recv_parts.append(buf)
        expert_of_row = np.full(capacity, -1, np.int64)
        weight_of_row = np.zeros(capacity, np.float32)
        for i, pair in enumerate(kept):
            if pair is not None:
                expert_of_row[i], weight_of_row[i] = pair[2], pair_weights[i]
        starts = np.cumsum(sizes) - sizes
        held = np.clip(capacity - starts, 0, sizes)
        results.append(GroupedDispatched(kept, recv_parts, expert_of_row, weight_of_row, held, len(rows)))
    return results


def grouped_combine(rows, dispatched: list, num_tokens: int, bias=(), weighted: bool = True):
    """Per token, the sum over its kept pairs of (the pair's weight *) `rows [R, N, ...]`, in float64,
    plus each bias `[R, T, ...]`. Returns `[R, T, ...]`."""
    rows = np.asarray(rows, np.float64)
    out = np.zeros((len(dispatched), num_tokens) + rows.shape[2:])
    for d, result in enumerate(dispatched):
        for i, pair in enumerate(result.pairs):
            if pair is not None:
                weight = float(result.recv_topk_weights[i]) if weighted else 1.0
                out[pair[0], pair[1]] += weight * rows[d, i]
    for b in bias:
        out += np.asarray(b, np.float64)
    return out


def grouped_combined_weights(row_weights, dispatched: list, topk_idx, num_experts: int):
    """`[R, T, K]`: for each (token, k), `row_weights [R, N]` at the kept row of its pair, else 0."""
    idx = valid_ids(topk_idx, num_experts)
    experts_per_rank = num_experts // idx.shape[0]
    out = np.zeros(idx.shape, np.float64)
    for d, result in enumerate(dispatched):
        row_of = {pair: i for i, pair in enumerate(result.pairs) if pair is not None}
        for s, t, k in np.ndindex(idx.shape):
            expert = idx[s, t, k]
            if expert >= 0 and expert // experts_per_rank == d:
                i = row_of.get((s, t, expert - d * experts_per_rank))
                out[s, t, k] = 0.0 if i is None else row_weights[d][i]
    return out


# ---- LogFMT-10 (low-latency combine with use_logfmt=True) --------------------------------------
def logfmt_round_trip(x):
    """The f32 values a receiver decodes from bf16 rows `x [..., H]` sent as LogFMT-10, per group of 128
    channels: magnitudes below 2^-126 count as 0; encoded when 0 < amax < 1 and amin < amax, else exact.
    Logarithms in units of 2^-16: log2(2^e (1 + m/128)) = e 2^16 + round(2^16 log2(1 + m/128));
    log_amin = max(log2 amin, log2 amax - 32) (log2 amax - 32 when amin = 0), span = log2 amax - log_amin;
    code = floor(((log2 x - log_amin) 510 + 1.5 span - (span >> 10)^2 // 368) / span) in [0, 511];
    code c > 0 decodes to 2^y, y = log_amin + (c - 1) span // 510, as f32(2^(y_hi / 256)) f32(2^(y_lo /
    65536)) 2^(y >> 16) with y_hi, y_lo y's bits 8-15 and 0-7, and 0 below 2^-126."""
    x = np.asarray(x, ml_dtypes.bfloat16)
    bits = x.reshape(*x.shape[:-1], x.shape[-1] // 128, 128).view(np.uint16).astype(np.int64)
    magnitude = bits & 0x7FFF
    magnitude[magnitude < 0x80] = 0
    amax = magnitude.max(axis=-1, keepdims=True)
    amin = magnitude.min(axis=-1, keepdims=True)
    encoded = (amax >= 0x80) & (amax < 0x3F80) & (amin < amax)

    def log2(m):
        return ((m >> 7) - 127) * 65536 + np.round(np.log2(1.0 + (m & 0x7F) / 128.0) * 65536).astype(np.int64)

    log_amax = log2(amax)
    log_amin = np.where(amin == 0, log_amax - 32 * 65536, np.maximum(log2(amin), log_amax - 32 * 65536))
    span = np.where(encoded, log_amax - log_amin, 1)
    above = np.maximum(log2(np.maximum(magnitude, 0x80)) - log_amin, -span)
    code = (above * 510 + span + span // 2 - (span // 1024) ** 2 // 368) // span
    code = np.where(magnitude == 0, 0, np.clip(code, 0, 511))
    y = log_amin + (code - 1) * span // 510
    high = np.exp2(((y // 256) % 256) / 256.0).astype(np.float32)
    low = np.exp2((y % 256) / 65536.0).astype(np.float32)
    n = y // 65536
    value = np.where((code == 0) | (n < -126), np.float32(0),
                     (high * low) * np.exp2(np.maximum(n, -126)).astype(np.float32)).astype(np.float32)
    value = np.where(bits >> 15 == 1, -value, value)
    return np.where(encoded, value, x.reshape(bits.shape).astype(np.float32)).reshape(x.shape)


def low_latency_logfmt_combine(y, topk_weights, received: list, num_tokens: int):
    """`low_latency_combine` with every row that travels to another rank decoded from LogFMT-10 (a rank's
    own experts' rows stay exact), in float64."""
    decoded = []
    for d, rec in enumerate(received):
        rows = np.asarray(y[d], np.float32).copy()
        for local, block in enumerate(rec.rows):
            remote = block[:, 0] != d
            rows[local, :len(block)][remote] = logfmt_round_trip(np.asarray(y[d][local, :len(block)])[remote])
        decoded.append(rows)
    return low_latency_combine(np.stack(decoded), topk_weights, received, num_tokens)
