// The accuracy table: for each k, top-k and Top-θ in every threshold space, compensation and calibration
// method, calibrated on one set of sequences and evaluated against dense attention on another.
#pragma once

#include "llama2c/tools/calibration.hpp"
#include "llama2c/tools/evaluation.hpp"
#include "llama2c/tools/layer_split.hpp"

#include <toptheta/calibrator.hpp>
#include <toptheta/executor.hpp>

#include <algorithm>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama2c {

/// A threshold table of the accuracy table's calibration: one per (k, space, method).
struct CalibratedTable {
  Index k;
  toptheta::ThresholdSpace space;
  toptheta::CalibrationMethod method;
  toptheta::ThresholdTable table;
};

/// The calibration methods of the table's rows in `space`: mean of thresholds and count-matched, and in the
/// probability space also budget-matched (one θ per layer for the layer's k per row).
inline std::vector<toptheta::CalibrationMethod> table_methods(toptheta::ThresholdSpace space) {
  std::vector<toptheta::CalibrationMethod> methods{toptheta::CalibrationMethod::mean_of_thresholds,
                                                   toptheta::CalibrationMethod::count_matched};
  if (space == toptheta::ThresholdSpace::probability) methods.push_back(toptheta::CalibrationMethod::budget_matched);
  return methods;
}

/// Calibrates, for every k of `ks` and every threshold space, one table per calibration method, all from one
/// dense pass over `sequences` (one `Calibrator` per (k, space), each giving every method of `table_methods`).
/// Denominator terms are cut at each table's own θ (`DenominatorTermSource::table_threshold`): the pruned mass
/// the kernel's calibrated compensation stands for under the threshold it uses.
///
/// The pass is split into `shards` fixed interleaved parts of the sequences (shard s takes every sequence i with
/// i mod shards = s), run on up to `threads` threads and merged in shard order, so the tables depend on `shards`
/// but not on `threads`.
inline std::vector<CalibratedTable> calibrate_tables(const Model& model, const std::vector<std::vector<int>>& sequences,
                                                     const std::vector<Index>& ks,
                                                     const std::vector<toptheta::ThresholdSpace>& spaces,
                                                     Index shards = 2, int threads = 1) {
  using Calibrators = std::vector<std::unique_ptr<toptheta::Calibrator>>;
  std::vector<Calibrators> calibrators(std::size_t(std::max<Index>(1, shards)));
  for (Calibrators& shard : calibrators)
    for (Index k : ks)
      for (toptheta::ThresholdSpace space : spaces) {
        toptheta::CalibratorOptions options;
        options.shape = model_shape(model.config);
        options.space = space;
        options.k = {k};
        options.summary_masses = true;
        shard.push_back(std::make_unique<toptheta::Calibrator>(options));
      }
  toptheta::OpenMPExecutor{std::max(1, threads)}.parallel_for(Index(calibrators.size()), [&](Index shard) {
    std::vector<std::vector<int>> part;
    for (std::size_t i = std::size_t(shard); i < sequences.size(); i += calibrators.size())
      part.push_back(sequences[i]);
    std::vector<toptheta::Calibrator*> feeds;
    for (const auto& calibrator : calibrators[std::size_t(shard)]) feeds.push_back(calibrator.get());
    EngineOptions engine_options;
    engine_options.threads = 1;
    Engine<float> engine(model, engine_options);
    calibrate(engine, part, feeds);
  });
  for (std::size_t shard = 1; shard < calibrators.size(); ++shard)
    for (std::size_t c = 0; c < calibrators[0].size(); ++c) calibrators[0][c]->merge(*calibrators[shard][c]);

  std::vector<CalibratedTable> tables;
  for (const auto& calibrator : calibrators[0])
    for (auto method : table_methods(calibrator->options().space)) {
      toptheta::TableOptions options;
      options.method = method;
      options.denominator_terms = toptheta::DenominatorTermSource::table_threshold;
      tables.push_back({calibrator->k(0), calibrator->options().space, method, calibrator->table(options)});
    }
  return tables;
}

