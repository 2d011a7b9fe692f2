"""jax_deepep.sizes: the layouts the handlers receive as attributes, pinned to known values (those
the kernels' former C++ formulas gave), and the attribute names the handlers decode."""
import numpy as np
import pytest

import jax_deepep as deepep
from jax_deepep import sizes
from jax_deepep.config import Config
from jax_deepep.gpu.ffi_call import struct_attribute
from harness import ROOT, decoded_struct_members


def test_low_latency_layouts():
    # Signals: E dispatch counts and E combine flags of 8 bytes each.
    assert sizes.low_latency_layout(128, 7168, 288) == sizes.LowLatencyLayout(
        14352, 14560, 224, 529072128, 1065811968, 1065816576)
    assert sizes.low_latency_layout(8, 256, 16) == sizes.LowLatencyLayout(528, 528, 16, 67584, 135168, 135424)


def test_low_latency_halves_are_what_the_buffer_holds():
    layout = sizes.low_latency_layout(8, 256, 16)
    hint = 2 * layout.half_bytes
    assert sizes.low_latency_num_halves(hint, layout) == 2
    # Powers of two (n % B stays in step when the call numbers wrap), at most the kernels' receipts per kind.
    assert sizes.low_latency_num_halves(3 * layout.half_bytes + 100, layout) == 2
    assert sizes.low_latency_num_halves(7 * layout.half_bytes, layout) == 4
    assert sizes.low_latency_num_halves(100 * layout.half_bytes, layout) == 8 == sizes.MAX_LOW_LATENCY_HALVES
    if (ROOT / "cuda").is_dir():
        source = (ROOT / "cuda" / "nvshmem_peers.cuh").read_text()
        assert f"constexpr int kMaxLowLatencyHalves = {sizes.MAX_LOW_LATENCY_HALVES};" in source
    assert deepep.Buffer.get_low_latency_rdma_size_hint(8, 256, 2, 16) == hint


def test_intranode_slots():
    assert sizes.dispatch_slot([14336], 8) == sizes.DispatchSlot((16, 14352), 14352, 14384, 14416)
    assert sizes.dispatch_slot([7168, 224], 8) == sizes.DispatchSlot((16, 7184), 7408, 7440, 7472)
    assert sizes.combine_slot(7168, 8) == sizes.CombineSlot(14336, 14368)


def test_internode_layouts():
    # A dispatched row: 16-byte header, K ids, K weights, parts (bf16 tokens of H=7168 with 8 ids and weights) ...
    assert sizes.internode_dispatch_layout(8, True, True, [14336]) == \
        sizes.InternodeDispatchLayout(14416, 16, 48, 80, (80, 14416))
    # ... FP8 tokens (values and scales) with weights only.
    assert sizes.internode_dispatch_layout(8, False, True, [7168, 224]) == \
        sizes.InternodeDispatchLayout(7440, 16, 16, 48, (48, 7216))
    # Combine: a returned row (bf16 [H] + K f32 weights) and a partial (f32 [H] when exact, else bf16, + weights).
    assert sizes.internode_combine_layout(7168, 8, exact_partials=True) == sizes.InternodeCombineLayout(14368, 28704)
    assert sizes.internode_combine_layout(7168, 8, exact_partials=False) == sizes.InternodeCombineLayout(14368, 14368)
    assert sizes.internode_combine_layout(128, 0, exact_partials=False, f32_returns=True) == \
        sizes.InternodeCombineLayout(512, 256)


def test_internode_signals_and_rings():
    # 16 ranks in nodes of 8: links (2 RDMA peers + 8 ranks of the node) x 64 channels x (3 + 2 L) signals for
    # combine, then for dispatch, counts [2][R][R], expert counts [2][16384], then the rings.
    assert sizes.internode_signals(16, 8) == sizes.InternodeSignals(152, 0, 97280, 194560, 198656, 460800)
    config = Config(20, 32, 256, 16, 128)
    rings = sizes.internode_dispatch_geometry(16, 8, config, 8, True, True, [14336]).rings
    # 10 channels: rings from 2 nodes of 128 rows, then from 8 ranks of 256 rows; send rings to 2 nodes in staging.
    assert rings == sizes.InternodeRings(10, 128, 16, 14416, 256, 32, 14416, 460800, 37365760, 332605440, 36904960)
    assert rings.nvl_ring - rings.rdma_ring == rings.staging_bytes == 2 * 10 * 128 * 14416
    combine = sizes.internode_combine_geometry(4, 2, Config(4, 4, 8, 2, 8), 128, 0, exact_partials=False).rings
    assert combine == sizes.InternodeRings(2, 8, 2, 256, 8, 4, 256, 291072, 299264, 307456, 8192)


def test_internode_signals_lie_where_other_shapes_do_not_move_them():
    """Every signal comes before every ring, at offsets set by R and L alone, so a peer's call with other shapes or
    another Config still signals where this rank waits, and its signature fails the op at once (no timeout)."""
    big = sizes.internode_dispatch_geometry(16, 8, Config(20, 32, 256, 16, 128), 8, True, True, [14336])
    other = sizes.internode_dispatch_geometry(16, 8, Config(40, 8, 64, 4, 32), 2, True, False, [7168, 224],
                                              has_prefixes=True)
    combine = sizes.internode_combine_geometry(16, 8, Config(2, 1, 1, 1, 1), 128, 0, exact_partials=True)
    assert big.signals == other.signals == combine.signals
    assert all(g.rings.rdma_ring >= g.signals.rings for g in (big, other, combine))


