// The accuracy table as markdown (docs/accuracy.md) and as JSON. Needs nlohmann/json.
#pragma once

#include "llama2c/tools/accuracy_table.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <iomanip>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace llama2c {

/// How the table was made, for its header.
struct AccuracyReportContext {
  std::string command;     ///< the exact command line
  std::string model;       ///< checkpoint path
  double seconds = 0;      ///< wall-clock time of the whole run
  double cpu_seconds = 0;  ///< processor time of the whole run, all threads
  int threads = 1;
};

namespace report {

inline std::string fixed(double x, int digits) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(digits) << x;
  return out.str();
}
inline std::string signed_percent(double fraction, int digits = 2) {
  return (fraction >= 0 ? "+" : "") + fixed(100 * fraction, digits) + " %";
}
inline std::string scientific(double x) {
  std::ostringstream out;
  out << std::scientific << std::setprecision(2) << x;
  return out.str();
}

/// The row's name, with the per-layer k of a split: "..., split over layers (k 24,12,18,10,16)".
inline std::string split_name(const TableRow& row) {
  return row.configuration.split() ? row.name() + " (k " + row.configuration.layer_k_text() + ")" : row.name();
}
/// The row's name with its k, e.g. "k = 32, top-θ probability, count_matched, VMC".
inline std::string full_name(const TableRow& row) { return "k = " + std::to_string(row.k()) + ", " + split_name(row); }

/// Among the rows of `k` for which `select(configuration)` holds, the one with the lowest perplexity; null if none.
inline const TableRow* most_accurate(const AccuracyTable& table, Index k,
                                     const std::function<bool(const TableConfiguration&)>& select) {
  const TableRow* best = nullptr;
  for (const TableRow& row : table.rows)
    if (row.k() == k && select(row.configuration) && (!best || row.perplexity_increase() < best->perplexity_increase()))
      best = &row;
  return best;
}

/// The row of `k` that runs exactly `wanted` (k aside), or null.
inline const TableRow* find(const AccuracyTable& table, Index k, const TableConfiguration& wanted) {
  for (const TableRow& row : table.rows)
    if (row.k() == k && row.name() == wanted.name()) return &row;
  return nullptr;
}

/// "+0.42 % ppl at 4.7x fewer decode V rows" for a row.
inline std::string outcome(const TableRow& row) {
  return signed_percent(row.perplexity_increase()) + " perplexity at " + fixed(row.decode_v_reduction(), 2) +
         "x fewer decode V rows";
}

