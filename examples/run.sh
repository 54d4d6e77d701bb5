#!/usr/bin/env bash
# The main job, end to end:
#   1. speed: the benchmark suite's quick subset on a Llama-3-8B attention layer, as one table (time, speed-up
#      vs dense, V rows read, elements kept, output error vs dense) and the floors measured as same-run ratios;
#   2. accuracy on a real model: when a llama2.c model directory is present (default ../shared/models/stories260K:
#      <name>.bin, calib.tokens, eval.tokens), calibrate on calib.tokens, evaluate every attention choice for one
#      k on eval.tokens against dense attention, and print the accuracy table (`llama2c table`); otherwise every
#      kernel on the suite's synthetic layer (toptheta_main).
#
#   examples/run.sh [args for toptheta_main...]
# Environment:
#   TOPTHETA_MODEL_DIR   llama2.c model directory (default: ../shared/models/stories260K beside the repository)
#   TOPTHETA_MAIN_K      k of the accuracy table (default 32); TOPTHETA_MAIN_SEQUENCES evaluation sequences (default 8)
#   TOPTHETA_BUILD_DIR   build directory (default: build, relative to the repo root)
#   TOPTHETA_CMAKE_ARGS  extra configure args, word-split
#   TOPTHETA_JOBS        parallel build jobs (default: 2)
#   TOPTHETA_SKIP_DEPS=1 do not check/install apt packages
# Build logs go to stderr, so stdout carries only the results.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

build_dir=${TOPTHETA_BUILD_DIR:-build}
case "$build_dir" in /*) ;; *) build_dir="$root/$build_dir" ;; esac
jobs=${TOPTHETA_JOBS:-2}
read -r -a env_args <<<"${TOPTHETA_CMAKE_ARGS:-}"
model_dir=${TOPTHETA_MODEL_DIR:-$root/../shared/models/stories260K}
main_k=${TOPTHETA_MAIN_K:-32}
main_sequences=${TOPTHETA_MAIN_SEQUENCES:-8}

[ "${TOPTHETA_SKIP_DEPS:-0}" = 1 ] || "$root/cmake/install-deps.sh" >&2

cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DTOPTHETA_BUILD_BENCHMARKS=ON "${env_args[@]}" >&2
cmake --build "$build_dir" --target toptheta_bench toptheta_main -j "$jobs" >&2

echo "# 1. Speed: one Llama-3-8B attention layer (benchmark suite, quick subset)"
echo
results="$build_dir/benchmarks/results-main.json"
"$build_dir/benchmarks/toptheta_bench" --quick --benchmark_repetitions=3 --benchmark_out="$results" --benchmark_out_format=json >&2
"$root/benchmarks/report" --brief "$results" --plot "$build_dir/benchmarks/results-main.png"
echo

model_file=$(find "$model_dir" -maxdepth 1 -name '*.bin' ! -name 'tokenizer.bin' 2>/dev/null | sort | head -n 1 || true)
if [ -n "$model_file" ] && [ -f "$model_dir/calib.tokens" ] && [ -f "$model_dir/eval.tokens" ] &&
  cmake --build "$build_dir" --target llama2c -j "$jobs" >&2 && [ -x "$build_dir/examples/llama2c/llama2c" ]; then
  echo "# 2. Accuracy: $(basename "$model_file"), k = $main_k, first $main_sequences sequences of eval.tokens"
  echo
  table="$build_dir/examples/accuracy-main.md"
  "$build_dir/examples/llama2c/llama2c" table --model "$model_file" --calib "$model_dir/calib.tokens" \
    --eval "$model_dir/eval.tokens" --k "$main_k" --max-sequences "$main_sequences" --out "$table" >&2
  cat "$table"
else
  echo "# 2. Accuracy: every kernel on a synthetic layer (no llama2.c model in $model_dir)"
  echo
  "$build_dir/examples/toptheta_main" "$@"
fi
