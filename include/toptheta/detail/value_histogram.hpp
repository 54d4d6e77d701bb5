// A mergeable, bounded, deterministic histogram of values on a log-linear grid: the summary behind count-matched
// thresholds.
#pragma once

#include <toptheta/detail/histogram_grid.hpp>
#include <toptheta/detail/identity.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/scalar_traits.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace toptheta::detail {

/// Counts and masses of values on a log-linear grid, kept for the window below the largest value.
///
/// Optionally each value `v` comes with a mass `w` (for calibration `exp(a - m_i)`, the value's softmax weight
/// relative to its row max), summed per bin. Memory: 8 bytes per bin over the observed key range (16 with
/// masses), at most `16 · window_bins()` bytes.
/// The state after any sequence of `add` and `merge` calls depends only on the multiset of values (counts
/// exactly; masses up to the rounding of their sums), not on the order or the split: a bin holds exactly the
/// values of its key at or above the final window, the underflow cell all others.
class ValueHistogram {
 public:
  ValueHistogram() = default;
  /// \param with_masses sum each value's mass per bin (`add` then needs masses; `mass_at_or_below` works).
  explicit ValueHistogram(const HistogramGrid& grid, bool with_masses = true)
      : grid_(grid), with_masses_(with_masses) {}

  const HistogramGrid& grid() const { return grid_; }
  bool with_masses() const { return with_masses_; }
  std::uint64_t total_count() const { return total_; }
  std::size_t memory_bytes() const {
    return counts_.capacity() * sizeof(std::uint64_t) + masses_.capacity() * sizeof(double);
  }

  /// Buffers of `add`, reused across calls.
  template <class T>
  struct Scratch {
    std::vector<std::int32_t> keys;
    std::vector<std::uint32_t> counts;  ///< two partial histograms of one call, all zero between calls
    std::vector<T> masses;              ///< their masses, all zero between calls
  };