/// A paragraph that reads the table at the middle k (32 when present): which spaces and compensations work,
/// with the numbers that show why. Every comparison it states is computed from the table.
inline std::string reading(const AccuracyTable& table) {
  using toptheta::CalibrationMethod;
  using toptheta::Compensation;
  using toptheta::DenominatorCompensation;
  using toptheta::ThresholdSpace;
  using Space = std::optional<ThresholdSpace>;
  const Index k =
      std::find(table.ks.begin(), table.ks.end(), 32) != table.ks.end() ? 32 : table.ks[table.ks.size() / 2];
  const Compensation none{}, vmc{DenominatorCompensation::none, 1.0, true},
      exp_threshold{DenominatorCompensation::exp_threshold, 1.0, false},
      exp_threshold_vmc{DenominatorCompensation::exp_threshold, 1.0, true};
  const auto row = [&](Space space, CalibrationMethod method, const Compensation& c) {
    return find(table, k, {k, space, method, c, {}});
  };
  const auto best_in = [&](Space space) {
    return most_accurate(table, k, [&](const TableConfiguration& c) { return c.space == space; });
  };
  const auto ppl = [](const TableRow* r) { return r ? signed_percent(r->perplexity_increase()) : std::string("n/a"); };
  const auto kept = [](const TableRow* r) {
    return r ? fixed(100 * r->decode().kept_fraction(), 1) + " %" : std::string("n/a");
  };
  const auto count_matched = CalibrationMethod::count_matched, mean = CalibrationMethod::mean_of_thresholds;
  std::ostringstream md;
  md << "## Reading the numbers\n\nAt k = " << k << " the most accurate row of each kind is";
  const std::pair<Space, const char*> kinds[] = {{ThresholdSpace::probability, "probability"},
                                                 {ThresholdSpace::score_minus_max, "score_minus_max"},
                                                 {ThresholdSpace::score_over_query_norm, "score_over_query_norm"},
                                                 {ThresholdSpace::raw_score, "raw_score"},
                                                 {std::nullopt, "top-k"}};
  for (std::size_t i = 0; i < std::size(kinds); ++i)
    if (const TableRow* best = best_in(kinds[i].first))
      md << (i == 0                      ? " "
             : i + 1 == std::size(kinds) ? " and "
                                         : ", ")
         << kinds[i].second << " " << ppl(best) << " (" << fixed(best->decode_v_reduction(), 1) << "x)";
  Index meeting = 0, meeting_probability = 0;
  for (const TableRow& r : table.rows)
    if (r.meets_target()) {
      ++meeting;
      meeting_probability += r.configuration.space == ThresholdSpace::probability ? 1 : 0;
    }
  md << " (perplexity increase, decode V-row reduction). " << meeting << " rows meet the target, "
     << meeting_probability << " of them in the probability space.\n\n";

  const TableRow *probability = row(ThresholdSpace::probability, count_matched, none),
                 *probability_vmc = row(ThresholdSpace::probability, count_matched, vmc),
                 *top_k = row(std::nullopt, mean, none);
  const TableRow* best_probability = best_in(ThresholdSpace::probability);
  md << (best_probability && best_probability->meets_target() ? "*Probability thresholds work* because they"
                                                              : "*Probability thresholds*")
     << " are relative to the whole row: a key is kept when "
        "P_ij > θ, so each dropped key carries less than θ of the row's probability, and rows with flat attention "
        "keep more keys than peaked ones while the mean stays near k. The kept weights are the exact softmax "
        "probabilities, and VMC gives the dropped mass 1 − Σ P_ij to the mean of V: compensation that is exact row "
        "by row. It lowers the increase from "
     << ppl(probability) << " to " << ppl(probability_vmc) << " (count-matched, k = " << k
     << "). Top-k, which keeps exactly k keys in every row and renormalises them, costs " << ppl(top_k)
     << " at a similar V-row reduction.\n\n";

  // Budget-matched against count-matched at every k: the two read different numbers of V rows for one k, so
  // both coordinates are given.
  std::string budget_pairs;
  for (Index each_k : table.ks) {
    const TableRow* budget =
        find(table, each_k, {each_k, ThresholdSpace::probability, CalibrationMethod::budget_matched, vmc, {}});
    const TableRow* count = find(table, each_k, {each_k, ThresholdSpace::probability, count_matched, vmc, {}});
    if (!budget || !count) continue;
    budget_pairs += std::string(budget_pairs.empty() ? "" : "; ") + "k = " + std::to_string(each_k) + ": " +
                    outcome(*budget) + " against " + outcome(*count);
  }
  if (!budget_pairs.empty())
    md << "*Budget-matched* probability thresholds (one θ per layer, at which the layer's calibration rows of every "
          "head and length keep k on average) spend the same k per row on the largest probabilities wherever they "
          "are, which leaves out the least mass a split of that budget can: flat heads and long rows keep fewer "
          "keys, peaked heads more. With VMC, against count-matched: "
       << budget_pairs << ".\n\n";

  std::string split_pairs;
  Index splits = 0, first_layer_denser = 0;
  for (const TableRow& split : table.rows) {
    if (!split.configuration.split()) continue;
    ++splits;
    first_layer_denser += split.configuration.layer_k.front() > split.k() ? 1 : 0;
    const TableRow* even =
        find(table, split.k(), {split.k(), ThresholdSpace::probability, CalibrationMethod::budget_matched, vmc, {}});
    split_pairs += std::string(split_pairs.empty() ? "" : "; ") + "k = " + std::to_string(split.k()) + " as " +
                   split.configuration.layer_k_text() + ": " + outcome(split) +
                   (even ? " against " + outcome(*even) + " with k in every layer" : std::string());
  }
  if (!split_pairs.empty())
    md << "*Split over layers*: the budget of k kept keys per row of every layer, moved " << table.split.step
       << " at a time from layer to layer while that lowers the mean KL divergence from dense attention on "
       << (table.split.scoring_sequences > 0 ? "the first " + std::to_string(table.split.scoring_sequences) + " "
                                             : std::string("all "))
       << "calibration sequences (budget-matched probability thresholds, VMC). The first layer takes more than its "
          "even share in "
       << first_layer_denser << " of the " << splits << " splits: " << split_pairs << ".\n\n";

  const TableRow* raw = row(ThresholdSpace::raw_score, count_matched, none);
  md << "*Raw-score thresholds*: one θ per (head, length) is compared with a_ij = s⟨q_i, k_j⟩, whose scale "
        "changes from query to query (with the head size "
     << table.head_dim
     << ", s‖q_i‖‖k_j‖ varies widely), so the same θ keeps many keys of one row and none of another. With "
        "count-matched raw-score thresholds "
     << fixed(100 * (raw ? raw->decode_empty_rows() : 0.0), 1)
     << " % of the decode rows have no score above θ and keep only their max key (the probability space: "
     << fixed(100 * (probability ? probability->decode_empty_rows() : 0.0), 1) << " %), and perplexity rises by "
     << ppl(raw)
     << " although the mean keep count matches k. The row-relative spaces sit in between: "
        "score − max removes the row's shift but not its spread, score/‖q‖ the query's norm but not the keys' "
        "spread.\n\n";

  const TableRow *minus_max_mean = row(ThresholdSpace::score_minus_max, mean, none),
                 *minus_max_matched = row(ThresholdSpace::score_minus_max, count_matched, none),
                 *probability_mean = row(ThresholdSpace::probability, mean, vmc);
  const bool mean_keeps_more_and_better =
      minus_max_mean && minus_max_matched &&
      minus_max_mean->decode().kept_fraction() > minus_max_matched->decode().kept_fraction() &&
      minus_max_mean->perplexity_increase() < minus_max_matched->perplexity_increase();
  md << "*Calibration method.* The mean of the rows' (k+1)-th values is not the θ that keeps k on average: in "
        "score − max it keeps "
     << kept(minus_max_mean) << " of the decode elements (" << ppl(minus_max_mean) << ") where count-matched keeps "
     << kept(minus_max_matched) << " (" << ppl(minus_max_matched) << ")"
     << (mean_keeps_more_and_better ? ", so its better accuracy is bought with more V rows" : "")
     << ". In the probability space (with VMC) mean-of-thresholds keeps " << kept(probability_mean) << " ("
     << ppl(probability_mean) << ") and count-matched " << kept(probability_vmc) << " (" << ppl(probability_vmc)
     << ").\n\n";

  // Score spaces: does any denominator compensation beat renormalising (none) for the same space and method?
  Index pairs = 0, helped = 0;
  for (ThresholdSpace space :
       {ThresholdSpace::raw_score, ThresholdSpace::score_minus_max, ThresholdSpace::score_over_query_norm})
    for (CalibrationMethod method : {mean, count_matched}) {
      const TableRow* plain = row(space, method, none);
      const TableRow* compensated = most_accurate(table, k, [&](const TableConfiguration& c) {
        return c.space == space && c.method == method && c.compensation.denominator != DenominatorCompensation::none;
      });
      if (!plain || !compensated) continue;
      ++pairs;
      helped += compensated->perplexity_increase() < plain->perplexity_increase() ? 1 : 0;
    }
  const TableRow *top_k_sdc = row(std::nullopt, mean, exp_threshold),
                 *top_k_sdc_vmc = row(std::nullopt, mean, exp_threshold_vmc);
  md << "*Denominator compensation* beat plain renormalisation for " << helped << " of " << pairs
     << " (score space, method) pairs at k = " << k
     << ". The exp-threshold term (L_i − |S_i|) exp(τ_i − m_i) bounds every pruned term by the largest one, a bound "
        "that is loose when hundreds of keys are pruned: it overstates the pruned mass and shrinks the output "
        "towards 0 (top-k: "
     << ppl(top_k) << " without it, " << ppl(top_k_sdc) << " with it, " << ppl(top_k_sdc_vmc)
     << " when VMC returns the over-removed mass as the V mean). The calibrated term c_h(L) is the head's mean "
        "pruned mass, right on average but wrong row by row, while renormalising keeps each output a convex "
        "combination of the kept V rows.\n";
  return md.str();
}

