// The machine's own limits, measured in the same run as the kernels: read bandwidth from memory and Eigen's
// float GEMM rate. Every case reports its rate as a percentage of them (bw%, gemm%). And the decode kernel's
// arithmetic alone: its row products on K and V rows held in cache (probe/row_products/<type>), the time per
// key and KV head that decode/<kernel>/... (counter ns/key-head) would take if no row came from memory.
#include "kernels.hpp"
#include "suite.hpp"

#include <toptheta/aligned_vector.hpp>
#include <toptheta/detail/row_products.hpp>
#include <toptheta/executor.hpp>
#include <toptheta/q8_block.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <memory>
#include <random>
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

/// Keys of the row-product probe: one sweep step of decode (16 keys per KV head) twice, so that its K and V
/// rows (`[keys, kv_heads, head_dim]`, 256 KiB for f32) stay in each core's L2.
constexpr Index product_keys = 32;
/// Passes over those keys per work item.
constexpr Index product_passes = 16;

/// K and V rows of `product_keys` tokens of the layer, random in [-1, 1] (q8_0 blocks quantized from them).
template <class Stored>
AlignedVector<Stored> product_rows(unsigned seed) {
  constexpr Index d = LayerShape::head_dim, elements = elements_of<Stored>(d);
  const Index rows = product_keys * LayerShape::kv_heads;
  std::mt19937 generator(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> values(std::size_t(rows * d));
  for (float& value : values) value = uniform(generator);
  AlignedVector<Stored> stored(std::size_t(rows * elements));
  if constexpr (is_q8_block_v<Stored>)
    quantize_q8(values.data(), rows * d, stored.data());
  else
    for (std::size_t i = 0; i < values.size(); ++i) stored[i] = Stored(values[i]);
  return stored;
}

/// probe/row_products/<type>: per work item, `product_passes` times for every KV head, the scores of the GQA
/// group's 4 query rows against `product_keys` cached K rows (`detail::dot_rows`) and their weighted sum of
/// the V rows (`detail::add_weighted_rows`): the two products dense decode runs per key and KV head, as the
/// kernel calls them (one sweep step per call), without its softmax, merges or memory traffic. Counters:
/// `ns/key-head` (time per key and KV head, times the threads: compare with decode's), `GMAC/s`.
template <class Stored>
void register_row_product_probe() {
  register_case(std::string("probe/row_products/") + type_name<Stored>(), true, [](benchmark::State& state) {
    constexpr Index d = LayerShape::head_dim, rows = LayerShape::q_heads / LayerShape::kv_heads;
    constexpr Index row = elements_of<Stored>(d), stride = LayerShape::kv_heads * row;
    const AlignedVector<Stored> keys = product_rows<Stored>(1), values = product_rows<Stored>(2);
    const int threads = settings().threads;
    const Index items = 4 * threads;
    AlignedVector<float> queries(std::size_t(rows * d), 0.01f);
    // Per item: its scores (rows x keys) and its output rows (rows x d).
    AlignedVector<float> scores(std::size_t(items * rows * product_keys)), outputs(std::size_t(items * rows * d));
    const OpenMPExecutor executor{threads};
    // head_dim as the kernel sees it, a run-time value (a constant would let GCC unroll what the kernel cannot).
    static volatile Index run_time_head_dim = d;
    const Index dim = run_time_head_dim;
    const double seconds = timed_loop(state, [&] {
      executor.parallel_for(items, [&](Index item) {
        float* score = scores.data() + item * rows * product_keys;
        float* output = outputs.data() + item * rows * d;
        for (Index pass = 0; pass < product_passes; ++pass)
          for (Index head = 0; head < LayerShape::kv_heads; ++head) {
            const Index first = head * row;
            detail::dot_rows(detail::RowBlock<const float>{queries.data(), d}, rows, keys.data() + first, stride,
                             product_keys, dim, detail::RowBlock<float>{score, product_keys});
            detail::add_weighted_rows(detail::RowBlock<const float>{score, product_keys}, rows, values.data() + first,
                                      stride, product_keys, dim, detail::RowBlock<float>{output, d});
          }
      });
      benchmark::DoNotOptimize(outputs.data());
    });
    const double key_heads = double(items * product_passes * LayerShape::kv_heads * product_keys);
    state.counters["ns/key-head"] = seconds * threads / key_heads * 1e9;
    state.counters["GMAC/s"] = key_heads * 2.0 * double(rows * d) / seconds * 1e-9;
    state.counters["threads"] = threads;
  });
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
  register_row_product_probe<float>();
  register_row_product_probe<Eigen::bfloat16>();
  register_row_product_probe<BlockQ8_0>();
}

}  // namespace toptheta::bench
