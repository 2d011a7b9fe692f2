"""Test plumbing shared by the CPU suite: meshes over the "ep" axis, a runner that executes a
per-rank function under `jax.jit(jax.shard_map(...))`, and random tokens and routing.

Imported by the test modules after conftest.py has set XLA_FLAGS (8 virtual CPU devices).
"""
import functools
import pathlib
import re
import types

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "ep"
RANK_COUNTS = (1, 2, 4, 8)


ROOT = pathlib.Path(__file__).resolve().parent.parent


def decoded_struct_members(struct: str) -> dict:
    """{member name: its struct type's name, or None for a scalar} that xla_ffi/*_ffi.cc decode
    `jax_deepep::<struct>` from, in order."""
    for path in sorted((ROOT / "xla_ffi").glob("*_ffi.cc")):
        match = re.search(rf"XLA_FFI_REGISTER_STRUCT_ATTR_DECODING\(jax_deepep::{struct},(.*?)\);", path.read_text(),
                          re.S)
        if match:
            members = re.findall(r'StructMember<([\w:]+)>\("(\w+)"\)', match.group(1))
            return {name: (kind.split("::")[-1] if kind.startswith(("jax_deepep::", "jd::")) else None)
                    for kind, name in members}
    raise AssertionError(f"no decoding of {struct} in xla_ffi/")


def handler_attrs_struct(target: str) -> str:
    """The struct whose fields the FFI handler `target` takes as its attributes (`.Attrs<jd::X>()`)."""
    for path in sorted((ROOT / "xla_ffi").glob("*_ffi.cc")):
        match = re.search(rf"XLA_FFI_DEFINE_HANDLER_SYMBOL\({target},.*?\.Attrs<jd::(\w+)>\(\)\);", path.read_text(),
                          re.S)
        if match:
            return match.group(1)
    raise AssertionError(f"no handler {target} in xla_ffi/")


@functools.lru_cache(maxsize=None)
def make_mesh(num_ranks: int) -> Mesh:
    devices = jax.devices("cpu")
    if len(devices) < num_ranks:
        pytest.skip(f"needs {num_ranks} CPU devices, have {len(devices)} (XLA_FLAGS set too late?)")
    return Mesh(np.array(devices[:num_ranks]), (AXIS,))


def run_per_rank(mesh: Mesh, fn, *args):
    """Run `fn` once per rank inside `jit(shard_map)` over "ep".

    Every argument leaf has a leading rank axis of size R that is stripped inside; every output
    leaf gains one, so scalars and pytrees (handles, pending results) come back as `[R, ...]`
    numpy arrays. Passing the same `fn` object again reuses its compiled executable.
    """
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    args = jax.tree.map(lambda a: jax.device_put(a, sharding), args)
    return jax.device_get(_per_rank_jit(mesh, fn)(*args))


@functools.lru_cache(maxsize=None)
def _per_rank_jit(mesh: Mesh, fn):
    spec = PartitionSpec(AXIS)

    def body(*shards):
        out = fn(*jax.tree.map(lambda a: a[0], shards))
        return jax.tree.map(lambda a: a[None], out)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))


def buffer_with_cuda_backends(mesh: Mesh, axis_name: str = AXIS, **buffer_args):
    """A Buffer on CPU devices whose ops trace through the CUDA backends (intranode and low latency), with
    no device memory behind them: only tracing may follow. Needs the compiled library."""
    import jax_deepep as deepep
    from jax_deepep.gpu.intranode import IntranodeBackend
    from jax_deepep.gpu.low_latency import LowLatencyBackend

    buffer = deepep.Buffer(mesh, axis_name, **buffer_args)
    buffer.normal_backend = IntranodeBackend(types.SimpleNamespace(buffer_id=1, num_bytes=1 << 30, ring_bytes=1 << 30))
    buffer.low_latency_backend = LowLatencyBackend(types.SimpleNamespace(buffer_id=2),
                                                   buffer_args.get("num_rdma_bytes", 1 << 30), "jax_deepep_ll_")
    return buffer


