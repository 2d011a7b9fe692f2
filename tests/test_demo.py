"""`python -m jax_deepep.demo`: its main() trains with expert parallelism, agrees with the dense
model (exit 0) and reports disagreement with a non-zero exit."""
import pytest

from jax_deepep import demo

SMALL = ["demo", "--steps=3", "--tokens=16", "--hidden=128", "--ffn=64", "--experts=8", "--topk=2"]


def test_demo_agrees_with_dense(capsys):
    assert demo.main(SMALL) == 0
    output = capsys.readouterr().out
    assert "backend: reference" in output or "backend: cuda" in output
    assert "OK: expert-parallel loss and gradients match" in output


def test_demo_reports_disagreement(capsys):
    # No bf16 computation matches to 1e-12: the check must fail and say so.
    assert demo.main(SMALL + ["--grad_rtol=1e-12", "--data_parallel=2"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


@pytest.fixture(autouse=True)
def _reset_flags():
    yield
    demo.FLAGS.unparse_flags()
