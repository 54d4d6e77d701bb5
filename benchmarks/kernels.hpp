// The kernels the suite compares, as one table of names -> calls; decode and prefill pick their rows from it.
#pragma once

#include "layers.hpp"
#include "suite.hpp"

#include <toptheta/aligned_vector.hpp>
#include <toptheta/dense_attention.hpp>
#include <toptheta/executor.hpp>
#include <toptheta/paged_view.hpp>
#include <toptheta/q8_block.hpp>
#include <toptheta/top_k_attention.hpp>
#include <toptheta/top_theta_attention.hpp>

#include <optional>
#include <string>
#include <vector>

namespace toptheta::bench {

/// The inputs of one attention call, and `Σ_{j<past} v_j` per KV head as an engine's KvCache keeps it (null:
/// V-mean compensation reads the V rows before `past` itself). K and V contiguous or paged (`KvView`).
template <class Scalar, class KvView = TensorView<const Scalar>>
struct AttentionCall {
  TensorView<const Scalar> q;
  KvView k, v;
  TensorView<Scalar> out;
  AttentionOptions attention;
  const double* value_prefix_sum = nullptr;
};

/// A kernel under test.
template <class Scalar, class KvView = TensorView<const Scalar>>
struct Kernel {
  std::string name;
  /// The space its thresholds are calibrated in; none for kernels without thresholds.
  std::optional<ThresholdSpace> space;
  void (*attend)(const AttentionCall<Scalar, KvView>& call, const LayerThresholds* thresholds,
                 const OpenMPExecutor& executor, AttentionStats* stats);
};

/// Top-θ in the thresholds' space with `passes`; V-mean compensation where `v_mean` (from the call's V prefix
/// sum), no denominator compensation.
template <class Scalar, Passes passes, bool v_mean, class KvView = TensorView<const Scalar>>
void attend_top_theta(const AttentionCall<Scalar, KvView>& call, const LayerThresholds* thresholds,
                      const OpenMPExecutor& executor, AttentionStats* stats) {
  TopThetaOptions options;
  options.attention = call.attention;
  options.passes = passes;
  options.compensation.v_mean = v_mean;
  options.value_prefix_sum = call.value_prefix_sum;
  top_theta_attention(call.q, call.k, call.v, call.out, *thresholds, options, stats, executor);
}

/// dense; top_k (k = 64); top_theta, the recommended configuration: probability thresholds (the paper's
/// post-softmax placement), count-matched, V-mean compensation with the V prefix sum a KvCache keeps, one pass
/// (design.md §6); the other threshold spaces, one pass, without compensation: top_theta_raw (a), top_theta_qnorm
/// (a / ||q||), top_theta_minus_max (a - m); top_theta_2pass: the recommended configuration on the two-pass
/// kernel (row max and sum first).
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
      {"top_theta", ThresholdSpace::probability, attend_top_theta<Scalar, Passes::one, true>},
      {"top_theta_raw", ThresholdSpace::raw_score, attend_top_theta<Scalar, Passes::one, false>},
      {"top_theta_qnorm", ThresholdSpace::score_over_query_norm, attend_top_theta<Scalar, Passes::one, false>},
      {"top_theta_minus_max", ThresholdSpace::score_minus_max, attend_top_theta<Scalar, Passes::one, false>},
      {"top_theta_2pass", ThresholdSpace::probability, attend_top_theta<Scalar, Passes::two, true>},
  };
  return table;
}

/// dense and top_theta (the recommended configuration) on K and V viewed as `KvView`: in pages
/// (`decode_paged/...`), or of q8_0 blocks (`.../q8`).
template <class Scalar, class KvView>
const std::vector<Kernel<Scalar, KvView>>& cache_kernels() {
  using Call = AttentionCall<Scalar, KvView>;
  static const std::vector<Kernel<Scalar, KvView>> table = {
      {"dense", std::nullopt,
       [](const Call& call, const LayerThresholds*, const OpenMPExecutor& executor, AttentionStats* stats) {
         dense_attention(call.q, call.k, call.v, call.out, call.attention, stats, executor);
       }},
      {"top_theta", ThresholdSpace::probability, attend_top_theta<Scalar, Passes::one, true, KvView>},
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
template <class Scalar, class KvView>
const LayerThresholds* thresholds_for(const Kernel<Scalar, KvView>& entry, Phase phase, Index tokens) {
  return entry.space ? &calibrated_thresholds(phase, tokens).in(*entry.space) : nullptr;
}

/// Runs `entry` once on `call` with statistics (outside any timed loop) and compares its output with
/// `dense_output`, dense attention's output for the same inputs.
template <class Scalar, class KvView>
CallSummary summarize_call(const Kernel<Scalar, KvView>& entry, const AttentionCall<Scalar, KvView>& call,
                           const LayerThresholds* thresholds, const OpenMPExecutor& executor,
                           const AlignedVector<Scalar>& dense_output) {
  CallSummary summary;
  entry.attend(call, thresholds, executor, &summary.stats);
  summary.bytes_per_k_or_v_row = double(stored_bytes<typename KvView::value_type>(LayerShape::head_dim));
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
template <>
inline const char* type_name<BlockQ8_0>() {
  return "q8";
}

}  // namespace toptheta::bench
