// Offline calibration of Top-θ thresholds: score rows in, a `ThresholdTable` out.
#pragma once

#include <toptheta/calibrator_options.hpp>
#include <toptheta/detail/calibration_bucket.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/detail/row_calibration.hpp>
#include <toptheta/detail/table_building.hpp>
#include <toptheta/detail/value_histogram.hpp>
#include <toptheta/length_buckets.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/threshold_space.hpp>
#include <toptheta/threshold_table.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace toptheta {

namespace detail {
class CalibratorState;  // calibrator_state.hpp: the state as bytes
}  // namespace detail

/// What one (layer, head, length bucket) has collected.
struct BucketStatistics {
  std::uint64_t rows = 0;       ///< calibration rows R
  double threshold_mean = 0;    ///< mean of the sample thresholds t_i
  double threshold_std = 0;     ///< their population standard deviation
  double denominator_mean = 0;  ///< mean of C_i cut at t_i
  std::uint64_t values = 0;     ///< values in the histogram (Σ L_i), 0 without `count_summary`
};

/// Accumulates, per (layer, query head, row-length bucket), the calibration statistics of design.md §1
/// ("Calibration") from score rows as an engine produces them, and turns them into a `ThresholdTable`.
///
/// For each observed row `i` of length `L_i > k` (shorter rows stay dense and are only counted) with scores
/// `a_ij` (already scaled), row max `m_i` and `Z_i = Σ_j exp(a_ij - m_i)`:
/// - the **sample threshold** `t_i` = the (k+1)-th largest value of the row in the threshold space (`a`,
///   `P = exp(a - m_i) / Z_i`, `a - m_i` or `a / ||q_i||`), so that `value > t_i` keeps at most `k` elements;
///   count, mean and M2 of `t_i` are streamed with Welford's update;
/// - the **denominator term** `C_i = Σ_{j∉S_i} exp(a_ij - m_i)` with `S_i = {j : value_ij > t_i}` (or, if all of
///   the top k+1 values tie so that `S_i` is empty, the max-score key, as the kernels keep it). During streaming
///   no final θ exists yet, so each row is cut at its own sample threshold: this keeps every row's term exact and
///   independent of the other rows and of the order they come in, so calibrators merge exactly (the reference
///   code cuts at the running mean of thresholds so far, which depends on the order). The table can instead use
///   the term cut at its final θ (`DenominatorTermSource::table_threshold`);
/// - with `count_summary`, every value `value_ij` (and with `summary_masses` its mass `exp(a_ij - m_i)`) into a
///   log-linear histogram (`detail::ValueHistogram`). A count-matched θ is the value above which `k · R` of the
///   bucket's values lie (the mean survivor count over its R rows is then k), interpolated inside the bin that holds
///   it.
///
/// Precision: float rows are processed in float (`Z_i`, `C_i` to ~1e-6 relative), double rows in double; the
/// statistics accumulate in double. A count-matched θ is resolved to its histogram bin (≤ 1.6 % of |θ| wide for
/// the score spaces, ≤ 0.043 score units for probabilities) and interpolated inside it; on the calibration rows
/// the mean survivor count then lies within 1 % of k (tests/test_calibrator.cpp). Buckets with few rows are pooled
/// with their neighbours for it (`TableOptions::min_pooled_rows`).
///
/// Cost per used row: O(L) (a few vectorised passes and a selection among the values above a sampled floor). Memory per
/// (layer, head, bucket) that saw rows: about 150 bytes, plus with `count_summary` 8 bytes per histogram bin over the
/// observed value range (16 with `summary_masses`), at most `8 · 2^summary_mantissa_bits · summary_window_binades`
/// bytes (12 KiB with the defaults; 24 KiB with masses).
///
/// Not thread-safe: give each thread (process, machine) its own calibrator and `merge` them. Two calibrators fed
/// disjoint rows, merged, give the table one calibrator fed all rows gives: sample counts and histogram counts
/// exactly, means and standard deviations to rounding (Chan's merge). Across processes, a calibrator's state
/// travels as bytes (calibrator_state.hpp).
class Calibrator {
 public:
  explicit Calibrator(const CalibratorOptions& options) : options_(options) {
    using detail::require;
    options_.shape.validate("options.shape");
    options_.buckets.validate("options.buckets");
    const Index layers = options_.shape.layers;
    require(options_.k.size() == 1 || Index(options_.k.size()) == layers, "options.k",
            "one k, or one per layer (" + std::to_string(layers) + ")", options_.k.size());
    if (options_.k.size() == 1) options_.k.assign(std::size_t(layers), options_.k.front());
    for (std::size_t l = 0; l < options_.k.size(); ++l)
      require(options_.k[l] >= 1, "options.k[" + std::to_string(l) + "]", "k >= 1", options_.k[l]);
    require(options_.sample_fraction > 0 && options_.sample_fraction <= 1, "options.sample_fraction",
            "a fraction in (0, 1]", options_.sample_fraction);
    const bool probability = options_.space == ThresholdSpace::probability;
    grid_ = {options_.summary_mantissa_bits.value_or(probability ? 4 : 6), default_min_exponent(options_.space),
             options_.summary_window_binades.value_or(probability ? 96 : 24)};
    grid_.validate("options.summary");
    const std::size_t cells = std::size_t(layers * options_.shape.q_heads);
    buckets_.resize(cells);
  }

