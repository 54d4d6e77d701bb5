// The plan of calls with few stacked rows per block (decode): work items are (query block, key range) over
// every KV head, and the ranges' partial rows merge exactly afterwards.
#pragma once

#include <toptheta/detail/attention_block.hpp>
#include <toptheta/detail/block_pool.hpp>
#include <toptheta/detail/call_state.hpp>
#include <toptheta/detail/row_products.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/stats.hpp>

#include <algorithm>
#include <memory>
#include <vector>

namespace toptheta::detail {

/// Split-key decode (design.md §3, §6): a work item is (query block, key range) over every KV head, so that a
/// `[tokens, heads, d]` cache is read in address order and one long row uses every core. Each range keeps its
/// rows' partial state (max, sums, output numerator, candidates of a running threshold); the finish items merge
/// the ranges of each (query block, KV head) and write o_i. For the rules that do not need whole rows first and
/// whose kept set does not depend on the order of the keys (a cap of k needs a running threshold).
template <class Tiles, class Scalar, class Selection, class KvView>
class SplitKeyPlan {
 public:
  using Call = CallState<Tiles, Scalar, Selection, KvView>;
  using Block = AttentionBlock<Tiles, Scalar, Selection, KvView>;
  using KvScalar = typename KvView::value_type;

  /// Whether a call whose blocks stack `block_rows` rows runs this plan.
  static bool suits(const Call& call, Index block_rows) {
    return block_rows <= Block::streaming_rows && !call.selection.needs_row_scores() &&
           (!call.selection.caps_rows() || call.defers_values);
  }

  SplitKeyPlan(Call& call, BlockPool<Block>& blocks) : call_(call), blocks_(blocks) {
    query_blocks_ = (call.shape.query_rows + Tiles::query_block - 1) / Tiles::query_block;
    tiles_ = (call.shape.max_row_length() + Tiles::kv_block - 1) / Tiles::kv_block;
    tiles_per_split_ = (tiles_ + max_key_splits - 1) / max_key_splits;
    key_splits_ = (tiles_ + tiles_per_split_ - 1) / tiles_per_split_;
    partials_.resize(std::size_t(query_blocks_ * key_splits_ * call.shape.kv_heads));
  }

  Index work_items() const { return query_blocks_ * key_splits_; }

