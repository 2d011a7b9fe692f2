"""Kernel launch configuration and buffer-size hints (docs/API.md, `Config`)."""
from __future__ import annotations

import dataclasses

from .limits import FP8_BLOCK, LOW_LATENCY_MAX_TOKENS_PER_RANK, MAX_TOPK
from .sizes import (align, internode_combine_geometry, internode_dispatch_geometry, internode_node_sizes,
                    low_latency_layout)
from .validation import expert_count, fail, integer, row_hidden

# Upper bounds the kernels are built for; the hints size buffers for them (and for MAX_TOPK).
MAX_NVL_PEERS = 8  # ranks of one node the NVLink kernels serve (cuda/comm_layout.h kMaxRanks)
_ALIGN = 128
# The CUDA backend's buffer header (counters, barrier flags, notify slots; cuda/comm_layout.h),
# rounded up; the rings follow it.
NVL_HEADER_BYTES = 320 << 10


def sm_count(op: str, name: str, value) -> int:
    """A number of SMs for the normal-mode kernels: positive and even (two SMs per channel)."""
    value = integer(op, name, value, minimum=2)
    if value % 2:
        fail(op, f"`{name}` must be an even int >= 2 (two SMs per channel), got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """SM count and chunk sizes of the normal-mode kernels.

    One channel uses two SMs (a sender and a receiver block), as in DeepEP, so `num_sms`
    must be even. `num_max_nvl_chunked_recv_tokens` is the per-channel, per-peer ring size
    in tokens; `num_max_nvl_chunked_send_tokens` is how many tokens a sender moves before
    publishing its tail.

    The CUDA kernels need all `num_sms` blocks resident at once (a channel's sender and receiver
    wait on each other): at most the device's SMs, which the intranode ops check, and where several
    ranks share one GPU (MPS), their SM counts summed. SMs that unrelated kernels hold only delay a launch.

    The internode kernels (several nodes) take the same fields: `num_max_nvl_chunked_recv_tokens` is
    then the ring from each rank of the node per channel, `num_max_rdma_chunked_recv_tokens` the ring
    from each other node's RDMA peer per channel, and `num_max_rdma_chunked_send_tokens` how many rows a
    sender stages before it puts them on the network (docs/INTERNODE.md). A ring must hold one batch.
    """

    num_sms: int
    num_max_nvl_chunked_send_tokens: int
    num_max_nvl_chunked_recv_tokens: int
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self):
        # Normalised to Python ints (numpy integers are accepted), so the frozen fields are set directly.
        object.__setattr__(self, "num_sms", sm_count("Config", "num_sms", self.num_sms))
        for name in ("num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                     "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens"):
            object.__setattr__(self, name, integer("Config", name, getattr(self, name), minimum=1))
        for ring in ("nvl", "rdma"):
            send, recv = f"num_max_{ring}_chunked_send_tokens", f"num_max_{ring}_chunked_recv_tokens"
            if getattr(self, send) > getattr(self, recv):
                fail("Config", f"`{send}` must be <= {recv}, got {getattr(self, send)} > {getattr(self, recv)}")

    @property
    def num_channels(self) -> int:
        """Channels of the normal-mode kernels: one per pair of SMs."""
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer one rank needs for tokens of `hidden_bytes` bytes."""
        op = "Config.get_nvl_buffer_size_hint"
        hidden_bytes = integer(op, "hidden_bytes", hidden_bytes, minimum=0)
        num_ranks = integer(op, "num_ranks", num_ranks, minimum=1)
        num_nvl_ranks = min(num_ranks, MAX_NVL_PEERS)
        slots = self.num_channels * num_nvl_ranks * self.num_max_nvl_chunked_recv_tokens
        per_token = (hidden_bytes  # payload
                     + MAX_TOPK * (4 + 4)  # top-k ids and weights
                     + (hidden_bytes // FP8_BLOCK) * 4  # FP8 scales (upper bound)
                     + 48)  # source index, destination row, 16-byte alignment of each piece
        return align(NVL_HEADER_BYTES + slots * per_token, _ALIGN)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of RDMA (NVSHMEM) buffer one rank needs for the internode ops with this config; 0 within a
        single node (up to 8 ranks). The most any op of rows of `hidden_bytes` needs on nodes of any size:
        dispatch of such rows with FP8 scales and MAX_TOPK ids, weights and pair prefixes, and combine of
        bf16 rows of `hidden_bytes` with f32 partials and f32 returned rows (the largest of each);
        `jax_deepep.gpu.internode.rdma_bytes_hint` gives the need of given shapes."""
        op = "Config.get_rdma_buffer_size_hint"
        hidden_bytes = integer(op, "hidden_bytes", hidden_bytes, minimum=0)
        num_ranks = integer(op, "num_ranks", num_ranks, minimum=1)
        if num_ranks <= MAX_NVL_PEERS:
            return 0
        parts = [hidden_bytes, hidden_bytes // FP8_BLOCK * 4]
        return max(max(internode_dispatch_geometry(num_ranks, per_node, self, MAX_TOPK, True, True, parts,
                                                   has_prefixes=True).rdma_bytes,
                       internode_combine_geometry(num_ranks, per_node, self, hidden_bytes // 2, MAX_TOPK,
                                                  exact_partials=True, f32_returns=True).rdma_bytes)
                   for per_node in internode_node_sizes(num_ranks))


# The internode rings from other nodes (per channel and node): 128 rows, put 16 at a time, keep the
# symmetric buffer near 0.33 GB at 2 nodes of 8 and 0.44 GB at 8 (H = 7168; docs/INTERNODE.md, Sizing).
_RDMA_BATCH, _RDMA_SLOTS = 16, 128


def default_dispatch_config(num_ranks: int, num_sms: int) -> Config:
    """Tuned defaults per rank count (smaller rings for more peers keep the buffer bounded)."""
    recv = {1: 512, 2: 512, 4: 384, 8: 256}.get(num_ranks, 256)
    return Config(num_sms, 32, recv, _RDMA_BATCH, _RDMA_SLOTS)


def default_combine_config(num_ranks: int, num_sms: int) -> Config:
    """As `default_dispatch_config`, with half the chunk size."""
    recv = {1: 512, 2: 512, 4: 384, 8: 256}.get(num_ranks, 256)
    return Config(num_sms, 16, recv, _RDMA_BATCH, _RDMA_SLOTS)


def low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                               num_experts: int) -> int:
    """Bytes of symmetric buffer the low-latency kernels need: two halves that calls take in turn,
    each holding one dispatch and one combine receive area plus signals (`sizes.low_latency_layout`).
    More bytes hold more halves, and so allow more sends of one op in flight (docs/API.md)."""
    # The sizes the low-latency ops accept, no others. num_ranks is checked only: a half holds every
    # expert's rows whatever the rank count.
    op = "Buffer.get_low_latency_rdma_size_hint"
    m = integer(op, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1,
                maximum=LOW_LATENCY_MAX_TOKENS_PER_RANK)
    hidden = integer(op, "hidden", hidden)
    row_hidden(op, "hidden", hidden)
    num_experts = expert_count(op, num_experts, integer(op, "num_ranks", num_ranks, minimum=1))
    return 2 * low_latency_layout(m, hidden, num_experts).half_bytes
