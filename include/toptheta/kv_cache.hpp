// A KV cache that also keeps the running V sum V-mean compensation needs.
#pragma once

#include <toptheta/aligned_vector.hpp>
#include <toptheta/detail/cached_tokens.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/views.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace toptheta {

/// K and V rows of one layer, `[capacity, kv_heads, head_dim]` each, plus `Σ_{j<length} v_j` per KV head,
/// updated in O(kv_heads x head_dim) per appended token (in double), so a decode step never re-reads V for it.
/// Storage is allocated once; views stay valid until the cache is destroyed.
///
/// `append` rejects non-finite K and V values by default (`check_finite`), naming the token and head, before it
/// changes anything: bad data is caught where it enters, and the running V sum (which every later row's V-mean
/// compensation reads) is never poisoned. The check reads each value once more in a loop that already converts
/// each one for the sum; an engine that wants the kernels' rules for non-finite data instead (README, "Bad and
/// non-finite input") turns it off.
///
/// \tparam Scalar stored type: `float`, `double`, `Eigen::half`, `Eigen::bfloat16`, or `BlockQ8<N>` for an int8
/// cache (`BlockQ8_0`: q8_0; `head_dim` a multiple of N), which quantizes each appended row (`quantize_q8`),
/// always rejects values it cannot hold (non-finite or above `q8_max_magnitude`, whatever `check_finite`
/// says), and sums the dequantized values, those the kernels read.
template <class Scalar>
class KvCache {
 public:
  KvCache(Index kv_heads, Index head_dim, Index capacity)
      : capacity_(capacity), tokens_(checked(kv_heads, head_dim, capacity)) {
    keys_.resize(std::size_t(capacity * kv_heads * elements_of<Scalar>(head_dim)));
    values_.resize(keys_.size());
  }

  Index length() const { return tokens_.length(); }
  Index capacity() const { return capacity_; }
  Index kv_heads() const { return tokens_.kv_heads(); }
  Index head_dim() const { return tokens_.head_dim(); }

  /// Whether `append` rejects non-finite values (default true).
  bool check_finite() const { return tokens_.check_finite(); }
  void check_finite(bool on) { tokens_.check_finite(on); }

  /// Appends `keys` and `values` (`[tokens, kv_heads, head_dim]`, any strides). With `check_finite`, a NaN or
  /// infinite value throws naming `keys` or `values`, the token's position in the cache and the head, and the
  /// cache is left unchanged.
  template <class Stored>
  void append(const TensorView<Stored>& keys, const TensorView<Stored>& values) {
    tokens_.template check<Scalar>(keys, values, capacity_ - length(), "free capacity");
    const auto row_at = [this](AlignedVector<Scalar>& rows) {
      return [&rows, this](Index t, Index h) {
        return rows.data() + (t * kv_heads() + h) * elements_of<Scalar>(head_dim());
      };
    };
    tokens_.template append<Stored, Scalar>(keys, values, row_at(keys_), row_at(values_));
  }

  TensorView<const Scalar> keys() const { return {keys_.data(), length(), kv_heads(), head_dim()}; }
  TensorView<const Scalar> values() const { return {values_.data(), length(), kv_heads(), head_dim()}; }

  /// `Σ_{j<position} v_j`, `kv_heads x head_dim` row-major, for `position` = `length()` or the length before
  /// the latest `append` (the `past` of the call that attends the appended rows). O(1).
  const double* value_sum_before(Index position) const { return tokens_.value_sum_before(position); }

  /// Forgets every row (capacity stays).
  void clear() { tokens_.clear(); }

 private:
  /// The tokens of a cache of this shape, once the shape is checked.
  detail::CachedTokens checked(Index kv_heads, Index head_dim, Index capacity) const {
    detail::require(kv_heads >= 1, "kv_heads", "a count >= 1", kv_heads);
    detail::require(head_dim >= 1, "head_dim", "a count >= 1", head_dim);
    detail::require(head_dim % values_per_element_v<Scalar> == 0, "head_dim",
                    "a multiple of the " + std::to_string(values_per_element_v<Scalar>) + " values of a block",
                    head_dim);
    detail::require(capacity >= 1, "capacity", "a count >= 1", capacity);
    const Index largest = Index(std::min(keys_.max_size(), std::size_t(std::numeric_limits<Index>::max())));
    detail::require(head_dim <= largest / kv_heads, "head_dim",
                    "at most " + std::to_string(largest / kv_heads) + " (a token's values must be addressable)",
                    head_dim);
    const Index per_token = kv_heads * head_dim;
    detail::require(capacity <= largest / per_token, "capacity",
                    "at most " + std::to_string(largest / per_token) +
                        " tokens (capacity x kv_heads x head_dim values must be addressable)",
                    capacity);
    return detail::CachedTokens(kv_heads, head_dim);
  }

  Index capacity_;
  AlignedVector<Scalar> keys_, values_;
  detail::CachedTokens tokens_;
};

}  // namespace toptheta
