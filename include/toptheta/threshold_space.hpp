// The quantity a threshold θ is compared with, and its conversion to a per-row score threshold.
#pragma once

#include <toptheta/detail/enum_names.hpp>
#include <toptheta/detail/require.hpp>

#include <cmath>
#include <limits>
#include <string>

namespace toptheta {

/// What θ is compared with for score `a_ij` of query row `i` (design.md §1, "Threshold spaces").
enum class ThresholdSpace {
  raw_score,              ///< `a_ij > θ`: the paper's pre-softmax placement; one pass.
  probability,            ///< `P_ij > θ`: the paper's post-softmax placement, no renormalisation; two passes.
  score_minus_max,        ///< `a_ij - m_i > θ`; needs the row max first, two passes.
  score_over_query_norm,  ///< `a_ij / ||q_i|| > θ`; one pass, `||q_i||` is known before any key is read.
};

namespace detail {
inline constexpr EnumName<ThresholdSpace> threshold_space_names[] = {
    {ThresholdSpace::raw_score, "raw_score"},
    {ThresholdSpace::probability, "probability"},
    {ThresholdSpace::score_minus_max, "score_minus_max"},
    {ThresholdSpace::score_over_query_norm, "score_over_query_norm"},
};
}  // namespace detail

inline const char* to_string(ThresholdSpace value) { return detail::name_of(value, detail::threshold_space_names); }

/// Parses the names printed by `to_string`; throws naming `argument` for any other text.
inline ThresholdSpace threshold_space_from_string(const std::string& name, const std::string& argument = "space") {
  return detail::value_named(name, detail::threshold_space_names, argument);
}

/// True when comparing in `space` needs the row max `m_i` (and sum) before any element can be tested.
constexpr bool needs_row_statistics(ThresholdSpace space) {
  return space == ThresholdSpace::probability || space == ThresholdSpace::score_minus_max;
}

/// The value of score `a_ij` compared with θ in `space` (design.md §1, Threshold spaces): `a_ij`,
/// `P_ij = exp(a_ij - m_i) / Z_i`, `a_ij - m_i` or `a_ij / ||q_i||`, given the row's max `m_i`, its sum
/// `Z_i = Σ_j exp(a_ij - m_i)` and the query norm.
template <class Acc>
Acc value_in_space(ThresholdSpace space, Acc score, Acc row_max, Acc row_sum, Acc query_norm) {
  switch (space) {
    case ThresholdSpace::raw_score:
      return score;
    case ThresholdSpace::probability:
      return std::exp(score - row_max) / row_sum;
    case ThresholdSpace::score_minus_max:
      return score - row_max;
    case ThresholdSpace::score_over_query_norm:
      return score / query_norm;
  }
  return score;
}

/// The score threshold `τ_i` with `value(a_ij) > θ  ⇔  a_ij > τ_i` for the monotone map of `space`:
/// `θ`, `m_i + log(θ Z_i)` (`Z_i = Σ_j exp(a_ij - m_i)`), `m_i + θ`, `θ ||q_i||`. A probability threshold
/// `θ <= 0` keeps every element (`τ = -inf`). A zero query (`||q_i|| = 0`, every score 0) has the value 0 in
/// the score/||q|| space: it keeps every element when `θ < 0` (`τ = -inf`) and none otherwise (`τ = +inf`).
template <class Acc>
Acc score_threshold(ThresholdSpace space, double theta, Acc row_max, Acc row_sum, Acc query_norm) {
  switch (space) {
    case ThresholdSpace::raw_score:
      return Acc(theta);
    case ThresholdSpace::probability:
      if (theta <= 0) return -std::numeric_limits<Acc>::infinity();
      return row_max + Acc(std::log(theta)) + std::log(row_sum);
    case ThresholdSpace::score_minus_max:
      return row_max + Acc(theta);
    case ThresholdSpace::score_over_query_norm: {
      constexpr Acc infinity = std::numeric_limits<Acc>::infinity();
      if (query_norm == 0) return theta < 0 ? -infinity : infinity;
      return Acc(theta) * query_norm;
    }
  }
  return Acc(theta);
}

}  // namespace toptheta