/// What one row of the accuracy table runs: top-k (no `space`) or Top-θ with the table of (k, space, method), and
/// a compensation; k in every layer alike, or a split of the budget k over the layers (`layer_split.hpp`).
struct TableConfiguration {
  Index k = 0;                                    ///< per row of every layer, or the mean over the layers of `layer_k`
  std::optional<toptheta::ThresholdSpace> space;  ///< empty: top-k
  toptheta::CalibrationMethod method = toptheta::CalibrationMethod::mean_of_thresholds;  ///< Top-θ only
  toptheta::Compensation compensation;
  std::vector<Index> layer_k;  ///< per layer, summing to layers · k; empty: k in every layer

  bool top_k() const { return !space; }
  bool split() const { return !layer_k.empty(); }
  /// E.g. "top-k, SDC exp_threshold" or "top-θ probability, count_matched, VMC" (", split over layers" for a
  /// split): the same for every k, so that the rows of one name form a curve over k.
  std::string name() const {
    std::string text = top_k()
                           ? std::string("top-k")
                           : std::string("top-θ ") + toptheta::to_string(*space) + ", " + toptheta::to_string(method);
    if (compensation.denominator != toptheta::DenominatorCompensation::none)
      text += std::string(", SDC ") + toptheta::to_string(compensation.denominator);
    if (compensation.v_mean) text += ", VMC";
    if (split()) text += ", split over layers";
    return text;
  }
  /// `layer_k` as "24,12,18,10,16"; empty when not split.
  std::string layer_k_text() const {
    std::string text;
    for (std::size_t l = 0; l < layer_k.size(); ++l) text += (l ? "," : "") + std::to_string(layer_k[l]);
    return text;
  }
};

/// The configurations of the table for one k: top-k without compensation, with exp-threshold SDC, and with
/// exp-threshold SDC and VMC; then Top-θ for each (space, method), with every denominator compensation the space
/// accepts (the probability space only `none`) and V-mean compensation off and on. VMC is skipped with no
/// denominator compensation in the score spaces, where the kept weights sum to 1 and it adds nothing.
inline std::vector<TableConfiguration> table_configurations(Index k) {
  using toptheta::Compensation;
  using toptheta::DenominatorCompensation;
  using toptheta::ThresholdSpace;
  std::vector<TableConfiguration> configurations;
  for (const Compensation& c : {Compensation{}, Compensation{DenominatorCompensation::exp_threshold, 1.0, false},
                                Compensation{DenominatorCompensation::exp_threshold, 1.0, true}})
    configurations.push_back({k, std::nullopt, {}, c, {}});
  for (ThresholdSpace space : {ThresholdSpace::probability, ThresholdSpace::raw_score, ThresholdSpace::score_minus_max,
                               ThresholdSpace::score_over_query_norm})
    for (auto method : table_methods(space)) {
      const bool probability = space == ThresholdSpace::probability;
      std::vector<DenominatorCompensation> denominators{DenominatorCompensation::none};
      if (!probability)
        denominators.insert(denominators.end(),
                            {DenominatorCompensation::exp_threshold, DenominatorCompensation::calibrated});
      for (DenominatorCompensation denominator : denominators)
        for (bool v_mean : {false, true})
          if (!v_mean || denominator != DenominatorCompensation::none || probability)
            configurations.push_back({k, space, method, Compensation{denominator, 1.0, v_mean}, {}});
    }
  return configurations;
}

/// The plan of `configuration`, its Top-θ thresholds taken from the matching one of `tables`.
inline AttentionPlan table_plan(const TableConfiguration& configuration, const std::vector<CalibratedTable>& tables,
                                Index layers) {
  if (configuration.top_k())
    return top_k_plan(std::vector<Index>(std::size_t(layers), configuration.k), configuration.compensation);
  for (const CalibratedTable& calibrated : tables)
    if (calibrated.k == configuration.k && calibrated.space == *configuration.space &&
        calibrated.method == configuration.method)
      return top_theta_plan(layer_tables(calibrated.table), configuration.compensation);
  throw std::invalid_argument("llama2c: no calibrated table for " + configuration.name() +
                              ", k = " + std::to_string(configuration.k));
}

