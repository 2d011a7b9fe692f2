"""jax_deepep.sizes: the layouts the handlers receive as attributes, pinned to known values (those
the kernels' former C++ formulas gave), and the attribute names the handlers decode."""
import numpy as np
import pytest

import jax_deepep as deepep
from jax_deepep import sizes
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
    # T=4096 bf16 tokens with 8 ids and weights, 16 ranks in nodes of 8, 256 experts, N=16384. The signals (counts
    # included: 8 bytes each, the signature above the call number and count) come first, then the rows.
    assert sizes.internode_dispatch_layout(4096, 16384, 8, True, True, [14336], 256, 8, 16) == \
        sizes.InternodeDispatchLayout(14416, 16, 48, 80, (80, 14416), 0, 2192, 4240, 2048, 118100112, 2064, 354291968,
                                      118095872)
    # FP8 tokens (values and scales) with weights only, 4 ranks in nodes of 2.
    assert sizes.internode_dispatch_layout(64, 128, 8, False, True, [7168, 224], 0, 2, 4) == \
        sizes.InternodeDispatchLayout(7440, 16, 16, 48, (48, 7216), 0, 176, 176, 128, 952496, 144, 1904896, 952320)
    # Combine with exact f32 partials ([H] f32 + K weights per (token, node)) ...
    assert sizes.internode_combine_layout(4096, 7168, 8, 8, 16, exact_partials=True) == sizes.InternodeCombineLayout(
        14368, 28704, 2064, 0, 941623312, 2048, 1176766720, 235143168)
    assert sizes.internode_combine_layout(64, 128, 0, 2, 4, exact_partials=True) == sizes.InternodeCombineLayout(
        256, 512, 528, 0, 66064, 512, 131840, 65536)
    # ... and with bf16 partials (the default): a partial row is a returned row's size, half the f32 one.
    assert sizes.internode_combine_layout(4096, 7168, 8, 8, 16, exact_partials=False) == sizes.InternodeCombineLayout(
        14368, 14368, 2064, 0, 941623312, 2048, 1059326208, 117702656)
    assert sizes.internode_combine_layout(64, 128, 0, 2, 4, exact_partials=False) == sizes.InternodeCombineLayout(
        256, 256, 528, 0, 66064, 512, 99072, 32768)


def test_internode_signals_lie_where_other_shapes_do_not_move_them():
    """Every signal comes before the rows, at offsets set by R, L and E alone, so a peer's call with other shapes
    still signals where this rank waits, and its signature fails the op at once (no timeout)."""
    big = sizes.internode_dispatch_layout(4096, 16384, 8, True, True, [14336], 256, 8, 16)
    other = sizes.internode_dispatch_layout(64, 128, 2, True, False, [7168, 224], 256, 8, 16, has_prefixes=True)
    signals = ("counts", "inbox_signals", "forward_signals", "expert_counts")
    assert [getattr(big, f) for f in signals] == [getattr(other, f) for f in signals]
    assert max(getattr(big, f) for f in signals) < min(big.inbox, big.landing)
    combine = [sizes.internode_combine_layout(t, h, k, 8, 16, exact_partials=exact, f32_returns=f32)
               for t, h, k, exact, f32 in ((4096, 7168, 8, True, False), (64, 128, 0, False, True))]
    assert {(c.return_signals, c.partial_signals) for c in combine} == {(0, 2048)}
    assert all(c.partial_signals < c.returns for c in combine)


def test_internode_hint_shrinks_with_bf16_partials():
    """`rdma_bytes_hint` sizes combine for the Buffer's partials: at 2 nodes of 8 (T=4096, H=7168) f32
    partials make combine the larger op, bf16 ones leave dispatch the larger."""
    from jax_deepep.gpu.internode import rdma_bytes_hint

    args = (4096, 7168, 8, 256, 16)
    combine = {exact: sizes.internode_combine_layout(4096, 7168, 8, 8, 16, exact_partials=exact)
               for exact in (False, True)}
    dispatch = sizes.internode_dispatch_layout(4096, 16 * 4096, 8, True, True, [14336], 256, 8, 16)
    need = {exact: sizes.internode_rdma_bytes(c.half_bytes, c.staging_bytes) for exact, c in combine.items()}
    dispatch_need = sizes.internode_rdma_bytes(dispatch.half_bytes, dispatch.staging_bytes)
    assert need[False] < dispatch_need < need[True]
    assert rdma_bytes_hint(*args, ranks_per_node=8, exact_internode_combine=True) == need[True]
    assert rdma_bytes_hint(*args, ranks_per_node=8) == dispatch_need


def test_internode_expert_grouped_layouts():
    """A first grouped dispatch's rows carry K i32 pair prefixes after the weights; a grouped combine returns
    f32 rows; partials and the plain layouts stay as they are; the hint covers both."""
    from jax_deepep.gpu.internode import rdma_bytes_hint

    plain = sizes.internode_dispatch_layout(4096, 16 * 4096, 8, True, True, [14336], 256, 8, 16)
    grouped = sizes.internode_dispatch_layout(4096, 16 * 4096, 8, True, True, [14336], 256, 8, 16, has_prefixes=True)
    assert (grouped.prefix_at, grouped.part_at, grouped.row_bytes) == (80, (112, 14448), 14448)
    assert (plain.prefix_at, plain.part_at) == (80, (80, 14416))
    combine = {f32: sizes.internode_combine_layout(4096, 7168, 8, 8, 16, exact_partials=False, f32_returns=f32)
               for f32 in (False, True)}
    assert combine[True].return_bytes == 7168 * 4 + 32 and combine[False].return_bytes == 7168 * 2 + 32
    assert combine[True].partial_bytes == combine[False].partial_bytes
    args = (4096, 7168, 8, 256, 16)
    assert rdma_bytes_hint(*args, ranks_per_node=8, expert_grouped=True) > rdma_bytes_hint(*args, ranks_per_node=8)
    # Any grouped capacity N: the token level has R * T rows.
    assert rdma_bytes_hint(*args, ranks_per_node=8, capacity=64, expert_grouped=True) == \
        rdma_bytes_hint(*args, ranks_per_node=8, expert_grouped=True)


def test_internode_regions():
    dispatch, combine = sizes.internode_regions((1 << 30) + 100)
    assert dispatch == sizes.InternodeRegion(0, 1 << 28)
    assert combine == sizes.InternodeRegion(1 << 29, 1 << 28)


def test_struct_attribute_spells_tuples_per_element():
    attribute = struct_attribute(sizes.dispatch_slot([14336], 8), np.int32)
    assert attribute == {"part_offset0": 16, "part_offset1": 14352, "topk_idx_offset": 14352,
                         "topk_weights_offset": 14384, "bytes": 14416}
    assert all(type(v) is np.int32 for v in attribute.values())


@pytest.mark.parametrize("layout", [
    sizes.low_latency_layout(8, 256, 16),
    sizes.dispatch_slot([14336], 8),
    sizes.combine_slot(7168, 8),
    sizes.internode_dispatch_layout(64, 128, 8, False, True, [7168, 224], 0, 2, 4),
    sizes.internode_combine_layout(64, 128, 0, 2, 4, exact_partials=False),
    sizes.internode_regions(1 << 20)[1],
], ids=lambda layout: type(layout).__name__)
def test_handlers_decode_the_fields_python_passes(layout):
    if not (ROOT / "xla_ffi").is_dir():
        pytest.skip("the C++ sources are not next to the tests")
    assert list(struct_attribute(layout)) == list(decoded_struct_members(type(layout).__name__))
