// K or V of one sequence kept in pages of a shared pool, found through the sequence's block table.
#pragma once

#include <toptheta/detail/require.hpp>
#include <toptheta/scalar_traits.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

namespace toptheta {

/// How a page holds its `page_size x heads` rows of `head_dim` values.
enum class PageLayout {
  token_major,  ///< `[page_size, heads, head_dim]`: a token's heads together, as a contiguous cache
  head_major,   ///< `[heads, page_size, head_dim]`: a head's tokens together, one run of memory per page
};

/// K or V of one sequence in a paged KV cache, used without copying: a pool of pages of `page_size x heads x
/// head_dim` values (`PageLayout`), and the sequence's block table, whose entry `b` names the pool page that
/// holds its tokens `b * page_size ... (b + 1) * page_size - 1`.
///
/// Element `(t, h, d)` lives at `pages[block_table[t / page_size] * page_size * heads * head_dim + (t %
/// page_size) * token_stride + h * head_stride + d]`, with the strides of the layout (token-major: `heads *
/// head_dim` and `head_dim`; head-major: `head_dim` and `page_size * head_dim`). For int8 blocks
/// (`BlockQ8<N>`) the offsets count blocks: `head_dim / N` in place of `head_dim`. The attention kernels take
/// this view wherever they take a `TensorView` for K and V; they read the rows of one page at a time and the
/// rows they gather through the table. Token-major pages are the faster ones in this project's decode benchmark
/// (`decode_paged`, benchmarks/decode.cpp); head-major is there for engines that keep their cache that way.
/// \tparam Scalar stored type, `const`-qualified for inputs.
template <class Scalar>
class PagedTensorView {
 public:
  using value_type = std::remove_const_t<Scalar>;

  PagedTensorView() = default;
  /// \param pages       the pool: `pool_pages` pages of `page_size * heads * head_dim` values
  /// \param page_size   tokens per page, a power of two (16 is common)
  /// \param block_table `ceil(tokens / page_size)` page indices in `[0, pool_pages)`, in the sequence's order
  /// \throws invalid_argument naming the argument (the table entry) that is out of range.
  PagedTensorView(Scalar* pages, Index pool_pages, Index page_size, const std::int32_t* block_table, Index tokens,
                  Index heads, Index head_dim, PageLayout layout = PageLayout::token_major)
      : pages_(pages),
        block_table_(block_table),
        pool_pages_(pool_pages),
        page_size_(page_size),
        tokens_(tokens),
        heads_(heads),
        head_dim_(head_dim),
        layout_(layout),
        token_stride_(layout == PageLayout::token_major ? heads * elements_of<Scalar>(head_dim)
                                                        : elements_of<Scalar>(head_dim)),
        head_stride_(layout == PageLayout::token_major ? elements_of<Scalar>(head_dim)
                                                       : page_size * elements_of<Scalar>(head_dim)) {
    using detail::require;
    require(page_size >= 1 && (page_size & (page_size - 1)) == 0, "page_size", "a power of two >= 1", page_size);
    require(tokens >= 0, "tokens", "a count >= 0", tokens);
    require(heads >= 1, "heads", "a count >= 1", heads);
    require(head_dim >= 1, "head_dim", "a count >= 1", head_dim);
    require(head_dim % values_per_element_v<Scalar> == 0, "head_dim",
            "a multiple of the " + std::to_string(values_per_element_v<Scalar>) + " values of a block", head_dim);
    require(pool_pages >= 0, "pool_pages", "a count >= 0", pool_pages);
    require(pages != nullptr || tokens == 0, "pages", "a non-null pointer", "nullptr");
    require(block_table != nullptr || tokens == 0, "block_table", "a non-null pointer", "nullptr");
    const Index largest = std::numeric_limits<Index>::max() / Index(sizeof(Scalar));
    require(head_dim <= largest / heads / page_size / std::max<Index>(pool_pages, 1), "pool_pages",
            "a pool whose pool_pages x page_size x heads x head_dim values are addressable", pool_pages);
    while ((Index(1) << page_shift_) < page_size) ++page_shift_;
    for (Index b = 0; b < table_entries(); ++b)
      require(block_table[b] >= 0 && block_table[b] < pool_pages, "block_table[" + std::to_string(b) + "]",
              "a page of the pool, in [0, " + std::to_string(pool_pages) + ")", block_table[b]);
  }

  /// A read-only view of the same pages.
  operator PagedTensorView<const value_type>() const {  // NOLINT(google-explicit-constructor)
    return {pages_, pool_pages_, page_size_, block_table_, tokens_, heads_, head_dim_, layout_};
  }

  Index tokens() const { return tokens_; }
  Index heads() const { return heads_; }
  Index head_dim() const { return head_dim_; }
  Index page_size() const { return page_size_; }
  Index pool_pages() const { return pool_pages_; }
  Scalar* pages() const { return pages_; }
  const std::int32_t* block_table() const { return block_table_; }
  /// Entries of the block table the view reads: `ceil(tokens / page_size)`.
  Index table_entries() const { return (tokens_ + page_size_ - 1) >> page_shift_; }
  PageLayout layout() const { return layout_; }
  /// Stored elements of one page: `page_size x heads x head_dim` values (for blocks, `/ N`).
  Index page_values() const { return page_size_ * heads_ * elements_of<Scalar>(head_dim_); }
  /// Distance between the rows of consecutive tokens within a page, and between the heads of one token.
  Index token_stride() const { return token_stride_; }
  Index head_stride() const { return head_stride_; }

  /// Pointer to the `head_dim` values of token `t`, head `h`.
  Scalar* row(Index t, Index h) const {
    return pages_ + Index(block_table_[t >> page_shift_]) * page_values() + (t & (page_size_ - 1)) * token_stride_ +
           h * head_stride_;
  }
  /// Tokens from `t` on whose rows lie `token_stride` apart: to the end of `t`'s page (or of the sequence).
  Index contiguous_from(Index t) const {
    const Index rest_of_page = page_size_ - (t & (page_size_ - 1));
    return rest_of_page < tokens_ - t ? rest_of_page : tokens_ - t;
  }

 private:
  Scalar* pages_ = nullptr;
  const std::int32_t* block_table_ = nullptr;
  Index pool_pages_ = 0, page_size_ = 1, page_shift_ = 0, tokens_ = 0, heads_ = 1, head_dim_ = 1;
  PageLayout layout_ = PageLayout::token_major;
  Index token_stride_ = 1, head_stride_ = 1;
};

}  // namespace toptheta