  /// Adds the values `value_of(inputs[j])` with masses `masses[j]` (ignored, and may be null, without
  /// `with_masses()`), `j < count` (`T` float or double, values finite); `max_value` is the largest value. Three
  /// passes: the keys (vectorised for float; `value_of` is applied in the same pass) and their range; the counts
  /// (and masses) into two partial histograms of the call's key range, masses in `T` (alternate values go to
  /// alternate partials, so repeated keys do not wait on each other); the partials into the bins.
  template <class T, class ValueOf = Identity>
  void add(const T* inputs, T max_value, const T* masses, Index count, Scratch<T>& scratch,
           const ValueOf& value_of = {}) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "values are float or double");
    if (count <= 0) return;
    const HistogramKeys key_of(grid_);
    scratch.keys.resize(std::size_t(count));
    std::int32_t* keys = scratch.keys.data();
    std::int32_t min_key = std::numeric_limits<std::int32_t>::max();
    std::int32_t max_key = std::numeric_limits<std::int32_t>::min();
    const auto key_all = [&](auto key) {  // one vectorisable pass: the keys and their range, in locals
      std::int32_t low = min_key, high = max_key;
      for (Index j = 0; j < count; ++j) {
        const std::int32_t k = key(value_of(inputs[j]));
        keys[j] = k;
        low = std::min(low, k);
        high = std::max(high, k);
      }
      min_key = low;
      max_key = high;
    };
    if constexpr (std::is_same_v<T, float>) {
      if (HistogramKeys::float_exact(grid_))
        key_all([&](float v) { return key_of(v); });
      else
        key_all([&](float v) { return std::int32_t(key_of(double(v))); });
    } else {
      key_all([&](double v) { return std::int32_t(key_of(v)); });
    }
    make_room(min_key, max_key, double(max_value));

    // Slot 0 gathers the keys below the window, slot s >= 1 key `first + s - 1`.
    const std::int32_t first = std::int32_t(std::max<std::int64_t>(min_key, low_));
    const Index slots = Index(max_key - first) + 2;
    if (with_masses_) {
      add_to_slots<true>(keys, masses, count, first, slots, scratch);
    } else if (min_key >= low_) {  // every key has its bin: count in place
      std::uint64_t* const bin_of_key = counts_.data() - low_;
      for (Index j = 0; j < count; ++j) ++bin_of_key[keys[j]];
    } else {
      add_to_slots<false>(keys, masses, count, first, slots, scratch);
    }
    total_ += std::uint64_t(count);
  }

  void merge(const ValueHistogram& other) {
    require(grid_ == other.grid_ && with_masses_ == other.with_masses_, "other",
            "a histogram on the same grid, with masses alike", "a different grid or mass setting");
    if (other.total_ == 0) return;
    underflow_count_ += other.underflow_count_;
    underflow_mass_ += other.underflow_mass_;
    total_ += other.total_;
    if (other.counts_.empty()) return;
    make_room(other.low_, other.high(), other.max_value_);
    for (std::size_t b = 0; b < other.counts_.size(); ++b) {
      const std::int64_t bin = other.low_ + std::int64_t(b) - low_;
      const double mass = with_masses_ ? other.masses_[b] : 0.0;
      if (bin >= 0) {
        counts_[std::size_t(bin)] += other.counts_[b];
        if (with_masses_) masses_[std::size_t(bin)] += mass;
      } else {
        underflow_count_ += other.counts_[b];
        underflow_mass_ += mass;
      }
    }
  }

  /// The value above which `target` of the values lie, and the mass of the values at or below it.
  struct Crossing {
    double value = 0;
    double mass_below = 0;
    bool inside_window = false;  ///< false: the crossing lies in the underflow cell and is not resolved
  };

  /// The value θ with `target` values above it, interpolating linearly inside the bin that holds it (values
  /// spread evenly over the bin); the top bin ends at the largest value seen. With fewer than `target` values in
  /// the window, its lower edge (`inside_window` false).
  Crossing value_with_count_above(double target) const {
    double above = 0, mass_above_bin = 0;
    for (std::size_t b = counts_.size(); b-- > 0;) {
      const double count = double(counts_[b]);
      if (count > 0 && above + count >= target) {
        const double fraction_above = (target - above) / count;
        const std::int64_t key = low_ + std::int64_t(b);
        const HistogramKeys keys(grid_);
        const double lower = keys.lower(key), upper = std::min(keys.upper(key), max_value_);
        Crossing crossing;
        crossing.value = upper - fraction_above * (upper - std::max(lower, -std::numeric_limits<double>::max()));
        crossing.mass_below = total_mass() - mass_above_bin - fraction_above * mass(b);
        crossing.inside_window = true;
        return crossing;
      }
      above += count;
      mass_above_bin += mass(b);
    }
    Crossing edge;  // fewer than `target` values in the window: its lower edge, every value in it above
    edge.value = counts_.empty() ? max_value_ : HistogramKeys(grid_).lower(low_);
    edge.mass_below = underflow_mass_;
    return edge;
  }

  /// The value θ at which the values at or below θ sum to `target` (values >= 0, such as probabilities), with
  /// the values of each bin spread evenly over it (their sum then grows as `(x² - lower²) / 2` per unit of
  /// count density up to x, solved exactly); the top bin ends at the largest value seen. The values under the
  /// window count as half its lower edge each. A target at or above the sum of every value gives the largest
  /// value; one reached under the window gives the window's lower edge (`inside_window` false).
  Crossing value_with_sum_at_or_below(double target) const {
    Crossing crossing;
    const HistogramKeys keys(grid_);
    const double window_low = counts_.empty() ? max_value_ : keys.lower(low_);
    double below = double(underflow_count_) * window_low / 2;
    if (below >= target) {
      crossing.value = window_low;
      return crossing;
    }
    crossing.inside_window = true;
    for (std::size_t b = 0; b < counts_.size(); ++b) {
      const double count = double(counts_[b]);
      if (count == 0) continue;
      const std::int64_t key = low_ + std::int64_t(b);
      const double lower = keys.lower(key), upper = std::min(keys.upper(key), max_value_);
      const double bin_sum = count * (lower + upper) / 2;
      if (below + bin_sum >= target) {
        // count (x² - lower²) / (2 (upper - lower)) = target - below
        const double x = std::sqrt(lower * lower + 2 * (upper - lower) * (target - below) / count);
        crossing.value = std::clamp(x, lower, upper);
        return crossing;
      }
      below += bin_sum;
    }
    crossing.value = max_value_;
    return crossing;
  }

  /// Mass of the values at or below `theta`, interpolating inside its bin; `inside_window` false when `theta`
  /// lies below the window (the underflow cell's mass cannot be split; its whole mass is returned). Requires
  /// `with_masses()`.
  Crossing mass_at_or_below(double theta) const {
    require(with_masses_, "histogram", "a histogram with masses", "one without");
    Crossing crossing;
    crossing.value = theta;
    if (counts_.empty() || theta >= max_value_) {
      crossing.mass_below = total_mass();
      crossing.inside_window = true;
      return crossing;
    }
    const HistogramKeys keys(grid_);
    const std::int64_t key = keys(theta);
    if (key < low_) {  // below the window: at most the underflow cell's mass
      crossing.inside_window = underflow_count_ == 0;
      crossing.mass_below = underflow_mass_;
      return crossing;
    }
    double below = underflow_mass_;
    for (std::int64_t k = low_; k < key; ++k) below += masses_[std::size_t(k - low_)];
    const double lower = keys.lower(key), upper = std::min(keys.upper(key), max_value_);
    const double fraction = upper > lower ? std::clamp((theta - lower) / (upper - lower), 0.0, 1.0) : 1.0;
    crossing.mass_below = below + fraction * masses_[std::size_t(key - low_)];
    crossing.inside_window = true;
    return crossing;
  }

 private:
  friend class CalibratorState;  // calibrator_state.hpp

  std::int64_t high() const { return low_ + std::int64_t(counts_.size()) - 1; }
  double mass(std::size_t bin) const { return with_masses_ ? masses_[bin] : 0.0; }

  /// The counting pass of `add`: alternate values into two partial histograms of `slots` slots (slot 0: keys
  /// below the window, slot s: key `first + s - 1`), then the partials into the bins and the underflow cell.
  template <bool WithMasses, class T>
  void add_to_slots(const std::int32_t* keys, const T* masses, Index count, std::int32_t first, Index slots,
                    Scratch<T>& scratch) {
    if (scratch.counts.size() < std::size_t(2 * slots)) scratch.counts.assign(std::size_t(2 * slots), 0);
    std::uint32_t *const counts0 = scratch.counts.data(), *const counts1 = counts0 + slots;
    T *masses0 = nullptr, *masses1 = nullptr;
    if constexpr (WithMasses) {
      if (scratch.masses.size() < std::size_t(2 * slots)) scratch.masses.assign(std::size_t(2 * slots), T(0));
      masses0 = scratch.masses.data();
      masses1 = masses0 + slots;
    }
    const std::int32_t below_first = first - 1;
    const auto slot_of = [below_first](std::int32_t key) { return std::max(key - below_first, 0); };
    Index j = 0;
    for (; j + 2 <= count; j += 2) {
      const std::int32_t slot0 = slot_of(keys[j]), slot1 = slot_of(keys[j + 1]);
      ++counts0[slot0];
      ++counts1[slot1];
      if constexpr (WithMasses) {
        masses0[slot0] += masses[j];
        masses1[slot1] += masses[j + 1];
      }
    }
    if (j < count) {
      ++counts0[slot_of(keys[j])];
      if constexpr (WithMasses) masses0[slot_of(keys[j])] += masses[j];
    }
    // Into the bins, zeroing the partials for the next call.
    underflow_count_ += std::uint64_t(counts0[0]) + counts1[0];
    counts0[0] = counts1[0] = 0;
    std::uint64_t* const bin_counts = counts_.data() + (first - low_) - 1;  // bin_counts[s]: slot s's bin
    for (Index slot = 1; slot < slots; ++slot) {
      bin_counts[slot] += std::uint64_t(counts0[slot]) + counts1[slot];
      counts0[slot] = counts1[slot] = 0;
    }
    if constexpr (WithMasses) {
      underflow_mass_ += double(masses0[0]) + double(masses1[0]);
      masses0[0] = masses1[0] = T(0);
      double* const bin_masses = masses_.data() + (first - low_) - 1;
      for (Index slot = 1; slot < slots; ++slot) {
        bin_masses[slot] += double(masses0[slot]) + double(masses1[slot]);
        masses0[slot] = masses1[slot] = T(0);
      }
    }
  }

  double total_mass() const {
    double mass = underflow_mass_;
    for (double m : masses_) mass += m;
    return mass;
  }

  /// Extends the kept bins to `[min_key, max_key]`, then drops (into the underflow cell) those below the window
  /// under the largest key.
  void make_room(std::int64_t min_key, std::int64_t max_key, double max_value) {
    max_value_ = std::max(max_value_, max_value);
    const bool empty = counts_.empty();
    const std::int64_t new_high = empty ? max_key : std::max(high(), max_key);
    const std::int64_t window_low = new_high - grid_.window_bins() + 1;
    const std::int64_t new_low = std::max(empty ? min_key : std::min(low_, min_key), window_low);
    if (empty) {
      low_ = new_low;
      counts_.assign(std::size_t(new_high - new_low + 1), 0);
      if (with_masses_) masses_.assign(counts_.size(), 0.0);
      return;
    }
    if (new_low > low_) {  // fold bins that left the window
      const std::size_t dropped = std::size_t(std::min(new_low - low_, std::int64_t(counts_.size())));
      for (std::size_t b = 0; b < dropped; ++b) {
        underflow_count_ += counts_[b];
        underflow_mass_ += mass(b);
      }
      counts_.erase(counts_.begin(), counts_.begin() + std::ptrdiff_t(dropped));
      if (with_masses_) masses_.erase(masses_.begin(), masses_.begin() + std::ptrdiff_t(dropped));
    } else if (new_low < low_) {
      counts_.insert(counts_.begin(), std::size_t(low_ - new_low), 0);
      if (with_masses_) masses_.insert(masses_.begin(), std::size_t(low_ - new_low), 0.0);
    }
    low_ = new_low;
    const std::size_t size = std::size_t(new_high - new_low + 1);
    counts_.resize(size, 0);
    if (with_masses_) masses_.resize(size, 0.0);
  }

  HistogramGrid grid_;
  bool with_masses_ = true;
  std::int64_t low_ = 0;               ///< key of counts_[0]
  std::vector<std::uint64_t> counts_;  ///< per key in [low_, high()]
  std::vector<double> masses_;         ///< per key, empty without masses
  std::uint64_t underflow_count_ = 0;
  double underflow_mass_ = 0;
  std::uint64_t total_ = 0;
  double max_value_ = -std::numeric_limits<double>::infinity();
};

}  // namespace toptheta::detail
