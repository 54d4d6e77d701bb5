// What a calibration collects per (layer, query head, length bucket): streamed, mergeable statistics.
#pragma once

#include <toptheta/detail/running_moments.hpp>
#include <toptheta/detail/value_histogram.hpp>

namespace toptheta::detail {

/// The statistics of one (layer, head, bucket): the moments of the sample thresholds `t_i` and of the
/// denominator terms `C_i`, and the histogram of every value of its rows (empty without a count summary).
struct CalibrationBucket {
  RunningMoments threshold, denominator;
  ValueHistogram histogram;

  CalibrationBucket(const HistogramGrid& grid, bool with_masses) : histogram(grid, with_masses) {}
  void merge(const CalibrationBucket& other) {
    threshold.merge(other.threshold);
    denominator.merge(other.denominator);
    histogram.merge(other.histogram);
  }
};

}  // namespace toptheta::detail
