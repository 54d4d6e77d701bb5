#!/usr/bin/env bash
# The main job: builds examples/main.cpp in Release and runs it, passing all arguments on:
#   examples/run.sh [args for toptheta_main...]
# Build logs go to stderr, so stdout carries only the program's output.
# Environment:
#   TOPTHETA_BUILD_DIR   build directory (default: build, relative to the repo root)
#   TOPTHETA_CMAKE_ARGS  extra configure args, word-split
#   TOPTHETA_JOBS        parallel build jobs (default: 2)
#   TOPTHETA_SKIP_DEPS=1 do not check/install apt packages
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

build_dir=${TOPTHETA_BUILD_DIR:-build}
case "$build_dir" in /*) ;; *) build_dir="$root/$build_dir" ;; esac
jobs=${TOPTHETA_JOBS:-2}
read -r -a env_args <<<"${TOPTHETA_CMAKE_ARGS:-}"

[ "${TOPTHETA_SKIP_DEPS:-0}" = 1 ] || "$root/cmake/install-deps.sh" >&2

cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release "${env_args[@]}" >&2
cmake --build "$build_dir" --target toptheta_main -j "$jobs" >&2
exec "$build_dir/examples/toptheta_main" "$@"
