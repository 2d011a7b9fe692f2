"""Runs the pytest files named on the command line as one Bazel test (see bazel/pytest.bzl)."""
import os
import sys

import pytest

# Libraries that tests/BUILD.bazel names by their path in the runfiles directory (where a test starts).
# They are built only where nvcc exists: an absent one is unset, a present one made absolute so that it
# still resolves after a test changes directory.
_OPTIONAL_LIBRARY_VARIABLES = ("JAX_DEEPEP_LIBRARY", "JAX_DEEPEP_NVSHMEM_LIBRARY")


def main() -> int:
    for variable in _OPTIONAL_LIBRARY_VARIABLES:
        path = os.environ.pop(variable, "")
        if path and os.path.exists(path):
            os.environ[variable] = os.path.abspath(path)
    args = ["-p", "no:cacheprovider", *sys.argv[1:]]
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
    return pytest.main(args)


if __name__ == "__main__":
    sys.exit(main())
