// A calibrator's collected statistics as versioned bytes, so that calibrators of different processes (MPI ranks,
// machines) merge into one: `encode_calibrator_state` on each, `merge_calibrator_state` into one.
//
// Format version 1, little-endian (detail/byte_codec.hpp):
//   "TTCS", u8 version = 1; the options the state depends on: u32 layers, q_heads, kv_heads, head_dim, u8 space,
//   u32 k per layer, i64 exact_limit, i64 buckets_per_doubling, u8 count_summary, u8 summary_masses, i32
//   mantissa_bits, min_exponent, window_binades (the histogram grid); u64 rows offered, dense, used; per
//   (layer, head): u32 buckets, per bucket: the sample thresholds' and denominator terms' moments (u64 count,
//   f64 mean, f64 M2 each), the value histogram (i64 lowest key, u32 bins, u64 count per bin, f64 mass per bin
//   with masses, u64 underflow count, f64 underflow mass, u64 total, f64 largest value).
// The sampling seed and fraction are not part of it (calibrators that merge may differ in them).
#pragma once

#include <toptheta/calibrator.hpp>
#include <toptheta/detail/byte_codec.hpp>
#include <toptheta/detail/require.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace toptheta {

/// The encoding version `encode_calibrator_state` writes and `merge_calibrator_state` reads.
inline constexpr std::uint8_t calibrator_state_version = 1;

namespace detail {

/// Reads and writes the private state of `Calibrator` and `ValueHistogram`.
class CalibratorState {
 public:
  static std::vector<std::uint8_t> encode(const Calibrator& calibrator) {
    ByteWriter out;
    out.magic("TTCS");
    out.unsigned_integer(calibrator_state_version, 1);
    write_options(out, calibrator.options_, calibrator.grid_);
    out.unsigned_integer(calibrator.rows_offered_, 8);
    out.unsigned_integer(calibrator.rows_dense_, 8);
    out.unsigned_integer(calibrator.rows_used_, 8);
    for (const auto& cell : calibrator.buckets_) {
      out.count(Index(cell.size()), "buckets");
      for (const auto& statistics : cell) {
        write_moments(out, statistics.threshold);
        write_moments(out, statistics.denominator);
        write_histogram(out, statistics.histogram);
      }
    }
    return out.take();
  }

  static void merge(Calibrator& into, const std::uint8_t* bytes, std::size_t size) {
    ByteReader in(bytes, size);
    in.magic("TTCS", "a calibrator state");
    const auto version = in.unsigned_integer(1);
    require(version == calibrator_state_version, "bytes",
            "calibrator state version " + std::to_string(calibrator_state_version), version);
    // The writer's options, checked against `into`'s with the same bytes: equal options encode alike.
    ByteWriter expected;
    write_options(expected, into.options_, into.grid_);
    const std::vector<std::uint8_t> options = expected.take();
    in.need(options.size());
    for (std::size_t b = 0; b < options.size(); ++b)
      require(in.unsigned_integer(1) == options[b], "bytes",
              "the state of a calibrator with this one's options (shape, space, k, buckets, summary settings)",
              "other options (byte " + std::to_string(b) + " differs)");
    Calibrator other(into.options_);
    other.rows_offered_ = in.unsigned_integer(8);
    other.rows_dense_ = in.unsigned_integer(8);
    other.rows_used_ = in.unsigned_integer(8);
    require(other.rows_dense_ <= other.rows_offered_ && other.rows_used_ <= other.rows_offered_ - other.rows_dense_,
            "bytes", "rows dense + rows used <= rows offered",
            std::to_string(other.rows_dense_) + " + " + std::to_string(other.rows_used_) + " of " +
                std::to_string(other.rows_offered_));
    // Far more buckets than any row length up to LengthBuckets::max_length needs.
    const Index most_buckets = into.options_.buckets.bucket(LengthBuckets::max_length) + 1;
    for (auto& cell : other.buckets_) {
      const Index buckets = in.count();
      require(buckets <= most_buckets, "bytes", "at most " + std::to_string(most_buckets) + " length buckets", buckets);
      cell.assign(std::size_t(buckets), Calibrator::Statistics(other.grid_, other.options_.summary_masses));
      for (auto& statistics : cell) {
        read_moments(in, statistics.threshold);
        read_moments(in, statistics.denominator);
        read_histogram(in, statistics.histogram);
      }
    }
    in.finish();
    into.merge(other);
  }

 private:
  static void write_options(ByteWriter& out, const CalibratorOptions& options, const HistogramGrid& grid) {
    out.count(options.shape.layers, "layers");
    out.count(options.shape.q_heads, "q_heads");
    out.count(options.shape.kv_heads, "kv_heads");
    out.count(options.shape.head_dim, "head_dim");
    out.unsigned_integer(std::uint8_t(options.space), 1);
    for (Index k : options.k) out.count(k, "k");
    out.integer(options.buckets.exact_limit);
    out.integer(options.buckets.buckets_per_doubling);
    out.unsigned_integer(options.count_summary, 1);
    out.unsigned_integer(options.summary_masses, 1);
    out.unsigned_integer(std::uint32_t(grid.mantissa_bits), 4);
    out.unsigned_integer(std::uint32_t(grid.min_exponent), 4);
    out.unsigned_integer(std::uint32_t(grid.window_binades), 4);
  }

  static void write_moments(ByteWriter& out, const RunningMoments& moments) {
    out.unsigned_integer(moments.count, 8);
    out.real(moments.mean);
    out.real(moments.m2);
  }