/// The perplexity increase of the configuration named `name` at `reduction`x fewer decode V rows, interpolated
/// linearly in log(reduction) between its two rows (of different k) whose reductions bracket it; empty outside
/// the reductions its rows measured.
inline std::optional<double> increase_at_reduction(const AccuracyTable& table, const std::string& name,
                                                   double reduction) {
  std::vector<const TableRow*> rows;
  for (const TableRow& row : table.rows)
    if (row.name() == name && row.decode_v_reduction() > 0) rows.push_back(&row);
  std::sort(rows.begin(), rows.end(),
            [](const TableRow* a, const TableRow* b) { return a->decode_v_reduction() < b->decode_v_reduction(); });
  for (std::size_t i = 1; i < rows.size(); ++i) {
    const double low = rows[i - 1]->decode_v_reduction(), high = rows[i]->decode_v_reduction();
    if (reduction < low || reduction > high) continue;
    const double t = high > low ? std::log(reduction / low) / std::log(high / low) : 0.0;
    const double first = rows[i - 1]->perplexity_increase(), second = rows[i]->perplexity_increase();
    return first + t * (second - first);
  }
  return std::nullopt;
}

/// The section that compares configurations at equal cost: each configuration's perplexity increase at a few
/// decode V-row reductions, interpolated between its k (`increase_at_reduction`); empty for a table of one k.
inline std::string equal_cost_section(const AccuracyTable& table) {
  if (table.ks.size() < 2) return {};
  const double reductions[] = {3, 4, 6, 8, 10};
  constexpr std::size_t columns = std::size(reductions);
  std::vector<std::string> names;
  for (const TableRow& row : table.rows)
    if (std::find(names.begin(), names.end(), row.name()) == names.end()) names.push_back(row.name());
  std::vector<std::array<std::optional<double>, columns>> increases(names.size());
  std::array<std::optional<double>, columns> best;
  for (std::size_t n = 0; n < names.size(); ++n)
    for (std::size_t i = 0; i < columns; ++i) {
      const auto increase = increases[n][i] = increase_at_reduction(table, names[n], reductions[i]);
      if (increase && (!best[i] || *increase < *best[i])) best[i] = increase;
    }
  std::ostringstream md;
  md << "## At equal decode V-row reduction\n\n"
        "Each configuration's perplexity increase at the same cost, interpolated linearly in log(reduction) "
        "between the two k whose reductions bracket it (blank: outside the reductions its k reach). The best at "
        "each reduction is bold.\n\n| config |";
  for (double r : reductions) md << " " << fixed(r, 0) << "x |";
  md << "\n|---|";
  for (std::size_t i = 0; i < columns; ++i) md << "---:|";
  md << "\n";
  for (std::size_t n = 0; n < names.size(); ++n) {
    if (std::none_of(increases[n].begin(), increases[n].end(), [](const auto& v) { return v.has_value(); })) continue;
    md << "| " << names[n] << " |";
    for (std::size_t i = 0; i < columns; ++i) {
      const auto& increase = increases[n][i];
      const std::string text = increase ? signed_percent(*increase) : std::string();
      md << (!increase ? " |" : " " + (*increase == *best[i] ? "**" + text + "**" : text) + " |");
    }
    md << "\n";
  }
  md << "\n";
  return md.str();
}

}  // namespace report

