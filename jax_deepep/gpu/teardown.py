"""Releasing a Buffer's device resources step by step (docs/RELIABILITY.md).

`destroy()` must release all it can even after an error, say what failed, and be callable again to
retry only what failed. A `Teardown` remembers which steps are done; a step that raises, or that
reports a problem it went past (the host runtimes return CUDA errors such as a trapped context's
sticky error as text rather than stopping), is listed, and `raise_problems` raises them all at once.
"""
from __future__ import annotations

import warnings

from ..validation import DeepEPError


class Teardown:
    """The steps of releasing one resource that are done so far, and the problems met since the
    last `raise_problems`. `what` names the resource in the error."""

    def __init__(self, what: str):
        self.what = what
        self._done: set[str] = set()
        self.problems: list[str] = []

    def run(self, step: str, call, *args) -> bool:
        """`call(*args)` unless `step` is done already; True once it is done. A raised exception leaves it
        to be retried; a message it returns (a problem it went past) is listed, and the step is done."""
        if step in self._done:
            return True
        try:
            message = call(*args)
        except Exception as e:  # noqa: BLE001 - every failure is reported together by raise_problems
            self.problems.append(f"{step}: {e}")
            return False
        self._done.add(step)
        if message:
            self.problems.append(f"{step}: {message}")
        return True

    def raise_problems(self):
        """Raise one DeepEPError listing the problems met (none: nothing happens)."""
        problems, self.problems = self.problems, []
        if problems:
            raise DeepEPError(f"{self.what}: " + "; ".join(problems))


def release_dropped(what: str, release, *args):
    """The finalizer of a resource dropped without destroy(): `release(*args)` (local frees only, no
    waiting on peers); a failure becomes a warning, since nothing can catch it there."""
    warnings.warn(f"jax_deepep: {what} was dropped without destroy(); freeing what this process holds",
                  ResourceWarning, stacklevel=2)
    try:
        release(*args)
    except DeepEPError as e:
        warnings.warn(f"jax_deepep: {e}", RuntimeWarning, stacklevel=2)
