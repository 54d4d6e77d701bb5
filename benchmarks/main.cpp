// toptheta_bench: the benchmark suite (design.md §3; issue 4). Usage:
//
//   toptheta_bench [--quick] [--threads=N] [Google Benchmark flags, e.g. --benchmark_out=r.json
//                  --benchmark_out_format=json --benchmark_filter=decode/.*/kv:16384]
//
// --quick (or TOPTHETA_BENCH_QUICK=1): only decode kv:16384, prefill n:2048, calibration in two spaces and the
// probes (under two minutes on a 2-core machine, data generation included). --threads=N (or TOPTHETA_BENCH_THREADS=N):
// threads of every kernel and probe; default all cores. benchmarks/report turns the JSON output into a markdown table
// and a plot.
#include "suite.hpp"

#include <Eigen/Core>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

int parse_threads(const char* text) {
  const int threads = std::atoi(text);
  if (threads < 1) {
    std::fprintf(stderr, "toptheta_bench: --threads (or TOPTHETA_BENCH_THREADS) must be >= 1, got '%s'\n", text);
    std::exit(2);
  }
  return threads;
}

/// Reads the suite's own flags and environment into settings() and returns the arguments left for Google
/// Benchmark.
std::vector<char*> parse_settings(int argc, char** argv) {
  toptheta::bench::Settings& settings = toptheta::bench::settings();
  settings.threads = int(std::max(1u, std::thread::hardware_concurrency()));
  if (const char* threads = std::getenv("TOPTHETA_BENCH_THREADS")) settings.threads = parse_threads(threads);
  if (const char* quick = std::getenv("TOPTHETA_BENCH_QUICK")) settings.quick = std::strcmp(quick, "0") != 0;
  std::vector<char*> rest = {argv[0]};
  for (int a = 1; a < argc; ++a) {
    if (!std::strcmp(argv[a], "--quick"))
      settings.quick = true;
    else if (!std::strncmp(argv[a], "--threads=", 10))
      settings.threads = parse_threads(argv[a] + 10);
    else
      rest.push_back(argv[a]);
  }
  return rest;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> arguments = parse_settings(argc, argv);
  const toptheta::bench::Settings& settings = toptheta::bench::settings();
  // The kernels parallelise through their executor and call Eigen products inside each work item. Eigen's own
  // OpenMP GEMM would start a nested team of nbThreads() threads inside every work item of a 1-thread team,
  // oversubscribing the cores, so it is off except in the GEMM probe.
  Eigen::setNbThreads(1);

  toptheta::bench::register_probe_benchmarks();
  toptheta::bench::register_decode_benchmarks();
  toptheta::bench::register_batch_benchmarks();
  toptheta::bench::register_prefill_benchmarks();
  toptheta::bench::register_calibration_benchmarks();

  int count = int(arguments.size());
  benchmark::Initialize(&count, arguments.data());
  if (benchmark::ReportUnrecognizedArguments(count, arguments.data())) return 2;
  benchmark::AddCustomContext("toptheta_threads", std::to_string(settings.threads));
  benchmark::AddCustomContext("toptheta_mode", settings.quick ? "quick" : "full");
  benchmark::AddCustomContext("toptheta_layer", "Llama-3-8B: 32 query heads, 8 KV heads, head_dim 128; k = 64");
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
