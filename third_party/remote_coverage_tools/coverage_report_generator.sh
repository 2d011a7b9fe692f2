#!/bin/sh
echo "coverage reports are not available in the offline Bazel set-up (docs/BAZEL.md)" >&2
exit 1
