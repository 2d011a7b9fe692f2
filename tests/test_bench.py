"""The bench on CPU: it runs in a tiny configuration and writes JSON, and the JAX-native baselines
give the same received rows and combined results as the pure-JAX reference."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jax_deepep as deepep
from jax_deepep import baselines, bench
from no_host_collectives import assert_same_programs, guarded_pythonpath

AXIS = bench.AXIS


def _mesh(num_ranks):
    devices = jax.devices("cpu")
    if len(devices) < num_ranks:
        pytest.skip(f"needs {num_ranks} CPU devices")
    return Mesh(np.array(devices[:num_ranks]), (AXIS,))


def _put(mesh, a):
    return jax.device_put(a, NamedSharding(mesh, PartitionSpec(AXIS)))


def _routing(rng, num_ranks, num_tokens, top_k, num_experts):
    """Distinct experts per token, uneven loads, ~15% of entries and some whole tokens -1."""
    scores = rng.random((num_ranks, num_tokens, num_experts)) + np.linspace(0, 0.3, num_experts)
    idx = np.argsort(-scores, axis=-1)[..., :top_k].astype(np.int32)
    idx[rng.random(idx.shape) < 0.15] = -1
    idx[rng.random((num_ranks, num_tokens)) < 0.1] = -1
    return idx, rng.random(idx.shape).astype(np.float32)


def _tokens(rng, shape):
    return rng.standard_normal(shape).astype(np.float32).astype(ml_dtypes.bfloat16)


def _assert_rows_equal(a, b, rows):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    for r, n in enumerate(rows):
        np.testing.assert_array_equal(a[r, :n], b[r, :n])


@pytest.mark.parametrize("as_words", [False, True], ids=["native", "u32"])
@pytest.mark.parametrize("transport", ["padded", "ring"])
@pytest.mark.parametrize("num_ranks,capacity", [(1, None), (2, None), (4, None), (8, None), (4, 40)])
def test_normal_baselines_match_reference(transport, as_words, num_ranks, capacity):
    rng = np.random.default_rng([num_ranks, capacity or 0, len(transport), as_words])
    num_tokens, hidden, top_k, num_experts = 24, 256, 4, 16
    mesh = _mesh(num_ranks)
    idx, w = _routing(rng, num_ranks, num_tokens, top_k, num_experts)
    x = _tokens(rng, (num_ranks, num_tokens, hidden))
    args = [_put(mesh, a) for a in (x, idx, w)]
    cap = capacity or num_ranks * num_tokens

    def reference(x, idx, w):
        out = deepep.reference.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=num_experts,
                                        num_worst_tokens=cap, axis_name=AXIS)
        y = out.recv_x * 2 - 1
        combined, _ = deepep.reference.combine(y, out.handle, axis_name=AXIS)
        fp8 = deepep.reference.dispatch(deepep.fp8.per_block_cast_to_fp8(x), handle=out.handle, axis_name=AXIS)
        return out, combined, fp8.recv_x

    def baseline(x, idx, w):
        layout = deepep.reference.get_dispatch_layout(idx, num_experts, axis_name=AXIS)
        out = baselines.dispatch(transport, x, idx, w, layout, axis_name=AXIS, num_experts=num_experts,
                                 capacity=cap, as_words=as_words)
        y = out.recv_parts[0] * 2 - 1
        fp8 = baselines.dispatch(transport, deepep.fp8.per_block_cast_to_fp8(x), idx, w, layout, axis_name=AXIS,
                                 num_experts=num_experts, capacity=cap, as_words=as_words)
        combined = baselines.combine(transport, y, out.plan, axis_name=AXIS, as_words=as_words)
        assert combined.return_buffer is None
        return out, combined.combined_x, fp8.recv_parts

    ref, ref_combined, ref_fp8 = jax.device_get(bench.per_rank(mesh, reference)(*args))
    got, got_combined, got_fp8 = jax.device_get(bench.per_rank(mesh, baseline)(*args))
    np.testing.assert_array_equal(got.num_recv_tokens, ref.num_recv_tokens)
    rows = np.minimum(ref.num_recv_tokens.reshape(-1), cap)
    assert rows.min() > 0 and (capacity is None or ref.num_recv_tokens.max() > cap)  # the test means something
    _assert_rows_equal(got.recv_parts[0], ref.recv_x, rows)
    _assert_rows_equal(got.recv_topk_idx, ref.recv_topk_idx, rows)
    _assert_rows_equal(got.recv_topk_weights, ref.recv_topk_weights, rows)
    for got_part, ref_part in zip(got_fp8, ref_fp8):
        _assert_rows_equal(got_part, ref_part, rows)
    np.testing.assert_array_equal(np.asarray(got_combined, np.float32), np.asarray(ref_combined, np.float32))


@pytest.mark.parametrize("num_ranks", [1, 2, 8])
def test_low_latency_baseline_matches_reference(num_ranks):
    rng = np.random.default_rng(100 + num_ranks)
    num_tokens, m, hidden, top_k, num_experts = 10, 12, 128, 4, 16
    mesh = _mesh(num_ranks)
    idx, w = _routing(rng, num_ranks, num_tokens, top_k, num_experts)
    x = _tokens(rng, (num_ranks, num_tokens, hidden))
    garbage = _tokens(rng, (num_ranks, num_experts // num_ranks, num_ranks * m, hidden))
    args = [_put(mesh, a) for a in (x, idx, w, garbage)]

    def reference(x, idx, w, _):
        out = deepep.reference.low_latency_dispatch(x, idx, num_max_dispatch_tokens_per_rank=m,
                                                    num_experts=num_experts, use_fp8=False, axis_name=AXIS)
        combined = deepep.reference.low_latency_combine(out.recv_x * 3, idx, w, out.handle, axis_name=AXIS)
        return out, combined

    def baseline(x, idx, w, buf):
        out = baselines.low_latency_dispatch(x, idx, buf, axis_name=AXIS, num_experts=num_experts)
        return out, baselines.low_latency_combine(out.recv_x * 3, w, out.plan, axis_name=AXIS)

    ref, ref_combined = jax.device_get(bench.per_rank(mesh, reference)(*args))
    got, got_combined = jax.device_get(bench.per_rank(mesh, baseline)(*args))
    np.testing.assert_array_equal(got.plan.recv_count, ref.recv_count)
    np.testing.assert_array_equal(got.plan.recv_layout_range, ref.recv_layout_range)
    assert ref.recv_count.sum() > 0
    for r in range(num_ranks):
        for e, n in enumerate(ref.recv_count[r]):
            np.testing.assert_array_equal(np.asarray(got.recv_x[r, e, :n], np.float32),
                                          np.asarray(ref.recv_x[r, e, :n], np.float32))
    np.testing.assert_allclose(np.asarray(got_combined, np.float32), np.asarray(ref_combined, np.float32),
                               rtol=1e-2, atol=1e-2)


def test_buffers_are_for_ragged_only():
    mesh = _mesh(1)
    x = jnp.zeros((1, 4, 128), jnp.bfloat16)
    idx = jnp.zeros((1, 4, 2), jnp.int32)

    def run(x, idx):
        layout = deepep.reference.get_dispatch_layout(idx, 4, axis_name=AXIS)
        return baselines.dispatch("padded", x, idx, jnp.ones(idx.shape), layout, axis_name=AXIS, num_experts=4,
                                  recv_buffers=(x,))

    with pytest.raises(ValueError, match="ragged"):
        bench.per_rank(mesh, run)(_put(mesh, x), _put(mesh, idx))


def test_as_words_round_trip():
    rng = np.random.default_rng(7)
    for a in (jnp.asarray(_tokens(rng, (5, 6, 8))), jnp.asarray(rng.random((5, 3)), jnp.float32),
              jnp.asarray(_tokens(rng, (5, 8))).astype(jnp.float8_e4m3fn), jnp.zeros((5, 3), jnp.bfloat16)):
        words, restore = baselines.uint32_view(a)
        assert words.dtype == (jnp.uint32 if a.dtype.itemsize * a[0].size % 4 == 0 else a.dtype)
        np.testing.assert_array_equal(np.asarray(restore(words), np.float32), np.asarray(a, np.float32))


@pytest.mark.parametrize("mode,tokens", [("normal", 32), ("low_latency", 8)])
def test_bench_runs_and_writes_json(tmp_path, mode, tokens):
    if len(jax.devices("cpu")) < 4:
        pytest.skip("needs 4 CPU devices")
    path = tmp_path / "bench.json"
    bench.main(["--mode", mode, "--num-ranks", "4", "--num-tokens", str(tokens), "--hidden", "256",
                "--num-topk", "4", "--num-experts", "16", "--warmup", "1", "--iters", "2", "--batch", "2",
                "--rotations", "2", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["meta"]["mode"] == mode and data["meta"]["sizes"]["num_ranks"] == 4
    by_name = {(r["op"], r["impl"], r["dtype"]): r for r in data["results"]}
    for r in data["results"]:
        assert "failed" not in r["note"] and "mismatch" not in r["note"], r
    if mode == "normal":
        assert by_name[("dispatch", "jax:ragged", "bf16")]["time_us"] is None  # skipped on XLA:CPU
        assert "ragged" in by_name[("dispatch", "jax:ragged", "bf16")]["note"]
        timed = [k for k, r in by_name.items() if r["time_us"]]
        for key in [("copy", "ceiling", "bf16"), ("dispatch", "buffer[reference]", "bf16"),
                    ("dispatch", "buffer[reference]", "fp8"), ("combine", "buffer[reference]", "bf16"),
                    ("dispatch", "jax:padded", "bf16"), ("combine", "jax:ring", "bf16"),
                    ("peer_copy", "ceiling", "bf16")]:
            assert key in timed, key
        assert by_name[("dispatch", "jax:padded", "bf16")]["gbps"] > 0
    else:
        for key in [("ll_dispatch", "buffer[reference]", "bf16"), ("ll_combine", "jax:padded", "bf16"),
                    ("ll_dispatch", "jax:padded", "bf16")]:
            assert by_name[key]["time_us"] > 0, key


def test_low_latency_bench_runs_as_processes_sharing_a_gpu(tmp_path, monkeypatch):
    """Two processes of one job, as `--spawn` starts them on one GPU (`--shared-gpu`, passed here by hand:
    this machine has none): the low-latency bench times the Buffer and records the JAX-native
    formulations, XLA collectives, which such processes lack, as skipped, saying why; nothing else
    runs a collective between the processes either."""
    monkeypatch.setenv("PYTHONPATH", guarded_pythonpath(tmp_path / "guard"))
    path = tmp_path / "bench.json"
    # 32 tokens of 4 pairs: the ranks' counts of pairs (2% are -1) differ, and the bench must not take a
    # shape from them
    bench.main(["--mode", "low_latency", "--spawn", "2", "--shared-gpu", "--num-tokens", "32", "--hidden", "256",
                "--num-topk", "4", "--num-experts", "8", "--warmup", "1", "--iters", "1", "--batch", "1",
                "--rotations", "1", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["meta"]["processes"] == 2 and data["meta"]["sizes"]["num_ranks"] == 2
    assert_same_programs(tmp_path / "guard")
    by_name = {(r["op"], r["impl"], r["dtype"]): r for r in data["results"]}
    assert by_name[("ll_dispatch", "buffer[reference]", "bf16")]["time_us"] > 0
    for op in ("ll_dispatch", "ll_combine"):
        skipped = by_name[(op, "jax:padded", "bf16")]
        assert skipped["time_us"] is None and "no XLA collectives" in skipped["note"], skipped


@pytest.mark.parametrize("mode, sizes", [("normal", ["--num-tokens", "32", "--num-topk", "4"]),
                                         ("moe", ["--num-tokens", "32", "--num-topk", "2", "--moe-ffn", "128"])])
def test_bench_as_processes_sharing_a_gpu_compiles_the_same_programs(tmp_path, monkeypatch, mode, sizes):
    """Normal mode and the MoE layer as `--spawn` runs them on one GPU: no collective between the
    processes outside the ops, and both processes compile the same programs (where they differ, a GPU
    hangs in the compile)."""
    monkeypatch.setenv("PYTHONPATH", guarded_pythonpath(tmp_path / "guard"))
    path = tmp_path / "bench.json"
    bench.main(["--mode", mode, "--spawn", "2", "--shared-gpu", "--hidden", "256", "--num-experts", "8",
                "--warmup", "1", "--iters", "1", "--batch", "1", "--rotations", "1", "--only", "buffer",
                "--json", str(path), *sizes])
    assert json.loads(path.read_text())["meta"]["processes"] == 2
    assert_same_programs(tmp_path / "guard")


def test_low_latency_bench_runs_as_a_job_of_two_processes(tmp_path):
    """Two processes of one job, each with its own device: every array is made where its rows live and
    the JAX-native baseline is checked against the Buffer on each process's own ranks (a process cannot
    read the other's)."""
    path = tmp_path / "bench.json"
    bench.main(["--mode", "low_latency", "--spawn", "2", "--num-tokens", "8", "--hidden", "256",
                "--num-topk", "2", "--num-experts", "8", "--warmup", "1", "--iters", "1", "--batch", "1",
                "--rotations", "1", "--json", str(path)])
    by_name = {(r["op"], r["impl"], r["dtype"]): r for r in json.loads(path.read_text())["results"]}
    dispatch = by_name[("ll_dispatch", "jax:padded", "bf16")]
    assert dispatch["time_us"] > 0 and "mismatch" not in dispatch["note"], dispatch
    assert by_name[("ll_combine", "buffer[reference]", "logfmt")]["time_us"] > 0


