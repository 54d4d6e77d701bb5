// Offline calibration of Top-θ thresholds: score rows in, a `ThresholdTable` out.
#pragma once

#include <toptheta/detail/rank_selection.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/detail/running_moments.hpp>
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

/// What a `Calibrator` collects, fixed for its lifetime (calibrators merge only with equal options, up to the
/// sampling seed and fraction).
struct CalibratorOptions {
  ModelShape shape;
  ThresholdSpace space = ThresholdSpace::raw_score;
  /// `k` per layer (`shape.layers` values), or one value for every layer.
  std::vector<Index> k{32};
  LengthBuckets buckets{};
  /// Fraction of the rows longer than `k` that are used, in (0, 1]. The r-th row passed to `observe_*` (counting
  /// every row, r = 0, 1, ...) is used when `splitmix64(seed + r · 0x9E3779B97F4A7C15) / 2^64 < sample_fraction`:
  /// deterministic for a given seed and observation order. Give shards that will be merged different seeds.
  double sample_fraction = 1.0;
  std::uint64_t seed = 0;
  /// Collect the value histograms that count-, mass- and budget-matched thresholds and table-threshold
  /// denominator terms need
  /// (memory: see `Calibrator`). Without them only `mean_of_thresholds` with per-row denominator terms works.
  bool count_summary = true;
  /// Also sum each value's `exp(a_ij - m_i)` per histogram bin: what `DenominatorTermSource::table_threshold`
  /// needs (count-matched θ needs only the counts). Doubles the summary's memory and most of its update cost.
  bool summary_masses = false;
  /// Histogram resolution: `2^summary_mantissa_bits` bins per binade of |value| over the `summary_window_binades`
  /// binades below the largest value seen. Unset: 6 bits (bins ≤ 1.6 % of the value wide) over 24 binades for the
  /// score spaces; 4 bits over 96 binades for probabilities, whose binades are ln 2 = 0.69 score units wide
  /// (bins ≤ 0.043 score units, 66 score units of range). Either way at most 12 KiB per histogram (24 KiB with
  /// `summary_masses`).
  std::optional<int> summary_mantissa_bits, summary_window_binades;
};

/// Which calibration rows' `C_i` a table's denominator term c_h(L) averages.
enum class DenominatorTermSource {
  /// `C_i = Σ_{j∉S_i} exp(a_ij - m_i)` with `S_i = {j : value_ij > t_i}` cut at the row's own sample threshold
  /// `t_i`: the mass outside the row's top k, exact per row and streamed (Welford). The default.
  row_threshold,
  /// `C_i` cut at the table's final θ of the row's bucket, from the value histogram (each value carries its
  /// `exp(a_ij - m_i)`): the term the kernel would need under the threshold actually used, to the histogram's
  /// resolution (the bin holding θ is split in proportion). Needs `count_summary` and `summary_masses`.
  table_threshold,
  /// No denominator terms in the table.
  none,
};

inline const char* to_string(DenominatorTermSource source) {
  switch (source) {
    case DenominatorTermSource::row_threshold: return "row_threshold";
    case DenominatorTermSource::table_threshold: return "table_threshold";
    case DenominatorTermSource::none: return "none";
  }
  return "unknown";
}

/// Parses the names printed by `to_string`; throws naming `argument` for any other text.
inline DenominatorTermSource denominator_term_source_from_string(const std::string& name,
                                                                 const std::string& argument = "denominator_terms") {
  for (auto source : {DenominatorTermSource::row_threshold, DenominatorTermSource::table_threshold,
                      DenominatorTermSource::none})
    if (name == to_string(source)) return source;
  detail::fail(argument, "one of row_threshold, table_threshold, none", name);
}

/// What `Calibrator::table` does with a (layer, head) that saw no calibration row longer than `k`.
enum class MissingCalibration {
  error,     ///< throw `invalid_argument` naming the layer and head (the default)
  keep_all,  ///< θ = lowest double (every key kept, as for rows of length ≤ k), c = 0, 0 samples
};

