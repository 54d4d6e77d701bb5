// The benchmark suite's settings, the layer shape it measures, and how a case is registered and reports
// counters.
#pragma once

#include <toptheta/scalar_traits.hpp>
#include <toptheta/stats.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>
#include <utility>

namespace toptheta::bench {

/// One attention layer of Llama-3-8B: 32 query heads over 8 KV heads (GQA 4:1), head_dim 128.
struct LayerShape {
  static constexpr Index q_heads = 32, kv_heads = 8, head_dim = 128;
};

/// Sparse kernels keep about k = 64 elements per row (top_k exactly, top_theta by calibrated thresholds).
constexpr Index kept_per_row = 64;

/// Command-line / environment settings, fixed before any case is registered.
struct Settings {
  /// Threads every kernel and probe uses (`--threads=N` or `TOPTHETA_BENCH_THREADS`; default: all cores).
  int threads = 1;
  /// The quick subset (`--quick` or `TOPTHETA_BENCH_QUICK=1`): decode kv:16384, prefill n:2048, the probes.
  bool quick = false;
};

inline Settings& settings() {
  static Settings instance;
  return instance;
}

/// Registers `name` (stable across versions) with wall-clock measurement, unless quick mode is on and the
/// case is not in the quick subset. Google Benchmark prints and writes it as `<name>/real_time`;
/// benchmarks/report strips that.
template <class Body>
void register_case(const std::string& name, bool in_quick_suite, Body&& body) {
  if (settings().quick && !in_quick_suite) return;
  benchmark::RegisterBenchmark(name.c_str(), std::forward<Body>(body))->UseRealTime()->Unit(benchmark::kMillisecond);
}

/// Memory and compute rates measured once per run by the probes (probes.cpp), the 100% of the % counters.
struct ReferenceRates {
  double read_bytes_per_second = 0;  ///< summing a 1 GiB float array with `Settings::threads` threads
  double gemm_flops_per_second = 0;  ///< Eigen float GEMM 2048^3 with `Settings::threads` threads
};
const ReferenceRates& reference_rates();  // probes.cpp

/// Runs `call` in the benchmark's timed loop and returns the wall-clock seconds per iteration, measured over
/// the same span as Google Benchmark's real time, so that rate counters can be reported as plain numbers.
template <class Call>
double timed_loop(benchmark::State& state, Call&& call) {
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    call();
    benchmark::ClobberMemory();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return seconds / double(std::max<benchmark::IterationCount>(1, state.iterations()));
}

/// What one call of a kernel kept and read, and how far its output is from dense attention's.
struct CallSummary {
  AttentionStats stats;
  double bytes_per_k_or_v_row = 0;  ///< head_dim x sizeof(stored scalar)
  double error_vs_dense = 0;        ///< ||o - o_dense||_F / ||o_dense||_F
};

/// The counters every case reports, so that a time points at its cause:
/// `bytes` read per call (K and V rows loaded x row bytes), `GB/s`, `bw%` (of the probe's read bandwidth),
/// `V_kept%` (distinct V rows kept / visible), `V_read%` (V rows loaded / visible; above V_kept% where query
/// blocks re-load rows), `kept%` (attention elements kept / visible), `empty%` (rows where nothing passed the
/// threshold and only the max-score key was kept), `err` (relative Frobenius error vs dense).
inline void report_call_counters(benchmark::State& state, const CallSummary& call, double seconds_per_call,
                                 int threads) {
  const AttentionStats& stats = call.stats;
  const double bytes = double(AttentionStats::total(stats.k_rows_read) + AttentionStats::total(stats.v_rows_read)) *
                       call.bytes_per_k_or_v_row;
  const double visible = double(AttentionStats::total(stats.v_rows_visible));
  state.counters["bytes"] = bytes;
  state.counters["GB/s"] = bytes / seconds_per_call * 1e-9;
  state.counters["bw%"] = 100 * bytes / seconds_per_call / reference_rates().read_bytes_per_second;
  state.counters["V_kept%"] = 100 * stats.v_rows_kept_fraction();
  state.counters["V_read%"] = 100 * double(AttentionStats::total(stats.v_rows_read)) / visible;
  state.counters["kept%"] = 100 * stats.kept_fraction();
  state.counters["empty%"] = stats.rows == 0 ? 0.0 : 100 * double(stats.empty_rows) / double(stats.rows);
  state.counters["err"] = call.error_vs_dense;
  state.counters["threads"] = threads;
}

/// `GFLOP/s` and `gemm%` (of the probe's GEMM rate) for `flops` per call.
inline void report_flop_counters(benchmark::State& state, double flops, double seconds_per_call) {
  state.counters["GFLOP/s"] = flops / seconds_per_call * 1e-9;
  state.counters["gemm%"] = 100 * flops / seconds_per_call / reference_rates().gemm_flops_per_second;
}

/// ||a - b||_F / ||b||_F over two buffers of the same length.
template <class Scalar>
double relative_error(const Scalar* output, const Scalar* reference, std::size_t size) {
  double error = 0, norm = 0;
  for (std::size_t i = 0; i < size; ++i) {
    const double o = static_cast<float>(output[i]), r = static_cast<float>(reference[i]);
    error += (o - r) * (o - r);
    norm += r * r;
  }
  return norm == 0 ? 0.0 : std::sqrt(error / norm);
}

void register_probe_benchmarks();        // probes.cpp
void register_decode_benchmarks();       // decode.cpp
void register_batch_benchmarks();        // batch.cpp
void register_prefill_benchmarks();      // prefill.cpp
void register_calibration_benchmarks();  // calibration.cpp

}  // namespace toptheta::bench
