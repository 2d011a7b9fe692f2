"""Finding and loading the compiled library (`libjax_deepep_cuda.so`) built by CMake."""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import pathlib

LIBRARY_NAME = "libjax_deepep_cuda.so"


def _candidates():
    env = os.environ.get("JAX_DEEPEP_LIBRARY")
    if env:
        yield pathlib.Path(env)
    yield pathlib.Path(__file__).resolve().parent / LIBRARY_NAME
    # Running from a source checkout shadows the installed package: look where pip put the library.
    try:
        yield pathlib.Path(importlib.metadata.distribution("jax_deepep").locate_file(
            f"jax_deepep/gpu/{LIBRARY_NAME}"))
    except importlib.metadata.PackageNotFoundError:
        pass


@functools.lru_cache(maxsize=None)
def _load():
    """(ctypes library, None) or (None, reason)."""
    for path in _candidates():
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
