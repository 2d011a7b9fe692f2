"""`Buffer`: the host-side owner of the communication buffers of one expert-parallel mesh axis.

It composes its backends once, at construction: one for normal mode and one for low-latency mode
(CUDA kernels on a GPU mesh when the library is built, pure JAX otherwise; `gpu.make_backends`),
which hold the device state. The ops (docs/API.md) are called per shard, inside `jax.shard_map`
over `axis_name`.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import jax

from . import creation, tuned
from . import low_latency as _ll
from . import normal as _normal
from .backend import RankContext
from .config import Config, default_combine_config, default_dispatch_config, low_latency_rdma_size_hint, sm_count
from .reference import ReferenceBackend
from .topology import detect_ranks_per_node
from .validation import DeepEPError, axis_size, boolean, fail, integer, seconds

DEFAULT_TIMEOUT_S = 100.0
_MAX_TIMEOUT_S = 1e9  # what the NVSHMEM runtime takes (xla_ffi/nvshmem_runtime.cc)


def _environment_value(variable: str, text: str, parse):
    try:
        return parse(text)
    except ValueError:
        raise DeepEPError(f"Buffer: the environment variable {variable} must be a number, got {text!r}") from None


def resolve_timeout_s(timeout_s: Optional[float]) -> float:
    """The seconds a kernel waits for a peer: `timeout_s`, else JAX_DEEPEP_TIMEOUT_S, else 100."""
    if timeout_s is not None:
        return seconds("Buffer", "timeout_s", timeout_s, maximum=_MAX_TIMEOUT_S)
    env = os.environ.get("JAX_DEEPEP_TIMEOUT_S")
    if env is None:
        return DEFAULT_TIMEOUT_S
    return seconds("Buffer", "timeout_s (from JAX_DEEPEP_TIMEOUT_S)",
                   _environment_value("JAX_DEEPEP_TIMEOUT_S", env, float), maximum=_MAX_TIMEOUT_S)


def _default_config(op: str, num_ranks: int, hidden: Optional[int], dtype: str,
                    tuned_configs: tuned.TunedConfigs) -> Config:
    """`op`'s default Config: the tuned one for (`hidden`, `dtype`), at `Buffer.num_sms` once `set_num_sms`
    chose it, else the built-in default with `Buffer.num_sms` SMs. Unchecked: the ops check their inputs."""
    builtin = default_dispatch_config if op == "dispatch" else default_combine_config
    return (tuned_configs.get(op, hidden, dtype, Buffer.num_sms if Buffer.num_sms_chosen else None)
            or builtin(num_ranks, Buffer.num_sms))


def _looked_up_config(where: str, op: str, num_ranks, hidden, dtype) -> Config:
    """`_default_config` for the static getters: arguments checked, the tuned configs read now for
    this process's first device."""
    num_ranks = integer(where, "num_ranks", num_ranks, minimum=1)
    if hidden is not None:
        hidden = integer(where, "hidden", hidden, minimum=1)
    if dtype not in tuned.DTYPES:
        fail(where, f"`dtype` must be one of {tuned.DTYPES}, got {dtype!r}")
    return _default_config(op, num_ranks, hidden, dtype, tuned.load(jax.devices()[0].device_kind, num_ranks))


def _backend_choice() -> str:
    return os.environ.get("JAX_DEEPEP_BACKEND", "auto")


def _mesh_platform(mesh) -> str:
    platforms = {d.platform for d in mesh.devices.flat}
    return platforms.pop() if len(platforms) == 1 else "mixed"