def test_stopped_bench_job_prints_where_it_waited_and_leaves_no_process():
    """SIGTERM to `--spawn`'s process (as a time limit sends it) ends the job's processes, which JAX's
    preemption notifier would keep alive, after each has printed its Python stacks."""
    proc = subprocess.Popen([sys.executable, "-m", "jax_deepep.bench", "--mode", "low_latency", "--spawn", "2",
                             "--num-tokens", "8", "--hidden", "256", "--num-topk", "2", "--num-experts", "8",
                             "--iters", "100000", "--batch", "1", "--rotations", "1"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    for line in proc.stderr:  # running: the ops are timed
        lines.append(line)
        if "ops in turns" in line:
            break
    proc.send_signal(signal.SIGTERM)
    try:
        err = "".join(lines) + proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    # Both processes dump at once into one pipe, faulthandler a write per piece ("  File ", the path,
    # " in ", the name): their pieces interleave, so look for the pieces, not for a line.
    assert err.count("most recent call first") >= 2 and "time_all" in err, err[-2000:]
    deadline = time.time() + 10
    while time.time() < deadline:  # the group's last members may take a moment to be reaped
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("a process of the job outlived its stop")


def test_bench_moe_layer_runs_and_writes_json(tmp_path):
    """`--mode moe`: the MoE layer forward and forward + backward in both layouts and on the JAX-native
    transports, each checked against the Buffer's rows-by-source layer, and the experts' ceiling."""
    if len(jax.devices("cpu")) < 2:
        pytest.skip("needs 2 CPU devices")
    path = tmp_path / "moe.json"
    bench.main(["--mode", "moe", "--num-ranks", "2", "--num-tokens", "16", "--hidden", "128", "--num-topk", "2",
                "--num-experts", "8", "--moe-ffn", "64", "--warmup", "1", "--iters", "1", "--batch", "1",
                "--rotations", "2", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["meta"]["mode"] == "moe"
    by_name = {(r["op"], r["impl"]): r for r in data["results"]}
    for r in data["results"]:
        assert "failed" not in r["note"] and "mismatch" not in r["note"], r
    for op in ("moe_fwd", "moe_fwd_bwd"):
        for impl in ("buffer[reference]/grouped", "buffer[reference]/argsort", "jax:padded/argsort",
                     "jax:ring/argsort"):
            assert by_name[(op, impl)]["time_us"] > 0, (op, impl)
        assert "ragged" in by_name[(op, "jax:ragged/argsort")]["note"]  # skipped on XLA:CPU
    assert by_name[("experts", "ceiling")]["time_us"] > 0


def test_num_sms_flag():
    cpu = jax.devices()[0]
    assert bench._num_sms("24", cpu) == 24
    gpu_like = type("Device", (), {"core_count": 133, "platform": "gpu"})()
    assert bench._num_sms("max", gpu_like) == 132  # all SMs, rounded down to even
    with pytest.raises(SystemExit, match="no SM count"):
        bench._num_sms("max", cpu)
    with pytest.raises(SystemExit, match="a number or 'max'"):
        bench._num_sms("many", cpu)


def test_bench_internode_spawns_a_job_of_two_processes(tmp_path):
    """`--spawn 2` starts two processes of one jax.distributed job (here on CPU: the pure-JAX ops);
    process 0 writes the results, with the same run's intranode times in `meta`."""
    path = tmp_path / "internode.json"
    bench.main(["--mode", "internode", "--spawn", "2", "--ranks-per-node", "1", "--num-tokens", "16", "--hidden", "128",
                "--num-topk", "2", "--num-experts", "8", "--warmup", "1", "--iters", "1", "--batch", "1",
                "--rotations", "1", "--only", "buffer", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["meta"]["processes"] == 2 and data["meta"]["ranks_per_node"] == 1
    assert data["meta"]["internode_partials"] == "bf16"  # the default; --exact-internode-combine: "f32"
    assert data["meta"]["internode_puts_only"] is False  # the default; --internode-puts-only: True
    assert data["meta"]["sizes"]["num_ranks"] == 2
    timed = {(r["op"], r["impl"], r["dtype"]) for r in data["results"] if r["time_us"]}
    internode = {("dispatch", "buffer[reference]", "bf16"), ("dispatch", "buffer[reference]", "fp8"),
                 ("combine", "buffer[reference]", "bf16")}
    # The same-run reference: an intranode Buffer of the same 2 ranks (on CPU, pure JAX like the internode one).
    intranode = {("dispatch", "buffer[reference]/intranode", "bf16"),
                 ("combine", "buffer[reference]/intranode", "bf16")}
    assert internode | intranode <= timed, data["results"]
    by_name = {(r["op"], r["impl"], r["dtype"]): r["time_us"] for r in data["results"]}
    assert data["meta"]["intranode_dispatch_us"] == by_name[("dispatch", "buffer[reference]/intranode", "bf16")]
    assert data["meta"]["intranode_combine_us"] == by_name[("combine", "buffer[reference]/intranode", "bf16")]


def test_kernel_labels_name_the_function():
    """The printed breakdown names each kernel by its function, demangled or not (the JSON keeps the whole name)."""
    kernel_label = bench.kernel_label
    mangled = ("__nv_static_36__c0ea8a3d_14_low_latency_cu_110c5e1c__ZN10jax_deepep47_GLOBAL__N__c0ea8a3d_14_"
               "low_latency_cu_110c5e1c20dispatch_recv_kernelENS_14LowLatencyCallEPKiPK13__nv_bfloat16bb")
    assert kernel_label(mangled) == "dispatch_recv_kernel"
    assert kernel_label("jax_deepep::(anonymous namespace)::combine_recv_kernel(jax_deepep::LowLatencyCall, "
                        "int const*)") == "combine_recv_kernel"
    assert kernel_label("void jax_deepep::intranode_dispatch<jax_deepep::DispatchArgs>(int)") == "intranode_dispatch"
    assert kernel_label("input_reduce_fusion_6") == "input_reduce_fusion_6"
