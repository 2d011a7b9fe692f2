"""Ring sizing (never shrunk silently), the tuned-config file and `python -m jax_deepep.tune` on CPU
(where its timings mean nothing: only the JSON's shape and how Buffers pick it up are checked)."""
import argparse
import json
import types

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

import jax_deepep as deepep
from jax_deepep import buffer as buffer_module
from jax_deepep import tune, tuned
from jax_deepep.backend import RankContext
from jax_deepep.config import default_combine_config, default_dispatch_config
from jax_deepep.gpu.intranode import DEFAULT_NUM_NVL_BYTES, IntranodeBackend, _sm_count
from jax_deepep.sizes import dispatch_slot

H = 128
TINY = ["--num-ranks", "2", "--hidden", str(H), "--num-tokens", "16", "--num-topk", "2", "--num-experts", "8",
        "--num-sms", "2", "4", "--send-tokens", "4", "--recv-tokens", "8", "--warmup", "0", "--iters", "1",
        "--batch", "1", "--rotations", "1"]


@pytest.fixture
def tuned_file(tmp_path, monkeypatch):
    """Buffers read tuned configs from this (absent) file; `Buffer.set_num_sms` left unchosen."""
    path = tmp_path / "tuned.json"
    monkeypatch.setenv(tuned.ENVIRONMENT_VARIABLE, str(path))
    monkeypatch.setattr(deepep.Buffer, "num_sms_chosen", False)
    return path


def _mesh(r=2):
    return Mesh(np.array(jax.devices()[:r]), ("ep",))


# ---- ring sizing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_ranks,most_sms", [(2, 86), (4, 56), (8, 42)])
def test_default_buffer_holds_the_builtin_defaults_up_to_documented_sms(num_ranks, most_sms):
    for make in (default_dispatch_config, default_combine_config):
        for sms, fits in ((deepep.Buffer.num_sms, True), (most_sms, True), (most_sms + 2, False)):
            need = make(num_ranks, sms).get_nvl_buffer_size_hint(2 * 7168, num_ranks)
            assert (need <= DEFAULT_NUM_NVL_BYTES) == fits, (make.__name__, sms)
    # The expert-grouped combine (the MoE layer's default) moves f32 partial rows: twice the bytes.
    grouped = default_combine_config(num_ranks, deepep.Buffer.num_sms).get_nvl_buffer_size_hint(4 * 7168, num_ranks)
    assert grouped <= DEFAULT_NUM_NVL_BYTES


def test_tuned_combine_configs_fit_the_grouped_combines_f32_rows():
    """A combine Config also serves the expert-grouped combine, whose rows are f32 sums: the sweep keeps
    only combine candidates whose rings hold those, while dispatch keeps every one that holds bf16 rows."""
    args = ([24, 48, 132], [16, 32], [256, 512], 7168, 8, DEFAULT_NUM_NVL_BYTES)
    dispatch = tune.candidates(*args, tune.ROW_BYTES["dispatch"])
    combine = tune.candidates(*args, tune.ROW_BYTES["combine"])
    assert set(combine) < set(dispatch)
    assert all(c.get_nvl_buffer_size_hint(4 * 7168, 8) <= DEFAULT_NUM_NVL_BYTES for c in combine)
    assert any(c.get_nvl_buffer_size_hint(4 * 7168, 8) > DEFAULT_NUM_NVL_BYTES for c in dispatch)


def _backend(ring_bytes, sm_count=None):
    backend = object.__new__(IntranodeBackend)  # no library: `_ring` reads only these
    backend.comm = types.SimpleNamespace(buffer_id=1, num_bytes=ring_bytes + 4096, ring_bytes=ring_bytes)
    backend._max_channels = 64
    backend._sm_count = sm_count
    return backend


def test_a_ring_the_buffer_cannot_hold_is_refused_never_shrunk():
    config, ctx, slot = deepep.Config(20, 32, 512), RankContext("ep", 2, 2), dispatch_slot([2 * H], 8)
    need = 10 * 2 * 512 * slot.bytes
    attrs = _backend(need)._ring("dispatch", ctx, config, slot, 2 * H)
    assert int(attrs["ring"]["slots"]) == 512 and int(attrs["ring"]["chunk_tokens"]) == 32
    with pytest.raises(deepep.DeepEPError) as e:
        _backend(need - 1)._ring("dispatch", ctx, config, slot, 2 * H)
    for part in ("num_max_nvl_chunked_recv_tokens", "num_sms", str(need),
                 str(config.get_nvl_buffer_size_hint(2 * H, 2)), "get_nvl_buffer_size_hint"):
        assert part in str(e.value), part


