"""The pure-JAX implementation of every op: what non-CUDA meshes run, and the oracle the CUDA
kernels are tested against.

`ReferenceBackend` plugs into `Buffer`; the functions below are the same ops without a
`Buffer`, for use inside `jax.shard_map` over `axis_name`.
"""
from __future__ import annotations

from .. import low_latency as _ll
from .. import normal as _normal
from ..backend import RankContext
from ..config import default_combine_config
from ..validation import axis_size
from . import low_latency, normal
from .expert_grouped import ExpertGroupedOps


class ReferenceBackend:
    """Both modes in pure JAX (XLA collectives over the axis); holds no device state. Over several nodes its
    combine rounds each node's partial sum to bf16 as the internode kernels do, unless
    `exact_internode_combine` (`Buffer(exact_internode_combine=)`)."""

    name = "reference"
    mode = "reference"

    def __init__(self, exact_internode_combine: bool = False):
        self.exact_internode_combine = exact_internode_combine
        self.expert_grouped = ExpertGroupedOps(self)

    def destroy(self):
        pass

    def failures(self):
        return []  # XLA's collectives report their own failures

    get_dispatch_layout = staticmethod(normal.get_dispatch_layout)
    dispatch = staticmethod(normal.dispatch)
    cached_dispatch = staticmethod(normal.cached_dispatch)

    def combine(self, ctx: RankContext, config, handle, y, topk_weights, bias):
        return normal.combine(ctx, config, handle, y, topk_weights, bias,
                              exact_partials=self.exact_internode_combine)

    low_latency_dispatch_send = staticmethod(low_latency.dispatch_send)
    low_latency_dispatch_recv = staticmethod(low_latency.dispatch_recv)
    low_latency_combine_send = staticmethod(low_latency.combine_send)
    low_latency_combine_recv = staticmethod(low_latency.combine_recv)


BACKEND = ReferenceBackend()


def _ctx(op: str, axis_name: str, ranks_per_node=None) -> RankContext:
    num_ranks = axis_size(op, axis_name)
    return RankContext(axis_name, num_ranks, ranks_per_node or num_ranks)


_CONFIG = default_combine_config(1, 2)  # the pure-JAX ops take no launch configuration


def get_dispatch_layout(topk_idx, num_experts, *, axis_name, ranks_per_node=None):
    return _normal.get_dispatch_layout(BACKEND, _ctx("get_dispatch_layout", axis_name, ranks_per_node),
                                       topk_idx, num_experts)


def dispatch(x, *, axis_name, **kwargs):
    return _normal.dispatch(BACKEND, _ctx("dispatch", axis_name), _CONFIG, x, **kwargs)


def combine(y, handle, *, axis_name, **kwargs):
    return _normal.combine(BACKEND, _ctx("combine", axis_name), _CONFIG, y, handle, **kwargs)


def low_latency_dispatch(x, topk_idx, *, axis_name, **kwargs):
    return _ll.low_latency_dispatch(BACKEND, _ctx("low_latency_dispatch", axis_name), x, topk_idx, **kwargs)


def low_latency_combine(y, topk_idx, topk_weights, handle, *, axis_name, **kwargs):
    return _ll.low_latency_combine(BACKEND, _ctx("low_latency_combine", axis_name), y, topk_idx,
                                   topk_weights, handle, **kwargs)


def low_latency_recv(pending, *, axis_name):
    return _ll.low_latency_recv(BACKEND, _ctx("low_latency_recv", axis_name), pending)
