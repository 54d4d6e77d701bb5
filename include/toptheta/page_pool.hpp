// Fixed-size pages of K and V shared by the sequences of one layer.
#pragma once

#include <toptheta/aligned_vector.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/paged_view.hpp>
#include <toptheta/scalar_traits.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace toptheta {

/// `pages` pages of K and `pages` pages of V of `page_size x kv_heads x head_dim` values (`PageLayout`,
/// token-major by default), allocated once (on cache lines) and lent to the sequences of one layer (`PagedKvCache`) one
/// page at a time; the pool hands out the most recently returned page first. Views of its pages stay valid until the
/// pool is destroyed. \tparam Scalar stored type: `float`, `double`, `Eigen::half`, `Eigen::bfloat16` or `BlockQ8<N>`
/// (an int8 cache, quantized on append; `head_dim` a multiple of N).
template <class Scalar>
class PagePool {
 public:
  /// \throws invalid_argument naming the argument: counts below 1, a `page_size` that is not a power of two,
  /// or a pool whose values could not be addressed.
  PagePool(Index pages, Index page_size, Index kv_heads, Index head_dim, PageLayout layout = PageLayout::token_major)
      : pages_(pages), page_size_(page_size), kv_heads_(kv_heads), head_dim_(head_dim), layout_(layout) {
    using detail::require;
    require(pages >= 1 && pages <= std::numeric_limits<std::int32_t>::max(), "pages",
            "a count in [1, 2^31) (block tables hold 32-bit page indices)", pages);
    require(page_size >= 1 && (page_size & (page_size - 1)) == 0, "page_size", "a power of two >= 1", page_size);
    require(kv_heads >= 1, "kv_heads", "a count >= 1", kv_heads);
    require(head_dim >= 1, "head_dim", "a count >= 1", head_dim);
    require(head_dim % values_per_element_v<Scalar> == 0, "head_dim",
            "a multiple of the " + std::to_string(values_per_element_v<Scalar>) + " values of a block", head_dim);
    const Index largest = std::numeric_limits<Index>::max() / Index(sizeof(Scalar));
    require(head_dim <= largest / kv_heads / page_size / pages, "pages",
            "a pool whose pages x page_size x kv_heads x head_dim values are addressable", pages);
    keys_.resize(std::size_t(pages * page_values()));
    values_.resize(keys_.size());
    free_.reserve(std::size_t(pages));
    for (Index page = pages - 1; page >= 0; --page) free_.push_back(std::int32_t(page));  // page 0 first
    in_use_.assign(std::size_t(pages), 0);
  }

  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  Index pages() const { return pages_; }
  Index page_size() const { return page_size_; }
  Index kv_heads() const { return kv_heads_; }
  Index head_dim() const { return head_dim_; }
  PageLayout layout() const { return layout_; }
  Index free_pages() const { return Index(free_.size()); }
  /// Stored elements of one page of K (or V): `page_size x kv_heads x head_dim` values (for blocks, `/ N`).
  Index page_values() const { return page_size_ * kv_heads_ * elements_of<Scalar>(head_dim_); }

  /// A free page, now in use. \throws invalid_argument when every page is in use.
  std::int32_t allocate() {
    detail::require(!free_.empty(), "pool", "a free page", "all " + std::to_string(pages_) + " pages in use");
    const std::int32_t page = free_.back();
    free_.pop_back();
    in_use_[std::size_t(page)] = 1;
    return page;
  }

  /// Returns a page in use to the pool. \throws invalid_argument for a page outside the pool or not in use.
  void release(std::int32_t page) {
    detail::require(page >= 0 && page < pages_ && in_use_[std::size_t(page)], "page",
                    "a page of the pool in use, in [0, " + std::to_string(pages_) + ")", page);
    in_use_[std::size_t(page)] = 0;
    free_.push_back(page);
  }

  Scalar* key_pages() { return keys_.data(); }
  Scalar* value_pages() { return values_.data(); }
  const Scalar* key_pages() const { return keys_.data(); }
  const Scalar* value_pages() const { return values_.data(); }

 private:
  Index pages_, page_size_, kv_heads_, head_dim_;
  PageLayout layout_;
  AlignedVector<Scalar> keys_, values_;
  std::vector<std::int32_t> free_;  // a stack: the last page returned is lent first (still in cache)
  std::vector<char> in_use_;
};

}  // namespace toptheta
