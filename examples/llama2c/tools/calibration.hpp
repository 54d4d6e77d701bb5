// Calibrating Top-θ thresholds on an engine's own attention rows, and counting what a threshold table keeps.
#pragma once

#include "llama2c/engine/engine.hpp"

#include <toptheta/calibrator.hpp>

#include <Eigen/Core>

#include <cstdint>
#include <string>
#include <vector>

namespace llama2c {

/// The `toptheta::ModelShape` a threshold table for `config` must have.
inline toptheta::ModelShape model_shape(const Config& config) {
  return {config.layers, config.heads, config.kv_heads, config.head_dim()};
}

/// The per-layer tables of `table`, layer 0 first, as `top_theta_plan` takes them.
inline std::vector<toptheta::LayerThresholds> layer_tables(const toptheta::ThresholdTable& table) {
  std::vector<toptheta::LayerThresholds> layers;
  for (Index l = 0; l < table.layers(); ++l) layers.push_back(table.layer(l));
  return layers;
}

/// Runs each of `sequences` as one prefill from an empty cache with `observer` seeing every attention score row
/// (layer by layer, head by head, position by position), then removes the observer. Rows come from the
/// engine's attention plan as set: calibrate with every layer dense, count survivors with the plan under test.
/// Returns the number of tokens run.
template <class Real, class KvScalar>
Index observe_sequences(Engine<Real, KvScalar>& engine, const std::vector<std::vector<int>>& sequences,
                        AttentionObserver observer) {
  engine.set_observer(std::move(observer));
  Index tokens = 0;
  try {
    for (const auto& sequence : sequences) {
      engine.reset();
      engine.prefill(sequence, LogitRows::last);
      tokens += Index(sequence.size());
    }
  } catch (...) {
    engine.set_observer({});
    engine.reset();
    throw;
  }
  engine.set_observer({});
  engine.reset();
  return tokens;
}

/// Hands one score row to `calibrator` (layer, query head, the scores, ||q_i||).
inline void observe(toptheta::Calibrator& calibrator, const ScoreRow& row) {
  calibrator.observe_row(row.layer, row.query_head, row.scores.data(), row.length, row.query_norm);
}

/// Feeds every score row of `sequences` (dense attention in every layer) to each of `calibrators`; one pass
/// of the engine serves calibrators of any spaces and k. Restores the engine's plan afterwards.
template <class Real, class KvScalar>
void calibrate(Engine<Real, KvScalar>& engine, const std::vector<std::vector<int>>& sequences,
               const std::vector<toptheta::Calibrator*>& calibrators) {
  const AttentionPlan plan = engine.attention();
  engine.set_attention(dense_plan(engine.config().layers));
  try {
    observe_sequences(engine, sequences, [&](const ScoreRow& row) {
      for (toptheta::Calibrator* calibrator : calibrators) observe(*calibrator, row);
    });
  } catch (...) {
    engine.set_attention(plan);
    throw;
  }
  engine.set_attention(plan);
}

/// Per (layer, query head): the rows longer than the layer's k and the elements of those rows above the
/// threshold a table gives them, `|S_i| = |{j : value_ij > θ_h(L_i)}|` (design.md §1) before the never-empty
/// rule and any cap. Rows of length <= k are dense by definition and not counted.
struct KeepCounts {
  using Counts = Eigen::Matrix<std::uint64_t, Eigen::Dynamic, Eigen::Dynamic>;
  Counts rows;  ///< [layers, heads]
  Counts kept;  ///< [layers, heads]: Σ_i |S_i|

  KeepCounts(Index layers, Index heads) : rows(Counts::Zero(layers, heads)), kept(Counts::Zero(layers, heads)) {}

  /// Mean survivors per counted row of (layer, head); 0 without rows.
  double mean(Index layer, Index head) const {
    const auto r = rows(layer, head);
    return r == 0 ? 0.0 : double(kept(layer, head)) / double(r);
  }
  /// `mean / k - 1`: the keep-count error of (layer, head) for a layer with `k`.
  double relative_error(Index layer, Index head, Index k) const { return mean(layer, head) / double(k) - 1.0; }
  /// `(Σ_h kept / Σ_h rows) / k - 1` over the layer's heads; 0 without rows.
  double layer_relative_error(Index layer, Index k) const {
    const auto r = rows.row(layer).sum();
    return r == 0 ? 0.0 : double(kept.row(layer).sum()) / double(r) / double(k) - 1.0;
  }
};

/// An observer that adds each row's survivors under `table` to `counts` (both must outlive it).
inline AttentionObserver keep_counter(const toptheta::ThresholdTable& table, KeepCounts& counts) {
  return [&table, &counts](const ScoreRow& row) {
    const Index k = table.k(row.layer);
    if (row.length <= k) return;
    const double theta = table.lookup(row.layer, row.query_head, row.length).theta;
    const double tau = toptheta::score_threshold<double>(table.space(), theta, row.max, row.sum, row.query_norm);
    counts.rows(row.layer, row.query_head) += 1;
    counts.kept(row.layer, row.query_head) += std::uint64_t((row.scores.array() > tau).count());
  };
}

/// Survivors per (layer, head) of `table`'s thresholds on the score rows of `sequences` under the engine's
/// current plan (dense: the in-sample fit of a table calibrated on them; the table's own plan: held-out use).
template <class Real, class KvScalar>
KeepCounts keep_counts(Engine<Real, KvScalar>& engine, const toptheta::ThresholdTable& table,
                       const std::vector<std::vector<int>>& sequences) {
  KeepCounts counts(engine.config().layers, engine.config().heads);
  observe_sequences(engine, sequences, keep_counter(table, counts));
  return counts;
}

}  // namespace llama2c
