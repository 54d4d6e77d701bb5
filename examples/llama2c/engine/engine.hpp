// The llama2.c forward pass: every attention call through the library, one `AttentionLayer` per layer.
#pragma once

#include "llama2c/engine/attention_layer.hpp"
#include "llama2c/engine/attention_policy.hpp"
#include "llama2c/engine/model.hpp"

#include <toptheta/toptheta.hpp>

#include <Eigen/Core>

#include <cmath>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace llama2c {

/// How an `Engine` is set up.
struct EngineOptions {
  /// Tokens the KV caches hold (prefill plus decode); 0 means the model's `seq_len`.
  Index max_tokens = 0;
  /// Threads of the attention kernels' executor; 0 means OpenMP's default. Eigen's matrix products follow
  /// Eigen's own setting (`Eigen::setNbThreads`).
  int threads = 0;
  /// Collect `toptheta::AttentionStats` per layer (costs a little time in the sparse kernels).
  bool collect_stats = true;
};

/// Per-layer attention statistics, merged over calls, kept apart for prefill calls and decode steps.
struct EngineStats {
  /// [layer]: merged over prefill calls.
  std::vector<toptheta::AttentionStats> prefill;
  /// [layer]: merged over decode steps (distinct V rows are counted per step, so they add over steps).
  std::vector<toptheta::AttentionStats> decode;

  /// The counters of all layers together.
  static toptheta::AttentionStats total(const std::vector<toptheta::AttentionStats>& layers) {
    toptheta::AttentionStats sum;
    for (const auto& layer : layers) sum.merge(layer);
    return sum;
  }
};

/// Which logits `Engine::prefill` returns.
enum class LogitRows {
  all,   ///< one row per token: the next-token logits after each position (for perplexity)
  last,  ///< only the last token's row (for generation)
};

/// The llama2.c transformer over a `Model`: RMSNorm (eps 1e-5), RoPE on interleaved pairs with frequency
/// 10000^(-2i/hs), GQA, SwiGLU FFN, final RMSNorm and classifier; activations in `Real`, Eigen products.
///
/// Attention runs only through toptheta's kernels, one `AttentionLayer` per layer (its KV cache and kernel, as
/// the `AttentionPlan` says). A sequence is fed by `prefill` (any number of tokens in one
/// kernel call per layer, causal, `past` = tokens already cached, so it also does chunked prefill) and
/// `decode` (one token, the same kernels with one query row); both give the same logits for the same tokens.
/// \tparam Real activations and matrix products: `float` (the engine), or `double` (a reference: it keeps a
/// double copy of the weights; on stories260K it matches a float64 implementation to ~1e-7, where float
/// rounding alone moves logits by ~1e-4).
/// \tparam KvScalar stored type of K and V: float, double, Eigen::half or Eigen::bfloat16 (also the type of the
/// kernels' Q and output; the kernels accumulate in float, double for double), or int8 blocks
/// (`toptheta::BlockQ8<N>`, quantized as the cache appends; Q and the output stay in `Real`).
/// An `Engine` refers to its `Model`, which must outlive it. After an exception from `prefill` or `decode`
/// the caches may hold part of the call: `reset()` before reuse.
template <class Real = float, class KvScalar = Real>
class Engine {
 public:
  using Matrix = RowMatrix<Real>;
  using Vector = ColumnVector<Real>;
  using Layer = AttentionLayer<Real, KvScalar>;
  /// The kernels' Q and output type: the cache's stored type, or `Real` for int8 blocks.
  using KernelScalar = typename Layer::KernelScalar;
  /// Sees each layer's attention call once its new K and V rows are cached, before the kernel runs: the layer,
  /// the kernel's queries `[n, heads, head_dim]`, the layer's cache and `past` (the rows cached before the call).
  using CallObserver = std::function<void(Index layer, const toptheta::TensorView<const KernelScalar>& queries,
                                          const toptheta::KvCache<KvScalar>& cache, Index past)>;