class Buffer:
    """Communication buffers for expert parallelism over `mesh` axis `axis_name` (docs/API.md).

    `num_nvl_bytes`: the intranode buffer per rank (0: a default); `num_rdma_bytes`: the NVSHMEM
    symmetric buffer per rank, needed by low-latency mode and by normal mode across nodes;
    `low_latency_mode` enables the low-latency ops; `allow_nvlink_for_low_latency_mode=False` sends
    every low-latency row as an NVSHMEM put; `num_qps_per_rank`: InfiniBand GPUDirect Async
    QPs per peer, set as `NVSHMEM_IBGDA_NUM_RC_PER_PE` where unset when the process's first NVSHMEM Buffer
    starts NVSHMEM (docs/INTERNODE.md).
    Collective in a multi-process job: every process constructs it with the same arguments (checked:
    otherwise every process raises a `DeepEPError` naming what differs; `creation.agree`), and the
    processes agree on its `buffer_id`, which namespaces its keys in the jax.distributed store.
    A node (ranks sharing NVLink) is the ranks whose devices' processes run on one host, which must be
    equal blocks of consecutive ranks (`topology.detect_ranks_per_node`; `JAX_DEEPEP_HOST_ID` fakes a
    process's host). `ranks_per_node`, else `JAX_DEEPEP_RANKS_PER_NODE`, overrides how many consecutive
    ranks form a node (tests use it to make one machine play several nodes). On the CUDA backend an axis
    of several nodes runs the NVSHMEM internode kernels when `num_rdma_bytes` is given, else pure JAX
    (docs/INTERNODE.md).

    `timeout_s` (None: the environment variable JAX_DEEPEP_TIMEOUT_S, else 100 s; a number in (0, 1e9))
    bounds every wait on a peer of the NVSHMEM kernels (low-latency and internode mode); the intranode
    kernels still wait their own fixed time. `exact_internode_combine` (True or False): across several
    nodes, combine sums each node's rows into one partial per token there; by default that partial is
    rounded to bf16 before it crosses the network, as in DeepEP (half the bytes); True keeps it in f32,
    so the result is the sum rounded to bf16 once (docs/INTERNODE.md). Within one node it changes nothing.
    `internode_puts_only` (True or False): the internode kernels write the ranks of other nodes that
    NVSHMEM maps (nodes joined by NVLink, or processes sharing a GPU) through that mapping, as within a
    node; True sends them nvshmem puts, the network path, as if no mapping existed (tests and benches).
    """

    num_sms: int = 20
    num_sms_chosen: bool = False  # set by `set_num_sms`: the default configs then keep those SMs

    def __init__(self, mesh, axis_name: str = "ep", *, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, timeout_s: Optional[float] = None,
                 exact_internode_combine: bool = False, ranks_per_node: Optional[int] = None,
                 internode_puts_only: bool = False):
        if not isinstance(mesh, jax.sharding.Mesh):
            raise DeepEPError(f"Buffer: `mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if axis_name not in mesh.axis_names:
            raise DeepEPError(f"Buffer: `axis_name` {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
        self.mesh = mesh
        self.axis_name = axis_name
        self.num_ranks = int(mesh.shape[axis_name])
        self.num_nvl_bytes = integer("Buffer", "num_nvl_bytes", num_nvl_bytes, minimum=0)
        self.num_rdma_bytes = integer("Buffer", "num_rdma_bytes", num_rdma_bytes, minimum=0)
        self.low_latency_mode = boolean("Buffer", "low_latency_mode", low_latency_mode)
        self.num_qps_per_rank = integer("Buffer", "num_qps_per_rank", num_qps_per_rank, minimum=0)
        self.allow_nvlink_for_low_latency_mode = boolean("Buffer", "allow_nvlink_for_low_latency_mode",
                                                         allow_nvlink_for_low_latency_mode)
        self.timeout_s = resolve_timeout_s(timeout_s)
        self.exact_internode_combine = boolean("Buffer", "exact_internode_combine", exact_internode_combine)
        self.internode_puts_only = boolean("Buffer", "internode_puts_only", internode_puts_only)
        if ranks_per_node is None:
            env = os.environ.get("JAX_DEEPEP_RANKS_PER_NODE")
            ranks_per_node = None if env is None else _environment_value("JAX_DEEPEP_RANKS_PER_NODE", env, int)
        if ranks_per_node is not None:
            ranks_per_node = integer("Buffer", "ranks_per_node", ranks_per_node, minimum=1)
            if self.num_ranks % ranks_per_node:
                raise DeepEPError(f"Buffer: `ranks_per_node` must divide the number of ranks ({self.num_ranks}), "
                                  f"got {ranks_per_node}")
        # Checked and agreed on before any backend allocates: a peer sized differently would be
        # written out of bounds. The handshake also tells every process the others' hosts.
        self.tuned_configs = tuned.load(mesh.devices.flat[0].device_kind, self.num_ranks)
        self.keys, hosts = creation.agree(mesh, self._arguments(ranks_per_node))
        self.buffer_id = self.keys.buffer_id
        if ranks_per_node is None:  # the same hosts on every process, so the same nodes
            ranks_per_node = detect_ranks_per_node(mesh, axis_name, hosts)
        self.ranks_per_node = min(ranks_per_node, self.num_ranks)
        self._destroyed = False
        self._failure = None  # Buffer.failure(), once known
        self.normal_backend, self.low_latency_backend = self._make_backends()

    def _arguments(self, ranks_per_node: Optional[int]) -> dict:
        """What every process must have passed alike (the default Configs follow from `num_ranks`,
        `Buffer.num_sms` and the tuned configs; `ranks_per_node` None: detected from the hosts after the
        handshake), as JSON values."""
        return {"axis_name": self.axis_name, "num_ranks": self.num_ranks,
                "mesh.device_ids": self.mesh.device_ids.tolist(), "num_nvl_bytes": self.num_nvl_bytes,
                "num_rdma_bytes": self.num_rdma_bytes, "low_latency_mode": self.low_latency_mode,
                "num_qps_per_rank": self.num_qps_per_rank,
                "allow_nvlink_for_low_latency_mode": self.allow_nvlink_for_low_latency_mode,
                "ranks_per_node": "detected from the hosts" if ranks_per_node is None else ranks_per_node,
                "timeout_s": self.timeout_s,
                "exact_internode_combine": self.exact_internode_combine,
                "internode_puts_only": self.internode_puts_only, "Buffer.num_sms": Buffer.num_sms,
                "Buffer.num_sms_chosen": Buffer.num_sms_chosen, "tuned_configs": self.tuned_configs.as_json(),
                "JAX_DEEPEP_BACKEND": _backend_choice()}

    def _make_backends(self) -> tuple:
        """(normal-mode backend, low-latency backend), chosen once for this Buffer."""
        choice = _backend_choice()
        reference = ReferenceBackend(self.exact_internode_combine)
        if choice == "reference" or _mesh_platform(self.mesh) != "gpu":
            return reference, reference
        from . import gpu

        if not gpu.available():
            if choice == "cuda":
                raise DeepEPError(f"Buffer: JAX_DEEPEP_BACKEND=cuda but the CUDA library is unusable: "
                                  f"{gpu.unavailable_reason()}")
            warnings.warn(f"jax_deepep: CUDA library not available ({gpu.unavailable_reason()}); "
                          "using the pure-JAX implementation")
            return reference, reference
        return gpu.make_backends(self, self.keys)

    @property
    def backend(self):
        """The backend of this Buffer's mode (the low-latency one for a `low_latency_mode` Buffer)."""
        return self.low_latency_backend if self.low_latency_mode else self.normal_backend

    # ---- lifetime -------------------------------------------------------------------------
    def destroy(self):
        """Free every device and host resource of the Buffer; collective like the constructor.

        Waits for this process's ops on the Buffer, then for the other processes at most `timeout_s`
        (one that does not come is taken as gone: this process frees what it can alone, and says what
        stays). Releases everything it can even after a failure, then raises one `DeepEPError` listing
        what failed; calling it again retries only that. Once everything is released it does nothing.
        A Buffer dropped without `destroy()` frees what this process holds when it is garbage collected
        or the interpreter exits, with no waiting on peers (docs/RELIABILITY.md)."""
        failure = self.failure()  # kept: the kernels' records go with their buffers
        self._destroyed = True
        problems = []
        for backend in (self.normal_backend, self.low_latency_backend):
            try:
                backend.destroy()
            except DeepEPError as e:
                problems.append(str(e))
        if problems:
            after = f" after the failure: {failure}" if failure else ""
            raise DeepEPError("Buffer.destroy" + after + ": " + "; ".join(problems) + " (destroy() may be called again)")

    def failure(self) -> Optional[str]:
        """None while every kernel of this Buffer in this process succeeded. Otherwise what the first
        that failed reports: a wait on a peer that timed out (the message contains "timed out", the
        op, this rank and the peer), or ranks that reached different ops. Such a kernel traps, so the
        process's CUDA context is lost and the process must restart (docs/RELIABILITY.md)."""
        if self._failure is None:
            failures = self.normal_backend.failures() + self.low_latency_backend.failures()
            self._failure = failures[0] if failures else None
        return self._failure

    def __enter__(self):
        """`with Buffer(...) as buffer:` destroys the Buffer when the block ends."""
        return self

    def __exit__(self, *exc):
        self.destroy()

    @property
    def is_destroyed(self) -> bool:
        """True once `destroy()` was called (even one that failed); ops of a destroyed Buffer raise
        `DeepEPError`."""
        return self._destroyed

    # ---- configuration --------------------------------------------------------------------
    @staticmethod
    def set_num_sms(new_num_sms: int):
        """Set the SMs (a positive even int) of the default normal-mode configs, for every Buffer
        (tuned configs then only for that SM count)."""
        Buffer.num_sms = sm_count("Buffer.set_num_sms", "new_num_sms", new_num_sms)
        Buffer.num_sms_chosen = True

    @staticmethod
    def get_dispatch_config(num_ranks: int, *, hidden: Optional[int] = None, dtype: str = "bf16") -> Config:
        """The `Config` dispatch uses by default for `num_ranks` ranks: with `hidden`, the tuned one for
        tokens of that size in `dtype` ("bf16" or "fp8") on this process's first device, if the tuned
        configs have one (read now); else the built-in default (`Buffer.num_sms` SMs)."""
        return _looked_up_config("Buffer.get_dispatch_config", "dispatch", num_ranks, hidden, dtype)

    @staticmethod
    def get_combine_config(num_ranks: int, *, hidden: Optional[int] = None) -> Config:
        """The `Config` combine uses by default for `num_ranks` ranks, as `get_dispatch_config` (bf16)."""
        return _looked_up_config("Buffer.get_combine_config", "combine", num_ranks, hidden, "bf16")

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of `num_rdma_bytes` the low-latency ops need for `M` tokens per rank of `hidden`
        channels, `num_ranks` ranks and `num_experts` experts."""
        return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # ---- per-shard ops ----------------------------------------------------------------------
    def _context(self, op: str) -> RankContext:
        if self._destroyed:
            fail(op, "this Buffer was destroyed")
        size = axis_size(op, self.axis_name)
        if size != self.num_ranks:
            fail(op, f"axis {self.axis_name!r} has size {size} here but the Buffer was made for "
                     f"{self.num_ranks} ranks")
        return RankContext(self.axis_name, self.num_ranks, self.ranks_per_node)

    def _config(self, op: str, config: Optional[Config], default: Config) -> Config:
        if config is None:
            return default
        if not isinstance(config, Config):
            fail(op, f"`config` must be a deepep.Config, got {type(config).__name__}")
        return config

    def get_dispatch_layout(self, topk_idx, num_experts: int):
        """Per shard: where this rank's tokens go, as a `DispatchLayout`.

        `topk_idx`: i32 `[T, K]` expert ids, -1 for none (ids outside [-1, E) count as -1);
        `num_experts`: E, divisible by the number of ranks. Traced under
        `jax.named_scope("deepep/get_dispatch_layout")`.
        """
        ctx = self._context("get_dispatch_layout")
        return _normal.get_dispatch_layout(self.normal_backend, ctx, topk_idx, num_experts)

    def dispatch(self, x, *, topk_idx=None, topk_weights=None, num_experts=None, layout=None, handle=None,
                 num_worst_tokens=None, expert_alignment=1, expert_grouped=False, config=None):
        """Per shard: send each token to the ranks of its experts; returns a `DispatchOutput`.

        `x`: bf16 `[T, H]` or the FP8 pair (float8_e4m3fn `[T, H]`, f32 scales `[T, H // 128]`).
        Routing: `topk_idx` (i32 `[T, K]`) with `num_experts` or `layout`, or `layout` alone, or the
        `handle` of an earlier dispatch (cached mode, no other routing). `topk_weights`: f32
        `[T, K]`. `num_worst_tokens`: the receive capacity N (default R * T); `expert_alignment`
        rounds the per-expert counts up; `config` defaults to `get_dispatch_config`. `expert_grouped=True`
        receives a row per (token, local expert) pair, grouped by expert and padded to `expert_alignment`,
        ready for `jax.lax.ragged_dot` (docs/API.md, "Expert-grouped dispatch").
        Differentiable in bf16 `x` and `topk_weights`; under `jax.vmap`, a loop over the mapped axis.

        Traced under `jax.named_scope("deepep/dispatch")`. Checkpoint names (`jax.checkpoint` policies):
        "deepep/dispatch/recv_x", "deepep/dispatch/recv_topk_idx", "deepep/dispatch/recv_topk_weights" and
        "deepep/dispatch/handle" (the handle and the counts); saving them all keeps the backward pass from
        dispatching again.
        """
        ctx = self._context("dispatch")
        config = self._config("dispatch", config, _default_config("dispatch", self.num_ranks, *tuned.token_key(x),
                                                                  self.tuned_configs))
        return _normal.dispatch(self.normal_backend, ctx, config, x, topk_idx=topk_idx, topk_weights=topk_weights,
                                num_experts=num_experts, layout=layout, handle=handle,
                                num_worst_tokens=num_worst_tokens, expert_alignment=expert_alignment,
                                expert_grouped=expert_grouped, num_nvl_bytes=self.num_nvl_bytes)

    def combine(self, y, handle, *, topk_weights=None, bias=None, config=None):
        """Per shard: sum each token's rows back on its source rank; returns
        (bf16 `[T, H]`, f32 `[T, K]` or None).

        `y`: bf16 `[N, H]`, a row per received row of the dispatch whose `handle` is given (rows past
        `num_recv_tokens` are ignored); `topk_weights`: f32 `[N, K]`, summed back alike; with an
        expert-grouped handle, each token's sum weights its pair rows, and `topk_weights` is f32 `[N]`; `bias`:
        None, or one or two bf16 `[T, H]` added to the sum, which is taken in f32 and rounded once.
        Differentiable in `y`, `topk_weights` and `bias`; under `jax.vmap`, a loop over the mapped axis.

        Traced under `jax.named_scope("deepep/combine")`. Checkpoint names: "deepep/combine/combined_x",
        "deepep/combine/combined_topk_weights".
        """
        ctx = self._context("combine")
        config = self._config("combine", config, _default_config("combine", self.num_ranks, tuned.token_key(y)[0],
                                                                 "bf16", self.tuned_configs))
        return _normal.combine(self.normal_backend, ctx, config, y, handle, topk_weights=topk_weights, bias=bias,
                               num_nvl_bytes=self.num_nvl_bytes)

    def _low_latency_context(self, op: str) -> RankContext:
        ctx = self._context(op)
        if not self.low_latency_mode:
            fail(op, "needs a Buffer created with low_latency_mode=True")
        if self.num_rdma_bytes <= 0:
            fail(op, "needs a Buffer created with num_rdma_bytes > 0 "
                     "(see Buffer.get_low_latency_rdma_size_hint)")
        return ctx

    def low_latency_dispatch(self, x, topk_idx, *, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=True,
                             round_scale=False, use_ue8m0=False, return_recv_hook=False):
        """Per shard, low-latency mode: send each (token, expert) pair to the expert's block;
        returns a `LowLatencyDispatchOutput` with `recv_x` `[E_l, R * M, H]` (bf16, or with `use_fp8`
        the FP8 pair with per-128-channel scales; `round_scale` / `use_ue8m0` as in DeepEP).

        `x`: bf16 `[T, H]`, T <= M = `num_max_dispatch_tokens_per_rank`; `topk_idx`: i32 `[T, K]`.
        With `return_recv_hook=True` only the sends are issued; `low_latency_recv` completes it.

        Traced under `jax.named_scope("deepep/low_latency_dispatch")`. Checkpoint names (on the completed
        output, whether or not through `low_latency_recv`): "deepep/low_latency_dispatch/recv_x",
        "deepep/low_latency_dispatch/handle" (the handle, whose arrays the counts and layout are).
        Under `jax.vmap` the op runs once per element; with `return_recv_hook=True` the CUDA kernels
        refuse to be mapped (every send would be in flight before the first receive).
        """
        ctx = self._low_latency_context("low_latency_dispatch")
        return _ll.low_latency_dispatch(self.low_latency_backend, ctx, x, topk_idx,
                                        num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
                                        num_experts=num_experts, use_fp8=use_fp8, round_scale=round_scale,
                                        use_ue8m0=use_ue8m0, return_recv_hook=return_recv_hook,
                                        num_rdma_bytes=self.num_rdma_bytes)

    def low_latency_combine(self, y, topk_idx, topk_weights, handle, *, use_logfmt=False, zero_copy=False,
                            return_recv_hook=False):
        """Per shard, low-latency mode: bf16 `[T, H]`, each token's expert rows weighted by
        `topk_weights` and summed in f32.

        `y`: bf16 `[E_l, R * M, H]` (rows as `low_latency_dispatch` delivered them); `topk_idx` and
        `topk_weights` (f32) `[T, K]`; `handle` from that dispatch. `zero_copy` sends `y` from where
        XLA keeps it; `use_logfmt` sends rows to other ranks as LogFMT-10 (lossy, `jax_deepep/logfmt.py`). With
        `return_recv_hook=True` it returns a `PendingLowLatencyCombine` for `low_latency_recv`.

        Traced under `jax.named_scope("deepep/low_latency_combine")`. Checkpoint name (on the completed
        output): "deepep/low_latency_combine/combined_x". Under `jax.vmap` as `low_latency_dispatch`.
        """
        ctx = self._low_latency_context("low_latency_combine")
        return _ll.low_latency_combine(self.low_latency_backend, ctx, y, topk_idx, topk_weights, handle,
                                       use_logfmt=use_logfmt, zero_copy=zero_copy,
                                       return_recv_hook=return_recv_hook, num_rdma_bytes=self.num_rdma_bytes)

    def get_next_low_latency_combine_buffer(self, handle):
        """DeepEP's way to let the expert GEMM write its output into the combine's send buffer. In JAX
        XLA owns every array, so the direction is reversed: `low_latency_combine(..., zero_copy=True)`
        sends `y` straight out of XLA's memory (registered with NVSHMEM) with no staging copy."""
        del handle
        fail("get_next_low_latency_combine_buffer", "JAX arrays cannot be written in place; compute `y` as "
             "usual and pass zero_copy=True to low_latency_combine, which sends it from where XLA put it")

    def low_latency_recv(self, pending):
        """Per shard: complete a `return_recv_hook=True` low-latency dispatch (returns its
        `LowLatencyDispatchOutput`) or combine (returns bf16 `[T, H]`). Traced under
        `jax.named_scope("deepep/low_latency_recv")`."""
        ctx = self._low_latency_context("low_latency_recv")
        return _ll.low_latency_recv(self.low_latency_backend, ctx, pending)

    def __repr__(self):
        return (f"Buffer(axis_name={self.axis_name!r}, num_ranks={self.num_ranks}, backend={self.backend.name}, "
                f"low_latency_mode={self.low_latency_mode})")
