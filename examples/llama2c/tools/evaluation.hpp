// Accuracy of an attention plan against a reference run: next-token NLL, perplexity ratio, KL divergence and
// top-1 agreement, on sequences fed as a prefill of their first part and token-by-token decode of the rest.
#pragma once

#include "llama2c/engine/attention_policy.hpp"
#include "llama2c/engine/engine.hpp"

#include <toptheta/stats.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama2c {

/// `log softmax(z)_j = z_j - max z - log Σ_l exp(z_l - max z)`, in double.
template <class Derived>
Eigen::VectorXd log_softmax(const Eigen::DenseBase<Derived>& logits) {
  const Eigen::VectorXd z = logits.derived().template cast<double>().reshaped();
  const double max = z.maxCoeff();
  return z.array() - max - std::log((z.array() - max).exp().sum());
}

/// Next-token predictions of a method compared with a reference's on the same positions, summed.
///
/// At a position with target token `y`, method distribution `q = softmax(z)` and reference `p = softmax(r)`:
/// NLL `-log q_y` (and `-log p_y`), `KL(p ‖ q) = Σ_j p_j (log p_j - log q_j)`, and agreement when
/// `argmax z = argmax r` (the first index on ties).
struct PredictionMetrics {
  Index positions = 0;
  double nll = 0;            ///< Σ -log q_y
  double reference_nll = 0;  ///< Σ -log p_y
  double kl = 0;             ///< Σ KL(p ‖ q)
  Index top1_agreements = 0;

  /// Adds one position: `method_logits` z, `reference_logits` r (vectors of the vocabulary's size), `target` y.
  template <class A, class B>
  void add(const Eigen::DenseBase<A>& method_logits, const Eigen::DenseBase<B>& reference_logits, int target) {
    if (method_logits.size() != reference_logits.size() || target < 0 || target >= method_logits.size())
      throw std::invalid_argument(
          "llama2c: PredictionMetrics::add: expected logits of equal size and a target in "
          "[0, " +
          std::to_string(method_logits.size()) + "), got sizes " + std::to_string(method_logits.size()) + " and " +
          std::to_string(reference_logits.size()) + ", target " + std::to_string(target));
    const Eigen::VectorXd log_q = log_softmax(method_logits), log_p = log_softmax(reference_logits);
    nll -= log_q(target);
    reference_nll -= log_p(target);
    // Terms with p_j = 0 contribute 0; log_q is finite, so the sum is finite.
    kl += (log_p.array().exp() * (log_p - log_q).array()).sum();
    Index method_top = 0, reference_top = 0;
    log_q.maxCoeff(&method_top);
    log_p.maxCoeff(&reference_top);
    top1_agreements += method_top == reference_top ? 1 : 0;
    ++positions;
  }

  void merge(const PredictionMetrics& other) {
    positions += other.positions;
    nll += other.nll;
    reference_nll += other.reference_nll;
    kl += other.kl;
    top1_agreements += other.top1_agreements;
  }

  double mean_nll() const { return mean(nll); }
  double reference_mean_nll() const { return mean(reference_nll); }
  /// `exp(mean NLL - reference mean NLL)`: the method's perplexity over the reference's.
  double perplexity_ratio() const { return std::exp(mean_nll() - reference_mean_nll()); }
  double mean_kl() const { return mean(kl); }
  double top1_agreement() const { return positions == 0 ? 0.0 : double(top1_agreements) / double(positions); }

 private:
  double mean(double sum) const { return positions == 0 ? 0.0 : sum / double(positions); }
};

/// How sequences are fed: the first `prefill_tokens(n)` tokens in one prefill call, the rest by decode steps.
struct FeedOptions {
  double prefill_fraction = 0.5;  ///< of each sequence's tokens, in [0, 1]
  Index max_sequences = 0;        ///< use only the first ones; 0: all

  /// `floor(prefill_fraction · n)`: tokens of an `n`-token sequence fed by prefill (0: every token decoded).
  Index prefill_tokens(Index n) const {
    return std::clamp(Index(std::floor(prefill_fraction * double(n))), Index(0), n);
  }
  /// The first `max_sequences` of `sequences` (all when 0).
  std::vector<std::vector<int>> select(const std::vector<std::vector<int>>& sequences) const {
    const std::size_t count =
        max_sequences > 0 ? std::min(sequences.size(), std::size_t(max_sequences)) : sequences.size();
    return {sequences.begin(), sequences.begin() + std::ptrdiff_t(count)};
  }
};

