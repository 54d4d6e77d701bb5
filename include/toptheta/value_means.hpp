// vbar(L) = (1/L) Σ_{j<L} v_j for the row lengths of one attention call, for V-mean compensation.
#pragma once

#include <toptheta/detail/convert.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/views.hpp>

#include <Eigen/Core>

#include <algorithm>

namespace toptheta {

/// The V means one call needs: for a causal call the lengths `past + 1 ... past + n_q`, otherwise `n_kv`.
///
/// Built from `Σ_{j<past} v_j` (a KV cache keeps it in O(head_dim) per appended token) plus the V rows from
/// `past` on, so a decode step reads one V row for it. Without that prefix sum the rows before `past` are read.
template <class Acc>
class ValueMeans {
 public:
  using Matrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  /// The means of a call of `shape`, sized; each KV head's are filled by `compute` (heads in any order or
  /// in parallel).
  static ValueMeans sized(const AttentionShape& shape) {
    ValueMeans means;
    means.start_ = std::min(shape.past, shape.key_rows);
    means.first_length_ = shape.causal ? shape.past + 1 : shape.key_rows;
    means.lengths_ = shape.causal ? shape.query_rows : 1;
    means.means_.resize(shape.kv_heads * means.lengths_, shape.head_dim);
    return means;
  }

  /// Fills the means of KV head `kv_head` from `v`.
  /// \param prefix_sum `kv_heads x head_dim` row-major sums `Σ_{j<past} v_j`, or null to read those rows.
  /// \tparam View `TensorView<const Scalar>` or `PagedTensorView<const Scalar>`.
  template <class View>
  void compute(Index kv_head, const View& v, const double* prefix_sum) {
    const Index dim = means_.cols();
    Eigen::RowVectorXd row(dim);
    const auto value = [&](Index t) -> const Eigen::RowVectorXd& {
      detail::convert(v.row(t, kv_head), dim, row.data());
      return row;
    };
    Eigen::RowVectorXd sum = Eigen::RowVectorXd::Zero(dim);
    if (prefix_sum) {
      sum = Eigen::Map<const Eigen::RowVectorXd>(prefix_sum + kv_head * dim, dim);
    } else {
      for (Index t = 0; t < start_; ++t) sum += value(t);
    }
    Index summed = start_;  // rows in `sum`
    for (Index l = 0; l < lengths_; ++l) {
      const Index length = first_length_ + l;
      for (; summed < length; ++summed) sum += value(summed);
      means_.row(kv_head * lengths_ + l) = (sum / double(length)).template cast<Acc>();
    }
  }

  /// vbar(L) for KV head `kv_head`; `length` must be one of the call's row lengths.
  auto mean(Index kv_head, Index length) const { return means_.row(kv_head * lengths_ + length - first_length_); }

 private:
  Index start_ = 0;  // rows summed from V (those before are in the prefix sum)
  Index first_length_ = 0, lengths_ = 0;
  Matrix means_;
};

}  // namespace toptheta
