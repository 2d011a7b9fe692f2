"""Launching the GPU tests' worker processes: a test file run as a script, once per rank.

R = 1 runs in one process; R > 1 runs as that many processes sharing the first visible GPU
(jax.distributed over a local port), which is how several ranks are tested on one GPU.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
# A worker running past this is killed (JAX_DEEPEP_WORKER_TIMEOUT_S overrides it; a device script
# sets it below its own step limit, so the workers' output still comes back).
WORKER_TIMEOUT_S = float(os.environ.get("JAX_DEEPEP_WORKER_TIMEOUT_S", 540))


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


def run_workers(script: str, num_ranks: int, env: dict, tag: str = "", timeout_s: float = WORKER_TIMEOUT_S,
                exit_codes=None):
    """Run `script --rank r --num-ranks R --port P` for every rank; fail unless every worker exits with
    its code of `exit_codes` (default all 0; an entry may be a set of codes) within `timeout_s` (the
    workers are killed then). Returns (exit codes, outputs), one of each per rank.

    With JAX_DEEPEP_WORKER_LOGS set, each worker writes its output to a file in that folder as it
    goes, so a run cut short from outside still leaves what every rank printed (`tag` tells
    variants with the same R apart there).
    """
    port = _free_port()
    log_dir = os.environ.get("JAX_DEEPEP_WORKER_LOGS")
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        stem = f"{pathlib.Path(log_dir) / pathlib.Path(script).stem}_R{num_ranks}{tag}"
        logs = [open(f"{stem}_rank{r}.log", "w+") for r in range(num_ranks)]
    else:
        logs = [subprocess.PIPE] * num_ranks
    procs = [subprocess.Popen([sys.executable, script, "--rank", str(r), "--num-ranks", str(num_ranks),
                               "--port", str(port)], env=env, stdout=logs[r], stderr=subprocess.STDOUT,
                              text=True) for r in range(num_ranks)]
    outputs, deadline = [], time.time() + timeout_s
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0] or "")
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outputs.append((p.communicate()[0] or "") + "\n[killed: worker timed out]")
    for r, log in enumerate(logs):
        if log is not subprocess.PIPE:
            log.seek(0)
            outputs[r] = log.read() + outputs[r]
            log.close()
    for r, (p, out) in enumerate(zip(procs, outputs)):
        print(f"---- rank {r} of {num_ranks}: exit {p.returncode} ----\n{out}")
    want = [c if isinstance(c, (set, frozenset)) else {c} for c in (exit_codes or [0] * num_ranks)]
    got = [p.returncode for p in procs]
    assert all(g in w for g, w in zip(got, want)), \
        f"workers exited with {got}, expected {want} (R={num_ranks}); see the output above"
    return got, outputs


def arm_watchdog():
    """In a worker: print every thread's Python stack shortly before the launcher kills it."""
    faulthandler.enable()  # a crash in native code still names the Python frame
    faulthandler.dump_traceback_later(max(1.0, WORKER_TIMEOUT_S - 15), exit=False)


def worker_args() -> argparse.Namespace:
    """In a worker: arm the watchdog and read the arguments `run_workers` passes."""
    arm_watchdog()
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--num-ranks", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    return parser.parse_args()
