// The log-linear grid of a value histogram and the integer key of a value on it.
#pragma once

#include <toptheta/detail/require.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

namespace toptheta::detail {

/// The grid of a `ValueHistogram`: log-linear in `|v|` with `2^mantissa_bits` bins per binade `[2^e, 2^{e+1})`
/// for `|v| ≥ 2^min_exponent`, linear with bin width `2^(min_exponent - mantissa_bits)` below, mirrored for
/// negative values. A bin's width is thus at most `2^-mantissa_bits` of its values (1.6 % at the default 6 bits),
/// or the absolute linear width near 0. Only the `window_binades · 2^mantissa_bits` bins below the largest value
/// seen are kept; values under that window are counted (and their mass summed) in one underflow cell.
struct HistogramGrid {
  int mantissa_bits = 6;
  int min_exponent = -2;
  int window_binades = 24;

  std::int64_t window_bins() const { return std::int64_t(window_binades) << mantissa_bits; }

  void validate(const std::string& argument) const {
    require(mantissa_bits >= 1 && mantissa_bits <= 12, argument + ".mantissa_bits", "a count in [1, 12]",
            mantissa_bits);
    require(min_exponent >= -1000 && min_exponent <= 1000, argument + ".min_exponent", "an exponent in [-1000, 1000]",
            min_exponent);
    require(window_binades >= 1 && window_binades <= 256, argument + ".window_binades", "a count in [1, 256]",
            window_binades);
  }

  friend bool operator==(const HistogramGrid& a, const HistogramGrid& b) {
    return a.mantissa_bits == b.mantissa_bits && a.min_exponent == b.min_exponent &&
           a.window_binades == b.window_binades;
  }
  friend bool operator!=(const HistogramGrid& a, const HistogramGrid& b) { return !(a == b); }
};

/// Monotone integer key of a finite double on a `HistogramGrid`: `v ≤ w ⇒ key(v) ≤ key(w)`. Integer and bit
/// operations only (the binade and the top mantissa bits of `|v|`), so every machine bins a value alike.
class HistogramKeys {
 public:
  explicit HistogramKeys(const HistogramGrid& grid)
      : bits_(grid.mantissa_bits),
        linear_limit_(std::ldexp(1.0, grid.min_exponent)),
        linear_scale_(std::ldexp(1.0, grid.mantissa_bits - grid.min_exponent)),
        offset_(((std::int64_t(1023) + grid.min_exponent) << grid.mantissa_bits) -
                (std::int64_t(1) << grid.mantissa_bits)),
        float_limit_(float(linear_limit_)),
        float_scale_(float(linear_scale_)),
        float_offset_(std::int32_t(((127 + grid.min_exponent) << grid.mantissa_bits) - (1 << grid.mantissa_bits))) {}

  /// True when float values get the same keys as their double values (the linear region lies in float's
  /// normal range), so float rows may use the 32-bit, vectorisable `operator()(float)`.
  static bool float_exact(const HistogramGrid& grid) { return grid.min_exponent > -126 && grid.min_exponent < 100; }

  /// Branch-free, so that values scattered around `2^min_exponent` and 0 cost no mispredictions.
  std::int64_t operator()(double v) const {
    const double magnitude = std::abs(v);
    std::uint64_t bits;
    std::memcpy(&bits, &magnitude, sizeof bits);
    const std::int64_t linear = std::int64_t(std::min(magnitude, linear_limit_) * linear_scale_);  // exact scaling
    const std::int64_t logarithmic = std::int64_t(bits >> (52 - bits_)) - offset_;
    const std::int64_t key = magnitude < linear_limit_ ? linear : logarithmic;
    return key ^ -std::int64_t(v < 0);  // v < 0: -key - 1
  }

  /// The same key as `operator()(double(v))`, in 32-bit arithmetic (requires `float_exact(grid)`).
  std::int32_t operator()(float v) const {
    std::uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    const std::uint32_t magnitude_bits = bits & 0x7fffffffu;
    float magnitude;
    std::memcpy(&magnitude, &magnitude_bits, sizeof magnitude);
    const std::int32_t linear = std::int32_t(std::min(magnitude, float_limit_) * float_scale_);
    const std::int32_t logarithmic = std::int32_t(magnitude_bits >> (23 - bits_)) - float_offset_;
    const std::int32_t key = magnitude < float_limit_ ? linear : logarithmic;
    return key ^ -std::int32_t(v < 0.0f);
  }

  /// Smallest and largest value of bin `key` (the bin is half-open on the side away from 0).
  double lower(std::int64_t key) const { return key >= 0 ? magnitude_low(key) : -magnitude_low(-key); }
  double upper(std::int64_t key) const { return key >= 0 ? magnitude_low(key + 1) : -magnitude_low(-key - 1); }

 private:
  double magnitude_low(std::int64_t magnitude_key) const {
    if (magnitude_key <= (std::int64_t(1) << bits_)) return double(magnitude_key) / linear_scale_;
    const std::uint64_t bits = std::uint64_t(magnitude_key + offset_) << (52 - bits_);
    if (bits >= 0x7ff0000000000000ull) return std::numeric_limits<double>::infinity();
    double value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }

  int bits_;
  double linear_limit_, linear_scale_;
  std::int64_t offset_;
  float float_limit_, float_scale_;
  std::int32_t float_offset_;
};

}  // namespace toptheta::detail
