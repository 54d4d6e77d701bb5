// A KV cache that also keeps the running V sum V-mean compensation needs.
#pragma once

#include <toptheta/aligned_vector.hpp>
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
template <class Scalar>
class KvCache {
 public:
  KvCache(Index kv_heads, Index head_dim, Index capacity)
      : kv_heads_(kv_heads), head_dim_(head_dim), capacity_(capacity) {
    detail::require(kv_heads >= 1, "kv_heads", "a count >= 1", kv_heads);
    detail::require(head_dim >= 1, "head_dim", "a count >= 1", head_dim);
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
    keys_.resize(std::size_t(capacity * kv_heads * head_dim));
    values_.resize(keys_.size());
    value_sum_.assign(std::size_t(kv_heads * head_dim), 0.0);
    value_sum_before_append_ = value_sum_;
  }

  Index length() const { return length_; }
  Index capacity() const { return capacity_; }
  Index kv_heads() const { return kv_heads_; }
  Index head_dim() const { return head_dim_; }

  /// Whether `append` rejects non-finite values (default true).
  bool check_finite() const { return check_finite_; }
  void check_finite(bool on) { check_finite_ = on; }

  /// Appends `keys` and `values` (`[tokens, kv_heads, head_dim]`, any strides). With `check_finite`, a NaN or
  /// infinite value throws naming `keys` or `values`, the token's position in the cache and the head, and the
  /// cache is left unchanged.
  template <class Stored>
  void append(const TensorView<Stored>& keys, const TensorView<Stored>& values) {
    using detail::require;
    const std::string expected =
        "[tokens, " + std::to_string(kv_heads_) + ", " + std::to_string(head_dim_) + "] like the cache";
    require(keys.heads() == kv_heads_ && keys.head_dim() == head_dim_, "keys", expected, shape_of(keys));
    require(values.heads() == kv_heads_ && values.head_dim() == head_dim_ && values.tokens() == keys.tokens(),
            "values", "the shape of keys, " + shape_of(keys), shape_of(values));
    require(length_ + keys.tokens() <= capacity_, "keys.tokens",
            "at most " + std::to_string(capacity_ - length_) + " (free capacity)", keys.tokens());
    if (check_finite_) {
      require_finite(keys, "keys");
      require_finite(values, "values");
    }
    value_sum_before_append_ = value_sum_;
    append_start_ = length_;
    for (Index t = 0; t < keys.tokens(); ++t, ++length_)
      for (Index h = 0; h < kv_heads_; ++h)
        for (Index d = 0; d < head_dim_; ++d) {
          const std::size_t at = std::size_t((length_ * kv_heads_ + h) * head_dim_ + d);
          keys_[at] = Scalar(keys.row(t, h)[d]);
          values_[at] = Scalar(values.row(t, h)[d]);
          value_sum_[std::size_t(h * head_dim_ + d)] += double(values_[at]);
        }
  }

  TensorView<const Scalar> keys() const { return {keys_.data(), length_, kv_heads_, head_dim_}; }
  TensorView<const Scalar> values() const { return {values_.data(), length_, kv_heads_, head_dim_}; }

  /// `Σ_{j<position} v_j`, `kv_heads x head_dim` row-major, for `position` = `length()` or the length before
  /// the latest `append` (the `past` of the call that attends the appended rows). O(1).
  const double* value_sum_before(Index position) const {
    if (position == length_) return value_sum_.data();
    detail::require(position == append_start_, "position",
                    "the cache length (" + std::to_string(length_) + ") or the start of the latest append (" +
                        std::to_string(append_start_) + ")",
                    position);
    return value_sum_before_append_.data();
  }

  /// Forgets every row (capacity stays).
  void clear() {
    length_ = append_start_ = 0;
    value_sum_.assign(value_sum_.size(), 0.0);
    value_sum_before_append_ = value_sum_;
  }

 private:
  template <class View>
  static std::string shape_of(const View& view) {
    return "[" + std::to_string(view.tokens()) + ", " + std::to_string(view.heads()) + ", " +
           std::to_string(view.head_dim()) + "]";
  }

  template <class Stored>
  void require_finite(const TensorView<Stored>& rows, const char* argument) const {
    for (Index t = 0; t < rows.tokens(); ++t)
      for (Index h = 0; h < kv_heads_; ++h)
        for (Index d = 0; d < head_dim_; ++d)
          if (const double x = double(rows.row(t, h)[d]); !std::isfinite(x))
            detail::fail(std::string(argument) + " (token " + std::to_string(length_ + t) + ", KV head " +
                             std::to_string(h) + ", element " + std::to_string(d) + ")",
                         "finite values (KvCache::check_finite)", x);
  }

  Index kv_heads_, head_dim_, capacity_, length_ = 0, append_start_ = 0;
  bool check_finite_ = true;
  AlignedVector<Scalar> keys_, values_;
  std::vector<double> value_sum_, value_sum_before_append_;
};

}  // namespace toptheta