  explicit Engine(const Model& model, const EngineOptions& options = {})
      : model_(model), options_(options), plan_(dense_plan(model.config.layers)) {
    if constexpr (!std::is_same_v<Real, float>) converted_weights_ = model.template cast<Real>();
    const Config& c = model.config;
    toptheta::detail::require(options.max_tokens >= 0 && options.max_tokens <= c.seq_len, "max_tokens",
                              "a count in [0, " + std::to_string(c.seq_len) + "] (the model's context)",
                              options.max_tokens);
    capacity_ = options.max_tokens > 0 ? options.max_tokens : c.seq_len;
    layers_.reserve(std::size_t(c.layers));
    for (Index l = 0; l < c.layers; ++l)
      layers_.emplace_back(c.heads, c.kv_heads, c.head_dim(), capacity_, options.threads);
    rope_tables(c.head_dim());
    reset_stats();
  }

  const Model& model() const { return model_; }
  const Config& config() const { return model_.config; }
  /// Tokens processed since the last `reset()`: the position of the next token.
  Index position() const { return position_; }
  /// Most tokens a sequence may have.
  Index capacity() const { return capacity_; }
  const toptheta::KvCache<KvScalar>& cache(Index layer) const { return layers_.at(std::size_t(layer)).cache(); }

  /// Sets every layer's attention policy. Throws `toptheta::invalid_argument` naming the layer when the plan
  /// has the wrong length or a policy does not fit the model (threshold table heads, k, compensation).
  void set_attention(AttentionPlan plan) {
    const Config& c = config();
    if (Index(plan.size()) != c.layers)
      throw toptheta::invalid_argument("llama2c: attention plan: expected one policy per layer (" +
                                       std::to_string(c.layers) + "), got " + std::to_string(plan.size()));
    for (Index l = 0; l < c.layers; ++l) validate(plan[std::size_t(l)], l);
    plan_ = std::move(plan);
    for (Index l = 0; l < c.layers; ++l) layers_[std::size_t(l)].set_policy(plan_[std::size_t(l)]);
  }
  const AttentionPlan& attention() const { return plan_; }

  /// Sets (or, with an empty function, removes) the observer that sees every attention score row.
  void set_observer(AttentionObserver observer) { observer_ = std::move(observer); }
  /// Sets (or removes) the observer that sees every attention call's queries and cache.
  void set_call_observer(CallObserver observer) { call_observer_ = std::move(observer); }

  /// Forgets the sequence: empties the caches. Statistics are kept (see `reset_stats`).
  void reset() {
    for (auto& layer : layers_) layer.clear();
    position_ = 0;
  }

  const EngineStats& stats() const { return stats_; }
  void reset_stats() {
    stats_.prefill.assign(std::size_t(config().layers), {});
    stats_.decode.assign(std::size_t(config().layers), {});
  }

  /// Runs `tokens` at positions `position() ...` through the model, one attention call per layer, and returns
  /// the next-token logits `[tokens, vocab]` (`LogitRows::all`) or `[1, vocab]` of the last token.
  Matrix prefill(const std::vector<int>& tokens, LogitRows rows = LogitRows::all) {
    return forward(tokens, /*decode=*/false, rows);
  }

  /// Runs one token at `position()` and returns its next-token logits `[vocab]`.
  Vector decode(int token) { return forward({token}, /*decode=*/true, LogitRows::last).row(0).transpose(); }

 private:
  /// The weights in `Real`: the model's own for float, else the engine's converted copy.
  const ModelWeights<Real>& weights() const {
    if constexpr (std::is_same_v<Real, float>)
      return model_;
    else
      return converted_weights_;
  }

