// Strided views of an engine's per-token, per-head buffers, and the shape of one attention call.
#pragma once

#include <toptheta/detail/require.hpp>
#include <toptheta/scalar_traits.hpp>

#include <Eigen/Core>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

namespace toptheta {

/// A `[tokens, heads, head_dim]` tensor in an engine's memory, used without copying.
///
/// Element `(t, h, d)` lives at `data[t * token_stride + h * head_stride + d]`: the `head_dim` values of one
/// (token, head) pair are contiguous. The defaults describe a dense `[tokens, heads, head_dim]` buffer;
/// `[heads, tokens, head_dim]` is `token_stride = head_dim, head_stride = tokens * head_dim`.
/// Strides count stored elements: for a K or V of int8 blocks (`BlockQ8<N>`, e.g. `BlockQ8_0` of 32 values)
/// `head_dim` is a multiple of N, a row is `head_dim / N` blocks, and the default strides are `heads * head_dim /
/// N` and `head_dim / N`; such a view has no `head()`.
/// \tparam Scalar stored type, `const`-qualified for inputs.
template <class Scalar>
class TensorView {
 public:
  using value_type = std::remove_const_t<Scalar>;
  using HeadRows =
      Eigen::Map<std::conditional_t<std::is_const_v<Scalar>,
                                    const Eigen::Matrix<value_type, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>,
                                    Eigen::Matrix<value_type, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>,
                 Eigen::Unaligned, Eigen::OuterStride<>>;

  TensorView() = default;
  TensorView(Scalar* data, Index tokens, Index heads, Index head_dim)
      : TensorView(data, tokens, heads, head_dim, dense_token_stride(heads, head_dim), elements_of<Scalar>(head_dim)) {}
  TensorView(Scalar* data, Index tokens, Index heads, Index head_dim, Index token_stride, Index head_stride)
      : data_(data),
        tokens_(tokens),
        heads_(heads),
        head_dim_(head_dim),
        token_stride_(token_stride),
        head_stride_(head_stride) {
    detail::require(tokens >= 0, "tokens", "a count >= 0", tokens);
    detail::require(heads >= 1, "heads", "a count >= 1", heads);
    detail::require(head_dim >= 1, "head_dim", "a count >= 1", head_dim);
    detail::require(head_dim % values_per_element_v<Scalar> == 0, "head_dim",
                    "a multiple of the " + std::to_string(values_per_element_v<Scalar>) + " values of a block",
                    head_dim);
    detail::require(data != nullptr || tokens == 0, "data", "a non-null pointer", "nullptr");
    detail::require(token_stride >= 0 && head_stride >= 0, "strides", "non-negative strides",
                    std::to_string(token_stride) + ", " + std::to_string(head_stride));
  }

  /// A read-only view of the same memory.
  operator TensorView<const value_type>() const {  // NOLINT(google-explicit-constructor)
    return {data_, tokens_, heads_, head_dim_, token_stride_, head_stride_};
  }

  Index tokens() const { return tokens_; }
  Index heads() const { return heads_; }
  Index head_dim() const { return head_dim_; }
  Index token_stride() const { return token_stride_; }
  Index head_stride() const { return head_stride_; }
  Scalar* data() const { return data_; }

  /// The rows of head `h`: a `tokens x head_dim` row-major map with outer stride `token_stride`.
  HeadRows head(Index h) const {
    static_assert(!is_block_type_v<Scalar>, "rows of blocks are read through row()");
    return HeadRows(data_ + h * head_stride_, tokens_, head_dim_, Eigen::OuterStride<>(token_stride_));
  }
  /// Pointer to the `head_dim` values (the blocks that hold them) of token `t`, head `h`.
  Scalar* row(Index t, Index h) const { return data_ + t * token_stride_ + h * head_stride_; }
  /// Tokens from `t` on whose rows lie `token_stride` apart: all the rest (a paged view: the rest of the page).
  Index contiguous_from(Index t) const { return tokens_ - t; }

 private:
  /// `heads * head_dim` stored elements; 0 for counts the constructor refuses, and a product `Index` cannot hold
  /// is refused here.
  static Index dense_token_stride(Index heads, Index head_dim) {
    const Index elements = head_dim >= 1 ? elements_of<Scalar>(head_dim) : 0;
    if (heads < 1 || elements < 1) return 0;
    detail::require(heads <= std::numeric_limits<Index>::max() / elements, "heads",
                    "a count whose product with head_dim fits in an index",
                    std::to_string(heads) + " x " + std::to_string(head_dim));
    return heads * elements;
  }

