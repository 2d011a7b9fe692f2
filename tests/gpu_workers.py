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
import tempfile
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
    """A port free on every address, as jax.distributed's coordinator binds it ([::], IPv4 too)."""
    with _listen_everywhere() as s:
        return s.getsockname()[1]


def _listen_everywhere() -> socket.socket:
    """A server socket on a free port of every address ([::] and IPv4 where the host has IPv6)."""
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", 0))


# What rank 0 prints when its coordinator cannot bind the port (taken between _free_port and the
# bind): the other ranks would wait for it until they time out, so the job is started again.
_PORT_TAKEN = "Failed to add port to server"
_LAUNCH_ATTEMPTS = 3


def _run_once(script: str, num_ranks: int, env: dict, logs, deadline: float):
    """One launch of every rank on a fresh port, each writing to its file of `logs`. Returns the
    processes once all have exited, or None (every rank killed) when rank 0 could not bind the port;
    at `deadline` every rank still running is killed."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, script, "--rank", str(r), "--num-ranks", str(num_ranks),
                               "--port", str(port)], env=env, stdout=logs[r], stderr=subprocess.STDOUT,
                              text=True) for r in range(num_ranks)]
    while any(p.poll() is None for p in procs):
        if procs[0].poll() not in (None, 0) and num_ranks > 1 and _PORT_TAKEN in _read(logs[0]):
            for p in procs:
                p.kill()
                p.wait()
            return None
        if time.time() > deadline:
            for p, log in zip(procs, logs):
                if p.poll() is None:
                    p.kill()
                    p.wait()
                    log.write("\n[killed: worker timed out]")
            break
        time.sleep(0.2)
    return procs


def _read(log) -> str:
    log.flush()
    log.seek(0)
    text = log.read()
    log.seek(0, os.SEEK_END)
    return text


def run_workers(script: str, num_ranks: int, env: dict, tag: str = "", timeout_s: float = WORKER_TIMEOUT_S,
                exit_codes=None):
    """Run `script --rank r --num-ranks R --port P` for every rank; fail unless every worker exits with
    its code of `exit_codes` (default all 0; an entry may be a set of codes) within `timeout_s` (the
    workers are killed then). Returns (exit codes, outputs), one of each per rank. A job whose port was
    taken before rank 0 bound it is started again on another port.

    Each worker writes its output to a file as it goes: with JAX_DEEPEP_WORKER_LOGS set, in that
    folder, so that a run cut short from outside still leaves what every rank printed (`tag` tells
    variants with the same R apart there).
    """
    log_dir = os.environ.get("JAX_DEEPEP_WORKER_LOGS")
    deadline = time.time() + timeout_s
    with tempfile.TemporaryDirectory() as scratch:
        folder = pathlib.Path(log_dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{folder / pathlib.Path(script).stem}_R{num_ranks}{tag}"
        for attempt in range(_LAUNCH_ATTEMPTS):
            logs = [open(f"{stem}_rank{r}.log", "w+") for r in range(num_ranks)]
            procs = _run_once(script, num_ranks, env, logs, deadline)
            outputs = [_read(log) for log in logs]
            for log in logs:
                log.close()
            if procs is not None:
                break
            print(f"---- attempt {attempt + 1}: rank 0 could not bind its port; starting the job again ----")
        else:
            raise AssertionError(f"rank 0 found its port taken {_LAUNCH_ATTEMPTS} times (R={num_ranks}):\n{outputs[0]}")
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
