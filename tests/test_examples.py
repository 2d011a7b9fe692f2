"""The example scripts run end to end in --short mode (subprocesses on 8 virtual CPU devices)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
EXAMPLES = REPO / "examples"


def run_example(name: str, *args: str) -> str:
    script = EXAMPLES / name
    if not script.exists():
        pytest.skip(f"{script} is not here")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(script), "--short", *args], env=env, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def test_train_moe_short():
    output = run_example("train_moe.py", "--data_parallel=2")
    assert "mesh {'data': 2, 'expert': 4}" in output
    assert "tokens/s" in output and "dispatch/combine share" in output


def test_serve_moe_short():
    output = run_example("serve_moe.py")
    assert "expert-parallel vs dense" in output
