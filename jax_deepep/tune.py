"""`python -m jax_deepep.tune`: find the fastest normal-mode `Config`s on this machine and write them
where `Buffer` finds them (docs/API.md, "Tuned configs").

    python -m jax_deepep.tune                                  # R = all local GPUs, H = 7168
    python -m jax_deepep.tune --num-ranks 1 2 --hidden 4096 7168 --short

For each rank count R, hidden size H and op (dispatch of bf16 and of FP8 tokens, combine of bf16) it
times every candidate Config: each SM count of --num-sms with each pair of --send-tokens and
--recv-tokens, the ring at least the chunk. Timing is `python -m jax_deepep.bench`'s (`bench.Repeated`,
`bench.measure`: the median over batches of back-to-back calls on fresh inputs). Candidates whose
rings a Buffer of --num-nvl-bytes cannot hold are skipped (for combine, with the expert-grouped
combine's f32 rows), so with the default size every tuned Config fits a Buffer made without
`num_nvl_bytes`, the MoE layer's grouped combine included. For each SM count the fastest Config becomes an
entry of the JSON file; entries already there for other devices, rank counts or sizes are kept.

On CPU the ops run on the pure-JAX backend, which ignores the Config: the timings mean nothing
there, the run only exercises the plumbing, and --output must be given.
"""
from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
from jax.sharding import Mesh

from . import tuned
from .bench import AXIS, Repeated, Sizes, _input_sets, _num_sms, measure, per_rank, random_tokens, stateless
from .buffer import Buffer
from .config import Config, default_combine_config, default_dispatch_config, sm_count
from .fp8 import per_block_cast_to_fp8
from .gpu.intranode import DEFAULT_NUM_NVL_BYTES
from .sizes import GROUPED_COMBINE_CHANNEL_BYTES
from .validation import DeepEPError

# (op, dtype) pairs the tuner times, and the built-in default each is compared with.
_CASES = (("dispatch", "bf16", default_dispatch_config), ("dispatch", "fp8", default_dispatch_config),
          ("combine", "bf16", default_combine_config))
_SWEEP = {"num_sms": ["16", "24", "32", "48", "64", "max"], "send_tokens": [8, 16, 32],
          "recv_tokens": [128, 256, 512]}
_SHORT = {"num_sms": ["24", "max"], "send_tokens": [16, 32], "recv_tokens": [256, 512]}


# Bytes per channel of the rows whose rings a tuned Config of each op must fit: bf16 rows, but a combine
# Config also serves the expert-grouped combine (the MoE layer's default), whose rows are f32 sums.
ROW_BYTES = {"dispatch": 2, "combine": GROUPED_COMBINE_CHANNEL_BYTES}


def candidates(sm_counts, send_tokens, recv_tokens, hidden: int, num_ranks: int, num_nvl_bytes: int,
               row_bytes: int = 2) -> list:
    """Every Config of the sweep whose rings (tokens of `hidden` channels of `row_bytes` bytes, as the ops
    check) fit `num_nvl_bytes`, ring at least the chunk."""
    return [config for sms in sm_counts for send in send_tokens for recv in recv_tokens if send <= recv
            for config in [Config(sms, send, recv)]
            if config.get_nvl_buffer_size_hint(row_bytes * hidden, num_ranks) <= num_nvl_bytes]


class Cases:
    """The inputs of one (R, H): routing and tokens (bf16 and FP8) for dispatch, and dispatched rows
    with their handles for combine."""

    def __init__(self, buffer: Buffer, mesh: Mesh, sizes: Sizes, args):
        self.buffer = buffer
        sets = _input_sets(mesh, sizes, args)
        layout = per_rank(mesh, lambda idx: buffer.get_dispatch_layout(idx, sizes.num_experts))
        to_fp8 = per_rank(mesh, per_block_cast_to_fp8)
        self.dispatch_args = {"bf16": [], "fp8": []}
        for x, idx, w in sets:
            lay = layout(idx)
            self.dispatch_args["bf16"].append((x, idx, w, lay))
            self.dispatch_args["fp8"].append((to_fp8(x), idx, w, lay))
        first = per_rank(mesh, lambda x, idx, w, lay: buffer.dispatch(x, topk_idx=idx, topk_weights=w, layout=lay))
        handles = [first(*a).handle for a in self.dispatch_args["bf16"]]
        keys = jax.random.split(jax.random.PRNGKey(args.seed + 1), len(handles))
        rows = handles[0].recv_src_idx.shape[1]
        self.combine_args = [(random_tokens(mesh, k, sizes, rows=rows), h) for k, h in zip(keys, handles)]

    def op(self, op: str, dtype: str, config: Config):
        """(`Repeated`'s op, its argument sets) of `op` on `dtype` tokens with `config`."""
        buffer = self.buffer
        if op == "combine":
            return stateless(lambda y, h: buffer.combine(y, h, config=config)[0]), self.combine_args
        return (stateless(lambda x, idx, w, lay: buffer.dispatch(x, topk_idx=idx, topk_weights=w, layout=lay,
                                                                 config=config)),
                self.dispatch_args[dtype])