/// How `Calibrator::table` turns the collected statistics into thresholds.
struct TableOptions {
  CalibrationMethod method = CalibrationMethod::mean_of_thresholds;
  /// σ_add of `mean_of_thresholds`: θ = mean + σ_add · std. Must be 0 for the other methods.
  double sigma_add = 0;
  /// ε of `mass_matched`, in (0, 1): the mean probability mass each calibration row leaves out. Unused by the
  /// other methods.
  double pruned_mass = 0.01;
  DenominatorTermSource denominator_terms = DenominatorTermSource::row_threshold;
  MissingCalibration missing = MissingCalibration::error;
  /// Histogram-derived values (count- or mass-matched θ, table-threshold c) of a bucket with fewer rows than
  /// this also use the histograms of the head's nearest calibrated buckets, as many on each side, until the
  /// rows reach it.
  /// A count-matched θ fitted to few rows keeps more than k on held-out rows on average (the survivor count is
  /// convex in θ); pooling trades that for a little smoothing over lengths. 0 or 1: every bucket alone.
  std::uint64_t min_pooled_rows = 256;
};

/// What `Calibrator::table` could not resolve exactly.
struct TableReport {
  struct Entry {
    Index layer = 0, head = 0, first_length = 0, last_length = 0;
    friend bool operator!=(const Entry& a, const Entry& b) {
      return a.layer != b.layer || a.head != b.head || a.first_length != b.first_length ||
             a.last_length != b.last_length;
    }
  };
  /// Entries whose count-matched θ (or table-threshold c) lies below the count summary's window: fewer than k·R
  /// values lie within `summary_window_binades` binades of the largest value, as in buckets whose rows barely
  /// exceed k and hold values near 0 (a mass-matched θ: the values under the window already sum to ε·R). θ is
  /// then the window's lower edge (every value in the window kept), c the mass below the window (for a
  /// mean-of-thresholds θ below the window, an upper bound). Raise
  /// `CalibratorOptions::summary_window_binades` to resolve them.
  std::vector<Entry> window_edge;
};

namespace detail {
class CalibratorState;  // calibrator_state.hpp: the state as bytes
}  // namespace detail

