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
/// One pass over K in every space (`Passes::automatic`, `Passes::one`): per KV tile the scores, then
///  - raw_score, score_over_query_norm: the threshold test, online softmax and V accumulation; a tile with no
///    survivor loads no V row;
///  - probability, score_minus_max (design.md §6): the running max and sum `(m_t, Z_t)` and the keys above the
///    running threshold `τ_t` (which only grows) as candidates; once the row has seen every key (after merging
///    the key ranges of a split decode), the candidates above the final `τ_i` are the kept set and only their V
///    rows are read. Extra memory: the live candidates of each row (fewer than `1/θ` in the probability space),
///    held in room for about one tile per row.
///
/// `Passes::two` keeps the two-pass kernel (the block's score rows, max and log-sum-exp first, then the same
/// test and accumulation; O(query block x group x L) per work item): it gives the same kept sets and outputs
/// but was slower in every case the benchmark suite measures, and stays as a reference (top-k still uses it).
/// \param thresholds one layer's table, with one row of thresholds per query head.
/// Errors and non-finite data as `dense_attention`.
template <class Tiles = DefaultTiles, class Scalar, class KView = TensorView<const Scalar>,
          class VView = TensorView<const Scalar>, class Executor = DefaultExecutor>
void top_theta_attention(const TensorView<const detail::identity_t<Scalar>>& q, const KView& k, const VView& v,
                         const TensorView<Scalar>& out, const LayerThresholds& thresholds,
                         const TopThetaOptions& options = {}, AttentionStats* stats = nullptr,
                         const Executor& executor = {}) {
  detail::require(thresholds.heads() == q.heads(), "thresholds",
                  "one row per query head (" + std::to_string(q.heads()) + ")", thresholds.heads());
  const TopThetaSelection selection(thresholds, options.compensation, options.cap_k, options.passes);
  using KvView = detail::kv_view_t<Scalar, KView, VView>;  // contiguous or paged, read-only
  detail::run_tiled_attention<Tiles, Scalar>(q, KvView(k), KvView(v), out, options.attention, selection,
                                             options.value_prefix_sum, executor, stats);
}

}  // namespace toptheta
