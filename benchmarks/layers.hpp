// The suite's data: synthetic Llama-3-8B attention layers, generated lazily and cached, and per-head
// count-matched thresholds calibrated on other data (a different seed) through the same heads.
#pragma once

#include "suite.hpp"

#include <toptheta/calibrator.hpp>
#include <toptheta/synthetic_attention.hpp>
#include <toptheta/threshold_table.hpp>
#include <toptheta/views.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <utility>
#include <vector>

namespace toptheta::bench {

/// Seeds of the data every case measures and of the data its thresholds are calibrated on, and of the heads
/// both pass through (`SyntheticAttentionOptions::model_seed`): two texts through the same model.
constexpr unsigned measured_seed = 1, calibration_seed = 2, model_seed = 1;

/// Q `[tokens, 32, 128]`, K and V `[tokens, 8, 128]` of one synthetic layer (sink, recency, salient keys,
/// query-norm variation: see synthetic_attention.hpp).
template <class Scalar>
struct Layer {
  Index tokens = 0;
  std::vector<Scalar> q, k, v;

  TensorView<const Scalar> queries() const {
    return {q.data(), tokens, LayerShape::q_heads, LayerShape::head_dim};
  }
  TensorView<const Scalar> keys() const {
    return {k.data(), tokens, LayerShape::kv_heads, LayerShape::head_dim};
  }
  TensorView<const Scalar> values() const {
    return {v.data(), tokens, LayerShape::kv_heads, LayerShape::head_dim};
  }
};

inline Layer<float> generate_layer(Index tokens, unsigned seed) {
  SyntheticAttentionOptions options;
  options.tokens = tokens;
  options.q_heads = LayerShape::q_heads;
  options.kv_heads = LayerShape::kv_heads;
  options.head_dim = LayerShape::head_dim;
  options.seed = seed;
  options.model_seed = model_seed;
  SyntheticAttention<float> synthetic(options);
  return {tokens, std::move(synthetic.q), std::move(synthetic.k), std::move(synthetic.v)};
}

template <class To, class From>
std::vector<To> converted(const std::vector<From>& values) {
  std::vector<To> out(values.size());
  std::transform(values.begin(), values.end(), out.begin(), [](From x) { return To(x); });
  return out;
}

/// The measured layer of `tokens` tokens in `Scalar`, generated on first use and kept for the whole run
/// (generating 65536 tokens takes seconds). Other stored types are the float layer rounded.
template <class Scalar>
const Layer<Scalar>& measured_layer(Index tokens) {
  static std::map<Index, std::unique_ptr<const Layer<Scalar>>>
      cache;  // one map per Scalar: key (n, type, seed)
  auto& entry = cache[tokens];
  if (!entry) {
    if constexpr (std::is_same_v<Scalar, float>) {
      entry = std::make_unique<const Layer<float>>(generate_layer(tokens, measured_seed));
    } else {
      const Layer<float>& source = measured_layer<float>(tokens);
      entry = std::make_unique<const Layer<Scalar>>(Layer<Scalar>{
          tokens, converted<Scalar>(source.q), converted<Scalar>(source.k), converted<Scalar>(source.v)});
    }
  }
  return *entry;
}

/// Per-head thresholds θ_h(L) in `space` for k = kept_per_row, count-matched (`Calibrator`, design.md §1
/// "Calibration"): at each calibrated length L, the θ at which the calibration layer's rows of length
/// L - rows_per_length + 1 .. L keep k elements on average. Rows must be longer than k; each length's rows are
/// fitted alone (no pooling across the far-apart lengths).
inline LayerThresholds calibrate(const Layer<float>& layer, const std::vector<Index>& lengths,
                                 Index rows_per_length, ThresholdSpace space) {
  constexpr Index group = LayerShape::q_heads / LayerShape::kv_heads;
  const float scale = 1 / std::sqrt(float(LayerShape::head_dim));
  CalibratorOptions options;
  options.shape = {1, LayerShape::q_heads, LayerShape::kv_heads, LayerShape::head_dim};
  options.space = space;
  options.k = {kept_per_row};
  Calibrator calibrator(options);
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  for (Index kv_head = 0; kv_head < LayerShape::kv_heads; ++kv_head) {
    const Matrix keys = layer.keys().head(kv_head);
    for (Index h = kv_head * group; h < (kv_head + 1) * group; ++h)
      for (const Index last : lengths) {
        const Index first = last - rows_per_length + 1;  // row lengths first..last
        detail::require(first > kept_per_row && last <= layer.tokens, "lengths",
                        "rows longer than k, within the layer", last);
        const Matrix queries = layer.queries().head(h).middleRows(first - 1, rows_per_length);
        const Matrix scores = scale * (queries * keys.topRows(last).transpose());
        std::vector<Index> row_lengths;
        std::vector<double> query_norms;
        for (Index r = 0; r < rows_per_length; ++r) {
          row_lengths.push_back(first + r);
          query_norms.push_back(double(queries.row(r).norm()));
        }
        calibrator.observe_rows(0, h, scores, row_lengths, query_norms);
      }
  }
  TableOptions table_options;
  table_options.method = CalibrationMethod::count_matched;
  table_options.min_pooled_rows = 1;
  return calibrator.table(table_options).layer(0);
}

/// Where a layer's rows sit: one decode row of length n, or the n causal rows of a prefill (lengths 1..n).
enum class Phase { decode, prefill };

/// The spaces the suite's kernels calibrate in (kernels.hpp).
constexpr ThresholdSpace calibrated_spaces[] = {ThresholdSpace::probability, ThresholdSpace::raw_score,
                                                ThresholdSpace::score_over_query_norm,
                                                ThresholdSpace::score_minus_max};

/// The per-head thresholds a phase at `tokens` tokens uses, one table per space of `calibrated_spaces`.
struct CalibratedThresholds {
  std::map<ThresholdSpace, LayerThresholds> tables;

  const LayerThresholds& in(ThresholdSpace space) const {
    const auto table = tables.find(space);
    if (table == tables.end()) detail::fail("space", "a space the suite calibrates", to_string(space));
    return table->second;
  }
};

/// The thresholds of `phase` at `tokens`, calibrated on first use on a layer of `tokens` tokens generated
/// with `calibration_seed` (then dropped), so that each is calibrated at the row lengths it is used at:
/// decode: the one length `tokens`, from the calibration layer's last 64 rows;
/// prefill: lengths 128, 256, ..., tokens, 32 rows each; shorter rows take the 128 value (and count as
/// extrapolated), the lengths in between are interpolated.
inline const CalibratedThresholds& calibrated_thresholds(Phase phase, Index tokens) {
  static std::map<std::pair<Phase, Index>, std::unique_ptr<const CalibratedThresholds>> cache;
  auto& entry = cache[{phase, tokens}];
  if (!entry) {
    const Layer<float> layer = generate_layer(tokens, calibration_seed);
    std::vector<Index> lengths;
    Index rows_per_length = 64;
    if (phase == Phase::decode) {
      lengths = {tokens};
    } else {
      rows_per_length = 32;
      for (Index length = 2 * kept_per_row; length < tokens; length *= 2) lengths.push_back(length);
      lengths.push_back(tokens);
    }
    auto calibrated = std::make_unique<CalibratedThresholds>();
    for (const ThresholdSpace space : calibrated_spaces)
      calibrated->tables.emplace(space, calibrate(layer, lengths, rows_per_length, space));
    entry = std::move(calibrated);
  }
  return *entry;
}

}  // namespace toptheta::bench
