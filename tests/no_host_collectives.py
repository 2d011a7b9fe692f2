"""A guard for jobs that stand in, on CPU, for processes sharing one GPU.

Such processes have no XLA collectives (NCCL refuses two ranks on one GPU), and some JAX calls run one
unasked: `jax.device_put` of host values onto a mesh over every process first checks them with
`multihost_utils.assert_equal`, and `multihost_utils.process_allgather` is one. There such a call waits for
ever; on CPU, where a test job's processes do have collectives, it simply works. A process started with
`guarded_pythonpath(folder)` as its PYTHONPATH fails on those calls instead.
"""
import os
import pathlib

_SITECUSTOMIZE = '''\
import jax.experimental.multihost_utils as _multihost_utils


def _refused(name):
    def call(*args, **kwargs):
        raise RuntimeError(f"multihost_utils.{name}: an XLA collective between the processes of the job, "
                           "which processes sharing one GPU lack")
    return call


_multihost_utils.assert_equal = _refused("assert_equal")
_multihost_utils.process_allgather = _refused("process_allgather")
'''


def guarded_pythonpath(folder: pathlib.Path) -> str:
    """PYTHONPATH with a `sitecustomize` in `folder` that makes those calls raise, before the current one."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
