"""What the package promises about its build and its dependencies (pyproject.toml, scripts/build_wheel.sh,
the NVSHMEM version check of jax_deepep/gpu/library.py)."""
import pathlib
import re

import jax
import pytest

from jax_deepep import DeepEPError
from jax_deepep.gpu import library

ROOT = pathlib.Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_build_does_not_require_nvshmem():
    """The NVSHMEM wheel (182 MB) is pulled only by who builds the NVSHMEM module (README, "On GPUs")."""
    requires = pyproject()["build-system"]["requires"]
    assert not [r for r in requires if "nvshmem" in r], requires


def test_jax_is_within_the_tested_range():
    """pyproject bounds jax to the versions tested (CI's and the GPU machine's); this one is among them."""
    spec = next(d for d in pyproject()["project"]["dependencies"] if re.match(r"jax\b", d))
    low, high = re.fullmatch(r"jax>=([\d.]+),<([\d.]+)", spec).groups()
    version = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", jax.__version__).groups())
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split("."))), (spec, jax.__version__)


def test_wheel_leaves_out_the_nvshmem_library_that_is_preloaded():
    """build_wheel.sh keeps NVSHMEM's host library out of the wheel: library.py loads the user's own."""
    script = (ROOT / "scripts" / "build_wheel.sh").read_text()
    assert f"--exclude '{library._NVSHMEM_HOST_LIBRARY}'" in script


@pytest.fixture
def nvshmem_versions(monkeypatch):
    """set(built, installed): fakes the version _build_info.json records and the installed package's."""
    def set_versions(built, installed):
        monkeypatch.setattr(library, "build_info", lambda: {"mode": "cuda", "reason": "test", "nvshmem": built})
        monkeypatch.setattr(library, "installed_nvshmem_version", lambda: installed)
    return set_versions


@pytest.mark.parametrize("installed", ["3.9.1", None])
def test_nvshmem_of_another_version_is_refused(nvshmem_versions, installed):
    nvshmem_versions("3.8.0", installed)
    with pytest.raises(DeepEPError, match=r"built against nvidia-nvshmem-cu13 3\.8\.0 but .* is installed: "
                                          r"pip install 'nvidia-nvshmem-cu13==3\.8\.0'"):
        library.check_nvshmem_version()


@pytest.mark.parametrize("built, installed", [("3.8.0", "3.8.0"), (None, "3.9.1")])
def test_nvshmem_of_the_built_version_or_a_source_build_passes(nvshmem_versions, built, installed):
    nvshmem_versions(built, installed)
    library.check_nvshmem_version()


def test_loading_the_nvshmem_module_checks_the_version(nvshmem_versions, monkeypatch, tmp_path):
    """The check runs before the module is loaded (a mismatched NVSHMEM fails loudly, with no fallback)."""
    nvshmem_versions("3.8.0", "3.9.1")
    (tmp_path / "lib").mkdir()
    monkeypatch.setattr(library, "nvshmem_dir", lambda: tmp_path)
    monkeypatch.setenv(library.NVSHMEM.env_var, str(tmp_path / "lib"))  # an existing path: "built"
    library._load.cache_clear()
    try:
        with pytest.raises(DeepEPError, match="built against nvidia-nvshmem-cu13 3.8.0"):
            library.is_available(library.NVSHMEM)
    finally:
        library._load.cache_clear()
