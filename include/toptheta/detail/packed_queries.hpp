// A block's scaled queries packed once for Eigen's GEMM kernel, so that each key tile's scores pack only the
// tile's keys: the QKᵀ of the tiled prefill kernel.
#pragma once

#include <toptheta/scalar_traits.hpp>

#include <Eigen/Core>

#include <algorithm>

namespace toptheta::detail {

/// `s Q` (rows x d) packed as the right-hand operand of `S_tileᵀ = K_tile (s Q)ᵀ`: a row-major score tile is
/// that column-major product, so each tile packs only `K_tile`. Eigen's GEMM micro-kernel runs on the calling
/// thread (see serial_product.hpp).
template <class Acc>
class PackedQueries {
  using Traits = Eigen::internal::gebp_traits<Acc, Acc>;
  using Packed = Eigen::Matrix<Acc, Eigen::Dynamic, 1>;  // aligned storage of a packed operand

 public:
  /// Packs `queries`, row-major with `dim` columns at outer stride `stride`.
  void pack(const Acc* queries, Index rows, Index dim, Index stride) {
    namespace ei = Eigen::internal;
    rows_ = rows;
    dim_ = dim;
    packed_queries_.resize(rows * dim);
    ei::gemm_pack_rhs<Acc, Index, ei::const_blas_data_mapper<Acc, Index, Eigen::ColMajor>, Traits::nr, Eigen::ColMajor>
        pack_rhs;
    pack_rhs(packed_queries_.data(), ei::const_blas_data_mapper<Acc, Index, Eigen::ColMajor>(queries, stride), dim,
             rows);
  }

  Index rows() const { return rows_; }

  /// Forgets the packed queries (`rows()` is 0 again); the storage stays for the next `pack`.
  void clear() { rows_ = 0; }

  /// Packs the `width` key rows at `keys` (row-major, `dim` values each at outer stride `key_stride`) into
  /// `packed` (`width * dim` values) as the left-hand operand of the score product.
  static void pack_keys(const Acc* keys, Index width, Index dim, Index key_stride, Acc* packed) {
    namespace ei = Eigen::internal;
    using KeyMapper = ei::const_blas_data_mapper<Acc, Index, Eigen::RowMajor>;
    ei::gemm_pack_lhs<Acc, Index, KeyMapper, Traits::mr, Traits::LhsProgress, typename Traits::LhsPacket4Packing,
                      Eigen::RowMajor>
        pack_lhs;
    pack_lhs(packed, KeyMapper(keys, key_stride), dim, width);
  }

  /// `scores(i, j) = <q_i, k_j>` for the `width` key rows at `keys` (row-major, outer stride `key_stride`), into
  /// the row-major `scores` with outer stride `score_stride`.
  void scores(const Acc* keys, Index width, Index key_stride, Acc* scores, Index score_stride) {
    packed_keys_.resize(width * dim_);
    if (width > 0) pack_keys(keys, width, dim_, key_stride, packed_keys_.data());
    packed_scores(packed_keys_.data(), width, scores, score_stride);
  }

  /// The same for `width` key rows that `pack_keys` packed.
  void packed_scores(const Acc* packed_keys, Index width, Acc* scores, Index score_stride) const {
    namespace ei = Eigen::internal;
    using ScoreMapper = ei::blas_data_mapper<Acc, Index, Eigen::ColMajor, Eigen::Unaligned, 1>;
    for (Index i = 0; i < rows_; ++i) std::fill(scores + i * score_stride, scores + i * score_stride + width, Acc(0));
    if (width == 0 || rows_ == 0 || dim_ == 0) return;
    ei::gebp_kernel<Acc, Acc, Index, ScoreMapper, Traits::mr, Traits::nr, false, false> gebp;
    gebp(ScoreMapper(scores, score_stride), packed_keys, packed_queries_.data(), width, dim_, rows_, Acc(1));
  }

 private:
  Index rows_ = 0, dim_ = 0;
  Packed packed_queries_, packed_keys_;
};

}  // namespace toptheta::detail
