"""The interfaces between the public ops and the backends that implement them, one backend per mode.

A `Buffer` composes one `NormalBackend` and one `LowLatencyBackend` when it is made. The ops in
`normal.py` / `low_latency.py` validate arguments, apply autodiff rules and then call one of these
methods per shard (inside `shard_map`). Token payloads travel as `parts`: a tuple of
arrays sharing the leading token dimension (`(x,)` for bf16, `(x_fp8, scales)` for FP8).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Protocol

import jax
import jax.numpy as jnp

from .config import Config
from .fp8 import scales_struct
from .types import DispatchHandle, DispatchLayout, ExpertGroupedHandle


@dataclasses.dataclass(frozen=True)
class RankContext:
    """Static facts about the expert-parallel axis, known at trace time."""

    axis_name: str
    num_ranks: int
    ranks_per_node: int

    def rank(self) -> jax.Array:
        return jax.lax.axis_index(self.axis_name)

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node


@dataclasses.dataclass(frozen=True)
class DispatchResult:
    recv_parts: tuple
    recv_topk_idx: Optional[jax.Array]
    recv_topk_weights: Optional[jax.Array]
    num_recv_tokens_per_expert: jax.Array
    num_recv_tokens: jax.Array
    handle: DispatchHandle


def grouped_dispatch_result(tokens: DispatchHandle, recv_parts, expert, weight, token_row, pair_row, num_rows, held,
                            weighted: bool) -> DispatchResult:
    """An expert-grouped dispatch's result from its arrays (`ExpertGroupedHandle` says what each is);
    `recv_topk_weights` are the pair weights where the dispatch had `topk_weights` (`weighted`). Without
    them every pair weighs 1, however many of its token's k name its expert (the kernels, sent ones, sum
    to that count: so the handle's weights are set here, alike for every backend)."""
    handle = ExpertGroupedHandle(tokens=tokens, token_row=token_row, pair_row=pair_row, weight=weight,
                                 num_recv_tokens=num_rows, num_recv_tokens_per_expert=held)
    if not weighted:
        return DispatchResult(recv_parts, expert, None, held, num_rows, handle.with_unit_weights())
    return DispatchResult(recv_parts, expert, weight, held, num_rows, handle)


@dataclasses.dataclass(frozen=True)
class LowLatencyOptions:
    num_max_dispatch_tokens_per_rank: int
    num_experts: int
    use_fp8: bool
    round_scale: bool
    use_ue8m0: bool

    @property
    def power_of_two_scales(self) -> bool:
        """Whether FP8 scales round up to powers of two: `round_scale`, or UE8M0 (which stores only exponents)."""
        return bool(self.round_scale or self.use_ue8m0)

    def recv_x_parts(self, num_ranks: int, hidden: int) -> tuple:
        """The shapes and dtypes of a dispatch's `recv_x` [E_l, R * M, H]: (bf16,), or the FP8 values and
        their scales (f32 per 128 channels, or with UE8M0 int32 per 512)."""
        rows = (self.num_experts // num_ranks, num_ranks * self.num_max_dispatch_tokens_per_rank)
        if not self.use_fp8:
            return (jax.ShapeDtypeStruct(rows + (hidden,), jnp.bfloat16),)
        return jax.ShapeDtypeStruct(rows + (hidden,), jnp.float8_e4m3fn), scales_struct(rows, hidden, self.use_ue8m0)


class NormalBackend(Protocol):
    """Normal mode on one Buffer: `reference.ReferenceBackend` (pure JAX), `gpu.intranode.IntranodeBackend`
    (CUDA IPC within a node) or `gpu.internode.InternodeBackend` (NVSHMEM across nodes)."""

    name: str  # "reference" or "cuda"
    mode: str  # "reference", "intranode", "internode"
    # The expert-grouped dispatch, cached dispatch and combine (`reference.expert_grouped.ExpertGroupedOps`
    # has their signatures), or None where `expert_grouped=True` is not implemented.
    expert_grouped: Optional[object]

    def destroy(self) -> None:
        """Free what the backend holds (idempotent)."""

    def failures(self) -> list:
        """What each of its kernels that failed (timed out, or met another op) reports; [] if none did."""

    def get_dispatch_layout(self, ctx: RankContext, topk_idx, num_experts: int) -> DispatchLayout: ...

    def dispatch(self, ctx: RankContext, config: Config, parts: tuple, topk_idx, topk_weights,
                 layout: DispatchLayout, num_experts: int, num_worst_tokens: int,
                 expert_alignment: int) -> DispatchResult: ...

    def cached_dispatch(self, ctx: RankContext, config: Config, handle: DispatchHandle, parts: tuple,
                        topk_weights=None) -> tuple:
        """Returns (recv_parts, recv_topk_weights or None); rows past num_recv_tokens are unspecified."""

    def combine(self, ctx: RankContext, config: Config, handle: DispatchHandle, y, topk_weights,
                bias: tuple) -> tuple:
        """Returns (combined_x bf16 [T, H], combined_topk_weights f32 [T, K] or None)."""


class LowLatencyBackend(Protocol):
    """Low-latency mode on one Buffer: `reference.ReferenceBackend` or `gpu.low_latency.LowLatencyBackend`.

    Each op is a send and a receive, with the backend's in-flight state (`transit`, a dict of
    arrays) between them."""

    name: str
    mode: str  # "reference", "low_latency"

    def destroy(self) -> None:
        """Free what the backend holds (idempotent)."""

    def failures(self) -> list:
        """As `NormalBackend.failures`."""

    def low_latency_dispatch_send(self, ctx: RankContext, opts: LowLatencyOptions, x, topk_idx) -> dict: ...

    def low_latency_dispatch_recv(self, ctx: RankContext, opts: LowLatencyOptions, transit: dict) -> tuple:
        """Returns (recv_x, recv_count, recv_src_info, recv_layout_range, send_slot)."""

    def low_latency_combine_send(self, ctx: RankContext, y, topk_idx, topk_weights, handle,
                                 use_logfmt: bool, zero_copy: bool) -> dict: ...

    def low_latency_combine_recv(self, ctx: RankContext, transit: dict): ...
