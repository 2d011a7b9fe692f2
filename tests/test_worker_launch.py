"""The GPU tests' launcher (tests/gpu_workers.py), on CPU: a job whose coordinator port is taken
before rank 0 binds it starts again on another port instead of waiting out its timeout."""
import textwrap
import time

import gpu_workers

_WORKER = textwrap.dedent("""
    import sys
    import jax
    rank, num_ranks, port = (int(sys.argv[i]) for i in (2, 4, 6))
    jax.distributed.initialize(f"127.0.0.1:{port}", num_ranks, rank, initialization_timeout=60)
    print("rank", rank, "joined", jax.process_count())
    jax.distributed.shutdown()
""")


def test_a_taken_port_starts_the_job_again(tmp_path, monkeypatch, capsys):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    with gpu_workers._listen_everywhere() as taken:
        ports = iter([taken.getsockname()[1]])
        free_port = gpu_workers._free_port
        monkeypatch.setattr(gpu_workers, "_free_port", lambda: next(ports, None) or free_port())
        env = gpu_workers.worker_env(2, 0.1)
        env.update(JAX_PLATFORMS="cpu")
        start = time.time()
        _, outputs = gpu_workers.run_workers(str(script), 2, env, timeout_s=120)
    assert time.time() - start < 60
    assert [f"rank {r} joined 2" in outputs[r] for r in range(2)] == [True, True], outputs
    assert "attempt 1: rank 0 could not bind its port" in capsys.readouterr().out
