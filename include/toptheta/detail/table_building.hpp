// Turning a calibration's statistics into a `ThresholdTable` (the body of `Calibrator::table`).
#pragma once

#include <toptheta/calibrator_options.hpp>
#include <toptheta/detail/calibration_bucket.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/detail/value_histogram.hpp>
#include <toptheta/threshold_table.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace toptheta::detail {

/// Builds the table of a calibration's buckets (`cells[layer * q_heads + head][bucket]`) as
/// `Calibrator::table` documents: per entry θ by the table's method, c by its denominator-term source, the
/// buckets a head did not calibrate filled from those it did.
class TableBuilder {
 public:
  TableBuilder(const CalibratorOptions& calibration, const HistogramGrid& grid,
               const std::vector<std::vector<CalibrationBucket>>& cells)
      : calibration_(calibration), grid_(grid), cells_(cells) {}

  ThresholdTable build(const TableOptions& options, TableReport* report) const {
    const bool count_matched = options.method == CalibrationMethod::count_matched;
    const bool mass_matched = options.method == CalibrationMethod::mass_matched;
    const bool budget_matched = options.method == CalibrationMethod::budget_matched;
    const bool from_histogram = count_matched || mass_matched || budget_matched;  // θ from the value histogram
    require(std::isfinite(options.sigma_add), "options.sigma_add", "a finite value", options.sigma_add);
    require(!from_histogram || options.sigma_add == 0, "options.sigma_add",
            std::string("0 for ") + to_string(options.method) + " (σ_add applies to mean_of_thresholds)",
            options.sigma_add);
    require(calibration_.count_summary || !from_histogram, "options.method",
            std::string("mean_of_thresholds (") + to_string(options.method) +
                " needs CalibratorOptions::count_summary, which is off)",
            to_string(options.method));
    require(!needs_probability_space(options.method) || calibration_.space == ThresholdSpace::probability,
            "options.method",
            "mean_of_thresholds or count_matched for " + std::string(to_string(calibration_.space)) + " thresholds (" +
                to_string(options.method) + " needs the probability space, whose values are the masses)",
            to_string(options.method));
    require(!mass_matched || (options.pruned_mass > 0 && options.pruned_mass < 1), "options.pruned_mass",
            "a probability mass in (0, 1)", options.pruned_mass);
    require((calibration_.count_summary && calibration_.summary_masses) ||
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
    const Index heads = calibration_.shape.q_heads;
    std::vector<LayerThresholds> layers;
    std::vector<SampleCounts> samples;
    for (Index l = 0; l < calibration_.shape.layers; ++l) {
      const Index k = calibration_.k[std::size_t(l)];
      std::vector<Index> used_buckets;  // buckets where any head saw a row, increasing
      for (Index h = 0; h < heads; ++h) {
        const auto& cell = cells_[cell_index(l, h)];
        for (std::size_t b = 0; b < cell.size(); ++b)
          if (cell[b].threshold.count > 0) used_buckets.push_back(Index(b));
      }
      std::sort(used_buckets.begin(), used_buckets.end());
      used_buckets.erase(std::unique(used_buckets.begin(), used_buckets.end()), used_buckets.end());
      if (used_buckets.empty()) {
        require(options.missing == MissingCalibration::keep_all, "layer " + std::to_string(l),
                "calibration rows longer than k = " + std::to_string(k) + " (or TableOptions::missing = keep_all)",
                "none");
        layers.push_back(LayerThresholds::uniform(
            k, calibration_.space, std::vector<double>(std::size_t(heads), std::numeric_limits<double>::lowest()),
            with_terms ? std::vector<double>(std::size_t(heads), 0.0) : std::vector<double>{}));
        samples.push_back(SampleCounts::Zero(heads, 1));
        continue;
      }
      // budget_matched: the layer's one θ, from its histograms pooled over heads and buckets.
      std::optional<ValueHistogram::Crossing> layer_crossing;
      if (budget_matched) layer_crossing = budget_crossing(l, k);
      const Index columns = Index(used_buckets.size());
      std::vector<Index> lengths;
      for (Index b : used_buckets) lengths.push_back(calibration_.buckets.representative(b));
      Eigen::MatrixXd theta(heads, columns), terms(with_terms ? heads : 0, with_terms ? columns : 0);
      SampleCounts counts = SampleCounts::Zero(heads, columns);
      for (Index h = 0; h < heads; ++h) {
        const auto& cell = cells_[cell_index(l, h)];
        std::vector<Index> known;  // columns this head calibrated
        for (Index c = 0; c < columns; ++c) {
          const std::size_t b = std::size_t(used_buckets[std::size_t(c)]);
          if (b < cell.size() && cell[b].threshold.count > 0) known.push_back(c);
        }
        for (std::size_t i = 0; i < known.size(); ++i) {
          const Index c = known[i], bucket = used_buckets[std::size_t(c)];
          const CalibrationBucket& s = cell[std::size_t(bucket)];
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
      layers.emplace_back(k, calibration_.space, lengths, std::move(theta), std::move(terms));
      samples.push_back(std::move(counts));
    }
    return ThresholdTable(calibration_.shape, calibration_.space, calibration_.buckets, options.method,
                          from_histogram ? std::nullopt : std::optional<double>(options.sigma_add), std::move(layers),
                          std::move(samples));
  }

 private:
  /// One table entry's statistics: the bucket's own, and for histogram-derived values the histogram pooled with
  /// neighbouring buckets (`TableOptions::min_pooled_rows`).
  struct Entry {
    Index layer, head, bucket;
    const CalibrationBucket& own;
    ValueHistogram pooled;
    std::uint64_t pooled_rows;
  };

  std::size_t cell_index(Index layer, Index head) const {
    return std::size_t(layer * calibration_.shape.q_heads + head);
  }

  /// Pools the histograms of `known[center]`'s bucket and of its nearest calibrated buckets of the same head, the
  /// same number on each side, until they hold `min_rows` rows or none is left.
  static void pool(Entry& entry, const std::vector<CalibrationBucket>& cell, const std::vector<Index>& known,
                   const std::vector<Index>& used_buckets, std::size_t center, std::uint64_t min_rows) {
    entry.pooled = entry.own.histogram;
    for (std::size_t distance = 1; entry.pooled_rows < min_rows; ++distance) {
      bool added = false;
      for (const bool left : {true, false}) {
        if (left ? distance > center : center + distance >= known.size()) continue;
        const std::size_t index = left ? center - distance : center + distance;
        const CalibrationBucket& s = cell[std::size_t(used_buckets[std::size_t(known[index])])];
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
    const auto crossing = options.method == CalibrationMethod::mass_matched
                              ? entry.pooled.value_with_sum_at_or_below(options.pruned_mass * double(entry.pooled_rows))
                              : entry.pooled.value_with_count_above(double(k) * double(entry.pooled_rows));
    if (!crossing.inside_window) note_window_edge(entry, report);
    return crossing.value;
  }

  /// The value above which `k` values per row lie among every calibration row of `layer`, its heads' histograms
  /// of every bucket pooled.
  ValueHistogram::Crossing budget_crossing(Index layer, Index k) const {
    ValueHistogram pooled(grid_, calibration_.summary_masses);
    std::uint64_t rows = 0;
    for (Index h = 0; h < calibration_.shape.q_heads; ++h)
      for (const CalibrationBucket& s : cells_[cell_index(layer, h)]) {
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
    const TableReport::Entry noted{entry.layer, entry.head, calibration_.buckets.first_length(entry.bucket),
                                   calibration_.buckets.last_length(entry.bucket)};
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

  const CalibratorOptions& calibration_;
  const HistogramGrid& grid_;
  const std::vector<std::vector<CalibrationBucket>>& cells_;
};

}  // namespace toptheta::detail
