// The kernels the suite compares, as one table of names -> calls; decode and prefill pick their rows from it.
#pragma once

#include "layers.hpp"
#include "suite.hpp"

#include <toptheta/dense_attention.hpp>
#include <toptheta/executor.hpp>
#include <toptheta/top_k_attention.hpp>
#include <toptheta/top_theta_attention.hpp>

#include <optional>
#include <string>
#include <vector>

namespace toptheta::bench {

/// The inputs of one attention call.
template <class Scalar>
struct AttentionCall {
  TensorView<const Scalar> q, k, v;
  TensorView<Scalar> out;
  AttentionOptions attention;
};

/// A kernel under test. Sparse kernels use no compensation (the compensations cost O(1) per row, except exact
/// SDC, and V-mean compensation needs a running V sum a decode step gets from its KvCache).
template <class Scalar>
struct Kernel {
  std::string name;
  /// The space its thresholds are calibrated in; none for kernels without thresholds.
  std::optional<ThresholdSpace> space;
  void (*attend)(const AttentionCall<Scalar>& call, const LayerThresholds* thresholds,
                 const OpenMPExecutor& executor, AttentionStats* stats);
};

/// dense; top_k (k = 64); top_theta (thresholds on a / ||q||, one pass: ||q|| is known before any key is read,
/// and unlike raw-score thresholds they follow the rows' query norms); top_theta_2pass (probability thresholds,
/// the post-softmax placement, which forces the two-pass kernel).
template <class Scalar>
const std::vector<Kernel<Scalar>>& kernels() {
  using Call = AttentionCall<Scalar>;
  static const std::vector<Kernel<Scalar>> table = {
      {"dense", std::nullopt,
       [](const Call& call, const LayerThresholds*, const OpenMPExecutor& executor, AttentionStats* stats) {
         dense_attention(call.q, call.k, call.v, call.out, call.attention, stats, executor);
       }},
      {"top_k", std::nullopt,
       [](const Call& call, const LayerThresholds*, const OpenMPExecutor& executor, AttentionStats* stats) {
         TopKOptions options;
         options.attention = call.attention;
         options.k = kept_per_row;
         top_k_attention(call.q, call.k, call.v, call.out, options, stats, executor);
       }},
      {"top_theta", ThresholdSpace::score_over_query_norm,
       [](const Call& call, const LayerThresholds* thresholds, const OpenMPExecutor& executor,
          AttentionStats* stats) {
         TopThetaOptions options;
         options.attention = call.attention;
         top_theta_attention(call.q, call.k, call.v, call.out, *thresholds, options, stats, executor);
       }},
      {"top_theta_2pass", ThresholdSpace::probability,
       [](const Call& call, const LayerThresholds* thresholds, const OpenMPExecutor& executor,
          AttentionStats* stats) {
         TopThetaOptions options;
         options.attention = call.attention;
         top_theta_attention(call.q, call.k, call.v, call.out, *thresholds, options, stats, executor);
       }},
  };
  return table;
}

/// The table's entry called `name`.
template <class Scalar>
const Kernel<Scalar>& kernel(const std::string& name) {
  for (const Kernel<Scalar>& entry : kernels<Scalar>())
    if (entry.name == name) return entry;
  detail::fail("kernel", "a name in the suite's kernel table", name);
}

/// The thresholds `entry` needs for `phase` at `tokens`, or null.
template <class Scalar>
const LayerThresholds* thresholds_for(const Kernel<Scalar>& entry, Phase phase, Index tokens) {
  return entry.space ? &calibrated_thresholds(phase, tokens).in(*entry.space) : nullptr;
}

/// Runs `entry` once on `call` with statistics (outside any timed loop) and compares its output with
/// `dense_output`, dense attention's output for the same inputs.
template <class Scalar>
CallSummary summarize_call(const Kernel<Scalar>& entry, const AttentionCall<Scalar>& call,
                           const LayerThresholds* thresholds, const OpenMPExecutor& executor,
                           const std::vector<Scalar>& dense_output) {
  CallSummary summary;
  entry.attend(call, thresholds, executor, &summary.stats);
  summary.bytes_per_k_or_v_row = double(LayerShape::head_dim) * sizeof(Scalar);
  summary.error_vs_dense = relative_error(call.out.data(), dense_output.data(), dense_output.size());
  return summary;
}

/// Type names used in case names.
template <class Scalar>
const char* type_name();
template <>
inline const char* type_name<float>() {
  return "f32";
}
template <>
inline const char* type_name<Eigen::bfloat16>() {
  return "bf16";
}

}  // namespace toptheta::bench
