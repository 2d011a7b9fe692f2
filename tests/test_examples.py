"""The example scripts run end to end in --short mode (subprocesses on 8 virtual CPU devices)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from no_host_collectives import assert_same_programs, guarded_pythonpath

REPO = Path(__file__).parent.parent
EXAMPLES = REPO / "examples"


def example_command(name: str, *args: str, devices: int = 8):
    """(argv, env) running examples/<name> --short on `devices` CPU devices."""
    script = EXAMPLES / name
    if not script.exists():
        pytest.skip(f"{script} is not here")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return [sys.executable, str(script), "--short", *args], env


def run_example(name: str, *args: str) -> str:
    argv, env = example_command(name, *args)
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def test_train_moe_short():
    output = run_example("train_moe.py", "--data_parallel=2")
    assert "mesh {'data': 2, 'expert': 4}" in output
    assert "tokens/s" in output and "dispatch/combine share" in output


def test_train_flax_moe_short():
    pytest.importorskip("flax")
    output = run_example("train_flax_moe.py", "--data_parallel=2")
    assert "mesh {'data': 2, 'expert': 4}" in output and "over 6 steps" in output


@pytest.mark.parametrize("dispatch", ["--fp8", "--nofp8"])
def test_serve_moe_short(dispatch):
    """Two layers, each checked against the dense model on the same input: about 1e-6 apart (before each
    layer took the expert-parallel input, FP8's rounding steps turned the first layer's ulp-level
    differences into 2e-4 after the second)."""
    output = run_example("serve_moe.py", dispatch, "--check_rtol=1e-5")
    assert "expert-parallel vs dense" in output


def run_in_processes(name: str, *args: str, processes: int = 2) -> list[str]:
    """The outputs of examples/<name> --short run as `processes` processes of one job (jax.distributed), the
    8 CPU devices split among them."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for process_id in range(processes):
        argv, env = example_command(name, *args, "--distributed", f"--coordinator_address=localhost:{port}",
                                    f"--num_processes={processes}", f"--process_id={process_id}",
                                    devices=8 // processes)
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()  # no-op for a process that has exited
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def test_train_moe_two_processes():
    """Multi-host path: two processes (4 CPU devices each) joined by jax.distributed, the expert
    axis spanning both."""
    for output in run_in_processes("train_moe.py"):
        assert "2 processes, 8 x cpu devices, mesh {'data': 1, 'expert': 8}" in output
        assert "dispatch/combine share" in output


def test_serve_moe_two_processes(tmp_path, monkeypatch):
    """Decoding with the expert axis over two processes' devices, checked against the dense model as in one
    process (both process models of docs/API.md), with no collective outside the decoding step's program
    (processes sharing one GPU have none) and the same programs compiled by both (where they differ, a GPU
    hangs)."""
    monkeypatch.setenv("PYTHONPATH", guarded_pythonpath(tmp_path / "guard"))
    for output in run_in_processes("serve_moe.py", "--check_rtol=1e-5"):
        assert "2 processes, 8 x cpu devices" in output and "expert-parallel vs dense" in output
    assert_same_programs(tmp_path / "guard")