  Scalar* data_ = nullptr;
  Index tokens_ = 0, heads_ = 1, head_dim_ = 1, token_stride_ = 0, head_stride_ = 0;
};

/// Placement of the queries of one call in the key sequence, and the score scale.
struct AttentionOptions {
  /// With a causal mask query row `i` sees keys `j < L_i = past + i + 1`; without one it sees all `n_kv`.
  bool causal = true;
  /// Absolute position `p_0` of the first query row: prefill of a new sequence 0, a chunk or a decode step the
  /// number of tokens already cached before it.
  Index past = 0;
  /// Score scale `s` in `a_ij = s <q_i, k_j>`; unset means `1 / sqrt(head_dim)`.
  std::optional<double> scale;
};

/// The validated shape of one attention call: `n_q` query rows of `q_heads` heads attending to `n_kv` keys of
/// `kv_heads` heads (query head `h` reads KV head `h / group_size`).
struct AttentionShape {
  Index query_rows = 0, key_rows = 0, q_heads = 0, kv_heads = 0, head_dim = 0, group_size = 0;
  bool causal = true;
  Index past = 0;
  double scale = 1;

  /// Row length `L_i` of query row `i`: the number of keys it sees.
  Index row_length(Index i) const { return causal ? past + i + 1 : key_rows; }
  Index max_row_length() const { return query_rows == 0 ? 0 : row_length(query_rows - 1); }
};

/// Checks that `q`, `k`, `v` and `out` describe one attention call and returns its shape.
/// `k` and `v` may be any views with `tokens()`, `heads()` and `head_dim()` (`TensorView`, `PagedTensorView`).
template <class Q, class KView, class VView, class Out>
AttentionShape attention_shape(const TensorView<Q>& q, const KView& k, const VView& v, const TensorView<Out>& out,
                               const AttentionOptions& options) {
  using detail::require;
  AttentionShape shape;
  shape.query_rows = q.tokens();
  shape.key_rows = k.tokens();
  shape.q_heads = q.heads();
  shape.kv_heads = k.heads();
  shape.head_dim = q.head_dim();
  require(k.head_dim() == q.head_dim(), "k.head_dim", "q.head_dim = " + std::to_string(q.head_dim()), k.head_dim());
  require(v.head_dim() == q.head_dim(), "v.head_dim", "q.head_dim = " + std::to_string(q.head_dim()), v.head_dim());
  require(v.tokens() == k.tokens(), "v.tokens", "k.tokens = " + std::to_string(k.tokens()), v.tokens());
  require(v.heads() == k.heads(), "v.heads", "k.heads = " + std::to_string(k.heads()), v.heads());
  require(q.heads() % k.heads() == 0, "q.heads", "a multiple of the KV heads (" + std::to_string(k.heads()) + ")",
          q.heads());
  require(out.tokens() == q.tokens() && out.heads() == q.heads() && out.head_dim() == q.head_dim(), "out",
          "shape [" + std::to_string(q.tokens()) + ", " + std::to_string(q.heads()) + ", " +
              std::to_string(q.head_dim()) + "] like q",
          "[" + std::to_string(out.tokens()) + ", " + std::to_string(out.heads()) + ", " +
              std::to_string(out.head_dim()) + "]");
  require(options.past >= 0, "options.past", "a position >= 0", options.past);
  shape.group_size = q.heads() / k.heads();
  shape.causal = options.causal;
  shape.past = options.past;
  if (options.causal) {
    // past + q.tokens() may overflow: compared as past <= k.tokens() - q.tokens(), and written as a sum only
    // when it has a value.
    const bool sum_fits = options.past <= std::numeric_limits<Index>::max() - q.tokens();
    require(options.past <= k.tokens() - q.tokens(), "k.tokens",
            "at least past + query rows = " +
                (sum_fits ? std::to_string(options.past + q.tokens())
                          : std::to_string(options.past) + " + " + std::to_string(q.tokens())) +
                " for causal attention",
            k.tokens());
  } else {
    require(q.tokens() == 0 || k.tokens() >= 1, "k.tokens", "at least 1 key for non-causal attention", k.tokens());
  }
  shape.scale = options.scale ? *options.scale : 1.0 / std::sqrt(double(q.head_dim()));
  require(std::isfinite(shape.scale) && shape.scale > 0, "options.scale", "a finite value > 0", shape.scale);
  using Acc = accumulator_t<Q>;  // the scores' type: s must be finite and > 0 in it too
  require(std::isfinite(Acc(shape.scale)) && Acc(shape.scale) > 0, "options.scale",
          std::string("a value > 0 that is finite and not 0 in the ") +
              (sizeof(Acc) == sizeof(float) ? "float" : "double") + " accumulator",
          shape.scale);
  return shape;
}

}  // namespace toptheta
