// The kernels' configurations that the layout tests (paged, q8_0) run the same way on two layouts: one call of
// each, and the statistics two calls must share.
#pragma once

#include "test_support.hpp"

namespace toptheta_test {

using namespace toptheta;

enum class Kind { dense, top_k, probability, probability_two_pass, score_minus_max, raw, query_norm };
inline const Kind every_kind[] = {Kind::dense,           Kind::top_k, Kind::probability, Kind::probability_two_pass,
                                  Kind::score_minus_max, Kind::raw,   Kind::query_norm};
inline const char* name(Kind kind) {
  switch (kind) {
    case Kind::dense:
      return "dense";
    case Kind::top_k:
      return "top_k, V mean";
    case Kind::probability:
      return "top_theta probability, V mean";
    case Kind::probability_two_pass:
      return "top_theta probability, two passes";
    case Kind::score_minus_max:
      return "top_theta score_minus_max";
    case Kind::raw:
      return "top_theta raw_score, exact denominator";
    case Kind::query_norm:
      return "top_theta score_over_query_norm";
  }
  return "";
}

/// One call of `kind` with K and V viewed as `k` and `v` (contiguous or paged).
template <class Scalar, class KvView>
void attend(Kind kind, const Problem<Scalar>& problem, const KvView& k, const KvView& v, TensorView<Scalar> out,
            Index past, int threads, AttentionStats* stats) {
  const OpenMPExecutor executor{threads};
  AttentionOptions attention;
  attention.past = past;
  if (kind == Kind::dense) return dense_attention(problem.queries(), k, v, out, attention, stats, executor);
  if (kind == Kind::top_k) {
    TopKOptions options;
    options.attention = attention;
    options.k = 8;
    options.compensation.v_mean = true;
    return top_k_attention(problem.queries(), k, v, out, options, stats, executor);
  }
  const ThresholdSpace space = kind == Kind::raw               ? ThresholdSpace::raw_score
                               : kind == Kind::query_norm      ? ThresholdSpace::score_over_query_norm
                               : kind == Kind::score_minus_max ? ThresholdSpace::score_minus_max
                                                               : ThresholdSpace::probability;
  const double theta = kind == Kind::raw               ? 0.2
                       : kind == Kind::query_norm      ? 0.05
                       : kind == Kind::score_minus_max ? -2.0
                                                       : 0.02;
  const auto table = LayerThresholds::uniform(8, space, std::vector<double>(std::size_t(problem.q_heads), theta));
  TopThetaOptions options;
  options.attention = attention;
  options.compensation.v_mean = kind == Kind::probability || kind == Kind::probability_two_pass;
  if (kind == Kind::raw) options.compensation.denominator = DenominatorCompensation::exact;
  options.passes = kind == Kind::probability_two_pass ? Passes::two : Passes::automatic;
  top_theta_attention(problem.queries(), k, v, out, table, options, stats, executor);
}

inline bool same_stats(const AttentionStats& a, const AttentionStats& b) {
  return a.elements_kept == b.elements_kept && a.elements_visible == b.elements_visible &&
         a.v_rows_kept == b.v_rows_kept && a.k_rows_read == b.k_rows_read && a.v_rows_read == b.v_rows_read &&
         a.kv_tiles == b.kv_tiles && a.kv_tiles_without_survivor == b.kv_tiles_without_survivor && a.rows == b.rows &&
         a.dense_rows == b.dense_rows && a.empty_rows == b.empty_rows && a.non_finite_rows == b.non_finite_rows;
}

}  // namespace toptheta_test