/// The table's rows as JSON: per row its k, name, metrics (all, prefill, decode positions), sparsity totals.
inline nlohmann::json accuracy_json(const AccuracyTable& table) {
  nlohmann::json rows = nlohmann::json::array();
  for (const TableRow& row : table.rows) {
    const PredictionMetrics all = row.evaluation.all();
    const auto decode = row.decode(), prefill = row.prefill();
    rows.push_back({{"k", row.k()},
                    {"config", row.name()},
                    {"layer_k", row.configuration.layer_k},
                    {"perplexity_ratio", all.perplexity_ratio()},
                    {"mean_nll", all.mean_nll()},
                    {"dense_mean_nll", all.reference_mean_nll()},
                    {"mean_kl", all.mean_kl()},
                    {"top1_agreement", all.top1_agreement()},
                    {"decode_perplexity_ratio", row.evaluation.decode.perplexity_ratio()},
                    {"decode_elements_kept_fraction", decode.kept_fraction()},
                    {"decode_v_rows_kept_fraction", decode.v_rows_kept_fraction()},
                    {"decode_v_rows_reduction", row.decode_v_reduction()},
                    {"decode_empty_rows_fraction", row.decode_empty_rows()},
                    {"prefill_elements_kept_fraction", prefill.kept_fraction()},
                    {"prefill_v_rows_kept_fraction", prefill.v_rows_kept_fraction()},
                    {"meets_target", row.meets_target()}});
  }
  return {{"calibration_sequences", table.calibration_sequences},
          {"evaluation_sequences", table.evaluation_sequences},
          {"evaluation_positions", table.evaluation_positions},
          {"prefill_fraction", table.feed.prefill_fraction},
          {"dense_mean_nll", table.dense_mean_nll},
          {"rows", rows}};
}

