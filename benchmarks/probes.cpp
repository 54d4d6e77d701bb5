// The machine's own limits, measured in the same run as the kernels: read bandwidth from memory and Eigen's
// float GEMM rate. Every case reports its rate as a percentage of them (bw%, gemm%).
#include "suite.hpp"

#include <toptheta/executor.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <memory>
#include <vector>

namespace toptheta::bench {
namespace {

/// 1 GiB of floats: twice the 480 MiB L3 this VM reports, so each sum streams from memory.
constexpr Index probe_floats = Index(1) << 28;
constexpr Index probe_block = Index(1) << 18;  // 1 MiB of floats per work item
constexpr Index gemm_size = 2048;

/// The probe array, written by the executor's threads (first touch where they will read it).
const float* probe_array() {
  static const std::unique_ptr<float[]> data = [] {
    std::unique_ptr<float[]> array(new float[std::size_t(probe_floats)]);
    OpenMPExecutor{settings().threads}.parallel_for(probe_floats / probe_block, [&](Index block) {
      std::fill_n(array.get() + block * probe_block, probe_block, 1.0f);
    });
    return array;
  }();
  return data.get();
}

/// Σ of the probe array, in 1 MiB blocks spread over the threads by the executor the kernels use.
double sum_probe_array() {
  const float* data = probe_array();
  std::vector<double> partial(std::size_t(probe_floats / probe_block));
  OpenMPExecutor{settings().threads}.parallel_for(Index(partial.size()), [&](Index block) {
    partial[std::size_t(block)] = Eigen::Map<const Eigen::ArrayXf>(data + block * probe_block, probe_block).sum();
  });
  double sum = 0;
  for (double value : partial) sum += value;
  return sum;
}

struct GemmOperands {
  Eigen::MatrixXf a = Eigen::MatrixXf::Random(gemm_size, gemm_size), b = Eigen::MatrixXf::Random(gemm_size, gemm_size);
  Eigen::MatrixXf c = Eigen::MatrixXf::Zero(gemm_size, gemm_size);
};

/// C = A B for 2048 x 2048 floats, on Settings::threads threads by Eigen's own OpenMP GEMM (which is off
/// everywhere else: see main.cpp).
void multiply(GemmOperands& operands) {
  Eigen::setNbThreads(settings().threads);
  operands.c.noalias() = operands.a * operands.b;
  Eigen::setNbThreads(1);
}

constexpr double gemm_flops = 2.0 * double(gemm_size) * double(gemm_size) * double(gemm_size);
constexpr double probe_bytes = double(probe_floats) * sizeof(float);

/// The shortest of `repeats` runs of `work`, after one warm-up run.
template <class Work>
double best_seconds(int repeats, Work&& work) {
  work();
  double best = 1e300;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    work();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

}  // namespace

/// Measured once, on first use (before the first case reports): the best of 5 sums and of 3 GEMMs.
const ReferenceRates& reference_rates() {
  static const ReferenceRates rates = [] {
    ReferenceRates measured;
    measured.read_bytes_per_second = probe_bytes / best_seconds(5, [] { benchmark::DoNotOptimize(sum_probe_array()); });
    GemmOperands operands;
    measured.gemm_flops_per_second = gemm_flops / best_seconds(3, [&] { multiply(operands); });
    return measured;
  }();
  return rates;
}

void register_probe_benchmarks() {
  register_case("probe/read_bandwidth", true, [](benchmark::State& state) {
    const double reference = reference_rates().read_bytes_per_second;
    const double seconds = timed_loop(state, [] { benchmark::DoNotOptimize(sum_probe_array()); });
    state.counters["bytes"] = probe_bytes;
    state.counters["GB/s"] = probe_bytes / seconds * 1e-9;
    state.counters["bw%"] = 100 * probe_bytes / seconds / reference;
    state.counters["reference_GB/s"] = reference * 1e-9;
    state.counters["threads"] = settings().threads;
  });
  register_case("probe/gemm", true, [](benchmark::State& state) {
    const double reference = reference_rates().gemm_flops_per_second;
    GemmOperands operands;
    const double seconds = timed_loop(state, [&] { multiply(operands); });
    state.counters["GFLOP/s"] = gemm_flops / seconds * 1e-9;
    state.counters["gemm%"] = 100 * gemm_flops / seconds / reference;
    state.counters["reference_GFLOP/s"] = reference * 1e-9;
    state.counters["threads"] = settings().threads;
  });
}

}  // namespace toptheta::bench