def test_internode_hint_is_bounded_by_the_rings():
    """At T=4096, H=7168, top-8 of 256 experts: at most 1.5 GB at 2 nodes of 8, and at 8 nodes of 8 at most 1.5 times
    that; neither T nor the capacity moves it (the rings bound it)."""
    from jax_deepep.gpu.internode import rdma_bytes_hint

    two = rdma_bytes_hint(4096, 7168, 8, 256, 16, ranks_per_node=8)
    eight = rdma_bytes_hint(4096, 7168, 8, 256, 64, ranks_per_node=8)
    assert two <= 1.5e9 and eight <= 1.5 * two
    assert rdma_bytes_hint(32767, 7168, 8, 256, 16, ranks_per_node=8, capacity=16 * 32767) == two
    # Its rings come from the configs: twice the slots, more bytes.
    assert rdma_bytes_hint(4096, 7168, 8, 256, 16, ranks_per_node=8, config=Config(20, 32, 512, 16, 256)) > two


def test_internode_hint_shrinks_with_bf16_partials():
    """`rdma_bytes_hint` sizes combine for the Buffer's partials: with f32 partials combine's rings between nodes take
    twice the bytes."""
    from jax_deepep.gpu.internode import rdma_bytes_hint

    config = Config(20, 16, 256, 16, 128)
    combine = {exact: sizes.internode_combine_geometry(16, 8, config, 7168, 8, exact_partials=exact).rdma_bytes
               for exact in (False, True)}
    assert combine[False] < combine[True]
    args = (4096, 7168, 8, 256, 16)
    assert rdma_bytes_hint(*args, ranks_per_node=8, exact_internode_combine=True, config=config) == combine[True]
    assert rdma_bytes_hint(*args, ranks_per_node=8, exact_internode_combine=True) > rdma_bytes_hint(*args,
                                                                                                   ranks_per_node=8)


def test_internode_expert_grouped_layouts():
    """A first grouped dispatch's rows carry K i32 pair prefixes after the weights; a grouped combine returns
    f32 rows; partials and the plain layouts stay as they are; the hint covers both."""
    from jax_deepep.gpu.internode import rdma_bytes_hint

    plain = sizes.internode_dispatch_layout(8, True, True, [14336])
    grouped = sizes.internode_dispatch_layout(8, True, True, [14336], has_prefixes=True)
    assert (grouped.prefix_at, grouped.part_at, grouped.row_bytes) == (80, (112, 14448), 14448)
    assert (plain.prefix_at, plain.part_at) == (80, (80, 14416))
    combine = {f32: sizes.internode_combine_layout(7168, 8, exact_partials=False, f32_returns=f32)
               for f32 in (False, True)}
    assert combine[True].return_bytes == 7168 * 4 + 32 and combine[False].return_bytes == 7168 * 2 + 32
    assert combine[True].partial_bytes == combine[False].partial_bytes
    args = (4096, 7168, 8, 256, 16)
    assert rdma_bytes_hint(*args, ranks_per_node=8, expert_grouped=True) > rdma_bytes_hint(*args, ranks_per_node=8)


def test_internode_hint_without_a_node_size_serves_every_one():
    from jax_deepep.gpu.internode import rdma_bytes_hint

    args = (4096, 7168, 8, 256, 16)
    assert sizes.internode_node_sizes(16) == [1, 2, 4, 8]
    assert rdma_bytes_hint(*args) == max(rdma_bytes_hint(*args, ranks_per_node=n) for n in (1, 2, 4, 8))


def test_config_rdma_hint_holds_every_internode_op_of_its_rows():
    """`Config.get_rdma_buffer_size_hint(hidden_bytes, R)`: 0 within a node; beyond, at least what `rdma_bytes_hint`
    asks for the same Config (any K up to 32, FP8, grouped, exact partials), and exactly the largest of those."""
    from jax_deepep.gpu.internode import rdma_bytes_hint

    config = Config(20, 32, 256, 16, 128)
    assert config.get_rdma_buffer_size_hint(2 * 7168, 8) == 0
    hint = config.get_rdma_buffer_size_hint(2 * 7168, 16)
    assert hint >= rdma_bytes_hint(4096, 7168, 32, 256, 16, exact_internode_combine=True, expert_grouped=True,
                                   config=config)
    combine = max(sizes.internode_combine_geometry(16, n, config, 7168, 32, exact_partials=True,
                                                   f32_returns=True).rdma_bytes for n in (1, 2, 4, 8))
    assert hint >= combine


def test_struct_attribute_spells_tuples_per_element():
    attribute = struct_attribute(sizes.dispatch_slot([14336], 8), np.int32)
    assert attribute == {"part_offset0": 16, "part_offset1": 14352, "topk_idx_offset": 14352,
                         "topk_weights_offset": 14384, "bytes": 14416}
    assert all(type(v) is np.int32 for v in attribute.values())


@pytest.mark.parametrize("layout", [
    sizes.low_latency_layout(8, 256, 16),
    sizes.dispatch_slot([14336], 8),
    sizes.combine_slot(7168, 8),
    sizes.internode_dispatch_layout(8, False, True, [7168, 224]),
    sizes.internode_combine_layout(128, 0, exact_partials=False),
    sizes.internode_signals(4, 2),
    sizes.internode_combine_geometry(4, 2, Config(4, 4, 8, 2, 8), 128, 0, exact_partials=False).rings,
], ids=lambda layout: type(layout).__name__)
def test_handlers_decode_the_fields_python_passes(layout):
    if not (ROOT / "xla_ffi").is_dir():
        pytest.skip("the C++ sources are not next to the tests")
    assert list(struct_attribute(layout)) == list(decoded_struct_members(type(layout).__name__))
