"""Kernel launch configuration and buffer-size hints (SPEC.md section 1)."""
from __future__ import annotations

import dataclasses

from .sizes import FP8_BLOCK, low_latency_layout

# Upper bounds the kernels are built for; the hints size buffers for them.
MAX_TOPK = 32
MAX_NVL_PEERS = 8
_ALIGN = 128
# The CUDA backend's buffer header (counters, barrier flags, notify slots; cuda/comm_layout.h),
# rounded up; the rings follow it.
NVL_HEADER_BYTES = 320 << 10


def _align(n: int, to: int = _ALIGN) -> int:
    return (n + to - 1) // to * to


@dataclasses.dataclass(frozen=True)
class Config:
    """SM count and chunk sizes of the normal-mode kernels.

    One channel uses two SMs (a sender and a receiver block), as in DeepEP, so `num_sms`
    must be even. `num_max_nvl_chunked_recv_tokens` is the per-channel, per-peer ring size
    in tokens; `num_max_nvl_chunked_send_tokens` is how many tokens a sender moves before
    publishing its tail.

    The two RDMA chunk sizes are accepted and checked (SPEC.md fixes them) but steer nothing
    here: the internode kernels size their buffers from the call's shapes (`jax_deepep.sizes`).
    """

    num_sms: int
    num_max_nvl_chunked_send_tokens: int
    num_max_nvl_chunked_recv_tokens: int
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self):
        if self.num_sms <= 0 or self.num_sms % 2:
            raise ValueError(f"Config.num_sms must be a positive even number, got {self.num_sms}")
        for name in ("num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                     "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_max_nvl_chunked_send_tokens > self.num_max_nvl_chunked_recv_tokens:
            raise ValueError(
                "Config.num_max_nvl_chunked_send_tokens must be <= num_max_nvl_chunked_recv_tokens, got "
                f"{self.num_max_nvl_chunked_send_tokens} > {self.num_max_nvl_chunked_recv_tokens}")

    @property
    def num_channels(self) -> int:
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer one rank needs for tokens of `hidden_bytes` bytes."""
        num_nvl_ranks = min(num_ranks, MAX_NVL_PEERS)
        slots = self.num_channels * num_nvl_ranks * self.num_max_nvl_chunked_recv_tokens
        per_token = (hidden_bytes  # payload
                     + MAX_TOPK * (4 + 4)  # top-k ids and weights
                     + (hidden_bytes // FP8_BLOCK) * 4  # FP8 scales (upper bound)
                     + 48)  # source index, destination row, 16-byte alignment of each piece
        return _align(NVL_HEADER_BYTES + slots * per_token)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of RDMA (NVSHMEM) buffer one rank needs; 0 within a single node. A DeepEP-style
        estimate from the RDMA chunk sizes; the internode kernels here need
        `jax_deepep.gpu.internode.rdma_bytes_hint` (exact for given shapes)."""
        if num_ranks <= MAX_NVL_PEERS:
            return 0
        num_rdma_ranks = num_ranks // MAX_NVL_PEERS
        slots = self.num_channels * num_rdma_ranks * self.num_max_rdma_chunked_recv_tokens
        per_token = hidden_bytes + MAX_TOPK * 8 + (hidden_bytes // FP8_BLOCK) * 4 + 32
        counters = self.num_channels * num_rdma_ranks * (MAX_NVL_PEERS * 2 + 2) * 4 * 2
        return _align(counters + 2 * slots * per_token)


def default_dispatch_config(num_ranks: int, num_sms: int) -> Config:
    """Tuned defaults per rank count (smaller rings for more peers keep the buffer bounded)."""
    recv = {1: 512, 2: 512, 4: 384, 8: 256}.get(num_ranks, 256)
    return Config(num_sms, 32, recv, 6, 256)


def default_combine_config(num_ranks: int, num_sms: int) -> Config:
    recv = {1: 512, 2: 512, 4: 384, 8: 256}.get(num_ranks, 256)
    return Config(num_sms, 16, recv, 6, 256)


def low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                               num_experts: int) -> int:
    """Bytes of symmetric buffer the low-latency kernels need: two alternating halves, each
    holding one dispatch and one combine receive area plus signals (`sizes.low_latency_layout`)."""
    del num_ranks  # a half holds every expert's rows whatever the rank count
    return 2 * low_latency_layout(num_max_dispatch_tokens_per_rank, hidden, num_experts).half_bytes
