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

/// Max and `Z = Σ exp(a_j - max)` of `count` scores: the row statistics a two-pass kernel computes first.
template <class Acc>
struct RowStatistics {
  Acc max = -std::numeric_limits<Acc>::infinity();
  Acc sum = 0;

  static RowStatistics of(const Acc* scores, long count) {
    RowStatistics row;
    for (long j = 0; j < count; ++j) row.max = scores[j] > row.max ? scores[j] : row.max;
    for (long j = 0; j < count; ++j) row.sum += std::exp(scores[j] - row.max);
    return row;
  }
};

}  // namespace toptheta
