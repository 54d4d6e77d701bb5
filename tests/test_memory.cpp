// No kernel allocates O(n²) memory (design.md §2–3): a causal prefill of n = 16384 tokens on one head, where
// an n x n score matrix of floats would take 1 GiB, runs dense, one-pass Top-θ, two-pass Top-θ and top-k
// attention each with less than 64 MiB of extra peak resident memory. (Unoptimised builds use n = 8192 to
// stay fast.)
//
// The measure is Linux's peak resident set size: writing "5" to /proc/self/clear_refs resets VmHWM (in
// /proc/self/status) to the current RSS, so VmHWM after a call minus VmHWM before it is the most memory the
// call ever held (and touched) at once, over all its threads.
#include "test_support.hpp"

#include <chrono>
#include <cstdint>
#include <fstream>
#include <sstream>

#if defined(__SANITIZE_ADDRESS__)
#define TOPTHETA_TEST_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(memory_sanitizer)
#define TOPTHETA_TEST_UNDER_ASAN 1
#endif
#endif

using namespace toptheta;
using namespace toptheta_test;

namespace {

/// VmHWM of this process in bytes, or -1 when /proc/self/status has none.
long long peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) {
      std::istringstream fields(line.substr(6));
      long long kib = -1;
      fields >> kib;
      return kib < 0 ? -1 : kib * 1024;
    }
  return -1;
}

/// Resets VmHWM to the current RSS; false when /proc/self/clear_refs cannot be written.
bool reset_peak_rss() {
  std::ofstream clear_refs("/proc/self/clear_refs");
  if (!clear_refs) return false;
  clear_refs << "5";
  clear_refs.flush();
  return bool(clear_refs);
}

/// Why the measure cannot be taken here, or empty.
std::string cannot_measure() {
#ifdef TOPTHETA_TEST_UNDER_ASAN
  // ASan's shadow memory and its quarantine of freed blocks (256 MiB by default) grow the RSS by far more
  // than the kernels themselves allocate.
  return "built with AddressSanitizer, whose shadow memory and quarantine distort the resident set size";
#else
  if (peak_rss_bytes() < 0) return "/proc/self/status has no VmHWM line (not Linux?)";
  if (!reset_peak_rss()) return "/proc/self/clear_refs cannot be written, so the peak RSS cannot be reset";
  return {};
#endif
}

/// Growth of the peak RSS while `work` runs, in bytes.
template <class Work>
long long peak_rss_growth(Work&& work) {
  REQUIRE(reset_peak_rss());
  const long long before = peak_rss_bytes();
  work();
  const long long after = peak_rss_bytes();
  REQUIRE(before > 0);
  // Linux counts resident pages per CPU in batches and folds them in lazily, so a peak read after a run that
  // freed pages can come out a few pages below the one read before it (seen: 8 KiB): no growth.
  const long long counter_lag = 1024 * 1024;
  REQUIRE(after >= before - counter_lag);
  return std::max(0LL, after - before);
}

constexpr long long MiB = 1024 * 1024;

}  // namespace

