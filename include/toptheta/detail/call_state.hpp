// What the work items of one attention call share: its views, shape and rule, and what they report back.
#pragma once

#include <toptheta/detail/kept_row_sets.hpp>
#include <toptheta/detail/kv_view.hpp>
#include <toptheta/detail/prefill_preparation.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/selection.hpp>
#include <toptheta/value_means.hpp>
#include <toptheta/views.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>

namespace toptheta::detail {

/// One call's inputs as every work item reads them (q, K, V, the output, the shape, the selection rule and the
/// V means) and what the items report back (non-finite outputs, the kept V rows). An execution plan decides
/// which items run; the blocks (`AttentionBlock`) do the work.
template <class Tiles, class Scalar, class Selection, class KvView>
struct CallState {
  using Acc = accumulator_t<Scalar>;

  CallState(const TensorView<const Scalar>& queries, const KvView& keys, const KvView& values,
            const TensorView<Scalar>& output, const AttentionShape& call_shape, const Selection& rule,
            const ValueMeans<Acc>* means, bool stats_wanted)
      : q(queries),
        k(keys),
        v(values),
        out(output),
        shape(call_shape),
        selection(rule),
        value_means(means),
        track_pruned_mass(!rule.post_softmax() && rule.compensation().denominator == DenominatorCompensation::exact),
        defers_values(rule.has_running_threshold()),
        collect_stats(stats_wanted) {
    if (collect_stats) kept_rows.reset(shape.kv_heads, shape.key_rows);
  }

  /// Packs K tiles and copies V head-major once for every block (`PrefillPreparation`); the blocks then read V
  /// from the copy when there is one (none for a paged V, one already head-major, or one above the size
  /// limit).
  void prepare_keys_and_values() {
    preparation.emplace(k, v, shape.max_row_length());
    v = preparation->values();
  }

  /// Keys [first, first + width) of `kv_head` packed once for every block; null unless they were.
  const Acc* packed_key_tile(Index kv_head, Index first, Index width) const {
    return preparation ? preparation->packed_key_tile(kv_head, first, width) : nullptr;
  }

  /// `row_at(j)`: the V row of position `first + j` of `kv_head`, for the gathers.
  auto value_rows(Index kv_head, Index first) const {
    if constexpr (is_paged_view_v<KvView>) {
      return [this, kv_head, first](std::int32_t j) { return v.row(first + j, kv_head); };
    } else {
      return [values = v.row(first, kv_head), stride = v.token_stride()](std::int32_t j) {
        return values + Index(j) * stride;
      };
    }
  }

  /// `f(from, count)` for each run of keys [first, first + count) whose rows lie a token stride apart in `view`
  /// (one run unless the view is paged), in order.
  template <class F>
  static void for_each_run(const KvView& view, Index first, Index count, F&& f) {
    for (Index from = first, end = first + count; from < end;) {
      const Index run = std::min(end - from, view.contiguous_from(from));
      f(from, run);
      from += run;
    }
  }

  TensorView<const Scalar> q;
  KvView k;
  KvView v;  // the caller's V, or its head-major copy that the blocks read
  TensorView<Scalar> out;
  AttentionShape shape;
  const Selection& selection;
  const ValueMeans<Acc>* value_means;
  bool track_pruned_mass;
  bool defers_values;  // running thresholds: V rows are read once each row's τ_i is known
  bool collect_stats;
  // Non-finite V values: a zero weight times inf is NaN, so the fast V products (GEMMs, streams over every row
  // of a block) would let a V row that a row does not use (pruned, masked) poison it. They are used as long as
  // every output row with a softmax comes out finite; otherwise the call runs again `careful_values`, adding
  // each V row only to the rows that weigh it.
  bool careful_values = false;
  std::atomic<bool> non_finite_output{false};
  KeptRowSets kept_rows;  // only when statistics are collected
  std::optional<PrefillPreparation<Tiles, Scalar, KvView>> preparation;
};

}  // namespace toptheta::detail