  /// Keeps the partial rows of query block `item / key_splits` over key range `item % key_splits` for every KV
  /// head: the range's tiles from the last to the first, every KV head in turn per tile.
  void run(Index item, AttentionStats& stats) {
    const Index query_block = item / key_splits_, split = item % key_splits_;
    std::vector<std::unique_ptr<Block>> blocks;
    for (Index kv_head = 0; kv_head < call_.shape.kv_heads; ++kv_head) {
      blocks.push_back(blocks_.lend(call_, kv_head, query_block));
      blocks.back()->select_rows(stats);
    }
    // Every block holds the same query rows, so they share their visible keys and their tiles.
    const Index first_tile = split * tiles_per_split_, end_tile = std::min(first_tile + tiles_per_split_, tiles_);
    const Index row_bytes = stored_bytes<KvScalar>(call_.shape.head_dim);
    // Keys [first, end) of the blocks `streams` says read every row of `rows`, `sweep_keys` at a time per block;
    // each block asks for its next rows while it works on the current ones: the next step's, and after the
    // last step those `after(block)` names. The first step's rows are asked for in one burst beforehand.
    // A step ends at the end of a page too (a paged view), so that its rows lie a token stride apart.
    const auto sweep = [&](Index first, Index end, const KvView& rows, auto&& streams, auto&& after, auto&& step) {
      const auto step_keys = [&](Index from) { return std::min({sweep_keys, end - from, rows.contiguous_from(from)}); };
      for (auto& block : blocks)
        if (streams(*block))
          prefetch_rows(rows.row(first, block->kv_head), rows.token_stride(), step_keys(first), row_bytes);
      for (Index from = first; from < end;) {
        const Index count = step_keys(from), next = from + count;
        for (auto& block : blocks) {
          if (!streams(*block)) continue;
          step(*block, from, count,
               next < end ? NextRows<KvScalar>{rows.row(next, block->kv_head), step_keys(next)} : after(*block));
        }
        from = next;
      }
    };
    std::vector<char> needs_values(blocks.size());
    for (Index tile = end_tile - 1; tile >= first_tile; --tile) {
      const Index first = tile * Tiles::kv_block;
      if (first >= blocks.front()->visible_end) continue;
      for (auto& block : blocks) block->begin_tile(first);
      const Index end = first + blocks.front()->tile_width;
      // After its last K rows, a block asks for the first K rows of the next tile (the one before).
      const auto next_tile_keys = [&](const Block& block) {
        return tile > first_tile ? NextRows<KvScalar>{call_.k.row(first - Tiles::kv_block, block.kv_head),
                                                      std::min({sweep_keys, Tiles::kv_block,
                                                                call_.k.contiguous_from(first - Tiles::kv_block)})}
                                 : NextRows<KvScalar>{};
      };
      sweep(
          first, end, call_.k, [](const Block& block) { return !block.scores_rows_first(); }, next_tile_keys,
          [&](Block& block, Index from, Index count, NextRows<KvScalar> next) {
            block.score_keys(from, count, stats, next);
          });
      for (std::size_t b = 0; b < blocks.size(); ++b) needs_values[b] = blocks[b]->weigh_tile(stats);
      for (std::size_t b = 0; b < blocks.size(); ++b)
        if (needs_values[b] && blocks[b]->tile_sparse) blocks[b]->accumulate_values(first, end - first);
      sweep(
          first, end, call_.v,
          [&](const Block& block) { return needs_values[std::size_t(block.kv_head)] && !block.tile_sparse; },
          [](const Block&) { return NextRows<KvScalar>{}; },
          [&](Block& block, Index from, Index count, NextRows<KvScalar> next) {
            block.accumulate_values(from, count, next);
          });
    }
    for (auto& block : blocks) block->forget_stale_candidates();
    for (Index kv_head = 0; kv_head < call_.shape.kv_heads; ++kv_head)
      partials_[std::size_t((query_block * key_splits_ + split) * call_.shape.kv_heads + kv_head)] =
          std::move(blocks[std::size_t(kv_head)]);
  }

  /// Work items to run after `run`'s: one per (query block, KV head).
  Index finish_items() const { return query_blocks_ * call_.shape.kv_heads; }

  /// After every item ran: merges the key ranges of (query block `item / kv_heads`, KV head `item % kv_heads`)
  /// and writes o_i.
  void finish(Index item, AttentionStats& stats) {
    const Index kv_heads = call_.shape.kv_heads, query_block = item / kv_heads, kv_head = item % kv_heads;
    const auto partial = [&](Index split) -> std::unique_ptr<Block>& {
      return partials_[std::size_t((query_block * key_splits_ + split) * kv_heads + kv_head)];
    };
    // From the last range to the first, as the tiles of one range run.
    Block& merged = *partial(key_splits_ - 1);
    for (Index split = key_splits_ - 2; split >= 0; --split) merged.merge(*partial(split));
    merged.finish_rows(stats);
    // Only this item used these partial rows: lent again now, not kept until the call (or a whole batch) ends.
    for (Index split = 0; split < key_splits_; ++split) blocks_.take_back(std::move(partial(split)));
  }

 private:
  /// Most key ranges one call is split into; a fixed count, not the thread count, so that results do not
  /// depend on the executor.
  static constexpr Index max_key_splits = 16;
  /// The KV heads' blocks take turns every this many keys, so that K and V are read in nearly address order
  /// from a `[tokens, heads, d]` cache and the hardware prefetcher follows.
  static constexpr Index sweep_keys = 16;

  Call& call_;
  Index query_blocks_ = 0, tiles_ = 0, tiles_per_split_ = 0, key_splits_ = 0;
  std::vector<std::unique_ptr<Block>> partials_;  // [query block][key range][KV head]
  BlockPool<Block>& blocks_;                      // shared by the calls of a batch
};

}  // namespace toptheta::detail
