"""The API contract stays written down: every public name of the package, and every public method and
property of `Buffer` and `Config`, has a docstring and appears in docs/API.md."""
import inspect
import pathlib
import re

import jax_deepep as deepep

API = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "API.md").read_text()


def _public_members():
    for name in deepep.__all__:
        yield "jax_deepep", name, getattr(deepep, name)
    for cls in (deepep.Buffer, deepep.Config):
        for name, member in vars(cls).items():
            if name.startswith("_"):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if callable(member) or isinstance(member, property):
                yield cls.__name__, name, member


def test_every_public_name_has_a_docstring_and_is_in_api_md():
    members = list(_public_members())
    assert len(members) > 30  # the package, Buffer's methods and Config's
    undocumented = [f"{owner}.{name}" for owner, name, member in members if not (inspect.getdoc(member) or "").strip()]
    unlisted = [f"{owner}.{name}" for owner, name, _ in members if not re.search(rf"\b{re.escape(name)}\b", API)]
    assert not undocumented, f"no docstring: {undocumented}"
    assert not unlisted, f"not in docs/API.md: {unlisted}"
