// The thresholded softmax as a primitive: rows of scores in, sparse probabilities and statistics out.
#pragma once

#include <toptheta/compensation.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/detail/row_survivors.hpp>
#include <toptheta/detail/threshold_scan.hpp>
#include <toptheta/online_softmax.hpp>
#include <toptheta/selection.hpp>
#include <toptheta/stats.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace toptheta {

/// Sparse probabilities of score rows, in compressed-row form.
template <class Acc>
struct SparseProbabilities {
  std::vector<Index> row_offsets{0};  ///< row r's entries are [row_offsets[r], row_offsets[r + 1])
  std::vector<Index> columns;         ///< kept positions j, increasing within a row
  std::vector<Acc> probabilities;     ///< p_ij of the kept positions
  std::vector<Acc> dropped_mass;      ///< per row `1 - Σ_j p_ij`: the weight V-mean compensation gives vbar(L_i)
};

/// Where the score rows come from, for threshold lookups and the score_over_query_norm space.
struct ScoreRows {
  Index query_head = 0;
  /// Visible length L_r of each row (its first L_r scores); empty: every row sees all columns.
  std::vector<Index> lengths;
  /// ||q_r|| of each row; required by the score_over_query_norm space.
  std::vector<double> query_norms;
};

/// Applies `selection` (dense, Top-θ or top-k) and its compensation to each row of `scores` (already scaled,
/// `a_ij`) and returns `p_ij` of the kept elements: design.md §1 steps 1–5 without the V product. A row
/// without a softmax (a NaN or +inf score, or every score -inf) lists every visible column with probability
/// NaN and a NaN dropped mass, and counts in `AttentionStats::non_finite_rows`.
/// \param stats if given, sized for one query head and one KV head, and filled with the row counters.
template <class Derived, class Selection>
SparseProbabilities<typename Derived::Scalar> thresholded_softmax(const Eigen::MatrixBase<Derived>& scores,
                                                                  const Selection& selection,
                                                                  const ScoreRows& rows = {},
                                                                  AttentionStats* stats = nullptr) {
  using Acc = typename Derived::Scalar;
  static_assert(std::is_same_v<Acc, float> || std::is_same_v<Acc, double>, "scores are float or double");
  const Index row_count = scores.rows();
  detail::require(rows.lengths.empty() || Index(rows.lengths.size()) == row_count, "rows.lengths",
                  "empty or one length per score row (" + std::to_string(row_count) + ")", rows.lengths.size());
  detail::require(rows.query_norms.empty() || Index(rows.query_norms.size()) == row_count, "rows.query_norms",
                  "empty or one norm per score row (" + std::to_string(row_count) + ")", rows.query_norms.size());
  if constexpr (std::is_same_v<Selection, TopThetaSelection>)
    detail::require(
        selection.thresholds().space() != ThresholdSpace::score_over_query_norm || !rows.query_norms.empty(),
        "rows.query_norms", "one norm per row for the score_over_query_norm space", "none");
  selection.require_query_head(rows.query_head, "rows.query_head");
  const bool track_pruned_mass =
      !selection.post_softmax() && selection.compensation().denominator == DenominatorCompensation::exact;
  if (stats) stats->reset(1, 1);

  SparseProbabilities<Acc> result;
  std::vector<Acc> row_scores, scratch, weights, kept_scores;
  std::vector<std::int32_t> columns;
  std::vector<Index> kept;  // kept positions, decreasing
  for (Index r = 0; r < row_count; ++r) {
    const Index length = rows.lengths.empty() ? scores.cols() : rows.lengths[std::size_t(r)];
    detail::require(length >= 1 && length <= scores.cols(), "rows.lengths[" + std::to_string(r) + "]",
                    "a length in [1, " + std::to_string(scores.cols()) + "]", length);
    row_scores.resize(std::size_t(length));
    for (Index j = 0; j < length; ++j) row_scores[std::size_t(j)] = scores(r, j);

    const auto statistics = RowStatistics<Acc>::of(row_scores.data(), length);
    if (!has_softmax(statistics.max)) {  // a NaN or +inf score, or every score -inf: every p_ij is NaN
      for (Index j = 0; j < length; ++j) {
        result.columns.push_back(j);
        result.probabilities.push_back(std::numeric_limits<Acc>::quiet_NaN());
      }
      result.row_offsets.push_back(Index(result.columns.size()));
      result.dropped_mass.push_back(std::numeric_limits<Acc>::quiet_NaN());
      if (stats) {
        stats->elements_visible[0] += std::uint64_t(length);
        ++stats->rows;
        ++stats->non_finite_rows;
      }
      continue;
    }
    const Acc norm = rows.query_norms.empty() ? Acc(0) : Acc(rows.query_norms[std::size_t(r)]);
    RowState<Acc> row;
    row.mass.max = statistics.max;
    row.mass.total_mass = statistics.sum;
    row.mass.length = length;
    row.selection = selection.select(
        RowFacts<Acc>{rows.query_head, length, norm, statistics.max, statistics.sum, row_scores.data()}, scratch);
    // The kernel's per-row step over the whole row: survivors (offsets increasing, or decreasing under a tie
    // rule or a cap), the row's max-score key and, for exact compensation, the pruned mass.
    columns.resize(std::size_t(length + detail::scan_slack));
    kept_scores.resize(std::size_t(length + detail::scan_slack));
    const detail::Survivors<Acc> survivors = detail::select_survivors<Acc>(
        row, row_scores.data(), length, 0, track_pruned_mass, columns.data(), kept_scores.data());
    if (survivors.count > 0) row.raise_kept_max(survivors.max);
    kept.clear();
    const bool increasing = row.selection.threshold_only();
    for (Index t = 0; t < survivors.count; ++t)
      kept.push_back(columns[std::size_t(increasing ? survivors.count - 1 - t : t)]);  // decreasing positions
    const bool filled_empty_row = row.keep_best_if_empty();
    if (filled_empty_row) kept.push_back(row.best_position);
    weights.clear();
    row.mass.kept_mass = 0;
    for (Index j : kept) {
      weights.push_back(std::exp(row_scores[std::size_t(j)] - row.mass.kept_max));
      row.mass.kept_mass += weights.back();
    }
    const Acc denominator = softmax_denominator(row.mass, selection.compensation(), selection.post_softmax(),
                                                row.selection.pruned_bound, row.selection.calibrated_term);
    for (std::size_t t = kept.size(); t-- > 0;) {
      result.columns.push_back(kept[t]);
      result.probabilities.push_back(weights[t] / denominator);
    }
    result.row_offsets.push_back(Index(result.columns.size()));
    result.dropped_mass.push_back(v_mean_weight(row.mass, denominator));

    if (!stats) continue;
    stats->elements_kept[0] += std::uint64_t(row.mass.kept);
    stats->elements_visible[0] += std::uint64_t(length);
    ++stats->rows;
    stats->dense_rows += row.selection.dense;
    stats->empty_rows += filled_empty_row;
    stats->capped_rows += row.capped;
    stats->extrapolated_rows += row.selection.extrapolated;
  }
  return result;
}

}  // namespace toptheta
