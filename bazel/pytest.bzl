"""`pytest_files`: one Bazel test per pytest file, run by pytest (bazel/pytest_main.py) with the local
Python toolchain."""

def pytest_files(srcs, deps = [], data = [], env = {}, **kwargs):
    """Declares a py_test named after each file of `srcs` (test_foo.py -> :test_foo).

    Args:
      srcs: the pytest files.
      deps: py_library targets every test imports.
      data: files every test needs (conftest.py, helper modules, pyproject.toml for pytest's settings).
      env: environment of every test (bazel/pytest_main.py resolves the library paths it names).
      **kwargs: passed to each py_test (size, timeout, tags).
    """
    for src in srcs:
        native.py_test(
            name = src[:-len(".py")],
            srcs = [src, "//bazel:pytest_main.py"],
            main = "//bazel:pytest_main.py",
            args = ["$(rootpath {})".format(src)],
            deps = deps,
            data = data,
            env = env,
            python_version = "PY3",
            # No generated __init__.py files: pytest imports the tests as top-level modules, as in a checkout.
            legacy_create_init = False,
            **kwargs
        )
