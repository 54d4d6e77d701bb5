// Row-length buckets: exact lengths up to a limit, then log-linear buckets, so that a calibration table stays
// bounded in size for any context length.
#pragma once

#include <toptheta/detail/require.hpp>
#include <toptheta/scalar_traits.hpp>

#include <cstdint>
#include <string>

namespace toptheta {

/// The scheme that groups row lengths `L` for calibration (design.md §1, "Calibration": a table must stay bounded
/// for long contexts).
///
/// Lengths `1 ≤ L ≤ exact_limit` each have their own bucket. Beyond it the buckets are log-linear: each doubling
/// `[2^e, 2^{e+1})` is split into `buckets_per_doubling` buckets of equal width `2^e / buckets_per_doubling`, so
/// consecutive bucket edges differ by a factor of at most `1 + 1 / buckets_per_doubling` (the first such bucket
/// starts at `exact_limit + 1`). Lengths up to `L_max` then need about
/// `exact_limit + buckets_per_doubling · log2(L_max / exact_limit)` buckets: with the defaults 161 for 4096 and
/// 241 for 128K. Bucket arithmetic is integer-only, so every machine buckets a length the same way.
///
/// A bucket's **representative length** is the midpoint `(first + last) / 2` (rounded down) of its lengths; a
/// threshold table stores one value per representative and interpolates between them.
struct LengthBuckets {
  /// Largest row length the scheme accepts: bucket arithmetic stays far from overflow below it.
  static constexpr Index max_length = Index(1) << 50;

  Index exact_limit = 64;           ///< every length `L ≤ exact_limit` is its own bucket
  Index buckets_per_doubling = 16;  ///< a power of two in [1, 2^16], at most `exact_limit`

  /// A scheme in which every length up to `largest` is its own bucket (used for imported per-length tables).
  static LengthBuckets exact_up_to(Index largest) { return {largest, 1}; }

  /// Throws `invalid_argument` naming `argument` unless the scheme is valid.
  void validate(const std::string& argument = "buckets") const {
    detail::require(exact_limit >= 1 && exact_limit <= max_length, argument + ".exact_limit", "a length in [1, 2^50]",
                    exact_limit);
    detail::require(buckets_per_doubling >= 1 && buckets_per_doubling <= (Index(1) << 16) &&
                        (buckets_per_doubling & (buckets_per_doubling - 1)) == 0,
                    argument + ".buckets_per_doubling", "a power of two in [1, 65536]", buckets_per_doubling);
    detail::require(buckets_per_doubling <= exact_limit, argument + ".buckets_per_doubling",
                    "at most exact_limit (" + std::to_string(exact_limit) + ")", buckets_per_doubling);
  }

  /// The bucket of row length `length` (`1 ≤ length ≤ max_length`): `length - 1` for exact lengths, then
  /// consecutive indices. Cost O(1).
  Index bucket(Index length) const {
    detail::require(length >= 1 && length <= max_length, "length", "a row length in [1, 2^50]", length);
    if (length <= exact_limit) return length - 1;
    return exact_limit + log_linear_index(length) - log_linear_index(exact_limit + 1);
  }

  /// The smallest row length of `bucket`.
  Index first_length(Index bucket) const {
    require_bucket(bucket);
    if (bucket < exact_limit) return bucket + 1;
    const Index index = log_linear_index(exact_limit + 1) + (bucket - exact_limit);
    return bucket == exact_limit ? exact_limit + 1 : length_at(index);
  }

  /// The largest row length of `bucket`.
  Index last_length(Index bucket) const {
    require_bucket(bucket);
    if (bucket < exact_limit) return bucket + 1;
    return length_at(log_linear_index(exact_limit + 1) + (bucket - exact_limit) + 1) - 1;
  }

  /// The length that stands for `bucket` in a table: the midpoint of its lengths, rounded down.
  Index representative(Index bucket) const {
    const Index first = first_length(bucket);
    return first + (last_length(bucket) - first) / 2;
  }

  /// Number of buckets needed for lengths `1..largest`.
  Index bucket_count(Index largest) const { return bucket(largest) + 1; }

  friend bool operator==(const LengthBuckets& a, const LengthBuckets& b) {
    return a.exact_limit == b.exact_limit && a.buckets_per_doubling == b.buckets_per_doubling;
  }
  friend bool operator!=(const LengthBuckets& a, const LengthBuckets& b) { return !(a == b); }

 private:
  static int floor_log2(std::uint64_t x) {
    int e = 0;
    while (x >>= 1) ++e;
    return e;
  }

  /// Index of the log-linear cell holding `length ≥ buckets_per_doubling`: `e · B + (L - 2^e) / (2^e / B)` with
  /// `e = floor(log2 L)` and `B = buckets_per_doubling`.
  Index log_linear_index(Index length) const {
    const int e = floor_log2(std::uint64_t(length));
    const int shift = e - floor_log2(std::uint64_t(buckets_per_doubling));
    return Index(e) * buckets_per_doubling + ((length - (Index(1) << e)) >> shift);
  }

  /// The first length of log-linear cell `index`.
  Index length_at(Index index) const {
    const int e = int(index / buckets_per_doubling);
    const int shift = e - floor_log2(std::uint64_t(buckets_per_doubling));
    return (Index(1) << e) + ((index % buckets_per_doubling) << shift);
  }

  void require_bucket(Index bucket) const {
    detail::require(bucket >= 0 && bucket <= this->bucket(max_length), "bucket",
                    "a bucket index in [0, " + std::to_string(this->bucket(max_length)) + "]", bucket);
  }
};

}  // namespace toptheta