  Matrix forward(const std::vector<int>& tokens, bool decode, LogitRows rows) {
    const Config& c = config();
    const Index n = Index(tokens.size());
    check_tokens(tokens);

    Matrix x(n, c.dim);
    for (Index t = 0; t < n; ++t) x.row(t) = weights().token_embedding.row(tokens[std::size_t(t)]);
    for (Index l = 0; l < c.layers; ++l) {
      const LayerWeights<Real>& w = weights().layers[std::size_t(l)];
      Matrix normed = rms_norm(x, w.attention_norm);
      Matrix q = normed * w.wq.transpose();  // [n, heads * hs] = [n, heads, hs]
      Matrix k = normed * w.wk.transpose();  // [n, kv_heads * hs]
      Matrix v = normed * w.wv.transpose();
      rotate(q, position_);
      rotate(k, position_);
      x.noalias() += attend(l, q, k, v, decode) * w.wo.transpose();

      normed = rms_norm(x, w.ffn_norm);
      Matrix gate = normed * w.w1.transpose();
      const Matrix up = normed * w.w3.transpose();
      gate = (gate.array() / (Real(1) + (-gate.array()).exp())) * up.array();  // silu(w1 x) * w3 x
      x.noalias() += gate * w.w2.transpose();
    }
    position_ += n;
    const Index first = rows == LogitRows::all ? 0 : n - 1;
    return rms_norm(x.bottomRows(n - first), weights().final_norm) * weights().output_weights().transpose();
  }

  /// Runs the layer's attention (`AttentionLayer::attend`) with the observers and the engine's statistics.
  Matrix attend(Index layer, const Matrix& q, const Matrix& k, const Matrix& v, bool decode) {
    toptheta::AttentionStats call_stats;
    toptheta::AttentionStats* stats = options_.collect_stats ? &call_stats : nullptr;
    const auto before_kernel = [&](const toptheta::TensorView<const KernelScalar>& queries,
                                   const toptheta::KvCache<KvScalar>& cache, Index past) {
      if (observer_) observe(layer, queries, cache, past, decode);
      if (call_observer_) call_observer_(layer, queries, cache, past);
    };
    Matrix out = layers_[std::size_t(layer)].attend(q, k, v, stats, before_kernel);
    if (stats) (decode ? stats_.decode : stats_.prefill)[std::size_t(layer)].merge(call_stats);
    return out;
  }

  /// Hands every score row of this call to the observer: `a_ij = <q_i, k_j> / sqrt(hs)` in double, from the Q
  /// and K the kernel reads. Cost O(heads x n x L x hs); meant for calibration, not speed.
  void observe(Index layer, const toptheta::TensorView<const KernelScalar>& queries,
               const toptheta::KvCache<KvScalar>& cache, Index past, bool decode) {
    const Config& c = config();
    const Index n = queries.tokens(), group = c.heads / c.kv_heads;
    const double scale = 1.0 / std::sqrt(double(c.head_dim()));
    Eigen::VectorXd row_scores;
    for (Index h = 0; h < c.heads; ++h) {
      const Eigen::MatrixXd q = queries.head(h).template cast<double>();
      RowMatrix<double> keys(cache.length(), c.head_dim());
      for (Index t = 0; t < keys.rows(); ++t)
        toptheta::detail::convert(cache.keys().row(t, h / group), c.head_dim(), keys.row(t).data());
      const Eigen::MatrixXd scores = scale * (q * keys.transpose());  // [n, past + n]
      for (Index i = 0; i < n; ++i) {
        const Index length = past + i + 1;
        row_scores = scores.row(i).head(length).transpose();
        ScoreRow row(row_scores.data(), length);
        row.layer = layer;
        row.query_head = h;
        row.kv_head = h / group;
        row.position = past + i;
        row.decode = decode;
        row.max = row_scores.maxCoeff();
        row.sum = (row_scores.array() - row.max).exp().sum();
        row.query_norm = q.row(i).norm();
        observer_(row);
      }
    }
  }

  /// y = w ⊙ x / sqrt(mean(x²) + 1e-5), row by row.
  static Matrix rms_norm(const Matrix& x, const Vector& weight) {
    Matrix y(x.rows(), x.cols());
    for (Index t = 0; t < x.rows(); ++t) {
      const Real inverse_rms = Real(1) / std::sqrt(x.row(t).squaredNorm() / Real(x.cols()) + Real(1e-5));
      y.row(t) = (x.row(t).array() * inverse_rms) * weight.transpose().array();
    }
    return y;
  }

