// The part of a KV cache that does not depend on where its rows live: how many tokens it holds, where the latest
// append started, and the running V sum V-mean compensation reads.
#pragma once

#include <toptheta/detail/convert.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/q8_block.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/views.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace toptheta::detail {

/// Tokens of a KV cache of `kv_heads x head_dim` rows, and `Σ_{j<length} v_j` per KV head (in double), kept
/// before and after the latest append. The caches (`KvCache`, `PagedKvCache`) check an append with `check`,
/// then copy its rows with `append` to where they keep them.
class CachedTokens {
 public:
  CachedTokens(Index kv_heads, Index head_dim)
      : kv_heads_(kv_heads),
        head_dim_(head_dim),
        value_sum_(std::size_t(kv_heads * head_dim), 0.0),
        value_sum_before_append_(value_sum_) {}

  Index length() const { return length_; }
  Index kv_heads() const { return kv_heads_; }
  Index head_dim() const { return head_dim_; }
  bool check_finite() const { return check_finite_; }
  void check_finite(bool on) { check_finite_ = on; }

  /// Throws `invalid_argument` unless `keys` and `values` are `[tokens, kv_heads, head_dim]` alike, at most
  /// `free_tokens` tokens (`free_what` says what limits them), and (with `check_finite`, or always for a cache
  /// of `Cached` int8 blocks, which cannot hold them) finite, naming the token's position in the cache and the
  /// head; an int8 cache also rejects magnitudes above `q8_max_magnitude`.
  template <class Cached, class Stored>
  void check(const TensorView<Stored>& keys, const TensorView<Stored>& values, Index free_tokens,
             const std::string& free_what) const {
    const std::string expected =
        "[tokens, " + std::to_string(kv_heads_) + ", " + std::to_string(head_dim_) + "] like the cache";
    require(keys.heads() == kv_heads_ && keys.head_dim() == head_dim_, "keys", expected, shape_of(keys));
    require(values.heads() == kv_heads_ && values.head_dim() == head_dim_ && values.tokens() == keys.tokens(), "values",
            "the shape of keys, " + shape_of(keys), shape_of(values));
    require(keys.tokens() <= free_tokens, "keys.tokens",
            "at most " + std::to_string(free_tokens) + " (" + free_what + ")", keys.tokens());
    if (check_finite_ || is_block_type_v<Cached>) {
      const double largest = is_block_type_v<Cached> ? q8_max_magnitude : HUGE_VAL;
      require_finite(keys, "keys", largest);
      require_finite(values, "values", largest);
    }
  }

  /// Copies checked `keys` and `values` to `key_row(position, head)` and `value_row(position, head)` (pointers
  /// to a row of the cache's storage, converted to `Scalar` or quantized to int8 blocks) and adds the values,
  /// as stored, to the running sum.
  template <class Stored, class Scalar, class KeyRowAt, class ValueRowAt>
  void append(const TensorView<Stored>& keys, const TensorView<Stored>& values, const KeyRowAt& key_row,
              const ValueRowAt& value_row) {
    value_sum_before_append_ = value_sum_;
    append_start_ = length_;
    std::vector<float> stored(std::size_t(is_block_type_v<Scalar> ? head_dim_ : 0));
    for (Index t = 0; t < keys.tokens(); ++t, ++length_)
      for (Index h = 0; h < kv_heads_; ++h) {
        Scalar* const key = key_row(length_, h);
        Scalar* const value = value_row(length_, h);
        if constexpr (is_block_type_v<Scalar>) {
          quantize_q8(keys.row(t, h), head_dim_, key, "keys");
          quantize_q8(values.row(t, h), head_dim_, value, "values");
          convert(value, head_dim_, stored.data());
          for (Index d = 0; d < head_dim_; ++d)
            value_sum_[std::size_t(h * head_dim_ + d)] += double(stored[std::size_t(d)]);
        } else {
          for (Index d = 0; d < head_dim_; ++d) {
            key[d] = Scalar(keys.row(t, h)[d]);
            value[d] = Scalar(values.row(t, h)[d]);
            value_sum_[std::size_t(h * head_dim_ + d)] += double(value[d]);
          }
        }
      }
  }

  /// `Σ_{j<position} v_j`, `kv_heads x head_dim` row-major, for `position` = `length()` or the length before
  /// the latest `append` (the `past` of the call that attends the appended rows). O(1).
  const double* value_sum_before(Index position) const {
    if (position == length_) return value_sum_.data();
    require(position == append_start_, "position",
            "the cache length (" + std::to_string(length_) + ") or the start of the latest append (" +
                std::to_string(append_start_) + ")",
            position);
    return value_sum_before_append_.data();
  }

  /// Forgets every token.
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

  /// Throws naming `argument`, the token and the head unless every value is finite and of magnitude at most
  /// `largest`.
  template <class Stored>
  void require_finite(const TensorView<Stored>& rows, const char* argument, double largest) const {
    for (Index t = 0; t < rows.tokens(); ++t)
      for (Index h = 0; h < kv_heads_; ++h)
        for (Index d = 0; d < head_dim_; ++d)
          if (const double x = double(rows.row(t, h)[d]); !std::isfinite(x) || std::abs(x) > largest)
            fail(std::string(argument) + " (token " + std::to_string(length_ + t) + ", KV head " + std::to_string(h) +
                     ", element " + std::to_string(d) + ")",
                 std::isfinite(largest) ? "finite values of magnitude at most 127 x 65504 (an int8 cache)"
                                        : "finite values (check_finite)",
                 x);
  }

  Index kv_heads_, head_dim_, length_ = 0, append_start_ = 0;
  bool check_finite_ = true;
  std::vector<double> value_sum_, value_sum_before_append_;
};

}  // namespace toptheta::detail
