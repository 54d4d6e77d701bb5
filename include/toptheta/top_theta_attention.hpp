// Top-θ attention: each score is compared with a static, calibrated per-head threshold.
#pragma once

#include <toptheta/detail/identity.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/detail/tiled_attention.hpp>
#include <toptheta/executor.hpp>
#include <toptheta/selection.hpp>
#include <toptheta/sparse_options.hpp>
#include <toptheta/threshold_table.hpp>

#include <string>

namespace toptheta {

struct TopThetaOptions : SparseAttentionOptions {
  /// Keep at most k survivors per row, those with the largest positions.
  bool cap_k = false;
  Passes passes = Passes::automatic;
};

/// Top-θ attention (design.md §1): row `i` of query head `h` keeps `S_i = {j : value(a_ij) > θ_h(L_i)}` in the
/// table's threshold space, rows with `L_i <= k` stay dense, a row is never empty, and the dropped mass is
/// compensated as `options.compensation` says.
///
/// One pass (raw_score, score_over_query_norm): scores, threshold test, online softmax and V accumulation per
/// KV tile; a tile with no survivor loads no V row. Two passes (needed by probability and score_minus_max): the
/// block's score rows, max and log-sum-exp first, then the same test and accumulation; extra memory
/// O(query block x group x L) per work item instead of O(tile).
/// \param thresholds one layer's table, with one row of thresholds per query head.
template <class Tiles = DefaultTiles, class Scalar, class Executor = DefaultExecutor>
void top_theta_attention(const TensorView<const detail::identity_t<Scalar>>& q,
                         const TensorView<const detail::identity_t<Scalar>>& k,
                         const TensorView<const detail::identity_t<Scalar>>& v, const TensorView<Scalar>& out,
                         const LayerThresholds& thresholds, const TopThetaOptions& options = {},
                         AttentionStats* stats = nullptr, const Executor& executor = {}) {
  detail::require(thresholds.heads() == q.heads(), "thresholds",
                  "one row per query head (" + std::to_string(q.heads()) + ")", thresholds.heads());
  const TopThetaSelection selection(thresholds, options.compensation, options.cap_k, options.passes);
  detail::run_tiled_attention<Tiles, Scalar>(q, k, v, out, options.attention, selection, options.value_prefix_sum,
                                             executor, stats);
}

}  // namespace toptheta
