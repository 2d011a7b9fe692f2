#!/usr/bin/env bash
# `bazel test //...`: builds the CUDA library (where nvcc exists) and runs the CPU test suite, offline.
# Installs Debian's Bazel 4.2.3 when there is no bazel. Arguments replace the default target pattern
# //... (e.g. scripts/bazel_test.sh //tests:test_layout). docs/BAZEL.md explains the set-up.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v bazel >/dev/null; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo=sudo; fi
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y bazel-bootstrap bazel-rules-java
fi

flags=()
version="$(bazel --version)"
if [ "$version" = "bazel no_version" ] || [[ "$version" == "bazel 4."* ]]; then
  # Debian's Bazel 4.2.3 (it reports "no_version") would download rules_cc, rules_java and
  # remote_coverage_tools: use Debian's rules_java and the stand-ins in third_party/ instead.
  flags+=(
    --override_repository=rules_java=/usr/share/bazel/rules/java
    --override_repository=rules_cc="$PWD/third_party/rules_cc"
    --override_repository=remote_coverage_tools="$PWD/third_party/remote_coverage_tools"
  )
else
  # Bazel 7: the WORKSPACE file alone (a flag Bazel 4 does not know, hence not in .bazelrc).
  flags+=(--noenable_bzlmod)
fi

if [ $# -eq 0 ]; then set -- //...; fi
bazel test "${flags[@]}" "$@"
