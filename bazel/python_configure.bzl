"""Repository rule: the local Python that has jax installed (pip), as Bazel's Python toolchain, plus the
XLA FFI headers that ship inside its jaxlib (`jax.ffi.include_dir()`).

The interpreter is $PYTHON_BIN_PATH, else the first `python3` on PATH (an activated venv wins)."""

_PROBE = """
import sys
import jax
print(sys.executable)
print(jax.ffi.include_dir())
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
"""

def _find_python(repository_ctx):
    python = repository_ctx.os.environ.get("PYTHON_BIN_PATH") or repository_ctx.which("python3")
    if not python:
        fail("No python3 on PATH (or set PYTHON_BIN_PATH): the tests need the Python that has jax.")
    return str(python)

def _local_python_impl(repository_ctx):
    python = _find_python(repository_ctx)
    result = repository_ctx.execute([python, "-c", _PROBE])
    if result.return_code != 0:
        fail("{} cannot import jax (pip install jax): {}".format(python, result.stderr))
    interpreter, jax_include = result.stdout.strip().split("\n")[-2:]
    repository_ctx.symlink(jax_include, "jax_include")
    repository_ctx.file("BUILD.bazel", _BUILD.format(interpreter = interpreter))

local_python = repository_rule(
    implementation = _local_python_impl,
    environ = ["PATH", "PYTHON_BIN_PATH", "VIRTUAL_ENV"],
    local = True,
)
