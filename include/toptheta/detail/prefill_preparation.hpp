// What a prefill call prepares once for all of its GEMM blocks: packed K tiles and V copied head by head.
#pragma once

#include <toptheta/detail/convert.hpp>
#include <toptheta/detail/kv_view.hpp>
#include <toptheta/detail/packed_queries.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/views.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <vector>

namespace toptheta::detail {

/// Calls with several GEMM blocks per KV head (prefill) read each K and V tile of a head once per block. Once
/// per call, before the blocks, this packs every full K tile for the score GEMM, and copies a V stored
/// `[tokens, heads, d]` (each row a miss of its own, a token stride apart) head by head so that the blocks
/// gather V rows from consecutive memory. Two transient buffers of at most K's size in the accumulator type
/// and V's size, each skipped above `max_bytes` (the blocks then pack their own tiles and read V where it
/// lies). Results are the same bits either way. A paged V is read where it lies, through its block table, and so
/// is a V of int8 blocks.
template <class Tiles, class Scalar, class KvView = TensorView<const Scalar>>
class PrefillPreparation {
 public:
  using Acc = accumulator_t<Scalar>;
  using Matrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  /// Whether a V viewed as `KvView` may be copied head-major: a contiguous view of the type of q.
  static constexpr bool copies_values = !is_paged_view_v<KvView> && std::is_same_v<typename KvView::value_type, Scalar>;

  /// Most bytes of packed K tiles, and of copied V rows, that a call prepares.
  static constexpr std::size_t max_bytes = std::size_t(64) << 20;

  /// Plans the buffers for keys [0, `visible`) of `k` and `v`.
  PrefillPreparation(const KvView& k, const KvView& v, Index visible) : k_(k), v_(v) {
    const Index kv_heads = k.heads(), dim = k.head_dim();
    const Index tiles = visible / Tiles::kv_block;
    if (double(tiles * Tiles::kv_block * dim * kv_heads) * sizeof(Acc) <= double(max_bytes)) {
      key_tiles_ = tiles;
      packed_keys_.resize(kv_heads * tiles * Tiles::kv_block * dim);
    }
    if constexpr (copies_values) {
      if (v.token_stride() != dim &&
          double(visible * kv_heads * dim) * sizeof(typename KvView::value_type) <= double(max_bytes)) {
        head_major_values_.resize(visible * kv_heads * dim);
        copied_values_ = KvView(head_major_values_.data(), visible, kv_heads, dim, dim, visible * dim);
        value_chunks_ = (visible + Tiles::kv_block - 1) / Tiles::kv_block;
      }
    }
  }

  /// Work items: packing K tiles, then copying V in chunks of tokens.
  Index items() const { return key_tiles_ * k_.heads() + value_chunks_; }

  void prepare(Index item) {
    const Index key_items = key_tiles_ * k_.heads(), dim = k_.head_dim();
    if (item < key_items) {  // K tile `item % tiles` of KV head `item / tiles`
      const Index kv_head = item / key_tiles_, first = (item % key_tiles_) * Tiles::kv_block;
      Matrix buffer;
      const auto keys = rows_as_accumulator<Acc>(k_, kv_head, first, Tiles::kv_block, buffer);
      PackedQueries<Acc>::pack_keys(keys.data(), Tiles::kv_block, dim, keys.outerStride(),
                                    packed_keys_.data() + item * Tiles::kv_block * dim);
      return;
    }
    // Tokens [first, end) in address order, each head's rows to its own run.
    const Index first = (item - key_items) * Tiles::kv_block;
    const Index end = std::min(first + Tiles::kv_block, copied_values_.tokens());
    if constexpr (copies_values)
      for (Index t = first; t < end; ++t)
        for (Index h = 0; h < v_.heads(); ++h)
          std::copy_n(v_.row(t, h), dim, head_major_values_.data() + (h * copied_values_.tokens() + t) * dim);
  }

  /// V as the blocks read it: the head-major copy when there is one, else the caller's.
  KvView values() const { return value_chunks_ > 0 ? copied_values_ : v_; }

  /// Keys [first, first + width) of `kv_head` packed for the score GEMM; null unless they are a packed tile.
  const Acc* packed_key_tile(Index kv_head, Index first, Index width) const {
    const Index tile = first / Tiles::kv_block;
    if (width != Tiles::kv_block || first % Tiles::kv_block != 0 || tile >= key_tiles_) return nullptr;
    return packed_keys_.data() + (kv_head * key_tiles_ + tile) * Tiles::kv_block * k_.head_dim();
  }

 private:
  KvView k_, v_, copied_values_;
  Index key_tiles_ = 0;                                // full K tiles per KV head packed
  Eigen::Matrix<Acc, Eigen::Dynamic, 1> packed_keys_;  // [KV head][tile], kv_block x d packed each
  // V as [KV head][token][d]; Eigen storage is aligned to the vector width, so that a row of 64-byte
  // multiples starts on a cache line and no load straddles two (a plain vector this large starts 16 bytes in).
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> head_major_values_;
  Index value_chunks_ = 0;
};

}  // namespace toptheta::detail