/// A configuration's evaluation.
struct TableRow {
  TableConfiguration configuration;
  Evaluation evaluation;

  Index k() const { return configuration.k; }
  std::string name() const { return configuration.name(); }

  double perplexity_increase() const { return evaluation.all().perplexity_ratio() - 1.0; }
  toptheta::AttentionStats decode() const { return EngineStats::total(evaluation.stats.decode); }
  toptheta::AttentionStats prefill() const { return EngineStats::total(evaluation.stats.prefill); }
  /// Visible over distinct kept V rows in decode.
  double decode_v_reduction() const {
    const double fraction = decode().v_rows_kept_fraction();
    return fraction > 0 ? 1.0 / fraction : 0.0;
  }
  /// Decode rows in which no score passed the threshold (they keep their max-score key), over all decode rows.
  double decode_empty_rows() const {
    const auto stats = decode();
    return stats.rows == 0 ? 0.0 : double(stats.empty_rows) / double(stats.rows);
  }
  /// The target: ≥ 3x fewer V rows in decode at ≤ 1 % perplexity increase.
  bool meets_target() const { return decode_v_reduction() >= 3.0 && perplexity_increase() <= 0.01; }
};

/// What `run_accuracy_table` produced.
struct AccuracyTable {
  std::vector<Index> ks;
  Index head_dim = 0;  ///< of the model, for the report
  Index calibration_sequences = 0, evaluation_sequences = 0, evaluation_positions = 0;
  Index evaluation_sequences_given = 0;  ///< in the evaluation set, before `max_sequences`
  FeedOptions feed;
  LayerSplitOptions split;  ///< how the rows "..., split over layers" were searched (`split.k` unused)
  double dense_mean_nll = 0;
  std::vector<TableRow> rows;

  /// Among the rows of `k` (every k when 0) that meet the target, the one reading the fewest V rows in decode;
  /// null when none does.
  const TableRow* best(Index k = 0) const {
    const TableRow* best = nullptr;
    for (const TableRow& row : rows)
      if ((k == 0 || row.k() == k) && row.meets_target() &&
          (!best || row.decode().v_rows_kept_fraction() < best->decode().v_rows_kept_fraction()))
        best = &row;
    return best;
  }
};

/// How `run_accuracy_table` is run.
struct AccuracyTableOptions {
  std::vector<Index> ks{16, 20, 24, 32, 64};
  FeedOptions feed;                     ///< how evaluation sequences are fed; `max_sequences` limits them
  Index max_calibration_sequences = 0;  ///< use only the first calibration sequences; 0: all
  int threads = 1;                      ///< configurations evaluated at once, each on its own single-threaded engine
  Index calibration_shards = 2;         ///< parts of the calibration pass run in parallel (see `calibrate_tables`)
  /// Budgets k split over the layers (`split_layers`, budget-matched probability thresholds, VMC): one row
  /// each, named "..., split over layers"; `split.k` and `split.threads` are replaced by each budget and
  /// `threads`.
  std::vector<Index> split_budgets;
  LayerSplitOptions split;
  /// Called with a line of progress (e.g. to print it); may be empty.
  std::function<void(const std::string&)> progress;
};

