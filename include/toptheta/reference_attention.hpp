// The oracle: attention written for clarity, in double, with an explicit mask and compensation.
#pragma once

#include <toptheta/detail/require.hpp>
#include <toptheta/views.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

namespace toptheta {

/// One query row as the oracle sees it, in double.
struct ReferenceRow {
  Index query_head = 0, query_row = 0, length = 0;  ///< h, i, L_i
  Eigen::VectorXd scores;                           ///< a_ij for j < L_i
  double max = 0;                                   ///< m_i
  double sum = 0;                                   ///< Z_i = Σ_j exp(a_ij - m_i)
  double query_norm = 0;                            ///< ||q_i||
};

/// Which keys the oracle keeps and how it compensates. Empty functions mean dense, `C_i = 0`.
struct ReferenceSparsity {
  /// `kept[j]` for `j < L_i`; at least one must be true.
  std::function<std::vector<bool>(const ReferenceRow&)> keep;
  /// `C_i` given the row and its kept set.
  std::function<double(const ReferenceRow&, const std::vector<bool>&)> denominator_term;
  double lambda = 1.0;
  bool post_softmax = false;      ///< denominator `Z_i`: probabilities are not renormalised
  bool v_mean = false;            ///< add `(1 - Σ_j p_ij) vbar(L_i)`
  bool v_mean_of_pruned = false;  ///< with `v_mean`, vbar over the pruned keys `j ∉ S_i` (none pruned: nothing)
};

/// Attention computed row by row in double: `o_i = Σ_{j∈S_i} p_ij v_j (+ (1 - Σ p_ij) vbar(L_i))`, vbar over
/// every visible key or only the pruned ones.
/// Returns `n_q x (q_heads * head_dim)`: row `i` holds every head's output like an `[n_q, q_heads, d]` buffer.
/// Cost O(n_q n_kv d) time, O(n_kv) memory per row; meant for tests and small checks.
template <class Scalar>
Eigen::MatrixXd reference_attention(const TensorView<const Scalar>& q, const TensorView<const Scalar>& k,
                                    const TensorView<const Scalar>& v, const AttentionOptions& options = {},
                                    const ReferenceSparsity& sparsity = {}) {
  const AttentionShape shape = attention_shape(q, k, v, q, options);
  Eigen::MatrixXd out = Eigen::MatrixXd::Zero(shape.query_rows, shape.q_heads * shape.head_dim);
  for (Index h = 0; h < shape.q_heads; ++h) {
    const Index kv_head = h / shape.group_size;
    const Eigen::MatrixXd keys = k.head(kv_head).template cast<double>();
    const Eigen::MatrixXd values = v.head(kv_head).template cast<double>();
    for (Index i = 0; i < shape.query_rows; ++i) {
      ReferenceRow row;
      row.query_head = h;
      row.query_row = i;
      row.length = shape.row_length(i);
      const Eigen::VectorXd query = q.head(h).row(i).template cast<double>().transpose();
      row.query_norm = query.norm();
      row.scores = shape.scale * (keys.topRows(row.length) * query);
      row.max = row.scores.maxCoeff();
      row.sum = (row.scores.array() - row.max).exp().sum();

      const std::vector<bool> kept = sparsity.keep ? sparsity.keep(row) : std::vector<bool>(row.length, true);
      detail::require(Index(kept.size()) == row.length, "sparsity.keep", "one flag per visible key", kept.size());
      detail::require(std::find(kept.begin(), kept.end(), true) != kept.end(), "sparsity.keep",
                      "at least one kept key in row " + std::to_string(i) + " of head " + std::to_string(h), "none");
      double kept_mass = 0;
      Eigen::RowVectorXd weighted = Eigen::RowVectorXd::Zero(shape.head_dim);
      for (Index j = 0; j < row.length; ++j) {
        if (!kept[std::size_t(j)]) continue;
        const double weight = std::exp(row.scores(j) - row.max);
        kept_mass += weight;
        weighted += weight * values.row(j);
      }
      const double term = sparsity.denominator_term ? sparsity.denominator_term(row, kept) : 0.0;
      const double denominator = sparsity.post_softmax ? row.sum : kept_mass + sparsity.lambda * term;
      Eigen::RowVectorXd output = weighted / denominator;
      if (sparsity.v_mean && !sparsity.v_mean_of_pruned)
        output += (1 - kept_mass / denominator) * values.topRows(row.length).colwise().mean();
      if (sparsity.v_mean && sparsity.v_mean_of_pruned) {
        Eigen::RowVectorXd pruned_sum = Eigen::RowVectorXd::Zero(shape.head_dim);
        Index pruned = 0;
        for (Index j = 0; j < row.length; ++j)
          if (!kept[std::size_t(j)]) {
            pruned_sum += values.row(j);
            ++pruned;
          }
        if (pruned > 0) output += (1 - kept_mass / denominator) * pruned_sum / double(pruned);
      }
      out.block(i, h * shape.head_dim, 1, shape.head_dim) = output;
    }
  }
  return out;
}

}  // namespace toptheta
