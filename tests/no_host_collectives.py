"""A guard for jobs that stand in, on CPU, for processes sharing one GPU.

Such processes have no XLA collectives (NCCL refuses two ranks on one GPU), and some JAX calls run one
unasked: `jax.device_put` of host values onto a mesh over every process first checks them with
`multihost_utils.assert_equal`, and `multihost_utils.process_allgather` is one. There such a call waits for
ever; on CPU, where a test job's processes do have collectives, it simply works. A process started with
`guarded_pythonpath(folder)` as its PYTHONPATH fails on those calls instead.

On a GPU, compiling a program over several processes also waits for the others to compile the same
program (they share autotuning results), so processes that compile different ones (a shape taken from a
process's own data) hang there. The guard records a digest of every such program each process
compiles; `assert_same_programs(folder)` compares them.
"""
import os
import pathlib

_SITECUSTOMIZE = '''\
import hashlib
import pathlib

import jax
import jax._src.compiler as _compiler
import jax.experimental.multihost_utils as _multihost_utils


def _refused(name):
    def call(*args, **kwargs):
        raise RuntimeError(f"multihost_utils.{name}: an XLA collective between the processes of the job, "
                           "which processes sharing one GPU lack")
    return call


_multihost_utils.assert_equal = _refused("assert_equal")
_multihost_utils.process_allgather = _refused("process_allgather")

_compile = _compiler.backend_compile_and_load


def _recorded_compile(backend, module, executable_devices, *args, **kwargs):
    if len({d.process_index for d in executable_devices}) > 1:
        digest = hashlib.sha256(str(module).encode()).hexdigest()[:16]
        with open(pathlib.Path(__file__).parent / f"compiled_{jax.process_index()}.txt", "a") as f:
            f.write(digest + "\\n")
    return _compile(backend, module, executable_devices, *args, **kwargs)


_compiler.backend_compile_and_load = _recorded_compile
'''


def guarded_pythonpath(folder: pathlib.Path) -> str:
    """PYTHONPATH with a `sitecustomize` in `folder` that makes those calls raise and records the programs
    compiled over several processes, before the current one."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))


def programs_compiled(folder: pathlib.Path) -> list:
    """For each process of the guarded job, in order, the digests of the programs over several processes it
    compiled, in the order it compiled them."""
    files = sorted(folder.glob("compiled_*.txt"), key=lambda p: int(p.stem.split("_")[1]))
    return [p.read_text().split() for p in files]


def assert_same_programs(folder: pathlib.Path):
    """The guarded job's two processes compiled programs over both, and the same ones."""
    first, second = programs_compiled(folder)
    assert first and first == second, "the processes compiled different programs (a GPU hangs there)"
