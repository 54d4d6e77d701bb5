// Synthetic attention inputs with the structure real attention rows have, for examples, benchmarks and tests.
#pragma once

#include <toptheta/aligned_vector.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/views.hpp>

#include <Eigen/Core>

#include <cmath>
#include <optional>
#include <random>
#include <vector>

namespace toptheta {

/// Shape and structure of a synthetic layer. Scores get four features seen in trained models: an attention
/// sink at position 0, a recency bias (q_i and k_j share an AR(1) component, so nearby keys score higher), a
/// few salient keys that most queries attend to, and query norms that vary from row to row.
struct SyntheticAttentionOptions {
  Index tokens = 1024, q_heads = 8, kv_heads = 2, head_dim = 128;
  double sink_strength = 10.0;        ///< extra score of key 0
  double recency_strength = 8.0;      ///< extra score of the nearest keys, decaying as ρ^|i-j|
  double recency_correlation = 0.98;  ///< AR(1) coefficient: the recency window is ~1 / (1 - ρ) tokens
  double salient_fraction = 0.01;     ///< fraction of keys that are salient
  double salient_strength = 6.0;      ///< extra score of a salient key
  double query_norm_spread = 0.3;     ///< standard deviation of log ||q_i||
  unsigned seed = 1;                  ///< the data: queries, keys, values, which keys are salient
  /// The "model": each KV head's sink and salient directions. Unset: drawn from `seed` with the data. Two
  /// layers with the same model seed and different seeds are two texts through the same heads (calibrate on
  /// one, measure on the other).
  std::optional<unsigned> model_seed;
};

/// Q `[tokens, q_heads, d]`, K and V `[tokens, kv_heads, d]` in one buffer each.
template <class Scalar>
struct SyntheticAttention {
  SyntheticAttentionOptions shape;
  AlignedVector<Scalar> q, k, v;

  explicit SyntheticAttention(const SyntheticAttentionOptions& options) : shape(options) {
    detail::require(options.tokens >= 1, "options.tokens", "a count >= 1", options.tokens);
    detail::require(options.head_dim >= 4, "options.head_dim", "at least 4", options.head_dim);
    detail::require(options.kv_heads >= 1 && options.q_heads % options.kv_heads == 0, "options.q_heads",
                    "a multiple of kv_heads", options.q_heads);
    const Index n = options.tokens, d = options.head_dim, group = options.q_heads / options.kv_heads;
    std::mt19937_64 rng(options.seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    auto random_vector = [&](Index size) {
      Eigen::VectorXd x(size);
      for (Index t = 0; t < size; ++t) x(t) = normal(rng);
      return x;
    };
    q.resize(std::size_t(n * options.q_heads * d));
    k.resize(std::size_t(n * options.kv_heads * d));
    v.resize(k.size());
    // Built in score units: with q = d^(1/4) x and k = d^(1/4) y the score is <x, y>. Noise coordinates have
    // variance 1/sqrt(d), so <x_noise, y_noise> has unit variance; unit directions u add their strengths.
    const double to_stored = std::sqrt(std::sqrt(double(d))), noise = 1 / to_stored;
    const double rho = options.recency_correlation, innovation = std::sqrt(1 - rho * rho);
    std::mt19937_64 model_rng(options.model_seed.value_or(0));
    for (Index kv = 0; kv < options.kv_heads; ++kv) {
      Eigen::VectorXd sink, salient;
      if (options.model_seed) {
        sink = random_direction(model_rng, d);
        salient = random_direction(model_rng, d);
      } else {
        sink = random_vector(d).normalized();
        salient = random_vector(d).normalized();
      }
      std::vector<Eigen::VectorXd> recency(
          static_cast<std::size_t>(n));  // z_t = ρ z_{t-1} + sqrt(1 - ρ²) ε_t, <z_i, z_j> ≈ ρ^|i-j|
      Eigen::VectorXd z = random_vector(d) / std::sqrt(double(d));
      for (Index t = 0; t < n; ++t) {
        z = rho * z + innovation * random_vector(d) / std::sqrt(double(d));
        recency[std::size_t(t)] = z;
        Eigen::VectorXd key = noise * random_vector(d) + z;
        if (t == 0) key += options.sink_strength * sink;
        if (uniform(rng) < options.salient_fraction) key += options.salient_strength * salient;
        store(k, t, kv, options.kv_heads, to_stored * key);
        store(v, t, kv, options.kv_heads, random_vector(d));
      }
      for (Index g = 0; g < group; ++g)
        for (Index t = 0; t < n; ++t) {
          Eigen::VectorXd query =
              noise * random_vector(d) + options.recency_strength * recency[std::size_t(t)] + sink + salient;
          query *= std::exp(options.query_norm_spread * normal(rng));
          store(q, t, kv * group + g, options.q_heads, to_stored * query);
        }
    }
  }

  TensorView<const Scalar> queries() const { return {q.data(), shape.tokens, shape.q_heads, shape.head_dim}; }
  TensorView<const Scalar> keys() const { return {k.data(), shape.tokens, shape.kv_heads, shape.head_dim}; }
  TensorView<const Scalar> values() const { return {v.data(), shape.tokens, shape.kv_heads, shape.head_dim}; }

 private:
  static Eigen::VectorXd random_direction(std::mt19937_64& rng, Index d) {
    std::normal_distribution<double> normal(0.0, 1.0);
    Eigen::VectorXd x(d);
    for (Index t = 0; t < d; ++t) x(t) = normal(rng);
    return x.normalized();
  }

  void store(AlignedVector<Scalar>& into, Index token, Index head, Index heads, const Eigen::VectorXd& row) {
    const Index d = shape.head_dim;
    for (Index c = 0; c < d; ++c) into[std::size_t((token * heads + head) * d + c)] = Scalar(row(c));
  }
};

}  // namespace toptheta
