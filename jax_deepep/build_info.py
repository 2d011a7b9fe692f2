"""Which build the user got: the CUDA library, or the pure-Python package (written by CMake)."""
from __future__ import annotations

import functools
import importlib.metadata
import json
import pathlib


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """{"mode": "cuda" | "pure-python" | "source-tree", "reason": ..., "nvshmem": the nvidia-nvshmem-cu13
    version the NVSHMEM module was built against, or None} (a source tree: mode and reason only)."""
    places = [pathlib.Path(__file__).resolve().parent / "_build_info.json"]
    try:
        places.append(pathlib.Path(importlib.metadata.distribution("jax_deepep").locate_file(
            "jax_deepep/_build_info.json")))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in places:
        if path.exists():
            return json.loads(path.read_text())
    return {"mode": "source-tree", "reason": "not installed: running from a checkout without a build"}