def _describe(config: Config) -> str:
    return (f"num_sms={config.num_sms} send={config.num_max_nvl_chunked_send_tokens} "
            f"recv={config.num_max_nvl_chunked_recv_tokens}")


def _time_us(mesh: Mesh, op, arg_sets, args) -> float:
    return measure(Repeated(mesh, op, arg_sets), warmup=args.warmup, iters=args.iters, batch=args.batch)[0]


def tune_case(mesh: Mesh, cases: Cases, op: str, dtype: str, builtin: Config, configs: list, args) -> dict:
    """{SM count: (fastest Config, its time in us)} over `configs`, and the built-in default's time
    under the key "default". A Config that fails (too many SMs for the kernels, ...) is reported and
    skipped."""
    times = {}
    for config in dict.fromkeys(configs + [builtin]):
        try:
            times[config] = _time_us(mesh, *cases.op(op, dtype, config), args)
        except Exception as e:  # the other candidates still count
            print(f"  {op} {dtype} {_describe(config)}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                  file=sys.stderr)
            continue
        print(f"  {op} {dtype} {_describe(config)}: {times[config]:.1f} us", file=sys.stderr, flush=True)
    best = {}
    for config, us in times.items():
        if config in configs and (config.num_sms not in best or us < best[config.num_sms][1]):
            best[config.num_sms] = (config, us)
    return {"default": times.get(builtin), **best}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jax_deepep.tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--num-ranks", type=int, nargs="+", default=None,
                   help="rank counts to tune, each at most the local devices (default: all local devices)")
    p.add_argument("--hidden", type=int, nargs="+", default=[7168], help="hidden sizes H to tune (default 7168)")
    p.add_argument("--num-tokens", type=int, default=4096, help="tokens per rank of the timed calls (default 4096)")
    p.add_argument("--num-topk", type=int, default=8, help="experts per token of the timed calls (default 8)")
    p.add_argument("--num-experts", type=int, default=256, help="experts of the timed calls (default 256)")
    p.add_argument("--num-sms", nargs="+", default=None,
                   help="SM counts to sweep, even numbers or 'max' (all of the device's, rounded down to even); "
                        f"default {' '.join(_SWEEP['num_sms'])}, with --short {' '.join(_SHORT['num_sms'])}")
    p.add_argument("--send-tokens", type=int, nargs="+", default=None,
                   help="num_max_nvl_chunked_send_tokens values to sweep; default "
                        f"{' '.join(map(str, _SWEEP['send_tokens']))}, with --short "
                        f"{' '.join(map(str, _SHORT['send_tokens']))}")
    p.add_argument("--recv-tokens", type=int, nargs="+", default=None,
                   help="num_max_nvl_chunked_recv_tokens (ring slots) values to sweep; default "
                        f"{' '.join(map(str, _SWEEP['recv_tokens']))}, with --short "
                        f"{' '.join(map(str, _SHORT['recv_tokens']))}")
    p.add_argument("--short", action="store_true", help="the short sweep (defaults above) and fewer timed batches")
    p.add_argument("--num-nvl-bytes", type=int, default=DEFAULT_NUM_NVL_BYTES,
                   help="the Buffer size the tuned Configs must fit (default: a Buffer's default, "
                        f"{DEFAULT_NUM_NVL_BYTES >> 20} MiB)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per candidate after compiling (default 3)")
    p.add_argument("--iters", type=int, default=None, help="timed batches per candidate, median kept (default 10; "
                                                           "--short 5)")
    p.add_argument("--batch", type=int, default=3, help="back-to-back executables per timed batch (default 3)")
    p.add_argument("--rotations", type=int, default=4,
                   help="independent input sets, each run once per executable (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens and routing (default 0)")
    p.add_argument("--output", default=None,
                   help=f"the JSON file to write (default: ${tuned.ENVIRONMENT_VARIABLE}, else "
                        "~/.cache/jax_deepep/tuned_configs.json: where Buffers look; required on CPU)")
    return p