/// Feeds `tokens` (n ≥ 2) from an empty cache with the engine's plan: tokens `[0, P)` by one prefill,
/// `[P, n-1)` one decode step each (`P = options.prefill_tokens(n)`). Returns the next-token logits
/// `[n-1, vocab]`: row t is the prediction of token t+1 after position t (rows t < P come from the prefill).
template <class Real, class KvScalar>
typename Engine<Real, KvScalar>::Matrix feed_sequence(Engine<Real, KvScalar>& engine, const std::vector<int>& tokens,
                                                      const FeedOptions& options) {
  const Index n = Index(tokens.size());
  if (n < 2)
    throw std::invalid_argument("llama2c: a sequence to evaluate needs at least 2 tokens, got " + std::to_string(n));
  const Index prefill = options.prefill_tokens(n);
  typename Engine<Real, KvScalar>::Matrix logits(n - 1, engine.config().vocab_size);
  engine.reset();
  if (prefill > 0) {
    const auto rows = engine.prefill({tokens.begin(), tokens.begin() + prefill}, LogitRows::all);
    const Index used = std::min(prefill, n - 1);  // the last token's row predicts nothing
    logits.topRows(used) = rows.topRows(used);
  }
  for (Index t = prefill; t < n - 1; ++t) logits.row(t) = engine.decode(tokens[std::size_t(t)]).transpose();
  engine.reset();
  return logits;
}

/// The logits `feed_sequence` gives for each of `sequences` under the engine's current plan.
template <class Real, class KvScalar>
std::vector<typename Engine<Real, KvScalar>::Matrix> feed_sequences(Engine<Real, KvScalar>& engine,
                                                                    const std::vector<std::vector<int>>& sequences,
                                                                    const FeedOptions& options) {
  std::vector<typename Engine<Real, KvScalar>::Matrix> logits;
  for (const auto& tokens : sequences) logits.push_back(feed_sequence(engine, tokens, options));
  return logits;
}

/// What one attention plan did on a set of sequences, compared with a reference run.
struct Evaluation {
  PredictionMetrics prefill;  ///< positions predicted by prefill rows
  PredictionMetrics decode;   ///< positions predicted by decode steps
  EngineStats stats;          ///< attention statistics per layer, prefill and decode apart

  PredictionMetrics all() const {
    PredictionMetrics sum = prefill;
    sum.merge(decode);
    return sum;
  }
};

/// Runs `plan` on `sequences` as `feed_sequence` does and compares each position with `reference[s]`, the
/// logits of the same feed of sequence s under the reference plan (usually dense). The engine's plan and
/// statistics are replaced. Deterministic for a given engine thread count.
template <class Real, class KvScalar>
Evaluation evaluate(Engine<Real, KvScalar>& engine, const AttentionPlan& plan,
                    const std::vector<std::vector<int>>& sequences,
                    const std::vector<typename Engine<Real, KvScalar>::Matrix>& reference, const FeedOptions& options) {
  if (reference.size() != sequences.size())
    throw std::invalid_argument("llama2c: evaluate: expected reference logits for each of the " +
                                std::to_string(sequences.size()) + " sequences, got " +
                                std::to_string(reference.size()));
  engine.set_attention(plan);
  engine.reset_stats();
  Evaluation result;
  for (std::size_t s = 0; s < sequences.size(); ++s) {
    const auto& tokens = sequences[s];
    const auto logits = feed_sequence(engine, tokens, options);
    if (reference[s].rows() != logits.rows() || reference[s].cols() != logits.cols())
      throw std::invalid_argument("llama2c: evaluate: reference logits of sequence " + std::to_string(s) +
                                  " have the wrong shape");
    const Index prefill = options.prefill_tokens(Index(tokens.size()));
    for (Index t = 0; t < logits.rows(); ++t)
      (t < prefill ? result.prefill : result.decode)
          .add(logits.row(t), reference[s].row(t), tokens[std::size_t(t + 1)]);
  }
  result.stats = engine.stats();
  return result;
}

}  // namespace llama2c
