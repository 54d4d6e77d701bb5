// Running row max and sums of the online softmax, rescaled when the max grows.
#pragma once

#include <cmath>
#include <limits>

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

}  // namespace toptheta
