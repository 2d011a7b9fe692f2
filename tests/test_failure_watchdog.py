"""The failure watchdog (jax_deepep/gpu/failure_watchdog.py) on CPU, with stand-in Buffers whose
backends report a failure: a process that leaves a failed Buffer alone is ended within timeout_s plus a
poll, with the failure printed; one that destroys it, or a Buffer without failures, is left alone."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from jax_deepep.gpu import failure_watchdog

FAILURE = "jax_deepep: low_latency_combine on rank 1 timed out waiting for rank 0 (an expert's rows)"

# A program with one stand-in Buffer (timeout 1 s) whose kernels record FAILURE after 0.3 s; then it
# does what argv[1] says and exits 0 if it is still alive after 5 s.
PROGRAM = textwrap.dedent(f"""
    import sys, time
    from jax_deepep.gpu import failure_watchdog

    class Backend:
        def __init__(self, fails_at):
            self.fails_at = fails_at
        def failures(self):
            return [{FAILURE!r}] if time.monotonic() >= self.fails_at else []

    class Buffer:
        timeout_s = 1.0
        is_destroyed = False

        def __init__(self, fails_at):
            self.normal_backend, self.low_latency_backend = Backend(fails_at), Backend(1e9)

    what = sys.argv[1]
    if what == "host":  # process 0 of a one-process job: it hosts the jax.distributed service
        import jax, socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        jax.distributed.initialize(f"127.0.0.1:{{port}}", num_processes=1, process_id=0)
    buffer = Buffer(time.monotonic() + (0.3 if what != "healthy" else 1e9))
    failure_watchdog.watch(buffer, (buffer.normal_backend, buffer.low_latency_backend))
    print("watching from", time.monotonic(), flush=True)
    if what == "destroy":
        time.sleep(0.8)
        buffer.is_destroyed = True
    elif what == "drop":
        del buffer
    time.sleep(5)
    print("still alive")
""")


def _run(what: str):
    """The finished program and how long it ran after it began watching (CLOCK_MONOTONIC is system-wide)."""
    done = subprocess.run([sys.executable, "-c", PROGRAM, what], capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - float(done.stdout.split("watching from")[1].split()[0])


def test_a_failure_left_alone_ends_the_process_after_the_timeout():
    done, took = _run("hang")
    assert done.returncode == failure_watchdog.EXIT_CODE, done.stderr
    assert FAILURE in done.stderr and "destroy() was not called within timeout_s=1 s" in done.stderr
    assert "still alive" not in done.stdout
    assert 1.3 <= took < 2.5, f"ended {took:.1f} s after the watch began"  # 0.3 s + timeout 1 s + a poll


def test_destroy_or_no_failure_leaves_the_process_alone():
    for what in ("destroy", "drop", "healthy"):
        done, _ = _run(what)
        assert done.returncode == 0 and "still alive" in done.stdout, (what, done.stderr)


def test_the_process_hosting_the_distributed_service_waits_longer():
    done, took = _run("host")  # its end would abort its peers: they get HOST_GRACE timeouts to leave first
    assert done.returncode == failure_watchdog.EXIT_CODE, done.stderr
    assert "3 times that here: this process hosts the jax.distributed service" in done.stderr
    assert 0.3 + failure_watchdog.HOST_GRACE <= took < failure_watchdog.HOST_GRACE + 1.5, f"ended after {took:.1f} s"
