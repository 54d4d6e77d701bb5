// The tiled attention kernel shared by dense, Top-θ and top-k attention: a selection policy decides which
// scores survive, the kernel streams K and V tiles and loads only the V rows some row of the block kept. This
// header chooses the execution plan of each call and runs a batch of calls on an executor.
#pragma once

#include <toptheta/detail/attention_block.hpp>
#include <toptheta/detail/block_pool.hpp>
#include <toptheta/detail/call_state.hpp>
#include <toptheta/detail/query_block_plan.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/detail/split_key_plan.hpp>
#include <toptheta/detail/view_overlap.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/selection.hpp>
#include <toptheta/stats.hpp>
#include <toptheta/value_means.hpp>
#include <toptheta/views.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace toptheta {

/// Compile-time tile sizes: `QueryBlock` query rows (times the GQA group's heads) against `KvBlock` keys.
template <Index QueryBlock, Index KvBlock>
struct Tiles {
  static_assert(QueryBlock >= 1 && KvBlock >= 1, "tile sizes must be positive");
  static constexpr Index query_block = QueryBlock;
  static constexpr Index kv_block = KvBlock;
};

/// 64 query rows x 256 keys: on a Llama-3-8B layer (GQA 4, d = 128; benchmarks/) each K tile packed for the
/// score GEMM serves 256 stacked rows and per-tile work is paid a quarter as often as with 32 x 128 (faster
/// prefill for every kernel in the suite's `prefill` cases), for about 1.5 MB of tile buffers per work item.
/// Decode (one query row, keys split across work items) is unaffected.
using DefaultTiles = Tiles<64, 256>;

namespace detail {

/// One attention call split into work items by one of two plans:
/// - `SplitKeyPlan` for calls with few stacked rows per block (decode) and a rule that needs no whole rows first:
///   items are (query block, key range) over every KV head, merged afterwards;
/// - `QueryBlockPlan` otherwise (prefill; decode with two passes or a cap without a running threshold): items
///   are (KV head, query block), after a `PrefillPreparation` when there are several GEMM blocks per KV head.
/// Both run `AttentionBlock`s over the shared `CallState`.
template <class Tiles, class Scalar, class Selection, class KvView = TensorView<const Scalar>>
class TiledAttention {
 public:
  using Acc = accumulator_t<Scalar>;

  using Block = AttentionBlock<Tiles, Scalar, Selection, KvView>;

  /// \param blocks where work items borrow their blocks; shared by the calls of a batch, outlives them.
  TiledAttention(const TensorView<const Scalar>& q, const KvView& k, const KvView& v, const TensorView<Scalar>& out,
                 const AttentionShape& shape, const Selection& selection, const ValueMeans<Acc>* value_means,
                 bool collect_stats, BlockPool<Block>& blocks)
      : call_(q, k, v, out, shape, selection, value_means, collect_stats) {
    const Index block_rows = shape.group_size * std::min(Tiles::query_block, shape.query_rows);
    if (SplitKeys::suits(call_, block_rows))
      split_keys_.emplace(call_, blocks);
    else
      query_blocks_.emplace(call_, block_rows, blocks);
  }

  /// Whether some output row with a softmax came out non-finite with the fast V products; then
  /// `use_careful_values` and running every item again gives the rows that do not weigh a non-finite V value
  /// their finite output.
  bool found_non_finite_output() const { return call_.non_finite_output.load(); }
  void use_careful_values() { call_.careful_values = true; }
  bool careful_values() const { return call_.careful_values; }

  /// Work items to run before the blocks (`PrefillPreparation`).
  Index preparation_items() const { return call_.preparation ? call_.preparation->items() : 0; }
  void prepare(Index item) { call_.preparation->prepare(item); }

  Index work_items() const { return split_keys_ ? split_keys_->work_items() : query_blocks_->work_items(); }

  /// Runs work item `item` of the plan.
  void run(Index item, AttentionStats& stats) {
    if (split_keys_) return split_keys_->run(item, stats);
    query_blocks_->run(item, stats);
  }

  /// Work items to run after `run`'s: with split keys, one per (query block, KV head).
  Index finish_items() const { return split_keys_ ? split_keys_->finish_items() : 0; }

  /// With split keys, after every item ran: merges the key ranges of one (query block, KV head), writes o_i.
  void finish_split_rows(Index item, AttentionStats& stats) { split_keys_->finish(item, stats); }

  /// Distinct V rows kept per KV head over the whole call (only when stats are collected).
  void count_kept_rows(AttentionStats& stats) const {
    for (Index h = 0; h < call_.shape.kv_heads; ++h) {
      stats.v_rows_kept[h] = call_.kept_rows.count(h);
      stats.v_rows_visible[h] = std::uint64_t(call_.shape.max_row_length());
    }
  }