/// The accuracy table as a markdown document: how it was made, the headline (best row per k, the recommended
/// default), one table per k, and a paragraph that reads the numbers.
inline std::string accuracy_markdown(const AccuracyTable& table, const AccuracyReportContext& context) {
  using namespace report;
  std::ostringstream md;
  md << "# Accuracy of Top-θ attention on a real model\n\n"
     << "Generated by the `llama2c` example program (examples/llama2c) with\n\n"
     << "```sh\n"
     << context.command << "\n```\n\n"
     << "in " << fixed(context.seconds, 0) << " s wall-clock, " << fixed(context.cpu_seconds, 0)
     << " s of processor time (" << context.threads
     << " threads: calibration in 2 shards, then one configuration per thread, each on a single-threaded engine; "
        "the numbers do not depend on the thread count). Do not edit by hand; rerun the command.\n\n"
     << "**Setup.** Model `" << context.model << "`. Thresholds are calibrated per (layer, query head, row-length "
     << "bucket) on " << table.calibration_sequences
     << " calibration sequences, every layer dense, in one pass that feeds a calibrator per (k, space); each "
        "calibrator gives every method (mean of the per-row (k+1)-th largest values, the paper's, with σ_add = 0; "
        "count-matched, the θ at which each (head, length bucket)'s calibration rows keep k on average; and, for "
        "probabilities, budget-matched, one θ per layer at which the layer's rows of every head and length keep k "
        "on average) and the calibrated denominator terms (the mean pruned mass under the table's own θ). Each of "
        "the "
     << table.evaluation_sequences << " evaluation sequences"
     << (table.evaluation_sequences < table.evaluation_sequences_given
             ? " (the first " + std::to_string(table.evaluation_sequences) + " of the " +
                   std::to_string(table.evaluation_sequences_given) +
                   " in the file, to keep the run within a few minutes on two cores)"
             : std::string())
     << " is fed as one prefill of its first " << fixed(100 * table.feed.prefill_fraction, 0)
     << " % of tokens and token-by-token decode of the rest, every layer running the configuration's kernels, and "
        "compared position by position with dense attention fed the same way ("
     << table.evaluation_positions << " predicted positions; dense perplexity "
     << fixed(std::exp(table.dense_mean_nll), 3) << ").\n\n"
     << "**Columns.** *ppl Δ*: perplexity of the configuration over dense, minus 1. *KL*: mean KL(dense ‖ "
        "configuration) of the next-token distributions. *top-1*: fraction of positions where both predict the "
        "same token. *decode kept*: attention elements kept / visible in decode steps. *decode V rows*: distinct V "
        "rows kept / visible per KV head (union over the group's query heads), summed over decode steps and "
        "layers; *reduction* is its inverse. *prefill kept*: elements kept / visible in the prefill calls (rows "
        "no longer than k are dense). ✓: at least 3x fewer decode V rows at ≤ 1 % perplexity increase. SDC: "
        "softmax-denominator compensation; VMC: V-mean compensation.\n\n";

  md << "## Headline\n\n";
  const TableRow* overall = table.best();
  for (Index k : table.ks) {
    md << "- k = " << k << ": ";
    if (const TableRow* best = table.best(k))
      md << "best **" << split_name(*best) << "**: " << outcome(*best) << ".\n";
    else
      md << "no configuration reaches 3x fewer decode V rows at ≤ 1 % perplexity increase.\n";
  }
  if (overall)
    md << "\n**Recommended default: " << full_name(*overall) << "** (" << outcome(*overall)
       << "): the fewest decode V rows among the ✓ rows.\n\n";
  else
    md << "\nNo configuration meets the target here, so none is recommended.\n\n";

  md << reading(table) << "\n" << equal_cost_section(table);
  for (Index k : table.ks) {
    md << "## k = " << k << "\n\n"
       << "| config | ppl Δ | KL | top-1 | decode kept | decode V rows | reduction | prefill kept | |\n"
       << "|---|---:|---:|---:|---:|---:|---:|---:|---|\n";
    for (const TableRow& row : table.rows) {
      if (row.k() != k) continue;
      const PredictionMetrics all = row.evaluation.all();
      const auto decode = row.decode(), prefill = row.prefill();
      const bool best = &row == table.best(k);
      const std::string name = split_name(row);
      md << "| " << (best ? "**" + name + "**" : name) << " | " << signed_percent(row.perplexity_increase()) << " | "
         << scientific(all.mean_kl()) << " | " << fixed(100 * all.top1_agreement(), 1) << " % | "
         << fixed(100 * decode.kept_fraction(), 1) << " % | " << fixed(100 * decode.v_rows_kept_fraction(), 1)
         << " % | " << fixed(row.decode_v_reduction(), 2) << "x | " << fixed(100 * prefill.kept_fraction(), 1)
         << " % | " << (row.meets_target() ? "✓" : "") << " |\n";
    }
    md << "\n";
  }
  return md.str();
}

}  // namespace llama2c
