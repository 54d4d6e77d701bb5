// One transformer layer's attention through toptheta: its KV cache, its kernel and the kernel's executor. The
// piece of this engine another engine copies: everything toptheta needs per layer is here.
#pragma once

#include "llama2c/engine/attention_policy.hpp"
#include "llama2c/engine/model.hpp"

#include <toptheta/toptheta.hpp>

#include <Eigen/Core>

#include <functional>
#include <type_traits>
#include <utility>
#include <variant>

namespace llama2c {

/// The attention of one layer: K and V of the tokens so far in a `toptheta::KvCache<KvScalar>` (with the running
/// V sum V-mean compensation reads), and one kernel call per forward pass as the layer's `LayerAttention` says
/// (dense, top-k or Top-θ), causal, at `past` = the tokens cached before the call.
/// \tparam Real the engine's activations (Q, K, V in, the output out).
/// \tparam KvScalar stored type of K and V: float, double, Eigen::half, Eigen::bfloat16 (also the kernels' Q and
/// output type; the kernels accumulate in float, double for double), or int8 blocks (`toptheta::BlockQ8<N>`,
/// quantized as the cache appends; Q and the output stay in `Real`).
template <class Real, class KvScalar = Real>
class AttentionLayer {
 public:
  using Matrix = RowMatrix<Real>;
  /// The kernels' Q and output type: the cache's stored type, or `Real` for int8 blocks.
  using KernelScalar = std::conditional_t<toptheta::is_q8_block_v<KvScalar>, Real, KvScalar>;
  /// Sees the call once the new K and V rows are cached, before the kernel runs: the kernel's queries
  /// `[n, heads, head_dim]`, the cache and `past`.
  using BeforeKernel = std::function<void(const toptheta::TensorView<const KernelScalar>& queries,
                                          const toptheta::KvCache<KvScalar>& cache, Index past)>;

  /// \param capacity tokens the cache holds. \param threads the kernels' threads (0: OpenMP's default).
  AttentionLayer(Index heads, Index kv_heads, Index head_dim, Index capacity, int threads = 0)
      : heads_(heads), head_dim_(head_dim), cache_(kv_heads, head_dim, capacity), executor_{threads} {}

  const toptheta::KvCache<KvScalar>& cache() const { return cache_; }
  const LayerAttention& policy() const { return policy_; }
  /// The layer's kernel from the next call on (the engine checks that it fits the model).
  void set_policy(LayerAttention policy) { policy_ = std::move(policy); }
  /// Forgets the sequence.
  void clear() { cache_.clear(); }

  /// Appends `k`, `v` (`[n, kv_heads * head_dim]`, RoPE applied to k) to the cache and returns the attention
  /// output `[n, heads * head_dim]` of `q` (`[n, heads * head_dim]`, RoPE applied) over every cached token.
  /// \param stats when not null, gets the kernel's statistics of this call.
  Matrix attend(const Matrix& q, const Matrix& k, const Matrix& v, toptheta::AttentionStats* stats = nullptr,
                const BeforeKernel& before_kernel = {}) {
    const Index n = q.rows();
    const Index past = cache_.length();
    cache_.append(toptheta::TensorView<const Real>(k.data(), n, cache_.kv_heads(), head_dim_),
                  toptheta::TensorView<const Real>(v.data(), n, cache_.kv_heads(), head_dim_));

    // The kernels take Q and the output in KernelScalar: the activations themselves when that is Real.
    RowMatrix<KernelScalar> q_converted, out_converted;
    Matrix out(n, heads_ * head_dim_);
    const KernelScalar* q_data;
    KernelScalar* out_data;
    if constexpr (std::is_same_v<KernelScalar, Real>) {
      q_data = q.data();
      out_data = out.data();
    } else {
      q_converted = q.template cast<KernelScalar>();
      out_converted.resize(n, heads_ * head_dim_);
      q_data = q_converted.data();
      out_data = out_converted.data();
    }
    const toptheta::TensorView<const KernelScalar> queries(q_data, n, heads_, head_dim_);
    const toptheta::TensorView<KernelScalar> output(out_data, n, heads_, head_dim_);
    if (before_kernel) before_kernel(queries, cache_, past);

    toptheta::AttentionOptions placement;
    placement.causal = true;
    placement.past = past;
    const auto keys = cache_.keys();
    const auto values = cache_.values();
    if (std::holds_alternative<DenseAttention>(policy_)) {
      toptheta::dense_attention(queries, keys, values, output, placement, stats, executor_);
    } else if (const auto* top_k = std::get_if<TopKAttention>(&policy_)) {
      toptheta::TopKOptions options;
      options.attention = placement;
      options.compensation = top_k->compensation;
      options.value_prefix_sum = cache_.value_sum_before(past);
      options.k = top_k->k;
      options.thresholds = top_k->denominator_terms ? &*top_k->denominator_terms : nullptr;
      toptheta::top_k_attention(queries, keys, values, output, options, stats, executor_);
    } else {
      const auto& top_theta = std::get<TopThetaAttention>(policy_);
      toptheta::TopThetaOptions options;
      options.attention = placement;
      options.compensation = top_theta.compensation;
      options.value_prefix_sum = cache_.value_sum_before(past);
      options.cap_k = top_theta.cap_k;
      options.passes = top_theta.passes;
      toptheta::top_theta_attention(queries, keys, values, output, top_theta.thresholds, options, stats, executor_);
    }
    if constexpr (!std::is_same_v<KernelScalar, Real>) out = out_converted.template cast<Real>();
    return out;
  }

 private:
  Index heads_, head_dim_;
  toptheta::KvCache<KvScalar> cache_;
  toptheta::OpenMPExecutor executor_;
  LayerAttention policy_ = DenseAttention{};
};

}  // namespace llama2c
