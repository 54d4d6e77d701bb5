// The union of the V rows any query row kept, per KV head: the distinct-row statistic of a call.
#pragma once

#include <toptheta/scalar_traits.hpp>

#include <atomic>
#include <cstdint>
#include <vector>

namespace toptheta::detail {

/// Rows kept by any query row, per KV head: the union that decides which V rows an engine needs. Work items
/// mark rows concurrently (relaxed atomic ORs).
class KeptRowSets {
 public:
  void reset(Index kv_heads, Index key_rows) {
    words_per_head_ = (key_rows + 63) / 64;
    bits_ = std::vector<std::atomic<std::uint64_t>>(std::size_t(kv_heads * words_per_head_));
  }
  void mark(Index kv_head, Index position) { mark_word(kv_head, position / 64, std::uint64_t(1) << (position % 64)); }
  /// Marks the positions 64 word + b for the bits b set in `bits`.
  void mark_word(Index kv_head, Index word, std::uint64_t bits) {
    bits_[std::size_t(kv_head * words_per_head_ + word)].fetch_or(bits, std::memory_order_relaxed);
  }
  std::uint64_t count(Index kv_head) const {
    std::uint64_t total = 0;
    for (Index w = 0; w < words_per_head_; ++w)
      total += std::uint64_t(__builtin_popcountll(bits_[std::size_t(kv_head * words_per_head_ + w)].load()));
    return total;
  }

 private:
  Index words_per_head_ = 0;
  std::vector<std::atomic<std::uint64_t>> bits_;
};

}  // namespace toptheta::detail
