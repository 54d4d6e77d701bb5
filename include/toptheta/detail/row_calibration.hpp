// One calibration row's statistic (design.md §1, "Calibration"): its max and sum, its sample threshold (the
// (k+1)-th largest score) and the mass outside its top k.
#pragma once

#include <toptheta/detail/rank_selection.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/detail/value_histogram.hpp>
#include <toptheta/scalar_traits.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

namespace toptheta::detail {

/// Buffers for one row, kept across rows: its scores, `exp(a - m)`, the selection's candidates, the partitions
/// of `rank_largest`, and the histogram's buffers.
template <class T>
struct RowCalibrationScratch {
  std::vector<T> scores, selection, partitions;
  // Eigen storage, aligned: a vectorised exp into it then starts on a whole packet wherever the heap put it,
  // so that a row's weights and sum round the same in every process.
  Eigen::Array<T, Eigen::Dynamic, 1> weights;
  ValueHistogram::Scratch<T> histogram;
};

/// What one score row `a_i` of length `L_i > k` gives the calibration, in the row's own precision `T` (float
/// rows: float exp and sums, so that calibration stays cheaper than scoring).
template <class T>
struct RowStatistic {
  T max;          ///< m_i
  T sum;          ///< Z_i = Σ_j exp(a_ij - m_i)
  T cut;          ///< the (k+1)-th largest score: S_i = {j : a_ij > cut} holds at most k keys
  double pruned;  ///< C_i = Z_i - Σ_{j∈S_i} exp(a_ij - m_i); S_i is the max-score key when the top k+1 tie
};

/// The `rank`-th largest of `a[0..n)`; the values at or above it are then among `scratch.selection[0..candidates)`.
/// In long rows only the values at or above a floor are gathered (branch-free): a strided sample's value that
/// about `4 · rank` of the row's values are expected to exceed, lowered if fewer than `rank` do. The result does
/// not depend on the sample.
template <class T>
T largest_with_candidates(RowCalibrationScratch<T>& scratch, const T* a, Index n, Index rank, Index& candidates) {
  constexpr Index sample_size = 64;
  scratch.selection.resize(std::size_t(n));
  T* out = scratch.selection.data();
  candidates = 0;
  if (n >= 16 * rank && n >= 16 * sample_size) {
    T sample[sample_size];
    const Index stride = n / sample_size;
    for (Index s = 0; s < sample_size; ++s) sample[s] = a[s * stride];
    for (Index sample_rank = (4 * rank * sample_size + n - 1) / n;; sample_rank *= 4) {
      sample_rank = std::min(sample_rank, sample_size);
      std::nth_element(sample, sample + (sample_rank - 1), sample + sample_size, std::greater<T>());
      const T floor = sample[sample_rank - 1];
      candidates = gather_at_least(a, n, floor, out);
      if (candidates >= rank || sample_rank == sample_size) break;
    }
  }
  if (candidates < rank) {
    std::copy(a, a + n, out);
    candidates = n;
  }
  return rank_largest(out, candidates, rank, scratch.partitions);
}

/// The statistic of the row `scores[0..length)` (length > k) of query head `head` in `layer`. With
/// `keep_weights`, `scratch.weights` holds `exp(a_ij - m_i)` afterwards (for the value histogram).
/// \throws invalid_argument naming the score (with its layer and head) that is not finite.
template <class T>
RowStatistic<T> row_statistic(RowCalibrationScratch<T>& scratch, const T* scores, Index length, Index k,
                              bool keep_weights, Index layer, Index head) {
  using Array = Eigen::Array<T, Eigen::Dynamic, 1>;
  const Eigen::Map<const Array> a(scores, length);
  if (!std::isfinite(a.sum())) {  // a vectorised test; the scan runs only for a NaN, an infinity or an overflow
    for (Index j = 0; j < length; ++j)
      if (!std::isfinite(a(j)))
        fail("scores[" + std::to_string(j) + "] (layer " + std::to_string(layer) + ", head " + std::to_string(head) +
                 ")",
             "finite scores", a(j));
  }
  RowStatistic<T> row;
  row.max = a.maxCoeff();
  scratch.weights.resize(keep_weights ? length : 0);
  if (keep_weights) {
    Eigen::Map<Array> w(scratch.weights.data(), length);
    w = (a - row.max).exp();
    row.sum = w.sum();
  } else {
    row.sum = (a - row.max).exp().sum();
  }
  // The sample threshold in score units: the (k+1)-th largest score. S_i = {a > cut} lies among the candidates.
  Index candidates = 0;
  row.cut = largest_with_candidates(scratch, scores, length, k + 1, candidates);
  const Eigen::Map<const Array> candidate(scratch.selection.data(), candidates);
  const double kept =
      row.cut == row.max ? 1.0 : double(((candidate - row.max).exp() * (candidate > row.cut).template cast<T>()).sum());
  row.pruned = std::max(0.0, double(row.sum) - kept);
  return row;
}

}  // namespace toptheta::detail
