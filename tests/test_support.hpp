// Shared test helpers: random attention problems, error measures, and design.md §1 written out plainly in
// double (the masks and compensation terms the oracle is given), independent of the library's selection code.
#pragma once

#include "catch.hpp"

#include <toptheta/toptheta.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#ifdef TOPTHETA_CATCH2_V3
using Catch::Approx;  // Catch2 v2 has it at global scope
#endif

/// `expression` throws toptheta::invalid_argument whose message names `argument` first (what() reads
/// "toptheta: <argument>: expected <what>, got <value>") and mentions `expected`.
#define REQUIRE_INVALID(expression, argument, expected)                                             \
  do {                                                                                              \
    REQUIRE_THROWS_AS(expression, toptheta::invalid_argument);                                      \
    REQUIRE_THROWS_WITH(expression, toptheta_test::mentions("toptheta: " + std::string(argument))); \
    REQUIRE_THROWS_WITH(expression, toptheta_test::mentions(expected));                             \
  } while (false)

namespace toptheta_test {

using toptheta::Index;

#ifdef TOPTHETA_CATCH2_V3
inline auto mentions(const std::string& text) { return Catch::Matchers::ContainsSubstring(text); }
#else
inline auto mentions(const std::string& text) { return Catch::Contains(text); }
#endif

/// Relative tolerance of each stored type against the double oracle.
template <class Scalar>
double tolerance() {
  if constexpr (std::is_same_v<Scalar, double>) return 1e-12;
  if constexpr (std::is_same_v<Scalar, float>) return 1e-5;
  return 1e-2;  // Eigen::half, Eigen::bfloat16
}

template <class Scalar>
const char* type_name() {
  if constexpr (std::is_same_v<Scalar, double>) return "double";
  if constexpr (std::is_same_v<Scalar, float>) return "float";
  if constexpr (std::is_same_v<Scalar, Eigen::half>) return "half";
  return "bfloat16";
}

/// Buffers of one attention call in `[tokens, heads, head_dim]` layout (or `[heads, tokens, head_dim]` with
/// `heads_major`), filled with normal numbers of standard deviation `spread`.
template <class Scalar>
struct Problem {
  Index query_rows, key_rows, q_heads, kv_heads, head_dim;
  bool heads_major;
  std::vector<Scalar> q, k, v, out;

  Problem(Index n_q, Index n_kv, Index q_heads_, Index kv_heads_, Index dim, unsigned seed, double spread = 1.0,
          bool heads_major_ = false)
      : query_rows(n_q),
        key_rows(n_kv),
        q_heads(q_heads_),
        kv_heads(kv_heads_),
        head_dim(dim),
        heads_major(heads_major_) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    auto fill = [&](std::vector<Scalar>& data, Index size, double sd) {
      data.resize(std::size_t(size));
      for (auto& x : data) x = Scalar(sd * normal(rng));
    };
    fill(q, n_q * q_heads * dim, spread);
    fill(k, n_kv * kv_heads * dim, spread);
    fill(v, n_kv * kv_heads * dim, 1.0);
    out.assign(std::size_t(n_q * q_heads * dim), Scalar(0));
  }

  template <class S>
  toptheta::TensorView<S> view(S* data, Index tokens, Index heads) const {
    if (heads_major) return {data, tokens, heads, head_dim, head_dim, tokens * head_dim};
    return {data, tokens, heads, head_dim};
  }
  toptheta::TensorView<const Scalar> queries() const { return view<const Scalar>(q.data(), query_rows, q_heads); }
  toptheta::TensorView<const Scalar> keys() const { return view<const Scalar>(k.data(), key_rows, kv_heads); }
  toptheta::TensorView<const Scalar> values() const { return view<const Scalar>(v.data(), key_rows, kv_heads); }
  toptheta::TensorView<Scalar> output() { return view<Scalar>(out.data(), query_rows, q_heads); }

