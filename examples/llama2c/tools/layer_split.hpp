// An automatic split of one kept-key budget over the layers: k moves from layer to layer while that lowers the
// model's divergence from dense attention on calibration text.
#pragma once

#include "llama2c/engine/attention_policy.hpp"
#include "llama2c/engine/engine.hpp"
#include "llama2c/tools/calibration.hpp"
#include "llama2c/tools/evaluation.hpp"

#include <toptheta/calibrator.hpp>
#include <toptheta/executor.hpp>
#include <toptheta/threshold_table.hpp>

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama2c {

/// What `split_layers` searches over.
struct LayerSplitOptions {
  Index k = 16;  ///< the budget: Σ_l k_l = layers · k, the kept keys per row of every layer together
  /// The budget Σ_l k_l when > 0 (at least one per layer), in place of layers · k: the search starts from the
  /// most even split (the first `total mod layers` layers one more).
  Index total = 0;
  Index step = 4;  ///< k moved from one layer to another by one move, >= 1
  Index max_moves = 32;
  /// Calibration sequences the divergence is measured on: the first this many (0: all).
  Index scoring_sequences = 8;
  FeedOptions feed;  ///< how the scoring sequences are fed (prefill part, decode steps)
  int threads = 1;   ///< candidate splits evaluated at once, one single-threaded engine each
};

/// The split `split_layers` found, and how it got there.
struct LayerSplit {
  struct Step {
    std::vector<Index> k;  ///< per layer
    double mean_kl;        ///< mean KL(dense ‖ split) per position on the scoring sequences
  };
  std::vector<Step> path;       ///< the most even split, then each accepted move; the last is the result
  Index scoring_sequences = 0;  ///< sequences the divergence was measured on
  toptheta::ThresholdTable table;

  const std::vector<Index>& k() const { return path.back().k; }
  double mean_kl() const { return path.back().mean_kl; }
};

/// The budget Σ_l k_l of `options` over `layers`.
inline Index split_total(const LayerSplitOptions& options, Index layers) {
  return options.total > 0 ? options.total : layers * options.k;
}

/// The most even split of `options`' budget: total / layers each, one more in the first total mod layers.
inline std::vector<Index> even_split(const LayerSplitOptions& options, Index layers) {
  const Index total = split_total(options, layers);
  std::vector<Index> split(std::size_t(layers), total / layers);
  for (Index l = 0; l < total % layers; ++l) ++split[std::size_t(l)];
  return split;
}

/// The k a layer may take when `options` splits its budget over `layers`: its even share less or plus whole
/// steps, at least 1, at most 4 times the largest share (and the whole budget with the other layers at 1).
inline std::vector<Index> layer_k_values(const LayerSplitOptions& options, Index layers) {
  const std::vector<Index> start = even_split(options, layers);
  const Index high = std::min(4 * start.front(), split_total(options, layers) - (layers - 1));
  std::vector<Index> values;
  for (Index share : {start.back(), start.front()})
    for (Index k = share - (share - 1) / options.step * options.step; k <= high; k += options.step) values.push_back(k);
  std::sort(values.begin(), values.end());
  values.erase(std::unique(values.begin(), values.end()), values.end());
  return values;
}

/// Splits the budget (`options.total`, or `options.k · layers`) of kept keys per row over the layers of `model`:
/// from the most even split (`even_split`), each move
/// takes `step` from one layer and gives it to another, the move (of every ordered pair of layers) whose Top-θ
/// plan gives the lowest mean KL divergence from dense attention on the scoring sequences, while that lowers it.
/// Each layer's thresholds for each k it may take come from one calibrator per k fed `calibration` in one dense
/// pass (`calibrator_options` with its k replaced), tabled with `table_options`; the plan uses `compensation`.
/// The per-layer k then hold the same budget of kept keys per calibration row, while the layers spend it where
/// the model's output is most sensitive (on stories260K, its first layer). Deterministic for given inputs.
/// Throws `std::invalid_argument` for a k or step below 1, or a total below one per layer.
inline LayerSplit split_layers(const Model& model, const std::vector<std::vector<int>>& calibration,
                               toptheta::CalibratorOptions calibrator_options,
                               const toptheta::TableOptions& table_options, const toptheta::Compensation& compensation,
                               const LayerSplitOptions& options,
                               const std::function<void(const std::string&)>& say = {}) {
  const Index layers = model.config.layers;
  if (options.k < 1 || options.step < 1 || (options.total != 0 && options.total < layers))
    throw std::invalid_argument(
        "llama2c: split_layers: expected k >= 1, step >= 1 and a total of 0 or >= " + std::to_string(layers) +
        " (one per layer), got k = " + std::to_string(options.k) + ", step = " + std::to_string(options.step) +
        ", total = " + std::to_string(options.total));
  const std::vector<Index> ks = layer_k_values(options, layers);
  // One calibrator per k a layer may take, all fed in one pass.
  std::map<Index, std::unique_ptr<toptheta::Calibrator>> calibrators;
  std::vector<toptheta::Calibrator*> feeds;
  for (Index k : ks) {
    calibrator_options.k = {k};
    feeds.push_back((calibrators[k] = std::make_unique<toptheta::Calibrator>(calibrator_options)).get());
  }
  EngineOptions engine_options;
  engine_options.threads = 1;
  Engine<float> engine(model, engine_options);
  if (say)
    say("calibrating k = " + std::to_string(ks.front()) + ".." + std::to_string(ks.back()) + " on " +
        std::to_string(calibration.size()) + " sequences");
  calibrate(engine, calibration, feeds);
  std::map<Index, toptheta::ThresholdTable> tables;
  for (const auto& [k, calibrator] : calibrators) tables.emplace(k, calibrator->table(table_options));
  calibrators.clear();

  FeedOptions scoring_limit;
  scoring_limit.max_sequences = options.scoring_sequences;
  const auto scoring = scoring_limit.select(calibration);
  engine.set_attention(dense_plan(layers));
  const auto reference = feed_sequences(engine, scoring, options.feed);
  const auto layer_tables_of = [&](const std::vector<Index>& split) {
    std::vector<toptheta::LayerThresholds> chosen;
    for (Index l = 0; l < layers; ++l) chosen.push_back(tables.at(split[std::size_t(l)]).layer(l));
    return chosen;
  };
  const auto score = [&](Engine<float>& worker, const std::vector<Index>& split) {
    return evaluate(worker, top_theta_plan(layer_tables_of(split), compensation), scoring, reference, options.feed)
        .all()
        .mean_kl();
  };
  const auto describe = [](const std::vector<Index>& split, double kl) {
    std::string text = "k";
    for (std::size_t l = 0; l < split.size(); ++l) text += (l ? "," : " ") + std::to_string(split[l]);
    return text + ": mean KL " + std::to_string(kl);
  };

  std::vector<Index> split = even_split(options, layers);
  double split_kl = score(engine, split);
  std::vector<LayerSplit::Step> path{{split, split_kl}};
  if (say) say(describe(split, split_kl));
  for (Index move = 0; move < options.max_moves; ++move) {
    std::vector<std::vector<Index>> candidates;
    for (Index to = 0; to < layers; ++to)
      for (Index from = 0; from < layers; ++from) {
        if (to == from || !tables.count(split[std::size_t(from)] - options.step) ||
            !tables.count(split[std::size_t(to)] + options.step))
          continue;
        std::vector<Index> candidate = split;
        candidate[std::size_t(from)] -= options.step;
        candidate[std::size_t(to)] += options.step;
        candidates.push_back(std::move(candidate));
      }
    std::vector<double> kl(candidates.size());
    toptheta::OpenMPExecutor{std::max(1, options.threads)}.parallel_for(Index(candidates.size()), [&](Index c) {
      Engine<float> worker(model, engine_options);
      kl[std::size_t(c)] = score(worker, candidates[std::size_t(c)]);
    });
    // The first of equal divergences: the result does not depend on the thread count.
    const auto best = std::min_element(kl.begin(), kl.end());
    if (best == kl.end() || !(*best < split_kl)) break;
    split = candidates[std::size_t(best - kl.begin())];
    split_kl = *best;
    path.push_back({split, split_kl});
    if (say) say(describe(split, split_kl));
  }

  const toptheta::ThresholdTable& first = tables.begin()->second;
  std::vector<toptheta::SampleCounts> samples;
  for (Index l = 0; l < layers; ++l) samples.push_back(tables.at(split[std::size_t(l)]).samples(l));
  return {std::move(path), Index(scoring.size()),
          toptheta::ThresholdTable(first.shape(), first.space(), first.buckets(), first.method(), first.sigma_add(),
                                   layer_tables_of(split), std::move(samples))};
}

}  // namespace llama2c
