// Dense attention, tiled with an online softmax: the baseline every sparse kernel is measured against.
#pragma once

#include <toptheta/detail/identity.hpp>
#include <toptheta/detail/tiled_attention.hpp>
#include <toptheta/executor.hpp>
#include <toptheta/selection.hpp>

namespace toptheta {

/// `o_i = Σ_{j<L_i} softmax(a_i)_j v_j` for every query head, tiled: KV tiles beyond a block's last visible key
/// (causal tiles above the diagonal) are never touched.
/// \tparam Tiles query block x KV block sizes. \tparam Scalar stored type, deduced from `out`.
/// \param q `[n_q, q_heads, d]`, \param out `[n_q, q_heads, d]`, \param k, v `[n_kv, kv_heads, d]`: both
/// `TensorView`s (a braced list makes one), or both `PagedTensorView`s (a paged KV cache, read through the
/// sequence's block table).
/// Extra memory: O(tile sizes x d) per work item.
/// Throws `invalid_argument` naming the argument for shapes that disagree, a `past` beyond the keys, a scale that
/// is not finite and > 0 in the accumulator type, or an `out` that overlaps q, k, v or itself. A row without a
/// softmax (a NaN or +inf score, or every score -inf) comes out NaN; a call without query rows does nothing
/// (README, "Bad and non-finite input").
template <class Tiles = DefaultTiles, class Scalar, class KView = TensorView<const Scalar>,
          class VView = TensorView<const Scalar>, class Executor = DefaultExecutor>
void dense_attention(const TensorView<const detail::identity_t<Scalar>>& q, const KView& k, const VView& v,
                     const TensorView<Scalar>& out, const AttentionOptions& options = {},
                     AttentionStats* stats = nullptr, const Executor& executor = {}) {
  using KvView = detail::kv_view_t<Scalar, KView, VView>;  // contiguous or paged, read-only
  detail::run_tiled_attention<Tiles, Scalar>(q, KvView(k), KvView(v), out, options, DenseSelection{}, nullptr, executor,
                                             stats);
}

}  // namespace toptheta
