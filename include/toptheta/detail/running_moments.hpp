// Streaming mean and variance (Welford), mergeable (Chan et al.).
#pragma once

#include <cmath>
#include <cstdint>

namespace toptheta::detail {

/// Count, mean and sum of squared deviations `M2 = Σ (x - mean)²` of a stream of values.
///
/// `add` is Welford's update, `merge` Chan's pairwise combination: both are backward stable, so a merge of two
/// halves agrees with one pass over all values to a few ulps of the spread (no catastrophic cancellation of
/// `Σx²` formulas). Counts merge exactly.
struct RunningMoments {
  std::uint64_t count = 0;
  double mean = 0;
  double m2 = 0;

  /// Welford's update in the form `M2 += δ² (n - 1) / n` (δ = x - old mean), equal to `δ (x - new mean)` but
  /// with `x` used once: a compiler that fuses the caller's product into `x - mean` (FMA contraction) cannot
  /// then leave a rounding residue in M2, so one value always has M2 = 0.
  void add(double x) {
    ++count;
    const double delta = x - mean;
    mean += delta / double(count);
    m2 += delta * delta * (double(count - 1) / double(count));
  }

  void merge(const RunningMoments& other) {
    if (other.count == 0) return;
    if (count == 0) {
      *this = other;
      return;
    }
    const double n_a = double(count), n_b = double(other.count), n = n_a + n_b;
    const double delta = other.mean - mean;
    mean += delta * (n_b / n);
    m2 += other.m2 + delta * delta * (n_a * n_b / n);
    count += other.count;
  }

  /// Population variance `M2 / n` (NumPy's default `std`, as the paper's reference code uses); 0 for n ≤ 1.
  double variance() const { return count == 0 ? 0.0 : std::max(0.0, m2) / double(count); }
  double standard_deviation() const { return std::sqrt(variance()); }
};

}  // namespace toptheta::detail