  static void read_moments(ByteReader& in, RunningMoments& moments) {
    moments.count = in.unsigned_integer(8);
    moments.mean = in.real<double>();
    moments.m2 = in.real<double>();
    require(std::isfinite(moments.mean) && std::isfinite(moments.m2) && moments.m2 >= 0 &&
                (moments.count > 0 || (moments.mean == 0 && moments.m2 == 0)),
            "bytes", "moments with a finite mean, a finite M2 >= 0, both 0 for no values",
            std::to_string(moments.count) + " values, mean " + std::to_string(moments.mean) + ", M2 " +
                std::to_string(moments.m2));
  }

  static void write_histogram(ByteWriter& out, const ValueHistogram& histogram) {
    out.integer(histogram.low_);
    out.count(Index(histogram.counts_.size()), "histogram bins");
    for (std::uint64_t count : histogram.counts_) out.unsigned_integer(count, 8);
    for (double mass : histogram.masses_) out.real(mass);
    out.unsigned_integer(histogram.underflow_count_, 8);
    out.real(histogram.underflow_mass_);
    out.unsigned_integer(histogram.total_, 8);
    out.real(histogram.max_value_);
  }

  /// Reads a histogram and checks what its use relies on: bins within the window under the largest value's key,
  /// counts that add up to the total, finite masses >= 0.
  static void read_histogram(ByteReader& in, ValueHistogram& histogram) {
    const std::int64_t low = in.integer();
    const Index bins = in.count();
    const std::int64_t window = histogram.grid_.window_bins();
    require(bins <= window, "bytes", "at most " + std::to_string(window) + " histogram bins", bins);
    // Keys of finite doubles lie within ±2^40 on every valid grid.
    const std::int64_t key_limit = std::int64_t(1) << 40;
    require(low >= -key_limit && low <= key_limit, "bytes", "a histogram key within ±2^40", low);
    in.need_rows(std::uint64_t(bins), histogram.with_masses_ ? 16 : 8);
    histogram.low_ = low;
    histogram.counts_.resize(std::size_t(bins));
    std::uint64_t counted = 0;
    for (std::uint64_t& count : histogram.counts_) {
      count = in.unsigned_integer(8);
      require(count <= std::numeric_limits<std::uint64_t>::max() - counted, "bytes", "bin counts that add up",
              "an overflow");
      counted += count;
    }
    if (histogram.with_masses_) {
      histogram.masses_.resize(std::size_t(bins));
      for (double& mass : histogram.masses_) mass = finite_mass(in.real<double>());
    }
    histogram.underflow_count_ = in.unsigned_integer(8);
    histogram.underflow_mass_ = finite_mass(in.real<double>());
    histogram.total_ = in.unsigned_integer(8);
    histogram.max_value_ = in.real<double>();
    require(histogram.underflow_count_ <= std::numeric_limits<std::uint64_t>::max() - counted &&
                histogram.total_ == counted + histogram.underflow_count_,
            "bytes", "a histogram total equal to its bin and underflow counts",
            std::to_string(histogram.total_) + " vs " + std::to_string(counted) + " + " +
                std::to_string(histogram.underflow_count_));
    if (bins == 0) {
      require(histogram.total_ == 0 && histogram.max_value_ == -std::numeric_limits<double>::infinity(), "bytes",
              "an empty histogram with no values and largest value -inf", "values or a largest value");
      if (histogram.with_masses_)
        require(histogram.underflow_mass_ == 0, "bytes", "no underflow mass in an empty histogram",
                histogram.underflow_mass_);
      return;
    }
    // Values below the largest one must find their bins: its key lies within the kept bins.
    const bool finite_max = std::isfinite(histogram.max_value_);
    const std::int64_t max_key = finite_max ? HistogramKeys(histogram.grid_)(histogram.max_value_) : 0;
    require(finite_max && max_key >= low && max_key <= low + bins - 1, "bytes",
            "a finite largest value within the histogram's bins (keys " + std::to_string(low) + " to " +
                std::to_string(low + bins - 1) + ")",
            histogram.max_value_);
    if (!histogram.with_masses_)
      require(histogram.underflow_mass_ == 0, "bytes", "no underflow mass without masses", histogram.underflow_mass_);
  }

  static double finite_mass(double mass) {
    require(std::isfinite(mass) && mass >= 0, "bytes", "a finite mass >= 0", mass);
    return mass;
  }
};

}  // namespace detail

/// Everything `calibrator` has collected, as bytes another process's calibrator with the same options can merge
/// (`merge_calibrator_state`). The encoding holds no sampling settings: calibrators that merge may differ in them.
inline std::vector<std::uint8_t> encode_calibrator_state(const Calibrator& calibrator) {
  return detail::CalibratorState::encode(calibrator);
}

/// Adds to `calibrator` what the calibrator whose state `bytes` holds collected, as `Calibrator::merge` would.
/// \throws invalid_argument naming `bytes` for a state of other options (shape, space, k, buckets, summary
/// settings), of another version, truncated, with trailing bytes, or inconsistent (counts that do not add up,
/// non-finite moments or masses, a histogram's bins outside its window); `calibrator` is then unchanged.
inline void merge_calibrator_state(Calibrator& calibrator, const std::uint8_t* bytes, std::size_t size) {
  detail::CalibratorState::merge(calibrator, bytes, size);
}

}  // namespace toptheta
