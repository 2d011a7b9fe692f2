"""Fixtures of the CPU suite: 8 virtual CPU devices, a mesh per rank count, seeded generators.

XLA_FLAGS must be set before jax is first imported, which is why it happens at the top here
(the plumbing the tests share lives in harness.py, the numpy oracle in oracle.py).
"""
import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICE_FLAG).strip()

import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from harness import RANK_COUNTS, make_mesh  # noqa: E402


@pytest.fixture(params=RANK_COUNTS, ids=lambda r: f"R{r}")
def mesh(request):
    """A mesh over the first R CPU devices, for R = 1, 2, 4, 8."""
    return make_mesh(request.param)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: fresh data per test, reproducible run to run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