/// What one (layer, head, length bucket) has collected.
struct BucketStatistics {
  std::uint64_t rows = 0;          ///< calibration rows R
  double threshold_mean = 0;       ///< mean of the sample thresholds t_i
  double threshold_std = 0;        ///< their population standard deviation
  double denominator_mean = 0;     ///< mean of C_i cut at t_i
  std::uint64_t values = 0;        ///< values in the histogram (Σ L_i), 0 without `count_summary`
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
///   log-linear histogram (`detail::ValueHistogram`). A count-matched θ is the value above which `k · R` of the bucket's values lie
///   (the mean survivor count over its R rows is then k), interpolated inside the bin that holds it.
///
/// Precision: float rows are processed in float (`Z_i`, `C_i` to ~1e-6 relative), double rows in double; the
/// statistics accumulate in double. A count-matched θ is resolved to its histogram bin (≤ 1.6 % of |θ| wide for
/// the score spaces, ≤ 0.043 score units for probabilities) and interpolated inside it; on the calibration rows
/// the mean survivor count then lies within 1 % of k (tests/test_calibrator.cpp). Buckets with few rows are pooled
/// with their neighbours for it (`TableOptions::min_pooled_rows`).
///
/// Cost per used row: O(L) (a few vectorised passes and a selection among the values above a sampled floor). Memory per (layer, head, bucket) that saw rows: about 150 bytes, plus with
/// `count_summary` 8 bytes per histogram bin over the observed value range (16 with `summary_masses`), at most
/// `8 · 2^summary_mantissa_bits · summary_window_binades` bytes (12 KiB with the defaults; 24 KiB with masses).
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
            "other",
            "a calibrator with the same count summary settings", "different settings");
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
    using detail::require;
    const bool count_matched = options.method == CalibrationMethod::count_matched;
    const bool mass_matched = options.method == CalibrationMethod::mass_matched;
    const bool budget_matched = options.method == CalibrationMethod::budget_matched;
    const bool from_histogram = count_matched || mass_matched || budget_matched;  // θ from the value histogram
    require(std::isfinite(options.sigma_add), "options.sigma_add", "a finite value", options.sigma_add);
    require(!from_histogram || options.sigma_add == 0, "options.sigma_add",
            std::string("0 for ") + to_string(options.method) + " (σ_add applies to mean_of_thresholds)",
            options.sigma_add);
    require(options_.count_summary || !from_histogram, "options.method",
            std::string("mean_of_thresholds (") + to_string(options.method) +
                " needs CalibratorOptions::count_summary, which is off)",
            to_string(options.method));
    require(!needs_probability_space(options.method) || options_.space == ThresholdSpace::probability,
            "options.method",
            "mean_of_thresholds or count_matched for " + std::string(to_string(options_.space)) + " thresholds (" +
                to_string(options.method) + " needs the probability space, whose values are the masses)",
            to_string(options.method));
    require(!mass_matched || (options.pruned_mass > 0 && options.pruned_mass < 1), "options.pruned_mass",
            "a probability mass in (0, 1)", options.pruned_mass);
    require((options_.count_summary && options_.summary_masses) ||
                options.denominator_terms != DenominatorTermSource::table_threshold,
            "options.denominator_terms",
            "row_threshold or none (table_threshold needs CalibratorOptions::count_summary and summary_masses "
            "on)",
            "table_threshold");
    const bool with_terms = options.denominator_terms != DenominatorTermSource::none;
    // Each entry's own (pooled) histogram: for its own θ, or for table-threshold terms under a layer's θ.
    const bool needs_histogram =
        count_matched || mass_matched || options.denominator_terms == DenominatorTermSource::table_threshold;
    if (report) *report = {};
    const Index heads = options_.shape.q_heads;
    std::vector<LayerThresholds> layers;
    std::vector<SampleCounts> samples;
    for (Index l = 0; l < options_.shape.layers; ++l) {
      const Index k = options_.k[std::size_t(l)];
      std::vector<Index> used_buckets;  // buckets where any head saw a row, increasing
      for (Index h = 0; h < heads; ++h) {
        const auto& cell = buckets_[cell_index(l, h)];
        for (std::size_t b = 0; b < cell.size(); ++b)
          if (cell[b].threshold.count > 0) used_buckets.push_back(Index(b));
      }
      std::sort(used_buckets.begin(), used_buckets.end());
      used_buckets.erase(std::unique(used_buckets.begin(), used_buckets.end()), used_buckets.end());
      if (used_buckets.empty()) {
        require(options.missing == MissingCalibration::keep_all, "layer " + std::to_string(l),
                "calibration rows longer than k = " + std::to_string(k) +
                    " (or TableOptions::missing = keep_all)", "none");
        layers.push_back(LayerThresholds::uniform(
            k, options_.space, std::vector<double>(std::size_t(heads), std::numeric_limits<double>::lowest()),
            with_terms ? std::vector<double>(std::size_t(heads), 0.0) : std::vector<double>{}));
        samples.push_back(SampleCounts::Zero(heads, 1));
        continue;
      }
      // budget_matched: the layer's one θ, from its histograms pooled over heads and buckets.
      std::optional<detail::ValueHistogram::Crossing> layer_crossing;
      if (budget_matched) layer_crossing = budget_crossing(l, k);
      const Index columns = Index(used_buckets.size());
      std::vector<Index> lengths;
      for (Index b : used_buckets) lengths.push_back(options_.buckets.representative(b));
      Eigen::MatrixXd theta(heads, columns), terms(with_terms ? heads : 0, with_terms ? columns : 0);
      SampleCounts counts = SampleCounts::Zero(heads, columns);
      for (Index h = 0; h < heads; ++h) {
        const auto& cell = buckets_[cell_index(l, h)];
        std::vector<Index> known;  // columns this head calibrated
        for (Index c = 0; c < columns; ++c) {
          const std::size_t b = std::size_t(used_buckets[std::size_t(c)]);
          if (b < cell.size() && cell[b].threshold.count > 0) known.push_back(c);
        }
        for (std::size_t i = 0; i < known.size(); ++i) {
          const Index c = known[i], bucket = used_buckets[std::size_t(c)];
          const Statistics& s = cell[std::size_t(bucket)];
          counts(h, c) = s.threshold.count;
          Entry entry{l, h, bucket, s, {}, s.threshold.count};
          if (needs_histogram) pool(entry, cell, known, used_buckets, i, options.min_pooled_rows);
          if (layer_crossing) {
            theta(h, c) = layer_crossing->value;
            if (!layer_crossing->inside_window) note_window_edge(entry, report);
          } else {
            theta(h, c) = entry_threshold(entry, k, options, report);
          }
          if (with_terms) terms(h, c) = entry_denominator_term(entry, theta(h, c), options, report);
        }
        if (known.empty()) {
          require(options.missing == MissingCalibration::keep_all,
                  "layer " + std::to_string(l) + " head " + std::to_string(h),
                  "calibration rows longer than k = " + std::to_string(k) + " (or TableOptions::missing = keep_all)",
                  "none");
          theta.row(h).setConstant(std::numeric_limits<double>::lowest());
          if (with_terms) terms.row(h).setZero();
          continue;
        }
        fill_from_known(theta, h, known, lengths);
        if (with_terms) fill_from_known(terms, h, known, lengths);
      }
      layers.emplace_back(k, options_.space, lengths, std::move(theta), std::move(terms));
      samples.push_back(std::move(counts));
    }
    return ThresholdTable(options_.shape, options_.space, options_.buckets, options.method,
                          from_histogram ? std::nullopt : std::optional<double>(options.sigma_add), std::move(layers),
                          std::move(samples));
  }

 private:
  friend class detail::CalibratorState;

  /// The statistics of one (layer, head, bucket).
  struct Statistics {
    detail::RunningMoments threshold, denominator;
    detail::ValueHistogram histogram;

    Statistics(const detail::HistogramGrid& grid, bool with_masses) : histogram(grid, with_masses) {}
    void merge(const Statistics& other) {
      threshold.merge(other.threshold);
      denominator.merge(other.denominator);
      histogram.merge(other.histogram);
    }
  };

  /// Buffers for one row: its scores, `exp(a - m)`, the selection's candidates, the partitions of
  /// `detail::rank_largest`, and the histogram's buffers.
  template <class T>
  struct RowScratch {
    std::vector<T> scores, selection, partitions;
    // Eigen storage, aligned: a vectorised exp into it then starts on a whole packet wherever the heap put it,
    // so that a row's weights and sum round the same in every process.
    Eigen::Array<T, Eigen::Dynamic, 1> weights;
    detail::ValueHistogram::Scratch<T> histogram;
  };
  template <class T>
  RowScratch<T>& scratch() {
    if constexpr (std::is_same_v<T, float>) return float_rows_;
    else return double_rows_;
  }

  /// Below `2^min_exponent` the histogram is linear: score-like values need absolute resolution near 0 (about
  /// 0.004 score units), probabilities relative resolution down to ~1e-19.
  static int default_min_exponent(ThresholdSpace space) {
    switch (space) {
      case ThresholdSpace::probability: return -64;
      case ThresholdSpace::score_over_query_norm: return -6;
      case ThresholdSpace::raw_score:
      case ThresholdSpace::score_minus_max: return -2;
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
    detail::require(length >= 1 && length <= LengthBuckets::max_length, "length", "a row length in [1, 2^50]",
                    length);
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

  /// The `rank`-th largest of the row's scores `a[0..n)`; the values at or above it are then among
  /// `scratch.selection[0..candidates)`. In long rows only the values at or above a floor are gathered
  /// (branch-free): a strided sample's value that about `4 · rank` of the row's values are expected to exceed,
  /// lowered if fewer than `rank` do. The result does not depend on the sample.
  template <class T>
  static T largest(RowScratch<T>& scratch, const T* a, Index n, Index rank, Index& candidates) {
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
        candidates = detail::gather_at_least(a, n, floor, out);
        if (candidates >= rank || sample_rank == sample_size) break;
      }
    }
    if (candidates < rank) {
      std::copy(a, a + n, out);
      candidates = n;
    }
    return detail::rank_largest(out, candidates, rank, scratch.partitions);
  }

  /// One row's statistics, computed in the row's own precision (float rows: float exp and sums, so that
  /// calibration stays cheaper than scoring), accumulated in double.
  template <class T>
  void accumulate(RowScratch<T>& scratch, const T* scores, std::size_t cell, Index layer, Index head, Index length,
                  double query_norm, Index k) {
    using Array = Eigen::Array<T, Eigen::Dynamic, 1>;
    const Eigen::Map<const Array> a(scores, length);
    if (!std::isfinite(a.sum())) {  // a vectorised test; the scan runs only for a NaN, an infinity or an overflow
      for (Index j = 0; j < length; ++j)
        if (!std::isfinite(a(j)))
          detail::fail("scores[" + std::to_string(j) + "] (layer " + std::to_string(layer) + ", head " +
                           std::to_string(head) + ")",
                       "finite scores", a(j));
    }
    const T max = a.maxCoeff();
    // The weights exp(a - m) are kept only when the histogram needs them (masses, probabilities).
    const bool keep_weights = options_.count_summary &&
                              (options_.summary_masses || options_.space == ThresholdSpace::probability);
    scratch.weights.resize(keep_weights ? length : 0);
    Eigen::Map<Array> w(scratch.weights.data(), keep_weights ? length : 0);
    T sum;
    if (keep_weights) {
      w = (a - max).exp();
      sum = w.sum();
    } else {
      sum = (a - max).exp().sum();
    }

    // Sample threshold, in score units first: the (k+1)-th largest score.
    Index candidates = 0;
    const T cut = largest(scratch, scores, length, k + 1, candidates);
    // C_i = Z_i - (mass of S_i); S_i = {a > cut} lies among the candidates, and when it is empty (the top k+1
    // scores tie) the max-score key is kept.
    const Eigen::Map<const Array> candidate(scratch.selection.data(), candidates);
    const double kept =
        cut == max ? 1.0 : double(((candidate - max).exp() * (candidate > cut).template cast<T>()).sum());
    const double pruned = std::max(0.0, double(sum) - kept);

    const T inverse_norm = options_.space == ThresholdSpace::score_over_query_norm ? T(1 / query_norm) : T(0);
    const T inverse_sum = T(1) / sum;
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
    s.denominator.add(pruned);
  }

  /// One table entry's statistics: the bucket's own, and for histogram-derived values the histogram pooled with
  /// neighbouring buckets (`TableOptions::min_pooled_rows`).
  struct Entry {
    Index layer, head, bucket;
    const Statistics& own;
    detail::ValueHistogram pooled;
    std::uint64_t pooled_rows;
  };

  /// Pools the histograms of `known[center]`'s bucket and of its nearest calibrated buckets of the same head, the
  /// same number on each side, until they hold `min_rows` rows or none is left.
  void pool(Entry& entry, const std::vector<Statistics>& cell, const std::vector<Index>& known,
            const std::vector<Index>& used_buckets, std::size_t center, std::uint64_t min_rows) const {
    entry.pooled = entry.own.histogram;
    for (std::size_t distance = 1; entry.pooled_rows < min_rows; ++distance) {
      bool added = false;
      for (const bool left : {true, false}) {
        if (left ? distance > center : center + distance >= known.size()) continue;
        const std::size_t index = left ? center - distance : center + distance;
        const Statistics& s = cell[std::size_t(used_buckets[std::size_t(known[index])])];
        entry.pooled.merge(s.histogram);
        entry.pooled_rows += s.threshold.count;
        added = true;
      }
      if (!added) break;
    }
  }

  double entry_threshold(const Entry& entry, Index k, const TableOptions& options, TableReport* report) const {
    if (options.method == CalibrationMethod::mean_of_thresholds)
      return entry.own.threshold.mean + options.sigma_add * entry.own.threshold.standard_deviation();
    const auto crossing =
        options.method == CalibrationMethod::mass_matched
            ? entry.pooled.value_with_sum_at_or_below(options.pruned_mass * double(entry.pooled_rows))
            : entry.pooled.value_with_count_above(double(k) * double(entry.pooled_rows));
    if (!crossing.inside_window) note_window_edge(entry, report);
    return crossing.value;
  }

  /// The value above which `k` values per row lie among every calibration row of `layer`, its heads' histograms
  /// of every bucket pooled.
  detail::ValueHistogram::Crossing budget_crossing(Index layer, Index k) const {
    detail::ValueHistogram pooled(grid_, options_.summary_masses);
    std::uint64_t rows = 0;
    for (Index h = 0; h < options_.shape.q_heads; ++h)
      for (const Statistics& s : buckets_[cell_index(layer, h)]) {
        pooled.merge(s.histogram);
        rows += s.threshold.count;
      }
    return pooled.value_with_count_above(double(k) * double(rows));
  }

  double entry_denominator_term(const Entry& entry, double theta, const TableOptions& options,
                                TableReport* report) const {
    if (options.denominator_terms == DenominatorTermSource::row_threshold) return entry.own.denominator.mean;
    const auto crossing = entry.pooled.mass_at_or_below(theta);
    if (!crossing.inside_window) note_window_edge(entry, report);
    return crossing.mass_below / double(entry.pooled_rows);
  }

  void note_window_edge(const Entry& entry, TableReport* report) const {
    if (!report) return;
    const TableReport::Entry noted{entry.layer, entry.head, options_.buckets.first_length(entry.bucket),
                                   options_.buckets.last_length(entry.bucket)};
    if (report->window_edge.empty() || report->window_edge.back() != noted) report->window_edge.push_back(noted);
  }

  /// Fills the columns of `values.row(head)` not in `known` from those in `known`: linear in the length between
  /// the nearest known columns, the nearest known value outside them.
  static void fill_from_known(Eigen::MatrixXd& values, Index head, const std::vector<Index>& known,
                              const std::vector<Index>& lengths) {
    std::size_t next = 0;  // first known column > c
    for (Index c = 0; c < values.cols(); ++c) {
      while (next < known.size() && known[next] <= c) ++next;
      if (next > 0 && known[next - 1] == c) continue;
      if (next == 0) {
        values(head, c) = values(head, known.front());
      } else if (next == known.size()) {
        values(head, c) = values(head, known.back());
      } else {
        const Index left = known[next - 1], right = known[next];
        const double weight = double(lengths[std::size_t(c)] - lengths[std::size_t(left)]) /
                              double(lengths[std::size_t(right)] - lengths[std::size_t(left)]);
        values(head, c) = (1 - weight) * values(head, left) + weight * values(head, right);
      }
    }
  }

  CalibratorOptions options_;
  detail::HistogramGrid grid_;
  std::vector<std::vector<Statistics>> buckets_;  ///< per (layer, head), per bucket
  std::uint64_t rows_offered_ = 0, rows_dense_ = 0, rows_used_ = 0;
  RowScratch<float> float_rows_;
  RowScratch<double> double_rows_;
};

}  // namespace toptheta
