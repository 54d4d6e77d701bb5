// Finished work-item blocks kept for the next items, so that their buffers are neither allocated nor cold again.
#pragma once

#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace toptheta::detail {

/// Blocks (default-constructible, `start(args...)`) lent to work items and given back when they finish; shared
/// by the threads and the calls of one batch, so that it holds no more blocks than were ever in use at once. A
/// lent block starts afresh, so results do not depend on which block an item gets.
template <class Block>
class BlockPool {
 public:
  /// A block started on `args`: the last one given back when there is one (its buffers are likely in cache),
  /// else a new one.
  template <class... Args>
  std::unique_ptr<Block> lend(Args&&... args) {
    std::unique_ptr<Block> block;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!spare_.empty()) {
        block = std::move(spare_.back());
        spare_.pop_back();
      }
    }
    if (!block) block = std::make_unique<Block>();
    block->start(std::forward<Args>(args)...);
    return block;
  }

  /// Keeps a finished block for `lend`.
  void take_back(std::unique_ptr<Block> block) {
    if (!block) return;
    const std::lock_guard<std::mutex> lock(mutex_);
    spare_.push_back(std::move(block));
  }

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<Block>> spare_;
};

}  // namespace toptheta::detail
