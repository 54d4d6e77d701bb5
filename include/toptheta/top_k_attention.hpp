// Top-k attention, the baseline Top-θ replaces: each row keeps its k largest scores.
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

struct TopKOptions : SparseAttentionOptions {
  Index k = 64;
  /// Calibrated denominator terms c_h(L), needed only for calibrated compensation.
  const LayerThresholds* thresholds = nullptr;
};

/// Top-k attention: `S_i` = the `k` largest scores of row `i` (ties: the larger position wins), rows with
/// `L_i <= k` dense, the same compensations as Top-θ. It needs each whole row before selecting: extra memory
/// O(query block x group x L) per work item. Errors and non-finite data as `dense_attention`.
template <class Tiles = DefaultTiles, class Scalar, class KView = TensorView<const Scalar>,
          class VView = TensorView<const Scalar>, class Executor = DefaultExecutor>
void top_k_attention(const TensorView<const detail::identity_t<Scalar>>& q, const KView& k, const VView& v,
                     const TensorView<Scalar>& out, const TopKOptions& options = {}, AttentionStats* stats = nullptr,
                     const Executor& executor = {}) {
  if (options.thresholds)
    detail::require(options.thresholds->heads() == q.heads(), "options.thresholds",
                    "one row per query head (" + std::to_string(q.heads()) + ")", options.thresholds->heads());
  const TopKSelection selection(options.k, options.compensation, options.thresholds);
  using KvView = detail::kv_view_t<Scalar, KView, VView>;  // contiguous or paged, read-only
  detail::run_tiled_attention<Tiles, Scalar>(q, KvView(k), KvView(v), out, options.attention, selection,
                                             options.value_prefix_sum, executor, stats);
}

}  // namespace toptheta