TEST_CASE("no kernel allocates O(n^2): a causal prefill of 16384 tokens grows the peak RSS by less than 64 MiB",
          "[memory]") {
  const std::string reason = cannot_measure();
  if (!reason.empty()) {
    TOPTHETA_SKIP("peak-memory test skipped: " + reason);
  }

#ifdef __OPTIMIZE__
  const Index n = 16384;  // ~8 s for the five kernels at -O2 on two cores
#else
  const Index n = 8192;  // unoptimised builds (~2 min at n = 16384); n² floats are still 256 MiB, 4x the budget
#endif
  const Index head_dim = 32;
  const long long budget = 64 * MiB;
  // Two threads whatever the machine: each work item holds O(query block x n) scratch, so the budget is per
  // thread count; the threads and their allocator arenas are started by the warm-up below.
  const OpenMPExecutor executor{2};

  // Inputs and output allocated and touched before any measurement.
  Problem<float> problem(n, n, 1, 1, head_dim, 41);
  const auto q = problem.queries(), k = problem.keys(), v = problem.values();
  const auto out = problem.output();

  // The measure must see an allocation above the budget: 2 x budget touched must show up (give or take the
  // few pages the process freed meanwhile) and exceed the budget by far.
  const long long probe = peak_rss_growth([&] {
    std::vector<char> block(std::size_t(2 * budget));
    for (std::size_t at = 0; at < block.size(); at += 4096) block[at] = char(at);
    REQUIRE(block[4096] == char(4096));
  });
  INFO("a touched 128 MiB block grew the peak RSS by " << double(probe) / double(MiB) << " MiB");
  REQUIRE(probe >= 2 * budget - 4 * MiB);

  // Scores a_ij ~ N(0, 1): raw θ = 3 keeps ~0.1% of a row; a probability θ of 1e-3 keeps the few keys with
  // e^(a_ij - m_i) > 1e-3 Z_i in long rows and more in short ones.
  const Index k_keep = 32;
  const auto raw = LayerThresholds::uniform(k_keep, ThresholdSpace::raw_score, {3.0});
  const auto probability = LayerThresholds::uniform(k_keep, ThresholdSpace::probability, {1e-3});
  TopThetaOptions one_pass;
  one_pass.passes = Passes::one;
  one_pass.compensation = {DenominatorCompensation::exact, 1.0, true};
  TopThetaOptions two_pass;
  two_pass.passes = Passes::two;
  two_pass.compensation.v_mean = true;
  TopThetaOptions one_pass_probability = two_pass;
  one_pass_probability.passes = Passes::one;
  TopKOptions top_k;
  top_k.k = k_keep;
  top_k.compensation = {DenominatorCompensation::exp_threshold, 1.0, true};

  auto run = [&](int kernel, const TensorView<const float>& qs, const TensorView<const float>& ks,
                 const TensorView<const float>& vs, const TensorView<float>& os, AttentionStats* stats) {
    switch (kernel) {
      case 0:
        dense_attention(qs, ks, vs, os, {}, stats, executor);
        break;
      case 1:
        top_theta_attention(qs, ks, vs, os, raw, one_pass, stats, executor);
        break;
      case 2:
        top_theta_attention(qs, ks, vs, os, probability, two_pass, stats, executor);
        break;
      case 3:
        top_k_attention(qs, ks, vs, os, top_k, stats, executor);
        break;
      case 4:
        top_theta_attention(qs, ks, vs, os, probability, one_pass_probability, stats, executor);
        break;
    }
  };
  const char* names[] = {"dense", "one-pass Top-θ (raw score)", "two-pass Top-θ (probability)", "top-k",
                         "one-pass Top-θ (probability: candidates)"};
  const int kernels = 5;

  // Warm-up on a 512-token prefix: OpenMP threads, their stacks and malloc arenas exist before measuring.
  {
    const Index m = 512;
    AttentionStats stats;
    for (int kernel = 0; kernel < kernels; ++kernel)
      run(kernel, TensorView<const float>(problem.q.data(), m, 1, head_dim),
          TensorView<const float>(problem.k.data(), m, 1, head_dim),
          TensorView<const float>(problem.v.data(), m, 1, head_dim),
          TensorView<float>(problem.out.data(), m, 1, head_dim), &stats);
  }

  const auto visible = std::uint64_t(n) * std::uint64_t(n + 1) / 2;
  for (int kernel = 0; kernel < kernels; ++kernel) {
    AttentionStats stats;
    stats.reset(1, 1);  // sized before measuring: the kernel's own allocations are what is measured
    std::fill(problem.out.begin(), problem.out.end(), std::numeric_limits<float>::quiet_NaN());
    const auto start = std::chrono::steady_clock::now();
    const long long growth = peak_rss_growth([&] { run(kernel, q, k, v, out, &stats); });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    INFO(names[kernel] << ": peak RSS grew by " << double(growth) / double(MiB) << " MiB in " << seconds << " s, kept "
                       << stats.kept_fraction() << " of the elements");
    CHECK(growth < budget);
    // The whole n x n causal problem ran, and wrote every output.
    CHECK(stats.elements_visible == std::vector<std::uint64_t>{visible});
    CHECK(stats.rows == std::uint64_t(n));
    CHECK(std::all_of(problem.out.begin(), problem.out.end(), [](float x) { return std::isfinite(x); }));
    if (kernel > 0) CHECK(stats.kept_fraction() < 0.05);
  }
}

TEMPLATE_TEST_CASE("KV caches and aligned buffers start their rows on a cache line, small or large",
                   "[memory][kv_cache]", float, Eigen::bfloat16) {
  // glibc serves blocks above 128 KiB from mmap, 16 bytes into a page: a plain std::vector of that size would
  // split every 64-byte load of a row between two cache lines.
  const Index capacity = GENERATE(1, 4096);
  KvCache<TestType> cache(8, 128, capacity);
  const auto line = [](const void* data) { return reinterpret_cast<std::uintptr_t>(data) % cache_line_bytes; };
  INFO("capacity " << capacity);
  CHECK(line(cache.keys().data()) == 0);
  CHECK(line(cache.values().data()) == 0);
  for (const std::size_t count : {std::size_t(1), std::size_t(1) << 20}) {
    const AlignedVector<TestType> buffer(count);
    CHECK(line(buffer.data()) == 0);
  }
}
