"""Launching the GPU tests' worker processes: a test file run as a script, once per rank.

R = 1 runs in one process; R > 1 runs as that many processes sharing the first visible GPU
(jax.distributed over a local port), which is how several ranks are tested on one GPU.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
WORKER_TIMEOUT_S = 540


def has_gpu() -> bool:
    return pathlib.Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def worker_env(num_ranks: int, mem_fraction: float) -> dict:
    """The environment of the workers; several ranks share the first visible GPU, each taking `mem_fraction`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    if num_ranks == 1:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{mem_fraction:.2f}")
    else:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction:.2f}"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, num_ranks: int, env: dict):
    """Run `script --rank r --num-ranks R --port P` for every rank; fail unless every worker exits 0."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, script, "--rank", str(r), "--num-ranks", str(num_ranks),
                               "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(num_ranks)]
    outputs, deadline = [], time.time() + WORKER_TIMEOUT_S
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outputs.append(p.communicate()[0] + "\n[killed: worker timed out]")
    for r, (p, out) in enumerate(zip(procs, outputs)):
        print(f"---- rank {r} of {num_ranks}: exit {p.returncode} ----\n{out}")
    assert all(p.returncode == 0 for p in procs), f"a worker failed (R={num_ranks}); see the output above"