  /// `out` as the oracle returns it: `n_q x (q_heads * head_dim)`.
  Eigen::MatrixXd output_matrix() const {
    Eigen::MatrixXd result(query_rows, q_heads * head_dim);
    const auto view_of_out = view<const Scalar>(out.data(), query_rows, q_heads);
    for (Index i = 0; i < query_rows; ++i)
      for (Index h = 0; h < q_heads; ++h)
        for (Index d = 0; d < head_dim; ++d) result(i, h * head_dim + d) = double(view_of_out.row(i, h)[d]);
    return result;
  }
};

/// max |a - b| / max |b|.
inline double relative_error(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) {
  const double scale = std::max(b.cwiseAbs().maxCoeff(), 1e-300);
  return (a - b).cwiseAbs().maxCoeff() / scale;
}

/// The value a threshold is compared with in `space` (design.md §1, "Threshold spaces").
inline double space_value(toptheta::ThresholdSpace space, const toptheta::ReferenceRow& row, Index j) {
  const double a = row.scores(j);
  switch (space) {
    case toptheta::ThresholdSpace::raw_score:
      return a;
    case toptheta::ThresholdSpace::probability:
      return std::exp(a - row.max) / row.sum;
    case toptheta::ThresholdSpace::score_minus_max:
      return a - row.max;
    case toptheta::ThresholdSpace::score_over_query_norm:
      return a / row.query_norm;
  }
  return a;
}

/// The visible key with the largest score, ties to the larger position.
inline Index max_score_key(const toptheta::ReferenceRow& row) {
  Index best = 0;
  for (Index j = 1; j < row.length; ++j)
    if (row.scores(j) >= row.scores(best)) best = j;
  return best;
}

/// Top-θ's kept set, steps 1–3 of design.md §1.
inline std::vector<bool> top_theta_kept(const toptheta::ReferenceRow& row, const toptheta::LayerThresholds& table,
                                        bool cap_k) {
  const Index k = table.k();
  std::vector<bool> kept(std::size_t(row.length), true);
  if (row.length <= k) return kept;
  const double theta = table.lookup(row.query_head, row.length).theta;
  Index count = 0;
  for (Index j = 0; j < row.length; ++j) {
    kept[std::size_t(j)] = space_value(table.space(), row, j) > theta;
    count += kept[std::size_t(j)];
  }
  if (cap_k && count > k)  // keep the k kept elements with the largest positions
    for (Index j = 0, dropped = 0; j < row.length && dropped < count - k; ++j)
      if (kept[std::size_t(j)]) {
        kept[std::size_t(j)] = false;
        ++dropped;
      }
  if (count == 0) kept[std::size_t(max_score_key(row))] = true;
  return kept;
}

/// Top-k's kept set by sorting: the k largest (score, position) pairs.
inline std::vector<bool> top_k_kept(const toptheta::ReferenceRow& row, Index k) {
  std::vector<bool> kept(std::size_t(row.length), true);
  if (row.length <= k) return kept;
  std::vector<Index> order(std::size_t(row.length));
  std::iota(order.begin(), order.end(), Index(0));
  std::sort(order.begin(), order.end(),
            [&](Index a, Index b) { return row.scores(a) != row.scores(b) ? row.scores(a) > row.scores(b) : a > b; });
  std::fill(kept.begin(), kept.end(), false);
  for (Index t = 0; t < k; ++t) kept[std::size_t(order[std::size_t(t)])] = true;
  return kept;
}

/// `θ` converted to score units for the exp-threshold term: θ, m + log(θ Z), m + θ, θ ||q||.
inline double threshold_in_score_units(toptheta::ThresholdSpace space, double theta,
                                       const toptheta::ReferenceRow& row) {
  switch (space) {
    case toptheta::ThresholdSpace::raw_score:
      return theta;
    case toptheta::ThresholdSpace::probability:
      return row.max + std::log(theta * row.sum);
    case toptheta::ThresholdSpace::score_minus_max:
      return row.max + theta;
    case toptheta::ThresholdSpace::score_over_query_norm:
      return theta * row.query_norm;
  }
  return theta;
}