/// Calibrates on `calibration` (dense engine), then evaluates every configuration of `table_configurations` for
/// each k on `evaluation` against dense attention fed the same way. Results do not depend on `threads`.
inline AccuracyTable run_accuracy_table(const Model& model, const std::vector<std::vector<int>>& calibration,
                                        const std::vector<std::vector<int>>& evaluation,
                                        const AccuracyTableOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  const auto say = [&](const std::string& line) {
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (options.progress) options.progress("[" + std::to_string(int(seconds)) + " s] " + line);
  };
  EngineOptions engine_options;
  engine_options.threads = 1;
  FeedOptions calibration_limit;
  calibration_limit.max_sequences = options.max_calibration_sequences;
  const auto calibration_set = calibration_limit.select(calibration);
  const auto evaluation_set = options.feed.select(evaluation);

  say("calibrating on " + std::to_string(calibration_set.size()) + " sequences");
  const std::vector<toptheta::ThresholdSpace> spaces{
      toptheta::ThresholdSpace::probability, toptheta::ThresholdSpace::raw_score,
      toptheta::ThresholdSpace::score_minus_max, toptheta::ThresholdSpace::score_over_query_norm};
  const std::vector<CalibratedTable> tables =
      calibrate_tables(model, calibration_set, options.ks, spaces, options.calibration_shards, options.threads);

  say("dense reference on " + std::to_string(evaluation_set.size()) + " sequences");
  Engine<float> engine(model, engine_options);
  const auto reference = feed_sequences(engine, evaluation_set, options.feed);

  std::vector<TableConfiguration> configurations;
  for (Index k : options.ks)
    for (const TableConfiguration& c : table_configurations(k)) configurations.push_back(c);
  say("evaluating " + std::to_string(configurations.size()) + " configurations on " + std::to_string(options.threads) +
      " threads");

  AccuracyTable result;
  result.ks = options.ks;
  result.head_dim = model.config.head_dim();
  result.feed = options.feed;
  result.split = options.split;
  result.calibration_sequences = Index(calibration_set.size());
  result.evaluation_sequences = Index(evaluation_set.size());
  result.evaluation_sequences_given = Index(evaluation.size());
  result.rows.resize(configurations.size());
  std::mutex progress_mutex;
  toptheta::OpenMPExecutor{std::max(1, options.threads)}.parallel_for(Index(configurations.size()), [&](Index i) {
    TableRow& row = result.rows[std::size_t(i)];
    row.configuration = configurations[std::size_t(i)];
    Engine<float> worker(model, engine_options);
    row.evaluation = evaluate(worker, table_plan(row.configuration, tables, model.config.layers), evaluation_set,
                              reference, options.feed);
    const std::lock_guard<std::mutex> lock(progress_mutex);
    say("  k=" + std::to_string(row.k()) + " " + row.name());
  });

  // Splits of a budget over the layers: each searched on the calibration sequences, then evaluated like the rows.
  const toptheta::Compensation vmc{toptheta::DenominatorCompensation::none, 1.0, true};
  for (Index budget : options.split_budgets) {
    toptheta::CalibratorOptions calibrator_options;
    calibrator_options.shape = model_shape(model.config);
    calibrator_options.space = toptheta::ThresholdSpace::probability;
    calibrator_options.summary_masses = true;
    toptheta::TableOptions table_options;
    table_options.method = toptheta::CalibrationMethod::budget_matched;
    table_options.denominator_terms = toptheta::DenominatorTermSource::table_threshold;
    LayerSplitOptions split_options = options.split;
    split_options.k = budget;
    split_options.threads = std::max(1, options.threads);
    say("splitting k = " + std::to_string(budget) + " over the layers");
    const LayerSplit split = split_layers(model, calibration_set, calibrator_options, table_options, vmc, split_options,
                                          [&](const std::string& line) { say("  " + line); });
    TableRow row;
    row.configuration = {budget, toptheta::ThresholdSpace::probability, table_options.method, vmc, split.k()};
    row.evaluation =
        evaluate(engine, top_theta_plan(layer_tables(split.table), vmc), evaluation_set, reference, options.feed);
    say("  k=" + std::to_string(budget) + " " + row.name() + " (" + row.configuration.layer_k_text() + ")");
    result.rows.push_back(std::move(row));
    if (std::find(result.ks.begin(), result.ks.end(), budget) == result.ks.end()) result.ks.push_back(budget);
  }
  std::sort(result.ks.begin(), result.ks.end());

  const PredictionMetrics all = result.rows.front().evaluation.all();
  result.evaluation_positions = all.positions;
  result.dense_mean_nll = all.reference_mean_nll();
  return result;
}

}  // namespace llama2c