  /// cos and sin of `p * 10000^(-2i/hs)` for every position p < capacity and pair i < hs/2, computed in
  /// double.
  void rope_tables(Index hs) {
    cos_.resize(capacity_, hs / 2);
    sin_.resize(capacity_, hs / 2);
    for (Index p = 0; p < capacity_; ++p)
      for (Index i = 0; i < hs / 2; ++i) {
        const double angle = double(p) * std::pow(10000.0, -2.0 * double(i) / double(hs));
        cos_(p, i) = Real(std::cos(angle));
        sin_(p, i) = Real(std::sin(angle));
      }
  }

  /// Rotates each pair (x[2i], x[2i+1]) of every head of token row t by the angle of position `first + t`.
  void rotate(Matrix& x, Index first) const {
    const Index hs = config().head_dim();
    for (Index t = 0; t < x.rows(); ++t)
      for (Index head_start = 0; head_start < x.cols(); head_start += hs)
        for (Index i = 0; i < hs / 2; ++i) {
          Real& even = x(t, head_start + 2 * i);
          Real& odd = x(t, head_start + 2 * i + 1);
          const Real c = cos_(first + t, i), s = sin_(first + t, i);
          const Real rotated_even = even * c - odd * s;
          odd = even * s + odd * c;
          even = rotated_even;
        }
  }

  void check_tokens(const std::vector<int>& tokens) const {
    const Index n = Index(tokens.size());
    if (n == 0) throw toptheta::invalid_argument("llama2c: tokens: expected at least one token, got none");
    if (position_ + n > capacity_)
      throw toptheta::invalid_argument("llama2c: tokens: expected at most " + std::to_string(capacity_ - position_) +
                                       " (capacity " + std::to_string(capacity_) + " minus position " +
                                       std::to_string(position_) + "), got " + std::to_string(n));
    for (Index t = 0; t < n; ++t)
      if (tokens[std::size_t(t)] < 0 || tokens[std::size_t(t)] >= config().vocab_size)
        throw toptheta::invalid_argument("llama2c: tokens[" + std::to_string(t) + "]: expected an id in [0, " +
                                         std::to_string(config().vocab_size) + "), got " +
                                         std::to_string(tokens[std::size_t(t)]));
  }

  /// Throws naming `layer` when `policy` cannot run on this model.
  void validate(const LayerAttention& policy, Index layer) const {
    const Index heads = config().heads;
    const std::string where = "llama2c: attention plan, layer " + std::to_string(layer) + ": ";
    const auto heads_match = [&](const toptheta::LayerThresholds& table, const char* name) {
      if (table.heads() != heads)
        throw toptheta::invalid_argument(where + name + ": expected one row per query head (" + std::to_string(heads) +
                                         "), got " + std::to_string(table.heads()));
    };
    try {
      if (const auto* top_k = std::get_if<TopKAttention>(&policy)) {
        if (top_k->denominator_terms) heads_match(*top_k->denominator_terms, "denominator_terms");
        // The kernel's selection checks k and the compensation; build it once here to fail early.
        (void)toptheta::TopKSelection(top_k->k, top_k->compensation,
                                      top_k->denominator_terms ? &*top_k->denominator_terms : nullptr);
      } else if (const auto* top_theta = std::get_if<TopThetaAttention>(&policy)) {
        heads_match(top_theta->thresholds, "thresholds");
        (void)toptheta::TopThetaSelection(top_theta->thresholds, top_theta->compensation, top_theta->cap_k,
                                          top_theta->passes);
      }
    } catch (const toptheta::invalid_argument& error) {
      const std::string message = error.what();
      if (message.rfind("llama2c:", 0) == 0) throw;
      throw toptheta::invalid_argument(where + message);
    }
  }

  const Model& model_;
  ModelWeights<Real> converted_weights_;  // the weights in Real, unless Real is float (then empty)
  EngineOptions options_;
  AttentionPlan plan_;
  AttentionObserver observer_;
  CallObserver call_observer_;
  std::vector<Layer> layers_;
  Index capacity_ = 0, position_ = 0;
  Matrix cos_, sin_;  // [capacity, hs / 2]
  EngineStats stats_;
};

}  // namespace llama2c
