#!/usr/bin/env bash
# Builds everything and runs the test suite:
#   tests/run.sh [extra cmake configure args...]
# Environment:
#   TOPTHETA_BUILD_DIR   build directory (default: build, relative to the repo root)
#   TOPTHETA_CMAKE_ARGS  extra configure args, word-split (e.g. "-DTOPTHETA_WERROR=ON")
#   TOPTHETA_JOBS        parallel build/test jobs (default: 2)
#   TOPTHETA_CTEST_ARGS  extra ctest args, word-split (e.g. "-E pattern" to leave tests to another build)
#   TOPTHETA_SKIP_DEPS=1 do not check/install apt packages
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

build_dir=${TOPTHETA_BUILD_DIR:-build}
jobs=${TOPTHETA_JOBS:-2}
read -r -a env_args <<<"${TOPTHETA_CMAKE_ARGS:-}"
read -r -a ctest_args <<<"${TOPTHETA_CTEST_ARGS:-}"

[ "${TOPTHETA_SKIP_DEPS:-0}" = 1 ] || cmake/install-deps.sh

cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release "${env_args[@]}" "$@"
cmake --build "$build_dir" -j "$jobs"
# A test that cannot run here (no model data, no way to measure memory) is reported as skipped, not passed.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
ctest --test-dir "$build_dir" --output-on-failure -j "$jobs" "${ctest_args[@]}" | tee "$log" || status=$?
skipped=$(grep -c '(Skipped)$' "$log" || true)
if [ "$skipped" -gt 0 ]; then
  echo "tests/run.sh: $skipped test(s) skipped, listed above with the reason in their output"
else
  echo "tests/run.sh: no test skipped"
fi
exit "$status"
