// What a calibration collects and how its table is built: the options of `Calibrator` and `Calibrator::table`.
#pragma once

#include <toptheta/detail/enum_names.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/length_buckets.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/threshold_space.hpp>
#include <toptheta/threshold_table.hpp>

#include <cstdint>
#include <optional>
#include <string>
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

namespace detail {
inline constexpr EnumName<DenominatorTermSource> denominator_term_source_names[] = {
    {DenominatorTermSource::row_threshold, "row_threshold"},
    {DenominatorTermSource::table_threshold, "table_threshold"},
    {DenominatorTermSource::none, "none"},
};
}  // namespace detail

inline const char* to_string(DenominatorTermSource value) {
  return detail::name_of(value, detail::denominator_term_source_names);
}

/// Parses the names printed by `to_string`; throws naming `argument` for any other text.
inline DenominatorTermSource denominator_term_source_from_string(const std::string& name,
                                                                 const std::string& argument = "denominator_terms") {
  return detail::value_named(name, detail::denominator_term_source_names, argument);
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

}  // namespace toptheta
