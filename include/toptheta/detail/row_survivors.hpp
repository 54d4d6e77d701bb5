// The survivors of one row among a run of its scores (design.md §1, steps 1–2 on the elements, and the row max
// and max-score key step 3 needs): what the tiled kernel does per row and tile, and `thresholded_softmax` once
// per row.
#pragma once

#include <toptheta/detail/threshold_scan.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/selection.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace toptheta::detail {

/// Remembers the max-score key among `scores[0..count)` (at positions `first + c`, whose max is `scores_max`)
/// and moves the row's sums to a larger row max (online softmax). A NaN or +inf `scores_max` marks the row as
/// having no softmax; a NaN leaves its max where it was. Runs of a row come in decreasing position, so ties go
/// to the larger position.
template <class Acc>
void track_max_score_key(RowState<Acc>& row, const Acc* scores, Index count, Index first, Acc scores_max) {
  row.note_scores_max(scores_max);
  if (scores_max != scores_max) return;
  if (scores_max > row.best_score) {  // strict: an earlier run (larger positions) keeps a tie
    row.best_score = scores_max;
    row.best_position = first + last_position_of(scores, count, scores_max);
  }
  row.raise_max(scores_max);
}

/// How many of a run's scores survive, and the largest of them (-inf when none does).
template <class Acc>
struct Survivors {
  Index count = 0;
  Acc max = -std::numeric_limits<Acc>::infinity();
};

/// Tests `scores[0..count)` (positions `first + c`) against the row's rule: counts the survivors in
/// `row.mass.kept` and writes their offsets `c` to `columns` and their scores to `kept` (room for
/// `count + scan_slack` each), tracks the row's max and max-score key, and with `track_pruned_mass` adds
/// `exp(a - m_i)` of each pruned score to `row.mass.pruned_mass` (exact compensation). When `a > τ` alone decides
/// (`threshold_only`), one vectorised scan finds the survivors (offsets increasing); otherwise the scores are
/// taken in decreasing position (offsets decreasing), so that a cap keeps the largest positions.
template <class Acc>
Survivors<Acc> select_survivors(RowState<Acc>& row, const Acc* scores, Index count, Index first, bool track_pruned_mass,
                                std::int32_t* columns, Acc* kept) {
  using Array = Eigen::Array<Acc, Eigen::Dynamic, 1>;
  const Eigen::Map<const Array> run(scores, count);
  Survivors<Acc> survivors;
  if (row.selection.threshold_only()) {
    const Acc threshold = row.selection.score_threshold;
    Acc run_max = 0;
    survivors.count = scan_above(scores, count, threshold, columns, kept, run_max);
    track_max_score_key(row, scores, count, first, run_max);
    if (track_pruned_mass) row.mass.pruned_mass += (run <= threshold).select((run - row.mass.max).exp(), 0).sum();
    row.mass.kept += survivors.count;
    if (survivors.count > 0) survivors.max = run_max;  // the run's max survives whenever anything does
    return survivors;
  }
  track_max_score_key(row, scores, count, first, max_of(scores, count));
  for (Index c = count - 1; c >= 0; --c) {
    const Acc a = scores[c];
    if (row.admit(a, first + c)) {
      columns[survivors.count] = std::int32_t(c);
      kept[survivors.count++] = a;
      survivors.max = std::max(survivors.max, a);
    } else if (track_pruned_mass) {
      row.mass.pruned_mass += std::exp(a - row.mass.max);
    }
  }
  return survivors;
}

}  // namespace toptheta::detail