def test_more_sms_than_the_device_has_are_refused():
    """Every block must be resident at once: more blocks than SMs would wait until the timeout."""
    ctx, slot = RankContext("ep", 2, 2), dispatch_slot([2 * H], 8)
    backend = _backend(1 << 30, sm_count=101)
    assert int(backend._ring("dispatch", ctx, deepep.Config(100, 32, 512), slot, 2 * H)["ring"]["num_channels"]) == 50
    with pytest.raises(deepep.DeepEPError, match=r"`config.num_sms`=102 is more than the 101 SMs.*num_sms <= 100"):
        backend._ring("combine", ctx, deepep.Config(102, 16, 512), slot, 2 * H)


def test_the_sm_count_checked_is_the_fewest_of_this_process_devices():
    device = lambda sms, process=0: types.SimpleNamespace(core_count=sms, process_index=process)
    mesh = types.SimpleNamespace(devices=np.array([device(132), device(114), device(16, process=1)]))
    assert _sm_count(mesh) == 114
    assert _sm_count(_mesh()) is None  # CPU devices report no SM count: nothing to check


# ---- the tuner and the file ---------------------------------------------------------------------
def test_every_flag_is_described():
    for action in tune.parser()._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings


def test_on_cpu_the_tuner_needs_an_output(tuned_file):
    with pytest.raises(SystemExit, match="--output"):
        tune.main(TINY)


def test_tuner_writes_entries_that_buffers_pick_up(tuned_file, capsys, monkeypatch):
    tune.main(TINY + ["--output", str(tuned_file)])
    assert "mean nothing" in capsys.readouterr().out
    entries = tuned.read(str(tuned_file))
    assert sorted((e.op, e.dtype, e.config.num_sms) for e in entries) == [
        ("combine", "bf16", 2), ("combine", "bf16", 4), ("dispatch", "bf16", 2), ("dispatch", "bf16", 4),
        ("dispatch", "fp8", 2), ("dispatch", "fp8", 4)]
    assert {(e.device_kind, e.num_ranks, e.hidden) for e in entries} == {("cpu", 2, H)}
    assert all(e.time_us > 0 and "default_time_us" in e.measured for e in entries)

    def best(op, dtype, sms=None):
        return min((e for e in entries if (e.op, e.dtype) == (op, dtype) and sms in (None, e.config.num_sms)),
                   key=lambda e: e.time_us).config

    assert deepep.Buffer.get_dispatch_config(2, hidden=H) == best("dispatch", "bf16")
    assert deepep.Buffer.get_dispatch_config(2, hidden=H, dtype="fp8") == best("dispatch", "fp8")
    assert deepep.Buffer.get_combine_config(2, hidden=H) == best("combine", "bf16")
    builtin = default_dispatch_config(2, deepep.Buffer.num_sms)
    # Another H, R or no H: the built-in defaults.
    assert deepep.Buffer.get_dispatch_config(2, hidden=2 * H) == builtin
    assert deepep.Buffer.get_dispatch_config(4, hidden=H) == default_dispatch_config(4, deepep.Buffer.num_sms)
    assert deepep.Buffer.get_dispatch_config(2) == builtin
    # Once set_num_sms chose the SMs: that SM count's entry, else the built-in default.
    monkeypatch.setattr(deepep.Buffer, "num_sms_chosen", True)
    monkeypatch.setattr(deepep.Buffer, "num_sms", 4)
    assert deepep.Buffer.get_dispatch_config(2, hidden=H) == best("dispatch", "bf16", 4)
    monkeypatch.setattr(deepep.Buffer, "num_sms", 6)
    assert deepep.Buffer.get_dispatch_config(2, hidden=H) == default_dispatch_config(2, 6)
    monkeypatch.setattr(deepep.Buffer, "num_sms_chosen", False)

    # The ops' default Config: the tuned one for the call's H and dtype.
    seen = []
    buffer = deepep.Buffer(_mesh(), "ep")
    assert buffer._arguments(buffer.ranks_per_node)["tuned_configs"] == buffer.tuned_configs.as_json() != []

    def body(x):
        buffer.dispatch(x[0], num_experts=8)
        return x

    with monkeypatch.context() as spy:
        spy.setattr(buffer_module._normal, "dispatch", lambda backend, ctx, config, *a, **k: seen.append(config))
        jax.eval_shape(jax.shard_map(body, mesh=buffer.mesh, in_specs=PartitionSpec("ep"),
                                     out_specs=PartitionSpec("ep")), jax.numpy.zeros((2, 16, H), jax.numpy.bfloat16))
    assert seen[-1] == best("dispatch", "bf16")

    # A second run for another H keeps these entries.
    tune.main([a if a != str(H) else str(2 * H) for a in TINY] + ["--output", str(tuned_file)])
    assert {e.hidden for e in tuned.read(str(tuned_file))} == {H, 2 * H}


