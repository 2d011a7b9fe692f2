"""The CUDA backend: our kernels as XLA FFI custom calls (see xla_ffi/ and cuda/)."""
from __future__ import annotations

from .library import available, unavailable_reason

__all__ = ["available", "unavailable_reason", "CudaBackend"]


def __getattr__(name):
    if name == "CudaBackend":
        from .backend import CudaBackend

        return CudaBackend
    raise AttributeError(name)
