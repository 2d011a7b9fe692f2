"""Finding and loading the compiled extension modules that CMake builds: `_intranode_lib` (the
normal-mode kernels) and `_nvshmem_lib` (the low-latency and internode kernels over NVSHMEM).

Each is looked for at `$JAX_DEEPEP_LIBRARY` / `$JAX_DEEPEP_NVSHMEM_LIBRARY` (the Bazel tests and
scripts/gpu_all.sh point them at their build outputs), next to this file, then in the installed
package; it is imported from that path, and its FFI handlers are registered with JAX once.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.machinery
import importlib.metadata
import importlib.util
import pathlib
import os
from typing import Optional

import jax

from ..build_info import build_info
from ..validation import DeepEPError

_NVSHMEM_HOST_LIBRARY = "libnvshmem_host.so.3"
NVSHMEM_PACKAGE = "nvidia-nvshmem-cu13"


@dataclasses.dataclass(frozen=True)
class Module:
    name: str
    env_var: str
    missing: str  # why it may not have been built


INTRANODE = Module("_intranode_lib", "JAX_DEEPEP_LIBRARY",
                   "install with a CUDA compiler present, see README")
NVSHMEM = Module("_nvshmem_lib", "JAX_DEEPEP_NVSHMEM_LIBRARY",
                 f"needs nvcc and {NVSHMEM_PACKAGE} at install time")


def candidates(module: Module):
    """Where `module` may be: `$env_var`, next to this file, then in the installed package."""
    env = os.environ.get(module.env_var)
    if env:
        yield pathlib.Path(env)
    file_name = module.name + ".so"
    yield pathlib.Path(__file__).resolve().parent / file_name
    # Running from a source checkout shadows the installed package: look where pip put the module.
    try:
        yield pathlib.Path(importlib.metadata.distribution("jax_deepep").locate_file(f"jax_deepep/gpu/{file_name}"))
    except importlib.metadata.PackageNotFoundError:
        pass


def nvshmem_dir() -> Optional[pathlib.Path]:
    """The folder of the nvidia-nvshmem-cu13 package (include/, lib/), or None."""
    try:
        import nvidia.nvshmem as package
    except ImportError:
        return None
    for path in package.__path__:
        if (pathlib.Path(path) / "lib" / _NVSHMEM_HOST_LIBRARY).exists():
            return pathlib.Path(path)
    return None


def installed_nvshmem_version() -> Optional[str]:
    """The version of the installed nvidia-nvshmem-cu13 package, or None."""
    try:
        return importlib.metadata.version(NVSHMEM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_nvshmem_version():
    """Raises DeepEPError unless the installed NVSHMEM is the one the installed `_nvshmem_lib` was built
    against: NVSHMEM refuses to start when its host library and the device library linked into the module
    differ. A build without that record (a source checkout's, which links the NVSHMEM it runs with) passes."""
    built = build_info().get("nvshmem")
    installed = installed_nvshmem_version()
    if built is not None and installed != built:
        raise DeepEPError(f"jax_deepep {NVSHMEM.name} was built against {NVSHMEM_PACKAGE} {built} but "
                          f"{installed or 'none'} is installed: pip install '{NVSHMEM_PACKAGE}=={built}', or "
                          "reinstall jax_deepep with this one present (pip install --no-build-isolation .)")


def _import(module: Module, path: pathlib.Path):
    loader = importlib.machinery.ExtensionFileLoader(f"jax_deepep.gpu.{module.name}", str(path))
    spec = importlib.util.spec_from_file_location(loader.name, path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=None)
def _load(module: Module):
    """(extension module with its FFI targets registered, None) or (None, reason); DeepEPError for an
    NVSHMEM of another version than the module's (that fails loudly rather than falling back)."""
    path = next((p for p in candidates(module) if p.exists()), None)
    if path is None:
        return None, f"{module.name}.so was not built ({module.missing})"
    try:
        if module is NVSHMEM:
            nv = nvshmem_dir()
            if nv is None:
                return None, f"NVSHMEM is missing: pip install {NVSHMEM_PACKAGE}"
            check_nvshmem_version()
            # The module links libnvshmem_host.so.3 by soname only: load it from the package first.
            ctypes.CDLL(str(nv / "lib" / _NVSHMEM_HOST_LIBRARY), mode=ctypes.RTLD_GLOBAL)
        mod = _import(module, path)
    except (OSError, ImportError) as e:
        return None, f"{path} failed to load: {e}"
    for name, handler in mod.ffi_targets().items():
        jax.ffi.register_ffi_target(name, handler, platform="CUDA")
    return mod, None


def load(module: Module):
    """The extension module; raises RuntimeError saying why when it cannot be loaded."""
    mod, reason = _load(module)
    if mod is None:
        raise RuntimeError(f"jax_deepep {module.name} unavailable: {reason}")
    return mod


def is_available(module: Module) -> bool:
    return _load(module)[0] is not None


def reason_unavailable(module: Module) -> str:
    return _load(module)[1] or ""


def available() -> bool:
    """Whether the normal-mode CUDA kernels can be used."""
    return is_available(INTRANODE)


def unavailable_reason() -> str:
    return reason_unavailable(INTRANODE)
