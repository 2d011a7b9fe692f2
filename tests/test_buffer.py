"""The host-side Buffer and Config (docs/API.md)."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jax_deepep as deepep
import oracle
from harness import RANK_COUNTS, make_mesh, random_bf16, random_topk, run_per_rank

T, H, K, E = 8, 128, 4, 16


def test_buffer_attributes(mesh):
    buffer = deepep.Buffer(mesh, "ep")
    assert buffer.num_ranks == mesh.size
    assert buffer.axis_name == "ep"
    assert buffer.mesh is mesh


def test_buffer_signature():
    mesh = make_mesh(2)
    assert deepep.Buffer(mesh).axis_name == "ep"  # the default axis name
    buffer = deepep.Buffer(mesh, axis_name="ep", num_nvl_bytes=0, num_rdma_bytes=1 << 20, low_latency_mode=True,
                           num_qps_per_rank=12, allow_nvlink_for_low_latency_mode=False)
    assert buffer.num_ranks == 2
    with pytest.raises(TypeError):
        deepep.Buffer(mesh, "ep", 0)  # sizes are keyword-only


def test_buffer_on_a_larger_mesh_uses_its_axis():
    mesh = Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 4), ("dp", "ep"))
    assert deepep.Buffer(mesh, "ep").num_ranks == 4
    assert deepep.Buffer(mesh, "dp").num_ranks == 2


def test_expert_parallel_inside_data_parallel(rng):
    """On a (dp, ep) mesh every dp group dispatches and combines among its own ep ranks."""
    dp, ep = 2, 4
    mesh = Mesh(np.array(jax.devices("cpu")[:dp * ep]).reshape(dp, ep), ("dp", "ep"))
    buffer = deepep.Buffer(mesh, "ep")
    x = random_bf16(rng, (dp * ep, T, H))
    topk_idx = random_topk(rng, dp * ep, T, K, E)
    spec = PartitionSpec(("dp", "ep"))

    def per_rank(x, idx):
        out = buffer.dispatch(x[0], topk_idx=idx[0], num_experts=E)
        combined, _ = buffer.combine(out.recv_x, out.handle)
        return out.recv_x[None], out.num_recv_tokens[None], combined[None]

    args = [jax.device_put(a, NamedSharding(mesh, spec)) for a in (x, topk_idx)]
    recv_x, num_recv, combined = jax.device_get(
        jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=spec, out_specs=spec))(*args))
    for g in range(dp):
        group = slice(g * ep, (g + 1) * ep)
        want = oracle.dispatch([x[group]], topk_idx[group], None, E, ep * T)
        for r, w in enumerate(want):
            assert num_recv[g * ep + r] == w.received.num_recv_tokens
            kept = w.received.num_kept
            np.testing.assert_array_equal(recv_x[g * ep + r, :kept].astype(np.float32),
                                          w.recv_parts[0][:kept].astype(np.float32))
        y = np.stack([w.recv_parts[0] for w in want]).astype(np.float32)
        oracle.assert_rounded_once(combined[group], oracle.combine(y, want, T), oracle.combine(np.abs(y), want, T))


def test_destroy_is_idempotent_and_a_context_manager():
    mesh = make_mesh(2)
    buffer = deepep.Buffer(mesh, "ep")
    buffer.destroy()
    buffer.destroy()
    with deepep.Buffer(mesh, "ep") as managed:
        assert isinstance(managed, deepep.Buffer)
        assert managed.num_ranks == 2
    managed.destroy()  # still idempotent after the context exits


@pytest.mark.parametrize("bad", [
    dict(mesh="not a mesh"),
    dict(axis_name="tp"),
    dict(num_nvl_bytes=-1),
    dict(num_rdma_bytes=-1),
])
def test_buffer_rejects_bad_arguments(bad):
    kwargs = dict(mesh=make_mesh(2), axis_name="ep") | bad
    with pytest.raises(deepep.DeepEPError) as exc_info:
        deepep.Buffer(kwargs.pop("mesh"), kwargs.pop("axis_name"), **kwargs)
    assert next(iter(bad)) in str(exc_info.value)


def test_config_fields_and_defaults():
    config = deepep.Config(24, 6, 256)
    assert (config.num_sms, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens,
            config.num_max_rdma_chunked_send_tokens, config.num_max_rdma_chunked_recv_tokens) == (24, 6, 256, 6, 256)
    config = deepep.Config(num_sms=20, num_max_nvl_chunked_send_tokens=8, num_max_nvl_chunked_recv_tokens=128,
                           num_max_rdma_chunked_send_tokens=16, num_max_rdma_chunked_recv_tokens=128)
    assert config.num_max_rdma_chunked_send_tokens == 16


def test_config_rejects_odd_sms():
    with pytest.raises(ValueError, match="num_sms"):
        deepep.Config(23, 6, 256)


def test_size_hints():
    config = deepep.Config(24, 6, 256)
    for num_ranks in RANK_COUNTS:
        small, large = (config.get_nvl_buffer_size_hint(h * 2, num_ranks) for h in (1024, 7168))
        assert isinstance(small, int) and 0 < small < large
        assert config.get_rdma_buffer_size_hint(7168 * 2, num_ranks) == 0  # one NVLink domain: no RDMA
    assert config.get_rdma_buffer_size_hint(7168 * 2, 16) > 0
    hint = deepep.Buffer.get_low_latency_rdma_size_hint
    assert isinstance(hint(128, 7168, 8, 256), int)
    assert 0 < hint(64, 7168, 8, 256) < hint(128, 7168, 8, 256)
    assert hint(128, 4096, 8, 256) < hint(128, 7168, 8, 256)


@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_default_configs(num_ranks):
    for config in (deepep.Buffer.get_dispatch_config(num_ranks), deepep.Buffer.get_combine_config(num_ranks)):
        assert isinstance(config, deepep.Config)
        assert config.num_sms == deepep.Buffer.num_sms


def test_set_num_sms():
    before = deepep.Buffer.num_sms
    try:
        deepep.Buffer.set_num_sms(24)
        assert deepep.Buffer.get_dispatch_config(8).num_sms == 24
        assert deepep.Buffer.get_combine_config(8).num_sms == 24
        with pytest.raises(deepep.DeepEPError, match="num_sms"):
            deepep.Buffer.set_num_sms(7)
    finally:
        deepep.Buffer.set_num_sms(before)


def test_buffer_sized_by_its_hints_runs(rng):
    """A Buffer sized with the hints accepts the ops it was sized for."""
    num_ranks, m = 2, 8
    mesh = make_mesh(num_ranks)
    nvl_bytes = max(deepep.Buffer.get_dispatch_config(num_ranks).get_nvl_buffer_size_hint(2 * H, num_ranks),
                    deepep.Buffer.get_combine_config(num_ranks).get_nvl_buffer_size_hint(2 * H, num_ranks))
    rdma_bytes = deepep.Buffer.get_low_latency_rdma_size_hint(m, H, num_ranks, E)
    normal = deepep.Buffer(mesh, "ep", num_nvl_bytes=nvl_bytes)
    low_latency = deepep.Buffer(mesh, "ep", low_latency_mode=True, num_rdma_bytes=rdma_bytes)

    def per_rank(x, idx):
        out = normal.dispatch(x, topk_idx=idx, num_experts=E)
        combined, _ = normal.combine(out.recv_x, out.handle)
        ll = low_latency.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=m, num_experts=E)
        return combined, ll.recv_count

    topk_idx = random_topk(rng, num_ranks, T, K, E)
    _, recv_count = run_per_rank(mesh, per_rank, random_bf16(rng, (num_ranks, T, H)), topk_idx)
    assert recv_count.sum() == (oracle.valid_ids(topk_idx, E) >= 0).sum()