  const CalibratorOptions& options() const { return options_; }
  Index k(Index layer) const { return options_.k[checked_layer(layer)]; }

  /// Observes one score row: `scores[j] = a_ij` for the `length` visible keys of query head `head` in `layer`.
  /// \param query_norm `||q_i||`, required (finite, > 0) for the score_over_query_norm space, else ignored.
  template <class Scalar>
  void observe_row(Index layer, Index head, const Scalar* scores, Index length, double query_norm = 0) {
    static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>, "scores are float or double");
    detail::require(scores != nullptr || length == 0, "scores", "a non-null pointer", "nullptr");
    observe_expression<Scalar>(layer, head, length, query_norm, [&](Scalar*) { return scores; });
  }

  /// Observes one score row given as an Eigen vector (its size is the row length).
  template <class Derived>
  void observe_row(Index layer, Index head, const Eigen::DenseBase<Derived>& scores, double query_norm = 0) {
    using Scalar = typename Derived::Scalar;
    static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>, "scores are float or double");
    detail::require(scores.rows() == 1 || scores.cols() == 1, "scores", "a row or column vector",
                    std::to_string(scores.rows()) + "x" + std::to_string(scores.cols()));
    const Index length = scores.size();
    observe_expression<Scalar>(layer, head, length, query_norm, [&](Scalar* into) {
      for (Index j = 0; j < length; ++j) into[j] = scores.derived().coeff(j);
      return static_cast<const Scalar*>(into);
    });
  }

  /// Observes a block of score rows of one (layer, head): row `r` of `scores` holds `a_rj` for its first
  /// `lengths[r]` columns (all columns when `lengths` is empty; e.g. causal prefill rows `past + r + 1`).
  /// Rows are observed in order, exactly as `observe_row` would.
  /// \param query_norms one `||q_r||` per row for the score_over_query_norm space, else may be empty.
  template <class Derived>
  void observe_rows(Index layer, Index head, const Eigen::MatrixBase<Derived>& scores,
                    const std::vector<Index>& lengths = {}, const std::vector<double>& query_norms = {}) {
    using Scalar = typename Derived::Scalar;
    static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>, "scores are float or double");
    const Index rows = scores.rows();
    detail::require(lengths.empty() || Index(lengths.size()) == rows, "lengths",
                    "empty or one length per score row (" + std::to_string(rows) + ")", lengths.size());
    detail::require(query_norms.empty() || Index(query_norms.size()) == rows, "query_norms",
                    "empty or one norm per score row (" + std::to_string(rows) + ")", query_norms.size());
    for (Index r = 0; r < rows; ++r) {
      const Index length = lengths.empty() ? scores.cols() : lengths[std::size_t(r)];
      detail::require(length >= 1 && length <= scores.cols(), "lengths[" + std::to_string(r) + "]",
                      "a length in [1, " + std::to_string(scores.cols()) + "]", length);
      const double norm = query_norms.empty() ? 0.0 : query_norms[std::size_t(r)];
      observe_expression<Scalar>(layer, head, length, norm, [&](Scalar* into) -> const Scalar* {
        if constexpr (bool(Derived::Flags & Eigen::DirectAccessBit) && bool(Derived::IsRowMajor)) {
          if (scores.derived().innerStride() == 1) return &scores.derived().coeffRef(r, 0);  // in place
        }
        Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>(into, length) = scores.row(r).head(length);
        return into;
      });
    }
  }

  /// Adds what `other` observed. Requires equal options except `seed` and `sample_fraction`.
  void merge(const Calibrator& other) {
    using detail::require;
    require(other.options_.shape == options_.shape, "other", "a calibrator of the same model shape",
            "a different shape");
    require(other.options_.space == options_.space, "other",
            std::string("a calibrator of the ") + to_string(options_.space) + " space",
            to_string(other.options_.space));
    require(other.options_.k == options_.k, "other", "a calibrator with the same k per layer", "different k");
    require(other.options_.buckets == options_.buckets, "other", "a calibrator with the same length buckets",
            "different buckets");
    require(other.options_.count_summary == options_.count_summary &&
                other.options_.summary_masses == options_.summary_masses && other.grid_ == grid_,
            "other", "a calibrator with the same count summary settings", "different settings");
    for (std::size_t cell = 0; cell < buckets_.size(); ++cell) {
      auto& mine = buckets_[cell];
      const auto& theirs = other.buckets_[cell];
      if (mine.size() < theirs.size()) mine.resize(theirs.size(), Statistics(grid_, options_.summary_masses));
      for (std::size_t b = 0; b < theirs.size(); ++b) mine[b].merge(theirs[b]);
    }
    rows_offered_ += other.rows_offered_;
    rows_dense_ += other.rows_dense_;
    rows_used_ += other.rows_used_;
  }

  /// Rows passed to `observe_*`, rows skipped because `L ≤ k`, and rows used (the rest were not sampled).
  std::uint64_t rows_offered() const { return rows_offered_; }
  std::uint64_t rows_dense() const { return rows_dense_; }
  std::uint64_t rows_used() const { return rows_used_; }

  /// What (layer, head, bucket) has collected (zeros for a bucket that saw no row).
  BucketStatistics statistics(Index layer, Index head, Index bucket) const {
    const auto& cell = buckets_[cell_index(layer, head)];
    BucketStatistics result;
    if (bucket < 0 || bucket >= Index(cell.size())) return result;
    const Statistics& s = cell[std::size_t(bucket)];
    result.rows = s.threshold.count;
    result.threshold_mean = s.threshold.mean;
    result.threshold_std = s.threshold.standard_deviation();
    result.denominator_mean = s.denominator.mean;
    result.values = s.histogram.total_count();
    return result;
  }

  /// Bytes held by the statistics (the histograms dominate).
  std::size_t memory_bytes() const {
    std::size_t bytes = 0;
    for (const auto& cell : buckets_)
      for (const auto& s : cell) bytes += sizeof(Statistics) + s.histogram.memory_bytes();
    return bytes;
  }

  /// The table of everything observed so far (see `ThresholdTable`). Per layer, the calibrated lengths are the
  /// representatives of the buckets in which any head saw a row. A head that saw rows in some of those buckets
  /// but not in others gets the missing entries from its own calibrated buckets (linear in the representative
  /// length between the nearest ones, the nearest one outside them) with a sample count of 0; a head or layer
  /// with no row at all is handled as `options.missing` says.
  ///
  /// \param report if given, lists the entries whose histogram-derived value fell below the count summary's
  /// window (see `TableReport`).
  ThresholdTable table(const TableOptions& options = {}, TableReport* report = nullptr) const {
    return detail::TableBuilder(options_, grid_, buckets_).build(options, report);
  }

 private:
  friend class detail::CalibratorState;

  using Statistics = detail::CalibrationBucket;
  template <class T>
  using RowScratch = detail::RowCalibrationScratch<T>;

  template <class T>
  RowScratch<T>& scratch() {
    if constexpr (std::is_same_v<T, float>)
      return float_rows_;
    else
      return double_rows_;
  }

  /// Below `2^min_exponent` the histogram is linear: score-like values need absolute resolution near 0 (about
  /// 0.004 score units), probabilities relative resolution down to ~1e-19.
  static int default_min_exponent(ThresholdSpace space) {
    switch (space) {
      case ThresholdSpace::probability:
        return -64;
      case ThresholdSpace::score_over_query_norm:
        return -6;
      case ThresholdSpace::raw_score:
      case ThresholdSpace::score_minus_max:
        return -2;
    }
    return -2;
  }

  static std::uint64_t splitmix64(std::uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
  }

  bool sampled(std::uint64_t row) const {
    if (options_.sample_fraction >= 1) return true;
    const double u = double(splitmix64(options_.seed + row * 0x9E3779B97F4A7C15ull) >> 11) * 0x1p-53;
    return u < options_.sample_fraction;
  }

  std::size_t checked_layer(Index layer) const {
    detail::require(layer >= 0 && layer < options_.shape.layers, "layer",
                    "a layer in [0, " + std::to_string(options_.shape.layers) + ")", layer);
    return std::size_t(layer);
  }

  std::size_t cell_index(Index layer, Index head) const {
    checked_layer(layer);
    detail::require(head >= 0 && head < options_.shape.q_heads, "head",
                    "a query head in [0, " + std::to_string(options_.shape.q_heads) + ")", head);
    return std::size_t(layer * options_.shape.q_heads + head);
  }

  /// Checks the row's arguments, counts it, and if it is longer than k and sampled, accumulates the scores
  /// `row_scores(buffer)` returns: the row in place, or copied into `buffer` (room for `length` scores).
  template <class Scalar, class Row>
  void observe_expression(Index layer, Index head, Index length, double query_norm, const Row& row_scores) {
    const std::size_t cell = cell_index(layer, head);
    detail::require(length >= 1 && length <= LengthBuckets::max_length, "length", "a row length in [1, 2^50]", length);
    if (options_.space == ThresholdSpace::score_over_query_norm)
      detail::require(std::isfinite(query_norm) && query_norm > 0, "query_norm",
                      "||q_i|| > 0 (finite) for the score_over_query_norm space", query_norm);
    const std::uint64_t row = rows_offered_++;
    const Index k = options_.k[std::size_t(layer)];
    if (length <= k) {
      ++rows_dense_;
      return;
    }
    if (!sampled(row)) return;
    RowScratch<Scalar>& buffers = scratch<Scalar>();
    buffers.scores.resize(std::size_t(length));
    accumulate(buffers, row_scores(buffers.scores.data()), cell, layer, head, length, query_norm, k);
    ++rows_used_;
  }

  /// One row's statistics, computed in the row's own precision (float rows: float exp and sums, so that
  /// calibration stays cheaper than scoring), accumulated in double.
  template <class T>
  void accumulate(RowScratch<T>& scratch, const T* scores, std::size_t cell, Index layer, Index head, Index length,
                  double query_norm, Index k) {
    // The weights exp(a - m) are kept only when the histogram needs them (masses, probabilities).
    const bool keep_weights =
        options_.count_summary && (options_.summary_masses || options_.space == ThresholdSpace::probability);
    const detail::RowStatistic<T> statistic =
        detail::row_statistic(scratch, scores, length, k, keep_weights, layer, head);
    const T max = statistic.max, cut = statistic.cut;
    const T inverse_norm = options_.space == ThresholdSpace::score_over_query_norm ? T(1 / query_norm) : T(0);
    const T inverse_sum = T(1) / statistic.sum;
    auto& statistics = buckets_[cell];
    const Index bucket = options_.buckets.bucket(length);
    if (Index(statistics.size()) <= bucket)
      statistics.resize(std::size_t(bucket + 1), Statistics(grid_, options_.summary_masses));
    Statistics& s = statistics[std::size_t(bucket)];
    const T* weights = options_.summary_masses ? scratch.weights.data() : nullptr;
    // The histogram takes the row in the threshold space, mapped on the fly from the scores (the probabilities
    // from the weights); its largest value is the map of `max`, computed by the same operation.
    const auto add_to_histogram = [&](const T* inputs, T max_value, const auto& value_of) {
      if (options_.count_summary) s.histogram.add(inputs, max_value, weights, length, scratch.histogram, value_of);
    };
    switch (options_.space) {
      case ThresholdSpace::raw_score:
        s.threshold.add(double(cut));
        add_to_histogram(scores, max, detail::Identity{});
        break;
      case ThresholdSpace::probability:
        s.threshold.add(double(std::exp(cut - max) * inverse_sum));
        add_to_histogram(scratch.weights.data(), T(1) * inverse_sum, [inverse_sum](T x) { return x * inverse_sum; });
        break;
      case ThresholdSpace::score_minus_max:
        s.threshold.add(double(cut - max));
        add_to_histogram(scores, T(0), [max](T x) { return x - max; });
        break;
      case ThresholdSpace::score_over_query_norm:
        s.threshold.add(double(cut * inverse_norm));
        add_to_histogram(scores, max * inverse_norm, [inverse_norm](T x) { return x * inverse_norm; });
        break;
    }
    s.denominator.add(statistic.pruned);
  }

  CalibratorOptions options_;
  detail::HistogramGrid grid_;
  std::vector<std::vector<Statistics>> buckets_;  ///< per (layer, head), per bucket
  std::uint64_t rows_offered_ = 0, rows_dense_ = 0, rows_used_ = 0;
  RowScratch<float> float_rows_;
  RowScratch<double> double_rows_;
};

}  // namespace toptheta