def fake_cuda_platform(monkeypatch, intranode_lib):
    """Buffers on CPU devices choose the CUDA backends as on GPUs, with `intranode_lib` (a fake that
    records what it is asked) in place of the compiled `_intranode_lib`."""
    from jax_deepep import buffer as buffer_module
    from jax_deepep import gpu
    from jax_deepep.gpu import runtime

    monkeypatch.setattr(buffer_module, "_mesh_platform", lambda mesh: "gpu")
    monkeypatch.setattr(gpu, "available", lambda: True)
    monkeypatch.setattr(runtime, "_lib", lambda: intranode_lib)


def buffer_keys_in_store() -> list[str]:
    """Every key jax_deepep holds in the jax.distributed key-value store (Buffer namespaces, creation
    records, anything else): none may outlive the Buffers."""
    from jax_deepep.topology import kv_client

    return [key for key, _ in kv_client().key_value_dir_get("jax_deepep")]


def random_bf16(rng, shape):
    """Normal values rounded to bf16 (returned as an ml_dtypes bf16 numpy array)."""
    return rng.standard_normal(shape).astype(np.float32).astype(ml_dtypes.bfloat16)


# Ids outside [-1, E) that must behave like -1.
_BAD_IDS = (-2, -100, np.iinfo(np.int32).min)


def random_topk(rng, num_ranks: int, num_tokens: int, top_k: int, num_experts: int, kind: str = "random"):
    """int32 `[R, T, K]` routing: distinct experts per token, about 20% of the entries -1 and
    about 10% of the tokens sent nowhere.

    kind "hot": 90% of the tokens prefer experts [0, K) (mostly rank 0): very uneven receives.
    kind "out_of_range": some -1 entries become ids outside [-1, E) (to behave like -1).
    kind "repeated": about 30% of the entries repeat an earlier expert of the same token.
    """
    scores = rng.random((num_ranks, num_tokens, num_experts))
    if kind == "hot":
        hot = rng.random((num_ranks, num_tokens)) < 0.9
        scores[..., :top_k] += np.where(hot, 10.0, 0.0)[..., None]
    idx = np.argsort(-scores, axis=-1)[..., :top_k].astype(np.int32)
    idx[rng.random(idx.shape) < 0.2] = -1
    idx[rng.random((num_ranks, num_tokens)) < 0.1] = -1
    if kind == "out_of_range":
        bad_ids = np.array(_BAD_IDS + (num_experts, num_experts + 3, np.iinfo(np.int32).max), np.int32)
        spots = (idx == -1) & (rng.random(idx.shape) < 0.7)
        idx[spots] = rng.choice(bad_ids, size=int(spots.sum()))
    elif kind == "repeated":
        spots = rng.random(idx.shape) < 0.3
        spots[..., 0] = False
        earlier = np.take_along_axis(idx, rng.integers(0, np.maximum(np.arange(top_k), 1), size=idx.shape), axis=-1)
        idx = np.where(spots, earlier, idx)
    elif kind != "random" and kind != "hot":
        raise ValueError(kind)
    return idx


def random_weights(rng, shape):
    return rng.random(shape).astype(np.float32)


def random_tokens(rng, num_ranks: int, num_tokens: int, hidden: int, top_k: int, num_experts: int,
                  kind: str = "random"):
    """Every rank's tokens bf16 [R, T, H], routing i32 [R, T, K] (`random_topk`'s `kind`) and weights f32 [R, T, K]."""
    x = random_bf16(rng, (num_ranks, num_tokens, hidden))
    topk_idx = random_topk(rng, num_ranks, num_tokens, top_k, num_experts, kind)
    return x, topk_idx, random_weights(rng, (num_ranks, num_tokens, top_k))



def enable_x64():
    """Context manager turning on 64-bit types (jax.enable_x64 in new jax, experimental before)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as experimental_enable_x64

    return experimental_enable_x64()


def int64_ids_beyond_int32(topk_idx):
    """int64 copy of `topk_idx` where some -1 entries become ids that wrap into [0, E) when
    truncated to int32 (2**32 + e): they are out of range and must still behave like -1."""
    idx = np.asarray(topk_idx).astype(np.int64)
    spots = np.argwhere(idx == -1)[::2]
    idx[tuple(spots.T)] = (1 << 32) + np.arange(len(spots)) % 4
    return idx
