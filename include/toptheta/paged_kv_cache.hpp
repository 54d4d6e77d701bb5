// One sequence's K and V in pages of a shared pool, with the running V sum V-mean compensation needs.
#pragma once

#include <toptheta/detail/cached_tokens.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/page_pool.hpp>
#include <toptheta/paged_view.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/views.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace toptheta {

/// The K and V rows of one sequence of one layer in pages lent by a `PagePool` (shared by the engine's
/// sequences), its block table, and `Σ_{j<length} v_j` per KV head as `KvCache` keeps it. `append` takes pages
/// from the pool as tokens fill them; `clear` (and the destructor) returns them. `keys()` and `values()` are the
/// views every kernel takes (`dense_attention`, `top_theta_attention`, `top_k_attention`, and their batches);
/// they stay valid until the next `append` or `clear`.
///
/// `append` checks everything before it changes anything: shapes, free pages for every new token, and (by
/// default, `check_finite`) finite values, as `KvCache::append` does. The pool must outlive its caches, and a
/// cache's pages are returned by the cache alone (`PagePool::release` of a page a cache holds would lend it
/// twice).
/// \tparam Scalar stored type, that of the pool.
template <class Scalar>
class PagedKvCache {
 public:
  explicit PagedKvCache(PagePool<Scalar>& pool) : pool_(&pool), tokens_(pool.kv_heads(), pool.head_dim()) {}
  PagedKvCache(const PagedKvCache&) = delete;
  PagedKvCache& operator=(const PagedKvCache&) = delete;
  /// The other cache is left empty, holding no page.
  PagedKvCache(PagedKvCache&& other) noexcept
      : pool_(other.pool_), tokens_(std::move(other.tokens_)), block_table_(std::move(other.block_table_)) {
    other.forget_all();
  }
  /// Returns this cache's pages, then takes the other's; the other is left empty.
  PagedKvCache& operator=(PagedKvCache&& other) noexcept {
    if (this == &other) return *this;
    clear();
    pool_ = other.pool_;
    tokens_ = std::move(other.tokens_);
    block_table_ = std::move(other.block_table_);
    other.forget_all();
    return *this;
  }
  ~PagedKvCache() { clear(); }

  Index length() const { return tokens_.length(); }
  Index kv_heads() const { return tokens_.kv_heads(); }
  Index head_dim() const { return tokens_.head_dim(); }
  /// Logical page b of the sequence lives in pool page `block_table()[b]`.
  const std::vector<std::int32_t>& block_table() const { return block_table_; }

  /// Whether `append` rejects non-finite values (default true).
  bool check_finite() const { return tokens_.check_finite(); }
  void check_finite(bool on) { tokens_.check_finite(on); }

  /// Appends `keys` and `values` (`[tokens, kv_heads, head_dim]`, any strides), taking pages from the pool.
  /// \throws invalid_argument naming `keys`, `values` or `keys.tokens` (more tokens than the pool's free pages
  /// hold); the cache and the pool are then unchanged.
  template <class Stored>
  void append(const TensorView<Stored>& keys, const TensorView<Stored>& values) {
    const Index page_size = pool_->page_size();
    const Index room = Index(block_table_.size()) * page_size - length();  // in the last page
    tokens_.template check<Scalar>(
        keys, values, room + pool_->free_pages() * page_size,
        "free room in the last page and the pool's " + std::to_string(pool_->free_pages()) + " free pages");
    while (Index(block_table_.size()) * page_size < length() + keys.tokens()) block_table_.push_back(pool_->allocate());
    const PagedTensorView<Scalar> key_pages = view(pool_->key_pages(), length() + keys.tokens());
    const PagedTensorView<Scalar> value_pages = view(pool_->value_pages(), length() + keys.tokens());
    tokens_.template append<Stored, Scalar>(
        keys, values, [&](Index t, Index h) { return key_pages.row(t, h); },
        [&](Index t, Index h) { return value_pages.row(t, h); });
  }

  PagedTensorView<const Scalar> keys() const { return view(pool_->key_pages(), length()); }
  PagedTensorView<const Scalar> values() const { return view(pool_->value_pages(), length()); }

  /// `Σ_{j<position} v_j` as `KvCache::value_sum_before`.
  const double* value_sum_before(Index position) const { return tokens_.value_sum_before(position); }

  /// Forgets every token and returns the pages to the pool.
  void clear() {
    for (const std::int32_t page : block_table_) pool_->release(page);
    block_table_.clear();
    tokens_.clear();
  }

 private:
  /// Empty and without pages, as a new cache of the same pool (after its pages and tokens moved elsewhere).
  void forget_all() {
    block_table_.clear();
    tokens_ = detail::CachedTokens(pool_->kv_heads(), pool_->head_dim());
  }

  /// The first `tokens` tokens of the pages at `pages` (K or V) through the block table.
  template <class Pages>
  PagedTensorView<Pages> view(Pages* pages, Index tokens) const {
    return {pages,  pool_->pages(), pool_->page_size(), block_table_.data(),
            tokens, kv_heads(),     head_dim(),         pool_->layout()};
  }

  PagePool<Scalar>* pool_;
  detail::CachedTokens tokens_;
  std::vector<std::int32_t> block_table_;
};

}  // namespace toptheta
