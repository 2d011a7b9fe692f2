"""The compiled modules' FFI targets are exactly those the Python call sites name (skipped where a
module was not built)."""
import pathlib
import re

import pytest

from jax_deepep.gpu import library

GPU_PACKAGE = pathlib.Path(library.__file__).parent


def _called_targets() -> set:
    """Target names of every `ffi_call("...", ...)` in jax_deepep/gpu, or of a helper that makes one
    (`_combine_call("...", ...)`), and of the low-latency calls (`ffi_call(self.targets + "...", ...)`)
    under both prefixes."""
    from jax_deepep.gpu.low_latency import NODE_TARGET_PREFIX, NVSHMEM_TARGET_PREFIX

    names = set()
    for path in GPU_PACKAGE.glob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r'_call\(\s*"(jax_deepep_\w+)"', text))
        for op in re.findall(r'ffi_call\(\s*self\.targets \+ "(\w+)"', text):
            names |= {NVSHMEM_TARGET_PREFIX + op, NODE_TARGET_PREFIX + op}
    return names


@pytest.mark.parametrize("module", [library.INTRANODE, library.NVSHMEM], ids=lambda m: m.name)
def test_module_loads_and_registers_targets(module):
    if not library.is_available(module):
        pytest.skip(library.reason_unavailable(module))
    targets = set(library.load(module).ffi_targets())
    assert targets and targets <= _called_targets(), targets - _called_targets()


def test_every_call_site_has_a_target():
    modules = [library.INTRANODE, library.NVSHMEM]
    if not all(library.is_available(m) for m in modules):
        pytest.skip("needs both compiled modules")
    targets = set().union(*(library.load(m).ffi_targets() for m in modules))
    assert _called_targets() == targets
