"""Finding and loading the compiled libraries built by CMake (`libjax_deepep_cuda.so`, and
`libjax_deepep_nvshmem.so` for the low-latency mode)."""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import pathlib

LIBRARY_NAME = "libjax_deepep_cuda.so"


def candidates(name: str, env_var: str):
    """Where library `name` may be: `$env_var`, next to this file, then in the installed package."""
    env = os.environ.get(env_var)
    if env:
        yield pathlib.Path(env)
    yield pathlib.Path(__file__).resolve().parent / name
    # Running from a source checkout shadows the installed package: look where pip put the library.
    try:
        yield pathlib.Path(importlib.metadata.distribution("jax_deepep").locate_file(f"jax_deepep/gpu/{name}"))
    except importlib.metadata.PackageNotFoundError:
        pass


@functools.lru_cache(maxsize=None)
def _load():
    """(ctypes library, None) or (None, reason)."""
    for path in candidates(LIBRARY_NAME, "JAX_DEEPEP_LIBRARY"):
        if path.exists():
            try:
                return ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL), None
            except OSError as e:
                return None, f"{path} failed to load: {e}"
    return None, f"{LIBRARY_NAME} was not built (install with a CUDA compiler present, see README)"


def library():
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(f"jax_deepep CUDA library unavailable: {reason}")
    return lib


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1] or ""
