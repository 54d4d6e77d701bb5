// The suite's data: synthetic Llama-3-8B attention layers, generated lazily and cached, and per-head
// thresholds calibrated on a second layer (a different seed) of the same length.
#pragma once

#include "suite.hpp"

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

/// Seeds of the layer every case measures and of the layer its thresholds are calibrated on.
constexpr unsigned measured_seed = 1, calibration_seed = 2;

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

/// The value a threshold in `space` is compared with, for every score of one row (design.md §1).
inline void to_threshold_space(ThresholdSpace space, Eigen::Ref<Eigen::ArrayXd> scores) {
  if (space == ThresholdSpace::raw_score) return;
  detail::require(space == ThresholdSpace::probability, "space", "raw_score or probability",
                  to_string(space));
  scores = (scores - scores.maxCoeff()).exp();
  scores /= scores.sum();
}

/// A table of per-head thresholds θ_h(L): for each calibrated length L, the mean over the calibration layer's
/// rows of length L - rows_per_length + 1 .. L of each row's (k+1)-th largest value in `space` (so that `> θ`
/// keeps k elements of an average row). Plain Eigen in double; rows must be longer than k.
inline LayerThresholds calibrate(const Layer<float>& layer, const std::vector<Index>& lengths,
                                 Index rows_per_length, ThresholdSpace space) {
  constexpr Index group = LayerShape::q_heads / LayerShape::kv_heads;
  const double scale = 1 / std::sqrt(double(LayerShape::head_dim));
  Eigen::MatrixXd theta(LayerShape::q_heads, Index(lengths.size()));
  std::vector<double> values;
  for (Index kv_head = 0; kv_head < LayerShape::kv_heads; ++kv_head) {
    const Eigen::MatrixXd keys = layer.keys().head(kv_head).cast<double>();
    for (Index h = kv_head * group; h < (kv_head + 1) * group; ++h)
      for (std::size_t l = 0; l < lengths.size(); ++l) {
        const Index last = lengths[l], first = last - rows_per_length + 1;  // row lengths first..last
        detail::require(first > kept_per_row && last <= layer.tokens, "lengths",
                        "rows longer than k, within the layer", last);
        const Eigen::MatrixXd queries =
            layer.queries().head(h).middleRows(first - 1, rows_per_length).cast<double>();
        const Eigen::MatrixXd scores = scale * queries * keys.topRows(last).transpose();
        double sum = 0;
        for (Index r = 0; r < rows_per_length; ++r) {
          Eigen::ArrayXd row = scores.row(r).head(first + r).transpose().array();  // row length L = first + r
          to_threshold_space(space, row);
          values.assign(row.data(), row.data() + row.size());
          std::nth_element(values.begin(), values.begin() + kept_per_row, values.end(),
                           std::greater<double>());
          sum += values[std::size_t(kept_per_row)];  // the (k+1)-th largest
        }
        theta(h, Index(l)) = sum / double(rows_per_length);
      }
  }
  return LayerThresholds(kept_per_row, space, lengths, std::move(theta));
}

/// Where a layer's rows sit: one decode row of length n, or the n causal rows of a prefill (lengths 1..n).
enum class Phase { decode, prefill };

/// The per-head thresholds a phase at `tokens` tokens uses, in the spaces the suite's kernels need.
struct CalibratedThresholds {
  LayerThresholds raw_score, probability;

  const LayerThresholds& in(ThresholdSpace space) const {
    detail::require(space == ThresholdSpace::raw_score || space == ThresholdSpace::probability, "space",
                    "raw_score or probability", to_string(space));
    return space == ThresholdSpace::raw_score ? raw_score : probability;
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
    entry = std::make_unique<const CalibratedThresholds>(
        CalibratedThresholds{calibrate(layer, lengths, rows_per_length, ThresholdSpace::raw_score),
                             calibrate(layer, lengths, rows_per_length, ThresholdSpace::probability)});
  }
  return *entry;
}

}  // namespace toptheta::bench
