"""Checked mode (docs/API.md): `deepep.checked(fn)` raises on expert ids outside [-1, E)
that the plain ops treat as -1."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import NamedSharding, PartitionSpec

import jax_deepep as deepep
from harness import make_mesh, random_bf16, random_topk, random_weights

T, H, K, E, M = 6, 128, 4, 8, 8


def _buffer(mesh):
    size = deepep.Buffer.get_low_latency_rdma_size_hint(M, H, mesh.size, E)
    return deepep.Buffer(mesh, "ep", low_latency_mode=True, num_rdma_bytes=size)


def _ops(buffer):
    """Per-rank functions of (x, topk_idx, topk_weights), one per op that reads expert ids."""
    def in_range(i):  # the routing a caller would have computed from valid ids
        return jnp.where((i >= 0) & (i < E), i, -1)

    def ll_combine(x, i, w):
        ll = buffer.low_latency_dispatch(x, in_range(i), num_max_dispatch_tokens_per_rank=M, num_experts=E,
                                         use_fp8=False)
        return buffer.low_latency_combine(ll.recv_x, i, w, ll.handle)

    return {
        "get_dispatch_layout": lambda x, i, w: buffer.get_dispatch_layout(i, E).num_tokens_per_expert,
        "dispatch_num_experts": lambda x, i, w: buffer.dispatch(x, topk_idx=i, num_experts=E).recv_x,
        "dispatch_layout": lambda x, i, w: buffer.dispatch(
            x, topk_idx=i, layout=buffer.get_dispatch_layout(in_range(i), E)).recv_x,
        "low_latency_dispatch": lambda x, i, w: buffer.low_latency_dispatch(
            x, i, num_max_dispatch_tokens_per_rank=M, num_experts=E, use_fp8=False).recv_count,
        "low_latency_combine": ll_combine,
    }


def _sharded(mesh, fn):
    """Global function of `[R * T, ...]` arrays running `fn` per rank (not jitted: checked jits it)."""
    return jax.shard_map(lambda *a: fn(*a)[None], mesh=mesh, in_specs=PartitionSpec("ep"),
                         out_specs=PartitionSpec("ep"))


def _inputs(mesh, rng, bad_rank=None, bad_id=E):
    num_ranks = mesh.size
    idx = random_topk(rng, num_ranks, T, K, E)
    if bad_rank is not None:
        idx[bad_rank, T // 2, 1] = bad_id
    arrays = (random_bf16(rng, (num_ranks * T, H)), idx.reshape(num_ranks * T, K),
              random_weights(rng, (num_ranks * T, K)))
    return tuple(jax.device_put(a, NamedSharding(mesh, PartitionSpec("ep"))) for a in arrays)


OPS = ["get_dispatch_layout", "dispatch_num_experts", "dispatch_layout", "low_latency_dispatch",
       "low_latency_combine"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("num_ranks", [1, 4])
def test_checked_raises_on_bad_ids(rng, op, num_ranks):
    mesh = make_mesh(num_ranks)
    fn = _sharded(mesh, _ops(_buffer(mesh))[op])
    step = deepep.checked(fn)
    good = _inputs(mesh, rng)
    np.testing.assert_array_equal(np.asarray(step(*good)).astype(np.float32),
                                  np.asarray(jax.jit(fn)(*good)).astype(np.float32))
    bad_rank = num_ranks - 1
    for bad_id in (E, -2):
        bad = _inputs(mesh, rng, bad_rank=bad_rank, bad_id=bad_id)
        with pytest.raises(checkify.JaxRuntimeError, match="topk_idx"):
            step(*bad)
        jax.block_until_ready(jax.jit(fn)(*bad))  # unchecked: no error, ids behave like -1
