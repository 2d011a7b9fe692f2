"""Repository rule: the local Python that has jax installed (pip), as Bazel's Python toolchain, plus what
the CUDA extension modules take from it: its C headers (Python.h), pybind11's headers, the XLA FFI
headers that ship inside jaxlib (`jax.ffi.include_dir()`) and, when the nvidia-nvshmem-cu13 package
is installed, NVSHMEM (`defs.bzl` says whether: NVSHMEM_FOUND).

The interpreter is $PYTHON_BIN_PATH, else the first `python3` on PATH (an activated venv wins)."""

# Prints `key=value` lines: interpreter, python_include, pybind11_include, jax_include and nvshmem
# (empty without the package).
_PROBE = """
import sys
import sysconfig
import jax
import pybind11
print("interpreter=" + sys.executable)
print("python_include=" + sysconfig.get_paths()["include"])
print("pybind11_include=" + pybind11.get_include())
print("jax_include=" + jax.ffi.include_dir())
try:
    import nvidia.nvshmem
    print("nvshmem=" + list(nvidia.nvshmem.__path__)[0])
except ImportError:
    print("nvshmem=")
"""

_BUILD = """
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

package(default_visibility = ["//visibility:public"])

py_runtime(
    name = "python3_runtime",
    interpreter_path = "{interpreter}",
    python_version = "PY3",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":python3_runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)

# XLA FFI headers of the installed jaxlib; compile with -I<dirname of api/ffi.h>/../../..
filegroup(
    name = "jax_ffi_headers",
    srcs = glob(["jax_include/xla/ffi/**/*.h"]),
)

exports_files(["jax_include/xla/ffi/api/ffi.h"])

# The extension modules' headers; compile with -I<dirname of Python.h> and -I<dirname of pybind11/>.
filegroup(
    name = "python_headers",
    srcs = glob(["python_include/**/*.h"]),
)

filegroup(
    name = "pybind11_headers",
    srcs = glob(["pybind11_include/pybind11/**/*.h"]),
)

exports_files([
    "python_include/Python.h",
    "pybind11_include/pybind11/pybind11.h",
])
"""

# Only where NVSHMEM was found; compile with -I<dirname of nvshmem.h>, link with the two libraries.
_NVSHMEM_BUILD = """
filegroup(
    name = "nvshmem_headers",
    srcs = glob(["nvshmem/include/**"]),
)

exports_files([
    "nvshmem/include/nvshmem.h",
    "nvshmem/lib/libnvshmem_device.a",
    "nvshmem/lib/libnvshmem_host.so.3",
])
"""

# The two NVSHMEM libraries _nvshmem_lib.so links against.
_NVSHMEM_LIBRARIES = ["lib/libnvshmem_device.a", "lib/libnvshmem_host.so.3"]

def _find_python(repository_ctx):
    python = repository_ctx.os.environ.get("PYTHON_BIN_PATH") or repository_ctx.which("python3")
    if not python:
        fail("No python3 on PATH (or set PYTHON_BIN_PATH): the tests need the Python that has jax.")
    return str(python)

def _local_python_impl(repository_ctx):
    python = _find_python(repository_ctx)
    result = repository_ctx.execute([python, "-c", _PROBE])
    if result.return_code != 0:
        fail("{} cannot import jax and pybind11 (pip install jax pybind11): {}".format(python, result.stderr))
    found = dict([line.split("=", 1) for line in result.stdout.splitlines() if "=" in line])
    repository_ctx.symlink(found["jax_include"], "jax_include")
    repository_ctx.symlink(found["python_include"], "python_include")
    repository_ctx.symlink(found["pybind11_include"], "pybind11_include")
    build = _BUILD.format(interpreter = found["interpreter"])
    nvshmem = found["nvshmem"]
    nvshmem_found = bool(nvshmem) and all([
        repository_ctx.path(nvshmem + "/" + library).exists
        for library in _NVSHMEM_LIBRARIES
    ])
    if nvshmem_found:
        repository_ctx.symlink(nvshmem, "nvshmem")
        build += _NVSHMEM_BUILD
    repository_ctx.file("BUILD.bazel", build)
    repository_ctx.file("defs.bzl", "NVSHMEM_FOUND = {}\n".format(nvshmem_found))

local_python = repository_rule(
    implementation = _local_python_impl,
    environ = ["PATH", "PYTHON_BIN_PATH", "VIRTUAL_ENV"],
    local = True,
)