 private:
  using SplitKeys = SplitKeyPlan<Tiles, Scalar, Selection, KvView>;
  using QueryBlocks = QueryBlockPlan<Tiles, Scalar, Selection, KvView>;

  CallState<Tiles, Scalar, Selection, KvView> call_;
  std::optional<SplitKeys> split_keys_;  // one plan of the two
  std::optional<QueryBlocks> query_blocks_;
};

/// One attention call of a batch: a sequence's views, placement and V prefix sum, and where its statistics go.
template <class Scalar, class KvView = TensorView<const Scalar>>
struct SequenceCall {
  TensorView<const Scalar> q;
  KvView k, v;
  TensorView<Scalar> out;
  AttentionOptions options;
  const double* value_prefix_sum = nullptr;
  AttentionStats* stats = nullptr;
};

/// Checks one call's views (`attention_shape`) and that `out` shares no memory with q, k, v or itself, and
/// returns its shape. With a `name` (a batch's "sequences[3]"), errors name the argument below it.
template <class Scalar, class KvView>
AttentionShape checked_call_shape(const SequenceCall<Scalar, KvView>& call, const std::string& name) {
  try {
    const AttentionShape shape = attention_shape(call.q, call.k, call.v, call.out, call.options);
    // The output is written while q, k and v are read (by other work items, and again when V values are not
    // finite), so it may share no memory with them, nor its rows with each other.
    const auto& out = call.out;
    require(!rows_overlap(out), "out", "rows that do not overlap (token_stride, head_stride >= head_dim)",
            "token_stride " + std::to_string(out.token_stride()) + ", head_stride " +
                std::to_string(out.head_stride()) + ", head_dim " + std::to_string(out.head_dim()));
    for (const auto& [input, overlaps] : {std::pair<const char*, bool>{"q", may_overlap(out, call.q)},
                                          {"k", may_overlap(out, call.k)},
                                          {"v", may_overlap(out, call.v)}})
      require(!overlaps, "out", std::string("memory apart from ") + input + " (no in-place attention)",
              std::string("a view that overlaps ") + input);
    return shape;
  } catch (const invalid_argument& error) {
    if (name.empty()) throw;
    const std::string message = error.what(), prefix = "toptheta: ";  // "toptheta: <argument>: ..."
    throw invalid_argument(prefix + name + "." + message.substr(message.rfind(prefix, 0) == 0 ? prefix.size() : 0));
  }
}

/// Runs `selection` over a batch of attention calls on `executor`: the body of every public attention kernel
/// (a single call is a batch of one). Every call is checked before any work starts. The calls' work items
/// (preparation, then blocks or key ranges, then the merges of split keys) run as one list per stage, so short
/// calls and long ones share the threads; each call's results are those it gives alone, bit for bit.
template <class Tiles, class Scalar, class KvView, class Selection, class Executor>
void run_tiled_attention_batch(const std::vector<SequenceCall<Scalar, KvView>>& calls, const Selection& selection,
                               const Executor& executor, bool name_calls) {
  using Acc = accumulator_t<Scalar>;
  using Kernel = TiledAttention<Tiles, Scalar, Selection, KvView>;
  const std::size_t count = calls.size();
  std::vector<AttentionShape> shapes;
  for (std::size_t c = 0; c < count; ++c)
    shapes.push_back(checked_call_shape(calls[c], name_calls ? "sequences[" + std::to_string(c) + "]" : ""));
  std::vector<ValueMeans<Acc>> value_means(count);
  BlockPool<typename Kernel::Block> blocks;             // every call's work items borrow from it
  std::vector<std::unique_ptr<Kernel>> kernels(count);  // none for a call without query rows: it does nothing
  for (std::size_t c = 0; c < count; ++c) {
    const SequenceCall<Scalar, KvView>& call = calls[c];
    if (call.stats) call.stats->reset(shapes[c].q_heads, shapes[c].kv_heads);
    if (shapes[c].query_rows == 0) continue;
    if (selection.compensation().v_mean) value_means[c] = ValueMeans<Acc>::sized(shapes[c]);
    kernels[c] = std::make_unique<Kernel>(call.q, call.k, call.v, call.out, shapes[c], selection, &value_means[c],
                                          call.stats != nullptr, blocks);
  }
  // One parallel_for over `items_of(c)` items of each call c (0 for calls without a kernel), in call order.
  std::vector<Index> first(count + 1);
  const auto run_stage = [&](auto&& items_of, auto&& run) {
    first[0] = 0;
    for (std::size_t c = 0; c < count; ++c) first[c + 1] = first[c] + (kernels[c] ? items_of(c) : 0);
    if (first[count] == 0) return;
    executor.parallel_for(first[count], [&](Index item) {
      const std::size_t c = std::size_t(std::upper_bound(first.begin(), first.end(), item) - first.begin()) - 1;
      run(c, item - first[c]);
    });
  };
  // Before the blocks: each call's preparation, then the V means of each of its KV heads.
  const Index mean_items = selection.compensation().v_mean ? 1 : 0;
  run_stage([&](std::size_t c) { return kernels[c]->preparation_items() + mean_items * shapes[c].kv_heads; },
            [&](std::size_t c, Index item) {
              const Index preparation_items = kernels[c]->preparation_items();
              if (item < preparation_items) return kernels[c]->prepare(item);
              value_means[c].compute(item - preparation_items, calls[c].v, calls[c].value_prefix_sum);
            });
  std::vector<std::vector<AttentionStats>> item_stats(count), finish_stats(count);
  for (std::size_t c = 0; c < count; ++c)
    if (kernels[c]) {
      item_stats[c].resize(std::size_t(kernels[c]->work_items()));
      finish_stats[c].resize(std::size_t(kernels[c]->finish_items()));
    }
  const auto run_item = [&](std::size_t c, Index item) {
    item_stats[c][std::size_t(item)].reset(shapes[c].q_heads, shapes[c].kv_heads);
    kernels[c]->run(item, item_stats[c][std::size_t(item)]);
  };
  const auto finish_item = [&](std::size_t c, Index item) {
    finish_stats[c][std::size_t(item)].reset(shapes[c].q_heads, shapes[c].kv_heads);
    kernels[c]->finish_split_rows(item, finish_stats[c][std::size_t(item)]);
  };
  // Calls in groups of at least `group_items` work items, and one parallel_for per group that also runs the
  // previous group's merges (split keys): the threads stay busy across calls, and a group's partial rows are
  // merged while they are still in cache (groups of 32 items measured faster than of 64, which were faster
  // than one group for the whole batch: the partial rows of fewer items stay in cache).
  constexpr Index group_items = 32;
  std::vector<std::size_t> group_first{0};
  for (std::size_t c = 0, items = 0; c < count; ++c) {
    items += kernels[c] ? std::size_t(kernels[c]->work_items()) : 0;
    if (items >= std::size_t(group_items) || c + 1 == count) {
      group_first.push_back(c + 1);
      items = 0;
    }
  }
  const std::size_t groups = group_first.size() - 1;
  for (std::size_t g = 0; g <= groups; ++g) {  // group g's work items and group g - 1's merges
    const auto in_group = [&](std::size_t c, std::size_t group) {
      return group < groups && c >= group_first[group] && c < group_first[group + 1];
    };
    const auto works = [&](std::size_t c) { return in_group(c, g); };
    const auto merges = [&](std::size_t c) { return g > 0 && in_group(c, g - 1); };
    run_stage(
        [&](std::size_t c) {
          return (works(c) ? kernels[c]->work_items() : 0) + (merges(c) ? kernels[c]->finish_items() : 0);
        },
        [&](std::size_t c, Index item) {
          if (works(c)) return run_item(c, item);
          finish_item(c, item);
        });
  }
  // Non-finite V values (or sums that overflow) in a call: V products that skip zero weights, for every row of
  // that call again (its out overlaps none of its inputs).
  bool any_careful = false;
  for (std::size_t c = 0; c < count; ++c)
    if (kernels[c] && kernels[c]->found_non_finite_output()) {
      kernels[c]->use_careful_values();
      any_careful = true;
    }
  if (any_careful) {
    const auto careful = [&](std::size_t c) { return kernels[c]->careful_values(); };
    run_stage([&](std::size_t c) { return careful(c) ? kernels[c]->work_items() : 0; }, run_item);
    run_stage([&](std::size_t c) { return careful(c) ? kernels[c]->finish_items() : 0; }, finish_item);
  }
  for (std::size_t c = 0; c < count; ++c) {
    AttentionStats* stats = calls[c].stats;
    if (!stats || !kernels[c]) continue;
    for (const auto& item : item_stats[c]) stats->merge(item);
    for (const auto& item : finish_stats[c]) stats->merge(item);
    kernels[c]->count_kept_rows(*stats);
  }
}

/// Runs `selection` over one attention call on `executor`.
template <class Tiles, class Scalar, class KvView, class Selection, class Executor>
void run_tiled_attention(const TensorView<const Scalar>& q, const KvView& k, const KvView& v,
                         const TensorView<Scalar>& out, const AttentionOptions& options, const Selection& selection,
                         const double* value_prefix_sum, const Executor& executor, AttentionStats* stats) {
  const std::vector<SequenceCall<Scalar, KvView>> call{{q, k, v, out, options, value_prefix_sum, stats}};
  run_tiled_attention_batch<Tiles, Scalar>(call, selection, executor, false);
}

}  // namespace detail
}  // namespace toptheta
