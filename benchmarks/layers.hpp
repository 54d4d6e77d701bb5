// The suite's data: synthetic Llama-3-8B attention layers, generated lazily and cached, and per-head
// count-matched thresholds calibrated on other data (a different seed) through the same heads.
#pragma once

#include "suite.hpp"

#include <toptheta/aligned_vector.hpp>
#include <toptheta/calibrator.hpp>
#include <toptheta/executor.hpp>
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
  AlignedVector<Scalar> q, k, v;

  TensorView<const Scalar> queries() const { return {q.data(), tokens, LayerShape::q_heads, LayerShape::head_dim}; }
  TensorView<const Scalar> keys() const { return {k.data(), tokens, LayerShape::kv_heads, LayerShape::head_dim}; }
  TensorView<const Scalar> values() const { return {v.data(), tokens, LayerShape::kv_heads, LayerShape::head_dim}; }
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
AlignedVector<To> converted(const AlignedVector<From>& values) {
  AlignedVector<To> out(values.size());
  std::transform(values.begin(), values.end(), out.begin(), [](From x) { return To(x); });
  return out;
}

/// The measured layer of `tokens` tokens in `Scalar`, generated on first use and kept for the whole run
/// (generating 65536 tokens takes seconds). Other stored types are the float layer rounded.
template <class Scalar>
const Layer<Scalar>& measured_layer(Index tokens) {
  static std::map<Index, std::unique_ptr<const Layer<Scalar>>> cache;  // one map per Scalar: key (n, type, seed)
  auto& entry = cache[tokens];
  if (!entry) {
    if constexpr (std::is_same_v<Scalar, float>) {
      entry = std::make_unique<const Layer<float>>(generate_layer(tokens, measured_seed));
    } else {
      const Layer<float>& source = measured_layer<float>(tokens);
      entry = std::make_unique<const Layer<Scalar>>(
          Layer<Scalar>{tokens, converted<Scalar>(source.q), converted<Scalar>(source.k), converted<Scalar>(source.v)});
    }
  }
  return *entry;
}

/// Where a layer's rows sit: one decode row of length n, or the n causal rows of a prefill (lengths 1..n).
enum class Phase { decode, prefill };

/// Rows of the calibration layer each phase's thresholds are fitted to: decode at n, the last 256 rows
/// (lengths n - 255 .. n); prefill of n, about 1024 rows spread over the lengths k + 1 .. n (every
/// max(1, n / 1024)-th length down from n).
inline std::vector<Index> calibration_lengths(Phase phase, Index tokens) {
  std::vector<Index> lengths;
  const Index stride = phase == Phase::decode ? 1 : std::max<Index>(1, tokens / 1024);
  const Index shortest = phase == Phase::decode ? std::max(kept_per_row + 1, tokens - 255) : kept_per_row + 1;
  for (Index length = tokens; length >= shortest; length -= stride) lengths.push_back(length);
  return lengths;
}

/// Per-head thresholds θ_h(L), count-matched for k = kept_per_row (`Calibrator`, design.md §1 "Calibration"),
/// on rows of a layer generated with `calibration_seed`: the rows whose lengths `calibration_lengths` gives,
/// calibrated on first use in each space, with the library's default pooling (a length bucket with fewer than
/// `TableOptions::min_pooled_rows` rows is fitted with its neighbours: a count-matched θ fitted to few rows keeps
/// more than k on other rows). Holds the keys and the calibrated query rows for the whole run.
class CalibratedThresholds {
 public:
  CalibratedThresholds(Phase phase, Index tokens) : lengths_(calibration_lengths(phase, tokens)) {
    const Layer<float> layer = generate_layer(tokens, calibration_seed);
    for (Index kv_head = 0; kv_head < LayerShape::kv_heads; ++kv_head)
      keys_.push_back(layer.keys().head(kv_head).topRows(lengths_.front()));
    for (Index h = 0; h < LayerShape::q_heads; ++h) {
      Matrix queries(Index(lengths_.size()), LayerShape::head_dim);
      for (std::size_t r = 0; r < lengths_.size(); ++r)
        queries.row(Index(r)) = layer.queries().head(h).row(lengths_[r] - 1);  // length L: query row L - 1
      queries_.push_back(std::move(queries));
    }
  }

  const LayerThresholds& in(ThresholdSpace space) {
    auto& table = tables_[space];
    if (!table) table = std::make_unique<const LayerThresholds>(calibrate(space));
    return *table;
  }

 private:
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  static constexpr Index rows_per_block = 64;

  /// One calibrator per KV head, filled on the suite's threads and merged.
  LayerThresholds calibrate(ThresholdSpace space) const {
    constexpr Index group = LayerShape::q_heads / LayerShape::kv_heads;
    const float scale = 1 / std::sqrt(float(LayerShape::head_dim));
    CalibratorOptions options;
    options.shape = {1, LayerShape::q_heads, LayerShape::kv_heads, LayerShape::head_dim};
    options.space = space;
    options.k = {kept_per_row};
    std::vector<Calibrator> calibrators(static_cast<std::size_t>(LayerShape::kv_heads), Calibrator(options));
    OpenMPExecutor{settings().threads}.parallel_for(LayerShape::kv_heads, [&](Index kv_head) {
      for (Index h = kv_head * group; h < (kv_head + 1) * group; ++h)
        for (Index first = 0; first < Index(lengths_.size()); first += rows_per_block) {
          const Index count = std::min(rows_per_block, Index(lengths_.size()) - first);
          const std::vector<Index> lengths(lengths_.begin() + first, lengths_.begin() + first + count);
          const auto queries = queries_[std::size_t(h)].middleRows(first, count);
          std::vector<double> query_norms;
          for (Index r = 0; r < count; ++r) query_norms.push_back(double(queries.row(r).norm()));
          const Matrix scores = scale * (queries * keys_[std::size_t(kv_head)].topRows(lengths.front()).transpose());
          calibrators[std::size_t(kv_head)].observe_rows(0, h, scores, lengths, query_norms);
        }
    });
    for (std::size_t c = 1; c < calibrators.size(); ++c) calibrators.front().merge(calibrators[c]);
    TableOptions table_options;
    table_options.method = CalibrationMethod::count_matched;
    return calibrators.front().table(table_options).layer(0);
  }

  std::vector<Index> lengths_;   // descending
  std::vector<Matrix> keys_;     // per KV head: keys 0 .. lengths_.front() - 1
  std::vector<Matrix> queries_;  // per query head: the query row of each calibrated length
  std::map<ThresholdSpace, std::unique_ptr<const LayerThresholds>> tables_;
};

/// The thresholds of `phase` at `tokens` (one set per phase and length for the whole run).
inline CalibratedThresholds& calibrated_thresholds(Phase phase, Index tokens) {
  static std::map<std::pair<Phase, Index>, std::unique_ptr<CalibratedThresholds>> cache;
  auto& entry = cache[{phase, tokens}];
  if (!entry) entry = std::make_unique<CalibratedThresholds>(phase, tokens);
  return *entry;
}

}  // namespace toptheta::bench
