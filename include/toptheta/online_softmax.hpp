// The online softmax of one row: running max and sums, rescaled when the max grows, and their merge over key
// ranges.
#pragma once

#include <toptheta/scalar_traits.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

namespace toptheta {

/// `exp(old_max - new_max)`: the factor that moves sums taken relative to `old_max` to `new_max >= old_max`.
/// 0 when nothing was summed yet (`old_max = -inf`).
template <class Acc>
Acc rescale_factor(Acc old_max, Acc new_max) {
  return old_max == -std::numeric_limits<Acc>::infinity() ? Acc(0) : std::exp(old_max - new_max);
}

/// Whether scores with max `max` (NaN when some score is NaN) have a softmax: no score is NaN or +inf, and
/// not every score is -inf. A row without one has no probabilities (`exp(a - m)` is NaN for some or every j).
template <class Acc>
bool has_softmax(Acc max) {
  return max > -std::numeric_limits<Acc>::infinity() && max < std::numeric_limits<Acc>::infinity();
}

/// Max and `Z = Σ exp(a_j - max)` of `count` scores: the row statistics a two-pass kernel computes first. The
/// max is NaN when some score is NaN, and the sum is then not computed (0).
template <class Acc>
struct RowStatistics {
  Acc max = -std::numeric_limits<Acc>::infinity();
  Acc sum = 0;

  static RowStatistics of(const Acc* scores, long count) {
    RowStatistics row;
    bool nan = false;
    for (long j = 0; j < count; ++j) {
      row.max = scores[j] > row.max ? scores[j] : row.max;
      nan = nan || scores[j] != scores[j];
    }
    if (nan) row.max = std::numeric_limits<Acc>::quiet_NaN();
    if (!has_softmax(row.max)) return row;
    for (long j = 0; j < count; ++j) row.sum += std::exp(scores[j] - row.max);
    return row;
  }
};

/// The row's online-softmax state (design.md §1, steps 4–5): its max and sums over the visible keys, and the kept
/// keys' mass. Kept weights are taken relative to the kept max `m_S` (equal to `m_i` unless a cap dropped the
/// row's max), so that no choice of kept set can underflow every kept weight.
template <class Acc>
struct RowMass {
  Acc max = -std::numeric_limits<Acc>::infinity();       ///< m_i over the visible keys
  Acc kept_max = -std::numeric_limits<Acc>::infinity();  ///< m_S over the kept keys
  Acc kept_mass = 0;    ///< `Σ_{j∈S_i} exp(a_ij - m_S)`: D_i in units of exp(m_S - m_i)
  Acc pruned_mass = 0;  ///< `Σ_{j∉S_i} exp(a_ij - m_i)`, tracked only for exact compensation
  Acc total_mass = 0;   ///< `Z_i = Σ_j exp(a_ij - m_i)`, known to two-pass kernels
  Index kept = 0;       ///< `|S_i|`
  Index length = 0;     ///< `L_i`

  /// Over all visible keys: moves the pruned mass and the row sum to a larger row max.
  void raise_max(Acc candidate) {
    if (candidate <= max) return;
    const Acc factor = rescale_factor(max, candidate);
    pruned_mass *= factor;
    total_mass *= factor;
    max = candidate;
  }

  /// Over the kept keys: moves the kept mass to a larger kept max and returns the factor that the row's
  /// accumulated output must be multiplied by (1 when the kept max stays).
  Acc raise_kept_max(Acc candidate) {
    if (candidate <= kept_max) return Acc(1);
    const Acc factor = rescale_factor(kept_max, candidate);
    kept_mass *= factor;
    kept_max = candidate;
    return factor;
  }

  /// Joins this row's masses with the same row's over another key range (the online-softmax merge of split
  /// keys). Returns the factors by which this range's and the other range's kept numerators must be multiplied
  /// before they are added.
  std::pair<Acc, Acc> merge(const RowMass& other) {
    const Acc joined_max = std::max(max, other.max);
    const Acc own_sums = rescale_factor(max, joined_max), their_sums = rescale_factor(other.max, joined_max);
    pruned_mass = pruned_mass * own_sums + other.pruned_mass * their_sums;
    total_mass = total_mass * own_sums + other.total_mass * their_sums;
    max = joined_max;
    const Acc joined_kept_max = std::max(kept_max, other.kept_max);
    const Acc own = rescale_factor(kept_max, joined_kept_max), theirs = rescale_factor(other.kept_max, joined_kept_max);
    kept_mass = kept_mass * own + other.kept_mass * theirs;
    kept_max = joined_kept_max;
    kept += other.kept;
    return {own, theirs};
  }
};

}  // namespace toptheta
