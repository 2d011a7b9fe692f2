"""Tuned default `Config`s: the JSON file `python -m jax_deepep.tune` writes and `Buffer` reads
(docs/API.md, "Tuned configs").

An entry is the fastest Config found for one (device kind, R, H, dtype, op) at one SM count. A
Buffer reads the file once, when it is made, and keeps the entries of its device kind and R; the ops'
default Config is then the entry for the call's H and dtype: the fastest over the SM counts, or the
one at `Buffer.num_sms` once `Buffer.set_num_sms` chose the SMs. A missing or unreadable file means
the built-in defaults; a malformed one is a `DeepEPError` naming the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from .config import Config
from .validation import DeepEPError, fail, integer

ENVIRONMENT_VARIABLE = "JAX_DEEPEP_TUNED_CONFIGS"
FORMAT = "jax_deepep.tuned_configs/1"
OPS = ("dispatch", "combine")
DTYPES = ("bf16", "fp8")
_KEY_FIELDS = ("device_kind", "num_ranks", "hidden", "dtype", "op")
_READ_FIELDS = _KEY_FIELDS + ("config", "time_us")


def default_path() -> str:
    """Where the tuner writes and Buffers read when JAX_DEEPEP_TUNED_CONFIGS is unset."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "jax_deepep", "tuned_configs.json")


def path() -> Optional[str]:
    """The tuned-config file: JAX_DEEPEP_TUNED_CONFIGS, else `default_path()`; None when the variable
    is set but empty (tuned configs off)."""
    chosen = os.environ.get(ENVIRONMENT_VARIABLE)
    return default_path() if chosen is None else (chosen or None)


@dataclasses.dataclass(frozen=True)
class Entry:
    device_kind: str  # jax's `Device.device_kind`, e.g. "NVIDIA H200"
    num_ranks: int
    hidden: int
    dtype: str  # "bf16" or "fp8" (the dispatched tokens; combine is bf16)
    op: str  # "dispatch" or "combine"
    config: Config
    time_us: float  # the op's time with `config` when tuned: the fastest entry over SM counts wins
    measured: dict = dataclasses.field(default_factory=dict)  # more of what the tuner saw; not read back

    def key(self) -> tuple:
        return tuple(getattr(self, name) for name in _KEY_FIELDS) + (self.config.num_sms,)

    def to_json(self) -> dict:
        return {**{name: getattr(self, name) for name in _KEY_FIELDS},
                "config": dataclasses.asdict(self.config), "time_us": self.time_us, **self.measured}


def _entry(where: str, item) -> Entry:
    """An entry of the file, checked: `where` names the file and the entry in every message."""
    if not isinstance(item, dict):
        fail(where, f"must be an object, got {type(item).__name__}")
    missing = [name for name in _READ_FIELDS if name not in item]
    if missing:
        fail(where, f"misses {', '.join(missing)}")
    if not isinstance(item["device_kind"], str):
        fail(where, f"`device_kind` must be a string, got {item['device_kind']!r}")
    if item["op"] not in OPS or item["dtype"] not in DTYPES or (item["op"], item["dtype"]) == ("combine", "fp8"):
        fail(where, f"`op` and `dtype` must be dispatch with bf16 or fp8, or combine with bf16, got "
                    f"{item['op']!r} with {item['dtype']!r}")
    num_ranks = integer(where, "num_ranks", item["num_ranks"], minimum=1)
    hidden = integer(where, "hidden", item["hidden"], minimum=1)
    if not isinstance(item["config"], dict):
        fail(where, f"`config` must be an object of Config fields, got {item['config']!r}")
    try:
        config = Config(**item["config"])
    except TypeError as e:
        fail(where, f"`config` must hold the fields of Config: {e}")
    except DeepEPError as e:
        fail(where, f"`config`: {e}")
    time_us = item["time_us"]
    if isinstance(time_us, bool) or not isinstance(time_us, (int, float)) or not time_us > 0:
        fail(where, f"`time_us` must be a positive number, got {time_us!r}")
    measured = {name: value for name, value in item.items() if name not in _READ_FIELDS}
    return Entry(item["device_kind"], num_ranks, hidden, item["dtype"], item["op"], config, float(time_us), measured)


def read(file: str) -> list:
    """The entries of `file` (`OSError` when it cannot be read; `DeepEPError` naming it when it is
    not a tuned-config file or an entry is malformed)."""
    with open(file, encoding="utf-8") as f:
        text = f.read()
    where = f"tuned configs {file}"
    try:
        data = json.loads(text)
    except ValueError as e:
        fail(where, f"not JSON ({e}); rerun python -m jax_deepep.tune or remove the file")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        fail(where, f"must be an object with \"format\": {FORMAT!r} and a list \"entries\"")
    entries, seen = [], {}
    for i, item in enumerate(data["entries"]):
        entry = _entry(f"{where}, entry {i}", item)
        if entry.key() in seen:
            fail(f"{where}, entry {i}", f"repeats entry {seen[entry.key()]} (same device_kind, num_ranks, "
                                        "hidden, dtype, op and num_sms)")
        seen[entry.key()] = i
        entries.append(entry)
    return entries


def write(file: str, entries: list):
    """Write `entries` to `file` (its folder made if need be), replacing it whole: a Buffer reading
    meanwhile sees the old file or the new one."""
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    data = {"format": FORMAT, "entries": [e.to_json() for e in sorted(entries, key=Entry.key)]}
    partial = f"{file}.{os.getpid()}.tmp"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(partial, file)


class TunedConfigs:
    """The entries of one file for one device kind and rank count."""

    def __init__(self, entries: list):
        self._entries = {(e.op, e.hidden, e.dtype, e.config.num_sms): e for e in entries}

    def get(self, op: str, hidden: Optional[int], dtype: str, num_sms: Optional[int]) -> Optional[Config]:
        """The tuned Config of `op` for tokens of `hidden` channels in `dtype`: the one for `num_sms`
        SMs, or with None the fastest over every SM count; None when the file has none."""
        matching = [e for (o, h, d, s), e in self._entries.items()
                    if (o, h, d) == (op, hidden, dtype) and num_sms in (None, s)]
        if not matching:
            return None
        return min(matching, key=lambda e: e.time_us).config

    def as_json(self) -> list:
        """The entries as JSON values, in a fixed order (the processes making a Buffer compare them)."""
        return [[op, hidden, dtype, dataclasses.asdict(e.config)]
                for (op, hidden, dtype, _), e in sorted(self._entries.items())]


def load(device_kind: str, num_ranks: int) -> TunedConfigs:
    """The tuned configs of `path()` for `device_kind` and `num_ranks` ranks; none when tuned configs
    are off or the file is missing or unreadable."""
    file = path()
    if file is None:
        return TunedConfigs([])
    try:
        entries = read(file)
    except OSError:
        return TunedConfigs([])
    return TunedConfigs([e for e in entries if (e.device_kind, e.num_ranks) == (device_kind, num_ranks)])


def token_key(x) -> tuple:
    """(H, dtype) of an op's tokens `x` (an array, or the FP8 pair); H is None when `x` has no
    `[T, H]` shape (the op's own checks then refuse it)."""
    parts = x if isinstance(x, (tuple, list)) else (x,)
    shape = getattr(parts[0], "shape", ()) if parts else ()
    return (shape[1] if len(shape) == 2 else None), ("fp8" if len(parts) == 2 else "bf16")
