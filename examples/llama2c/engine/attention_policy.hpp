// Which attention kernel each layer of the engine runs, and the hook that shows a layer's score rows.
#pragma once

#include <toptheta/toptheta.hpp>

#include <Eigen/Core>

#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

namespace llama2c {

using toptheta::Index;

/// Dense causal attention (`toptheta::dense_attention`).
struct DenseAttention {};

/// Each row keeps its `k` largest scores (`toptheta::top_k_attention`).
struct TopKAttention {
  Index k = 64;
  toptheta::Compensation compensation;
  /// Calibrated denominator terms c_h(L): needed only for `DenominatorCompensation::calibrated`.
  std::optional<toptheta::LayerThresholds> denominator_terms;
};

/// Top-θ: each score is compared with the layer's calibrated threshold θ_h(L)
/// (`toptheta::top_theta_attention`). `thresholds.k()` is the layer's k; `thresholds.space()` its threshold
/// space.
struct TopThetaAttention {
  toptheta::LayerThresholds thresholds;
  toptheta::Compensation compensation;
  bool cap_k = false;
  toptheta::Passes passes = toptheta::Passes::automatic;
};

/// The attention policy of one layer.
using LayerAttention = std::variant<DenseAttention, TopKAttention, TopThetaAttention>;
/// One policy per layer, layer 0 first.
using AttentionPlan = std::vector<LayerAttention>;

/// Every layer dense.
inline AttentionPlan dense_plan(Index layers) { return AttentionPlan(std::size_t(layers), DenseAttention{}); }

/// Top-k in every layer, with `k_per_layer[l]` for layer `l` (first layers are often kept denser).
inline AttentionPlan top_k_plan(const std::vector<Index>& k_per_layer,
                                const toptheta::Compensation& compensation = {}) {
  AttentionPlan plan;
  for (Index k : k_per_layer) plan.push_back(TopKAttention{k, compensation, std::nullopt});
  return plan;
}

/// Top-θ in every layer, layer `l` with `thresholds[l]` (its k, space and, for calibrated compensation, its
/// denominator terms).
inline AttentionPlan top_theta_plan(const std::vector<toptheta::LayerThresholds>& thresholds,
                                    const toptheta::Compensation& compensation = {}, bool cap_k = false) {
  AttentionPlan plan;
  for (const auto& table : thresholds)
    plan.push_back(TopThetaAttention{table, compensation, cap_k, toptheta::Passes::automatic});
  return plan;
}

/// A short human-readable name of a layer's policy, e.g. "top_theta(k=32, probability, vmc)".
inline std::string describe(const LayerAttention& attention) {
  const auto compensation_text = [](const toptheta::Compensation& c) {
    std::string text;
    if (c.denominator != toptheta::DenominatorCompensation::none) {
      text += std::string(", sdc=") + toptheta::to_string(c.denominator);
      if (c.lambda != 1.0) {
        std::ostringstream lambda;
        lambda << c.lambda;
        text += "x" + lambda.str();
      }
    }
    if (c.v_mean) text += ", vmc";
    return text;
  };
  if (std::holds_alternative<DenseAttention>(attention)) return "dense";
  if (const auto* top_k = std::get_if<TopKAttention>(&attention))
    return "top_k(k=" + std::to_string(top_k->k) + compensation_text(top_k->compensation) + ")";
  const auto& top_theta = std::get<TopThetaAttention>(attention);
  return "top_theta(k=" + std::to_string(top_theta.thresholds.k()) + ", " +
         toptheta::to_string(top_theta.thresholds.space()) + compensation_text(top_theta.compensation) +
         (top_theta.cap_k ? ", cap_k" : "") + ")";
}

/// One attention score row of one query head, as the layer's kernel is about to see it (design.md §1
/// notation), computed in double from the same Q and K the kernel reads.
struct ScoreRow {
  ScoreRow(const double* scores_data, Index length_) : length(length_), scores(scores_data, length_) {}

  Index layer = 0;
  Index query_head = 0;                      ///< h
  Index kv_head = 0;                         ///< h / (heads / kv_heads)
  Index position = 0;                        ///< p_i: the query's absolute position in the sequence
  Index length = 0;                          ///< L_i = p_i + 1 visible keys (causal)
  bool decode = false;                       ///< the row comes from a decode step (else from a prefill call)
  Eigen::Map<const Eigen::VectorXd> scores;  ///< a_ij = s <q_i, k_j> for j < L_i
  double max = 0;                            ///< m_i
  double sum = 0;                            ///< Z_i = Σ_j exp(a_ij - m_i), so P_ij = exp(a_ij - m_i) / Z_i
  double query_norm = 0;                     ///< ||q_i||
};

/// Called once per (layer, query head, query row) of every prefill call and decode step, before the layer's
/// kernel runs, on the calling thread, in order of layer, then query head, then position. `scores` points
/// into storage that is reused after the call returns: copy what you keep.
using AttentionObserver = std::function<void(const ScoreRow&)>;

}  // namespace llama2c
