// The plan of calls that do not split keys (prefill; decode with rules that need whole rows first, or a cap
// without a running threshold): work items are (KV head, query block), with GEMMs when a block has many rows.
#pragma once

#include <toptheta/detail/attention_block.hpp>
#include <toptheta/detail/block_pool.hpp>
#include <toptheta/detail/call_state.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/stats.hpp>

#include <memory>
#include <utility>

namespace toptheta::detail {

/// Query blocks (GEMM prefill): a work item is (KV head, query block) and runs design.md §1 on its rows, its
/// tiles from the last to the first so that a cap of k keeps the largest positions in one pass. A call with
/// several GEMM blocks per KV head first runs its `PrefillPreparation` (K tiles packed, V copied head-major
/// once for every block).
template <class Tiles, class Scalar, class Selection, class KvView>
class QueryBlockPlan {
 public:
  using Call = CallState<Tiles, Scalar, Selection, KvView>;
  using Block = AttentionBlock<Tiles, Scalar, Selection, KvView>;

  /// Plans `call`, whose blocks stack `block_rows` rows.
  QueryBlockPlan(Call& call, Index block_rows, BlockPool<Block>& blocks) : call_(call), blocks_(blocks) {
    query_blocks_ = (call.shape.query_rows + Tiles::query_block - 1) / Tiles::query_block;
    if (block_rows > Block::streaming_rows && query_blocks_ > 1) call.prepare_keys_and_values();
  }

  Index work_items() const { return call_.shape.kv_heads * query_blocks_; }

  /// Attends the query rows of block `item % query_blocks` for every head of KV head `item / query_blocks`.
  void run(Index item, AttentionStats& stats) {
    std::unique_ptr<Block> block = blocks_.lend(call_, item / query_blocks_, item % query_blocks_);
    block->select_rows(stats);
    const Index tiles = (block->visible_end + Tiles::kv_block - 1) / Tiles::kv_block;
    for (Index tile = tiles - 1; tile >= 0; --tile) block->accumulate_tile(tile * Tiles::kv_block, stats);
    block->finish_rows(stats);
    blocks_.take_back(std::move(block));
  }

 private:
  Call& call_;
  Index query_blocks_ = 0;
  BlockPool<Block>& blocks_;  // shared by the calls of a batch
};

}  // namespace toptheta::detail