def _write(path, entries):
    path.write_text(json.dumps({"format": tuned.FORMAT, "entries": entries}))


ENTRY = {"device_kind": "cpu", "num_ranks": 2, "hidden": H, "dtype": "bf16", "op": "dispatch", "time_us": 5.0,
         "config": {"num_sms": 4, "num_max_nvl_chunked_send_tokens": 4, "num_max_nvl_chunked_recv_tokens": 8}}


def test_a_file_for_another_device_kind_is_not_used(tuned_file):
    _write(tuned_file, [dict(ENTRY, device_kind="NVIDIA H200")])
    assert deepep.Buffer(_mesh(), "ep").tuned_configs.as_json() == []
    _write(tuned_file, [ENTRY])
    assert deepep.Buffer.get_dispatch_config(2, hidden=H) == deepep.Config(4, 4, 8)


def test_missing_unreadable_or_switched_off_means_builtin_defaults(tuned_file, monkeypatch):
    builtin = default_dispatch_config(2, deepep.Buffer.num_sms)
    assert deepep.Buffer.get_dispatch_config(2, hidden=H) == builtin  # missing
    tuned_file.mkdir()  # unreadable as a file
    assert deepep.Buffer.get_dispatch_config(2, hidden=H) == builtin
    monkeypatch.setenv(tuned.ENVIRONMENT_VARIABLE, "")
    assert tuned.path() is None and deepep.Buffer.get_dispatch_config(2, hidden=H) == builtin


@pytest.mark.parametrize("text,expected", [
    ("{not json", "not JSON"),
    (json.dumps({"entries": []}), "format"),
    (json.dumps({"format": tuned.FORMAT, "entries": [dict(ENTRY, op="gather")]}), "entry 0"),
    (json.dumps({"format": tuned.FORMAT, "entries": [dict(ENTRY, dtype="fp8", op="combine")]}), "`op` and `dtype`"),
    (json.dumps({"format": tuned.FORMAT, "entries": [{k: v for k, v in ENTRY.items() if k != "time_us"}]}),
     "misses time_us"),
    (json.dumps({"format": tuned.FORMAT, "entries": [dict(ENTRY, config=dict(ENTRY["config"], num_sms=3))]}),
     "num_sms"),
    (json.dumps({"format": tuned.FORMAT, "entries": [dict(ENTRY, config={"sms": 4})]}), "fields of Config"),
    (json.dumps({"format": tuned.FORMAT, "entries": [ENTRY, ENTRY]}), "entry 1: repeats entry 0"),
])
def test_a_malformed_file_is_an_error_naming_it(tuned_file, text, expected):
    tuned_file.write_text(text)
    with pytest.raises(deepep.DeepEPError, match=f"tuned configs {tuned_file}") as e:
        deepep.Buffer(_mesh(), "ep")
    assert expected in str(e.value)


def test_bad_lookup_arguments():
    """The getters check their arguments; the ops leave bad tokens to their own checks."""
    with pytest.raises(deepep.DeepEPError, match="dtype"):
        deepep.Buffer.get_dispatch_config(2, hidden=H, dtype="fp16")
    with pytest.raises(deepep.DeepEPError, match="hidden"):
        deepep.Buffer.get_combine_config(2, hidden=0)