def parse_args(argv=None):
    args = parser().parse_args(argv)
    sweep = _SHORT if args.short else _SWEEP
    for name in ("num_sms", "send_tokens", "recv_tokens"):
        if getattr(args, name) is None:
            setattr(args, name, sweep[name])
    if args.iters is None:
        args.iters = 5 if args.short else 10
    return args


def main(argv=None):
    args = parse_args(argv)
    devices = jax.local_devices()
    device = devices[0]
    on_gpu = device.platform == "gpu"
    output = args.output or (tuned.path() if on_gpu else None)
    if output is None:
        raise SystemExit("--output is required on CPU (the timings mean nothing there) and when "
                         f"{tuned.ENVIRONMENT_VARIABLE} is empty")
    if not on_gpu:
        print(f"{device.platform}: the pure-JAX backend ignores the Config, so these timings mean nothing; "
              "this run only checks the tuner's plumbing", file=sys.stderr)
    sm_counts = sorted({sm_count("tune", "--num-sms", _num_sms(value, device)) for value in args.num_sms})
    entries = []
    for num_ranks in args.num_ranks or [len(devices)]:
        if not 1 <= num_ranks <= len(devices):
            raise SystemExit(f"--num-ranks {num_ranks}: {len(devices)} local devices")
        mesh = Mesh(np.array(devices[:num_ranks]), (AXIS,))
        with Buffer(mesh, AXIS, num_nvl_bytes=args.num_nvl_bytes) as buffer:
            for hidden in args.hidden:
                sizes = Sizes(num_ranks, args.num_tokens, hidden, args.num_topk, args.num_experts)
                print(f"{num_ranks} x {device.device_kind}, {sizes}", file=sys.stderr)
                try:
                    configs = {op: candidates(sm_counts, args.send_tokens, args.recv_tokens, hidden, num_ranks,
                                              args.num_nvl_bytes, row_bytes) for op, row_bytes in ROW_BYTES.items()}
                except DeepEPError as e:
                    raise SystemExit(f"--send-tokens / --recv-tokens: {e}") from None
                cases = Cases(buffer, mesh, sizes, args)
                for op, dtype, builtin in _CASES:
                    best = tune_case(mesh, cases, op, dtype, builtin(num_ranks, Buffer.num_sms), configs[op], args)
                    default_us = best.pop("default")
                    for config, us in best.values():
                        measured = {"default_time_us": default_us, "num_tokens": args.num_tokens,
                                    "num_topk": args.num_topk, "num_experts": args.num_experts,
                                    "platform": device.platform}
                        entries.append(tuned.Entry(device.device_kind, num_ranks, hidden, dtype, op, config, us,
                                                   measured))
                    fastest = min(best.values(), key=lambda b: b[1], default=None)
                    print(f"R={num_ranks} H={hidden} {op} {dtype}: "
                          + (f"{fastest[1]:.1f} us with {_describe(fastest[0])}" if fastest else "no candidate ran")
                          + (f" (built-in default {default_us:.1f} us)" if default_us else ""))
    tuned_now = {e.key()[:5] for e in entries}  # (device kind, R, H, dtype, op): every SM count replaced
    try:
        kept = [e for e in tuned.read(output) if e.key()[:5] not in tuned_now]
    except OSError:
        kept = []
    tuned.write(output, kept + entries)
    print(f"wrote {len(entries)} tuned configs to {output} (kept {len(kept)} others)"
          + ("" if on_gpu else f"; {device.platform} timings mean nothing"))
    return output


if __name__ == "__main__":
    main()
