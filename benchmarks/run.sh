#!/usr/bin/env bash
# Builds the benchmark suite in Release (-O3 -march=native), runs it and prints its report (markdown) on stdout:
#   benchmarks/run.sh            # quick subset: decode kv:16384, prefill n:2048, probes, 3 repetitions (< 2 min)
#   benchmarks/run.sh --full     # every case (about 4 min on 2 cores: 64K-token layers, 8K-token prefill)
#   benchmarks/run.sh [--full] [toptheta_bench args...]    e.g. --threads=1, --benchmark_repetitions=5
# The suite's own console output and the build logs go to stderr. Results: <build>/benchmarks/results.json and
# results.png (decode time vs context length). Environment as in examples/run.sh:
#   TOPTHETA_BUILD_DIR (default build), TOPTHETA_CMAKE_ARGS, TOPTHETA_JOBS (default 2), TOPTHETA_SKIP_DEPS=1
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

build_dir=${TOPTHETA_BUILD_DIR:-build}
case "$build_dir" in /*) ;; *) build_dir="$root/$build_dir" ;; esac
jobs=${TOPTHETA_JOBS:-2}
read -r -a env_args <<<"${TOPTHETA_CMAKE_ARGS:-}"

# Quick mode repeats each case three times and the report takes the medians, so that the same-run ratios
# hold against this shared machine's bursts of noise (about a minute on 2 cores).
mode=(--quick --benchmark_repetitions=3)
args=()
for arg in "$@"; do
  if [ "$arg" = --full ]; then mode=(); else args+=("$arg"); fi
done

[ "${TOPTHETA_SKIP_DEPS:-0}" = 1 ] || "$root/cmake/install-deps.sh" >&2

cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DTOPTHETA_BUILD_BENCHMARKS=ON "${env_args[@]}" >&2
cmake --build "$build_dir" --target toptheta_bench -j "$jobs" >&2
results="$build_dir/benchmarks/results.json"
"$build_dir/benchmarks/toptheta_bench" "${mode[@]}" "${args[@]}" \
  --benchmark_out="$results" --benchmark_out_format=json >&2
exec "$root/benchmarks/report" "$results"