/// C_i of design.md §1 step 4 for a kept set; `pruned_bound` is the score bounding each pruned term.
inline double denominator_term(toptheta::DenominatorCompensation mode, const toptheta::ReferenceRow& row,
                               const std::vector<bool>& kept, double pruned_bound, double calibrated) {
  Index pruned = 0;
  double pruned_mass = 0;
  for (Index j = 0; j < row.length; ++j)
    if (!kept[std::size_t(j)]) {
      ++pruned;
      pruned_mass += std::exp(row.scores(j) - row.max);
    }
  if (pruned == 0) return 0;
  switch (mode) {
    case toptheta::DenominatorCompensation::none:
      return 0;
    case toptheta::DenominatorCompensation::exact:
      return pruned_mass;
    case toptheta::DenominatorCompensation::exp_threshold:
      return double(pruned) * std::exp(pruned_bound - row.max);
    case toptheta::DenominatorCompensation::calibrated:
      return calibrated;
  }
  return 0;
}

/// The oracle's description of Top-θ with `table`, `compensation` and `cap_k`.
inline toptheta::ReferenceSparsity top_theta_sparsity(const toptheta::LayerThresholds& table,
                                                      const toptheta::Compensation& compensation, bool cap_k) {
  toptheta::ReferenceSparsity sparsity;
  sparsity.keep = [&table, cap_k](const toptheta::ReferenceRow& row) { return top_theta_kept(row, table, cap_k); };
  sparsity.denominator_term = [&table, compensation](const toptheta::ReferenceRow& row, const std::vector<bool>& kept) {
    const auto lookup = table.lookup(row.query_head, row.length);
    return denominator_term(compensation.denominator, row, kept,
                            threshold_in_score_units(table.space(), lookup.theta, row), lookup.denominator_term);
  };
  sparsity.lambda = compensation.lambda;
  sparsity.post_softmax = table.space() == toptheta::ThresholdSpace::probability;
  sparsity.v_mean = compensation.v_mean;
  sparsity.v_mean_of_pruned = compensation.v_mean_of_pruned;
  return sparsity;
}

/// Per-head thresholds at quantile `keep_fraction` from the top of the values of rows longer than `k`, moved to
/// the middle of a gap of at least `margin` (relative) between neighbouring values, so that float rounding of
/// the scores cannot move an element across θ.
template <class Scalar>
std::vector<double> separated_thresholds(const Problem<Scalar>& problem, const toptheta::AttentionOptions& options,
                                         toptheta::ThresholdSpace space, Index k, double keep_fraction,
                                         double margin = 1e-4) {
  std::vector<std::vector<double>> values(std::size_t(problem.q_heads));
  toptheta::ReferenceSparsity collect;
  collect.keep = [&](const toptheta::ReferenceRow& row) {
    if (row.length > k)
      for (Index j = 0; j < row.length; ++j) values[std::size_t(row.query_head)].push_back(space_value(space, row, j));
    return std::vector<bool>(std::size_t(row.length), true);
  };
  toptheta::reference_attention(problem.queries(), problem.keys(), problem.values(), options, collect);
  std::vector<double> thresholds;
  for (auto& head_values : values) {
    std::sort(head_values.begin(), head_values.end(), std::greater<double>());
    if (head_values.size() < 2) {
      thresholds.push_back(0.0);
      continue;
    }
    const double span = std::max(head_values.front() - head_values.back(), 1e-30);
    std::size_t t = std::min(head_values.size() - 2, std::size_t(keep_fraction * double(head_values.size())));
    while (t + 2 < head_values.size() && head_values[t] - head_values[t + 1] < margin * span) ++t;
    thresholds.push_back(0.5 * (head_values[t] + head_values[t + 1]));
  }
  return thresholds;
}

}  // namespace toptheta_test
