"""get_dispatch_layout (docs/API.md) against the numpy oracle."""
import jax.numpy as jnp
import numpy as np
import pytest

import jax_deepep as deepep
import oracle
from harness import enable_x64, int64_ids_beyond_int32, make_mesh, random_topk, run_per_rank

T, K = 12, 4


def _check(got, want: oracle.Layout):
    assert got.num_tokens_per_rank.dtype == np.int32
    assert got.num_tokens_per_expert.dtype == np.int32
    assert got.is_token_in_rank.dtype == np.bool_
    np.testing.assert_array_equal(got.num_tokens_per_rank, want.num_tokens_per_rank)
    np.testing.assert_array_equal(got.num_tokens_per_expert, want.num_tokens_per_expert)
    np.testing.assert_array_equal(got.is_token_in_rank, want.is_token_in_rank)
    if want.num_tokens_per_rdma_rank is None:
        assert got.num_tokens_per_rdma_rank is None
    else:
        assert got.num_tokens_per_rdma_rank.dtype == np.int32
        np.testing.assert_array_equal(got.num_tokens_per_rdma_rank, want.num_tokens_per_rdma_rank)


def _layouts(mesh, topk_idx, num_experts, ranks_per_node=None):
    buffer = deepep.Buffer(mesh, "ep", ranks_per_node=ranks_per_node)
    return run_per_rank(mesh, lambda idx: buffer.get_dispatch_layout(idx, num_experts), topk_idx)


def _rank(tree, r):
    return type(tree)(**{f: None if v is None else v[r] for f, v in vars(tree).items()})


@pytest.mark.parametrize("kind", ["random", "hot", "out_of_range"])
def test_layout_matches_oracle(mesh, rng, kind):
    num_ranks, num_experts = mesh.size, 24
    topk_idx = random_topk(rng, num_ranks, T, K, num_experts, kind)
    got = _layouts(mesh, topk_idx, num_experts)
    for r in range(num_ranks):
        _check(_rank(got, r), oracle.layout(topk_idx[r], num_experts, num_ranks))


def test_layout_all_minus_one():
    mesh = make_mesh(4)
    topk_idx = np.full((4, T, K), -1, np.int32)
    got = _layouts(mesh, topk_idx, 8)
    assert not got.is_token_in_rank.any()
    assert not got.num_tokens_per_rank.any() and not got.num_tokens_per_expert.any()


@pytest.mark.parametrize("ranks_per_node", [2, 4])
def test_layout_several_nodes(rng, ranks_per_node):
    """`num_tokens_per_rdma_rank` counts the tokens sent to any rank of each node."""
    mesh = make_mesh(8)
    topk_idx = random_topk(rng, 8, T, K, 16)
    got = _layouts(mesh, topk_idx, 16, ranks_per_node)
    assert got.num_tokens_per_rdma_rank.shape == (8, 8 // ranks_per_node)
    for r in range(8):
        _check(_rank(got, r), oracle.layout(topk_idx[r], 16, 8, ranks_per_node))


def test_layout_int64_ids_with_x64(rng):
    mesh = make_mesh(2)
    topk_idx = int64_ids_beyond_int32(random_topk(rng, 2, T, K, 8, "out_of_range"))
    with enable_x64():
        got = _layouts(mesh, jnp.asarray(topk_idx, jnp.int64), 8)
    for r in range(2):
        _check(_rank(got, r), oracle.layout(topk_idx[r], 8, 2))
