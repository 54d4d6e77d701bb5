// The `llama2c` program's subcommands (calibrate, eval, generate, tokenize, table): options, work and printed
// results, compiled once for the program and its tests. Needs nlohmann/json (threshold files, JSON results) and
// CLI11 (options.hpp).
#include "llama2c/tools/commands.hpp"

#include "llama2c/engine/tokenizer.hpp"
#include "llama2c/tools/accuracy_report.hpp"
#include "llama2c/tools/accuracy_table.hpp"
#include "llama2c/tools/calibration.hpp"
#include "llama2c/tools/evaluation.hpp"
#include "llama2c/tools/layer_split.hpp"
#include "llama2c/tools/options.hpp"
#include "llama2c/tools/tokens.hpp"

#include <toptheta/threshold_io.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace llama2c {

namespace cli {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

constexpr const char* program = "llama2c";

/// Options every subcommand that runs attention takes.
std::vector<OptionSpec> attention_options() {
  return {
      {"thresholds", "FILE", "Top-θ in every layer with this threshold file (from calibrate)", std::nullopt},
      {"top-k", "K[,K...]", "top-k in every layer: one k, or one per layer", std::nullopt},
      {"denominator", "MODE", "softmax-denominator compensation: none, exact, exp_threshold, calibrated", "none"},
      {"lambda", "X", "scale λ of the denominator term", "1"},
      {"v-mean", "", "V-mean compensation of the dropped mass (the default with --thresholds or --top-k)",
       std::nullopt},
      {"no-v-mean", "", "no V-mean compensation", std::nullopt},
      {"v-mean-of-pruned", "", "V-mean compensation with the mean of the pruned V rows only", std::nullopt},
      {"cap-k", "", "Top-θ: keep at most k survivors per row (the latest)", std::nullopt},
  };
}

std::vector<OptionSpec> with(std::vector<OptionSpec> options, const std::vector<OptionSpec>& more) {
  options.insert(options.end(), more.begin(), more.end());
  return options;
}

/// The plan the attention options ask for: dense without --thresholds and --top-k.
AttentionPlan attention_plan(const CommandLine& line, const Model& model) {
  using toptheta::DenominatorCompensation;
  const Index layers = model.config.layers;
  if (line.given("thresholds") && line.given("top-k"))
    throw usage_error("--top-k: expected either --thresholds or --top-k, got both");
  toptheta::Compensation compensation;
  compensation.denominator = toptheta::denominator_compensation_from_string(
      line.choice("denominator", {"none", "exact", "exp_threshold", "calibrated"}), "--denominator");
  compensation.lambda = line.real("lambda", 0.0);
  if (line.flag("v-mean") && line.flag("no-v-mean"))
    throw usage_error("--no-v-mean: expected either --v-mean or --no-v-mean, got both");
  compensation.v_mean = !line.flag("no-v-mean");  // the recommended configuration compensates
  compensation.v_mean_of_pruned = line.flag("v-mean-of-pruned");
  if (compensation.v_mean_of_pruned && !compensation.v_mean)
    throw usage_error("--v-mean-of-pruned: expected without --no-v-mean (it chooses which V rows are averaged)");
  if (!line.given("thresholds") && !line.given("top-k"))
    for (const char* name : {"denominator", "lambda", "v-mean", "no-v-mean", "v-mean-of-pruned", "cap-k"})
      if (line.given(name))
        throw usage_error(std::string("--") + name +
                          ": expected with --thresholds or --top-k (dense attention "
                          "prunes nothing)");
  if (line.given("top-k")) {
    if (line.flag("cap-k")) throw usage_error("--cap-k: expected with --thresholds (top-k keeps k already)");
    if (compensation.denominator == DenominatorCompensation::calibrated)
      throw usage_error("--denominator: calibrated needs --thresholds (its denominator terms), got --top-k");
    std::vector<Index> k = line.integer_list("top-k", 1);
    if (k.size() == 1) k.assign(std::size_t(layers), k.front());
    if (Index(k.size()) != layers)
      throw usage_error("--top-k: expected one k or one per layer (" + std::to_string(layers) + "), got " +
                        std::to_string(k.size()));
    return top_k_plan(k, compensation);
  }
  if (line.given("thresholds")) {
    const toptheta::ThresholdTable table = toptheta::load_thresholds(line.input_file("thresholds"));
    if (table.shape() != model_shape(model.config))
      throw usage_error("--thresholds: expected a table for this model (" + std::to_string(layers) + " layers, " +
                        std::to_string(model.config.heads) + " heads), got " + std::to_string(table.shape().layers) +
                        " layers, " + std::to_string(table.shape().q_heads) + " heads");
    if (table.space() == toptheta::ThresholdSpace::probability &&
        compensation.denominator != DenominatorCompensation::none)
      throw usage_error(
          "--denominator: expected none for a probability-space table (post-softmax keeps the full "
          "denominator), got " +
          std::string(toptheta::to_string(compensation.denominator)));
    if (compensation.denominator == DenominatorCompensation::calibrated && !table.layer(0).has_denominator_terms())
      throw usage_error(
          "--denominator: calibrated needs a table with denominator terms; calibrate with "
          "--denominator-terms row_threshold or table_threshold");
    return top_theta_plan(layer_tables(table), compensation, line.flag("cap-k"));
  }
  return dense_plan(layers);
}

/// The plan's policies, e.g. "top_k(k=32)", or "per layer: ..." listing each change from one layer to the next.
std::string describe(const AttentionPlan& plan) {
  std::string text;
  for (std::size_t l = 0; l < plan.size(); ++l) {
    const std::string name = llama2c::describe(plan[l]);
    if (l > 0 && name == llama2c::describe(plan[l - 1])) continue;
    text += (text.empty() ? "" : "; ") + name;
  }
  bool uniform = true;
  for (const auto& layer : plan) uniform = uniform && llama2c::describe(layer) == llama2c::describe(plan.front());
  return uniform ? text : "per layer: " + text;
}

using report::fixed;

Model load(const CommandLine& line) { return load_model(line.input_file("model")); }

/// Writes `text` to `path`; throws naming the file when it cannot.
void write_text_file(const std::string& path, const std::string& text) {
  std::ofstream file(path);
  file << text;
  if (!file.flush()) throw std::runtime_error("llama2c: " + path + ": cannot write the file");
}

// ---------------------------------------------------------------------------------------------------------------
// calibrate

CommandLine calibrate_options() {
  return CommandLine(
      program, "calibrate",
      "Runs the dense engine over token sequences (one prefill each), feeds every attention score row to a\n"
      "toptheta::Calibrator and writes the threshold file; prints the in-sample keep-count error per layer.",
      {{"model", "FILE", "llama2.c checkpoint (legacy float32)", std::nullopt, true},
       {"tokens", "FILE", "token sequences, one per line", std::nullopt, true},
       {"out", "FILE", "threshold file to write (JSON)", std::nullopt, true},
       {"k", "K", "elements each row should keep", "32"},
       {"k-per-layer", "K,K,...", "one k per layer (overrides --k)", std::nullopt},
       {"space", "SPACE", "raw_score, probability, score_minus_max, score_over_query_norm", "probability"},
       {"method", "METHOD",
        "count_matched, mean_of_thresholds, or in the probability space mass_matched or budget_matched (one θ per "
        "layer: its k per row over all heads and lengths)",
        "count_matched"},
       {"sigma-add", "X", "mean_of_thresholds: θ = mean + σ_add · std", "0"},
       {"pruned-mass", "EPS", "mass_matched: the mean probability mass each row leaves out, in (0, 1)", "0.01"},
       {"sample-fraction", "F", "fraction of the rows used, in (0, 1]", "1"},
       {"seed", "S", "seed of the row sampling", "0"},
       {"denominator-terms", "SOURCE", "row_threshold, table_threshold or none", "table_threshold"},
       {"max-sequences", "N", "use only the first N sequences (0: all)", "0"},
       {"split-layers", "",
        "split the budget of --k per row over the layers: move --split-step between layers while that lowers the "
        "mean KL divergence from dense attention (V-mean compensation) on the first --split-sequences sequences",
        std::nullopt},
       {"split-step", "S", "--split-layers: k moved by one move", "4"},
       {"split-total", "N",
        "--split-layers: the budget Σ_l k_l to split, in place of --k x layers (e.g. 84 over 5 layers: 16.8 per "
        "layer)",
        "0"},
       {"split-sequences", "N", "--split-layers: sequences the divergence is measured on (0: all)", "8"},
       {"threads", "N", "--split-layers: candidate splits evaluated at once (0: the hardware's threads)", "0"}});
}

int calibrate_command(const std::vector<std::string>& arguments, std::ostream& out) {
  CommandLine line = calibrate_options();
  line.parse(arguments);
  if (line.help_requested()) {
    out << line.help();
    return 0;
  }
  const auto start = Clock::now();
  toptheta::CalibratorOptions options;
  options.space = toptheta::threshold_space_from_string(
      line.choice("space", {"raw_score", "probability", "score_minus_max", "score_over_query_norm"}));
  options.k =
      line.given("k-per-layer") ? line.integer_list("k-per-layer", 1) : std::vector<Index>{line.integer("k", 1)};
  options.sample_fraction = line.real("sample-fraction", 0.0, 1.0);
  if (options.sample_fraction <= 0) throw usage_error("--sample-fraction: expected a fraction in (0, 1], got 0");
  options.seed = std::uint64_t(line.integer("seed", 0));
  toptheta::TableOptions table_options;
  table_options.method = toptheta::calibration_method_from_string(
      line.choice("method", {"count_matched", "mean_of_thresholds", "mass_matched", "budget_matched"}));
  table_options.sigma_add = line.real("sigma-add");
  if (table_options.method != toptheta::CalibrationMethod::mean_of_thresholds && table_options.sigma_add != 0)
    throw usage_error(std::string("--sigma-add: expected 0 with --method ") +
                      toptheta::to_string(table_options.method) + " (σ_add applies to mean_of_thresholds)");
  table_options.pruned_mass = line.real("pruned-mass");
  if (table_options.method == toptheta::CalibrationMethod::mass_matched &&
      !(table_options.pruned_mass > 0 && table_options.pruned_mass < 1))
    throw usage_error("--pruned-mass: expected a probability mass in (0, 1), got " + line.text("pruned-mass"));
  if (toptheta::needs_probability_space(table_options.method) && options.space != toptheta::ThresholdSpace::probability)
    throw usage_error("--method: expected count_matched or mean_of_thresholds with --space " +
                      std::string(toptheta::to_string(options.space)) + " (" +
                      toptheta::to_string(table_options.method) + " needs probability)");
  table_options.denominator_terms = toptheta::denominator_term_source_from_string(
      line.choice("denominator-terms", {"row_threshold", "table_threshold", "none"}), "--denominator-terms");
  options.summary_masses = table_options.denominator_terms == toptheta::DenominatorTermSource::table_threshold;
  FeedOptions feed;
  feed.max_sequences = Index(line.integer("max-sequences", 0));

  const Model model = load(line);
  const Config& config = model.config;
  options.shape = model_shape(config);
  if (options.k.size() != 1 && Index(options.k.size()) != config.layers)
    throw usage_error("--k-per-layer: expected one k per layer (" + std::to_string(config.layers) + "), got " +
                      std::to_string(options.k.size()));
  const auto sequences = feed.select(read_token_file(line.input_file("tokens"), config.vocab_size));

  EngineOptions engine_options;
  engine_options.threads = 1;
  Engine<float> engine(model, engine_options);
  toptheta::TableReport report;
  const toptheta::ThresholdTable table = [&] {
    if (!line.flag("split-layers")) {
      toptheta::Calibrator calibrator(options);
      calibrate(engine, sequences, {&calibrator});
      toptheta::ThresholdTable calibrated = calibrator.table(table_options, &report);
      out << "calibrated " << toptheta::to_string(calibrated.space()) << " thresholds ("
          << toptheta::to_string(calibrated.method()) << ", denominator terms "
          << toptheta::to_string(table_options.denominator_terms) << ") on " << sequences.size()
          << " sequences: " << calibrator.rows_used() << " rows used, " << calibrator.rows_dense()
          << " rows of length <= k left dense\n";
      return calibrated;
    }
    if (line.given("k-per-layer"))
      throw usage_error("--split-layers: expected --k (the budget it splits), not --k-per-layer");
    LayerSplitOptions split_options;
    split_options.k = options.k.front();
    split_options.step = Index(line.integer("split-step", 1));
    split_options.total = Index(line.integer("split-total", 0));
    split_options.scoring_sequences = Index(line.integer("split-sequences", 0));
    split_options.threads = int(line.integer("threads", 0));
    if (split_options.threads == 0) split_options.threads = int(std::max(1u, std::thread::hardware_concurrency()));
    toptheta::Compensation compensation;
    compensation.v_mean = true;
    const LayerSplit split = split_layers(model, sequences, options, table_options, compensation, split_options,
                                          [&](const std::string& text) { out << "  " << text << "\n"; });
    out << "split " << split_total(split_options, config.layers) << " kept keys per row over the layers in "
        << split.path.size() - 1 << " moves: mean KL " << split.path.front().mean_kl << " -> " << split.mean_kl()
        << " on " << split.scoring_sequences << " sequences\n";
    return split.table;
  }();
  toptheta::save_thresholds(table, line.text("out"));
  const KeepCounts counts = keep_counts(engine, table, sequences);

  out << "wrote " << line.text("out") << " in " << fixed(seconds_since(start), 1) << " s\n";
  if (!report.window_edge.empty())
    out << report.window_edge.size() << " entries fell below the count summary's window (θ at its edge)\n";
  out << "in-sample keep count (mean survivors per row over heads / k - 1):\n";
  for (Index l = 0; l < config.layers; ++l)
    out << "  layer " << l << ": k = " << table.k(l) << ", " << std::showpos
        << fixed(100 * counts.layer_relative_error(l, table.k(l)), 2) << std::noshowpos << " %\n";
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// eval

CommandLine eval_options() {
  return CommandLine(
      program, "eval",
      "Feeds each sequence as a prefill of its first part and token-by-token decode of the rest, with\n"
      "the chosen attention and with dense attention, and compares the next-token predictions.",
      with({{"model", "FILE", "llama2.c checkpoint (legacy float32)", std::nullopt, true},
            {"tokens", "FILE", "token sequences, one per line", std::nullopt, true}},
           with(attention_options(),
                {{"prefill-fraction", "F", "fraction of each sequence fed by prefill", "0.5"},
                 {"max-sequences", "N", "use only the first N sequences (0: all)", "0"},
                 {"kv-cache", "TYPE",
                  "the evaluated engine's KV cache: f32, bf16, q8_0 (int8, one half scale per 32 values; "
                  "head_dim a multiple of 32) or q8_8 (per 8 values: on stories260K, one per token and "
                  "head); dense attention on an f32 cache is the reference either way",
                  "f32"},
                 {"json", "FILE", "also write the results as JSON", std::nullopt}})));
}

/// `evaluate` on an engine whose KV cache stores `kv_cache` ("f32", "bf16", "q8_0", "q8_8"), against the
/// reference logits of an f32 cache.
Evaluation evaluate_with_cache(const std::string& kv_cache, const Model& model, const EngineOptions& options,
                               const AttentionPlan& plan, const std::vector<std::vector<int>>& sequences,
                               const std::vector<RowMatrix<float>>& reference, const FeedOptions& feed) {
  const auto run = [&](auto stored) {
    Engine<float, decltype(stored)> engine(model, options);
    return evaluate(engine, plan, sequences, reference, feed);
  };
  if (kv_cache == "bf16") return run(Eigen::bfloat16());
  if (kv_cache == "q8_0") return run(toptheta::BlockQ8_0());
  if (kv_cache == "q8_8") return run(toptheta::BlockQ8<8>());
  return run(float());
}

/// Kept elements and distinct V rows of one set of counters, as JSON.
nlohmann::json sparsity_json(const toptheta::AttentionStats& stats) {
  const auto kept = toptheta::AttentionStats::total(stats.elements_kept);
  const auto visible = toptheta::AttentionStats::total(stats.elements_visible);
  const auto v_kept = toptheta::AttentionStats::total(stats.v_rows_kept);
  const auto v_visible = toptheta::AttentionStats::total(stats.v_rows_visible);
  return {{"elements_kept", kept},
          {"elements_visible", visible},
          {"elements_kept_fraction", stats.kept_fraction()},
          {"v_rows_kept", v_kept},
          {"v_rows_visible", v_visible},
          {"v_rows_kept_fraction", stats.v_rows_kept_fraction()},
          {"v_rows_reduction", v_kept == 0 ? 0.0 : double(v_visible) / double(v_kept)}};
}

nlohmann::json metrics_json(const PredictionMetrics& m) {
  return {{"positions", m.positions},
          {"mean_nll", m.mean_nll()},
          {"dense_mean_nll", m.reference_mean_nll()},
          {"perplexity_ratio", m.perplexity_ratio()},
          {"mean_kl", m.mean_kl()},
          {"top1_agreement", m.top1_agreement()}};
}

/// An evaluation as JSON: metrics for all, prefill and decode positions; sparsity per layer and in total.
nlohmann::json evaluation_json(const Evaluation& evaluation) {
  nlohmann::json attention;
  for (const char* phase : {"prefill", "decode"}) {
    const auto& layers = std::string(phase) == "prefill" ? evaluation.stats.prefill : evaluation.stats.decode;
    nlohmann::json per_layer = nlohmann::json::array();
    for (const auto& layer : layers) per_layer.push_back(sparsity_json(layer));
    attention[phase] = {{"layers", per_layer}, {"total", sparsity_json(EngineStats::total(layers))}};
  }
  return {{"metrics",
           {{"all", metrics_json(evaluation.all())},
            {"prefill", metrics_json(evaluation.prefill)},
            {"decode", metrics_json(evaluation.decode)}}},
          {"attention", attention}};
}

/// The printed results of `eval`: prediction metrics, then kept elements and V rows per layer.
void print_evaluation(std::ostream& out, const Evaluation& evaluation) {
  const PredictionMetrics parts[] = {evaluation.all(), evaluation.prefill, evaluation.decode};
  const auto line = [&](const std::string& name, const std::function<std::string(const PredictionMetrics&)>& value) {
    out << std::left << std::setw(24) << name << std::right;
    for (const auto& part : parts) out << std::setw(14) << value(part);
    out << "\n";
  };
  line("positions", [](const PredictionMetrics& m) { return std::to_string(m.positions); });
  out << std::left << std::setw(24) << "" << std::right << std::setw(14) << "all" << std::setw(14) << "prefill"
      << std::setw(14) << "decode"
      << "\n";
  line("mean NLL", [](const PredictionMetrics& m) { return fixed(m.mean_nll(), 5); });
  line("mean NLL dense", [](const PredictionMetrics& m) { return fixed(m.reference_mean_nll(), 5); });
  line("perplexity ratio", [](const PredictionMetrics& m) { return fixed(m.perplexity_ratio(), 5); });
  line("mean KL(dense||method)", [](const PredictionMetrics& m) {
    std::ostringstream text;
    text << std::scientific << std::setprecision(3) << m.mean_kl();
    return text.str();
  });
  line("top-1 agreement", [](const PredictionMetrics& m) { return fixed(m.top1_agreement(), 4); });
  out << "\n"
      << std::left << std::setw(8) << "layer" << std::right << std::setw(14) << "prefill kept" << std::setw(16)
      << "prefill V rows" << std::setw(14) << "decode kept" << std::setw(15) << "decode V rows" << std::setw(16)
      << "V reduction"
      << "\n";
  const auto row = [&](const std::string& name, const toptheta::AttentionStats& prefill,
                       const toptheta::AttentionStats& decode) {
    const double v = decode.v_rows_kept_fraction();
    out << std::left << std::setw(8) << name << std::right << std::setw(13) << fixed(100 * prefill.kept_fraction(), 2)
        << "%" << std::setw(15) << fixed(100 * prefill.v_rows_kept_fraction(), 2) << "%" << std::setw(13)
        << fixed(100 * decode.kept_fraction(), 2) << "%" << std::setw(14) << fixed(100 * v, 2) << "%" << std::setw(15)
        << (v > 0 ? fixed(1 / v, 2) : std::string("-")) << "x\n";
  };
  for (std::size_t l = 0; l < evaluation.stats.decode.size(); ++l)
    row(std::to_string(l), evaluation.stats.prefill[l], evaluation.stats.decode[l]);
  row("total", EngineStats::total(evaluation.stats.prefill), EngineStats::total(evaluation.stats.decode));
}

int eval_command(const std::vector<std::string>& arguments, std::ostream& out) {
  CommandLine line = eval_options();
  line.parse(arguments);
  if (line.help_requested()) {
    out << line.help();
    return 0;
  }
  const auto start = Clock::now();
  FeedOptions feed;
  feed.prefill_fraction = line.real("prefill-fraction", 0.0, 1.0);
  feed.max_sequences = Index(line.integer("max-sequences", 0));
  const Model model = load(line);
  const AttentionPlan plan = attention_plan(line, model);
  const auto sequences = feed.select(read_token_file(line.input_file("tokens"), model.config.vocab_size));

  EngineOptions engine_options;
  engine_options.threads = 1;
  const std::string kv_cache = line.choice("kv-cache", {"f32", "bf16", "q8_0", "q8_8"});
  Engine<float> engine(model, engine_options);
  const auto reference = feed_sequences(engine, sequences, feed);
  const Evaluation evaluation = evaluate_with_cache(kv_cache, model, engine_options, plan, sequences, reference, feed);

  out << "attention: " << describe(plan) << ", KV cache " << kv_cache << "\n"
      << sequences.size() << " sequences, prefill fraction " << feed.prefill_fraction << "\n\n";
  print_evaluation(out, evaluation);
  out << "\n(" << fixed(seconds_since(start), 1) << " s)\n";
  if (line.given("json")) {
    nlohmann::json json = evaluation_json(evaluation);
    json["attention_plan"] = nlohmann::json::array();
    for (const auto& layer : plan) json["attention_plan"].push_back(llama2c::describe(layer));
    json["sequences"] = sequences.size();
    json["prefill_fraction"] = feed.prefill_fraction;
    write_text_file(line.text("json"), json.dump(2) + "\n");
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// generate

CommandLine generate_options() {
  return CommandLine(program, "generate",
                     "Prefills a prompt, then decodes --steps tokens one at a time (greedy at temperature 0, else\n"
                     "sampled from softmax(logits / T) with --seed); stops early at BOS. Prints the tokens (as text\n"
                     "with --tokenizer) and the decode speed.",
                     with({{"model", "FILE", "llama2.c checkpoint (legacy float32)", std::nullopt, true},
                           {"tokenizer", "FILE", "llama2.c tokenizer.bin, for text in and out", std::nullopt},
                           {"prompt-tokens", "\"ID ID ...\"", "prompt as token ids (BOS is not added)", std::nullopt},
                           {"prompt", "TEXT", "prompt as text (needs --tokenizer; BOS is added)", std::nullopt},
                           {"steps", "N", "tokens to generate", "64"},
                           {"temperature", "T", "0: greedy; > 0: sampled", "0"},
                           {"seed", "S", "seed of the sampler", "0"}},
                          attention_options()));
}

/// The next token: `argmax logits` at temperature 0, else a draw from `softmax(logits / temperature)`.
template <class Derived>
int next_token(const Eigen::DenseBase<Derived>& logits, double temperature, std::mt19937_64& random) {
  Index best = 0;
  if (temperature <= 0) {
    logits.derived().maxCoeff(&best);
    return int(best);
  }
  const Eigen::VectorXd probabilities =
      (log_softmax(logits.derived().template cast<double>() / temperature)).array().exp();
  double u = std::uniform_real_distribution<double>(0.0, 1.0)(random);
  for (Index j = 0; j < probabilities.size(); ++j) {
    u -= probabilities(j);
    if (u < 0) return int(j);
  }
  return int(probabilities.size() - 1);
}

int generate_command(const std::vector<std::string>& arguments, std::ostream& out) {
  CommandLine line = generate_options();
  line.parse(arguments);
  if (line.help_requested()) {
    out << line.help();
    return 0;
  }
  if (line.given("prompt") == line.given("prompt-tokens"))
    throw usage_error("--prompt: expected exactly one of --prompt and --prompt-tokens");
  if (line.given("prompt") && !line.given("tokenizer"))
    throw usage_error("--prompt: text needs --tokenizer FILE (or give --prompt-tokens)");
  const Model model = load(line);
  const AttentionPlan plan = attention_plan(line, model);
  const Index steps = Index(line.integer("steps", 1));
  const double temperature = line.real("temperature", 0.0);
  std::mt19937_64 random(std::uint64_t(line.integer("seed", 0)));
  std::optional<Tokenizer> tokenizer;
  if (line.given("tokenizer")) tokenizer = load_tokenizer(line.input_file("tokenizer"), model.config.vocab_size);

  std::vector<int> prompt;
  if (line.given("prompt")) {
    prompt = tokenizer->encode(line.text("prompt"));
  } else {
    std::istringstream ids(line.text("prompt-tokens"));
    for (std::string word; ids >> word;) {
      const std::optional<long long> id = parse_integer(word);
      if (!id || *id < 0 || *id >= model.config.vocab_size)
        throw usage_error("--prompt-tokens: expected token ids in [0, " + std::to_string(model.config.vocab_size) +
                          "), got \"" + word + "\"");
      prompt.push_back(int(*id));
    }
    if (prompt.empty()) throw usage_error("--prompt-tokens: expected at least one token id, got none");
  }
  const Index context = model.config.seq_len, prompt_tokens = Index(prompt.size());
  if (prompt_tokens >= context)
    throw usage_error("--prompt: expected fewer than " + std::to_string(context) +
                      " tokens (the model's context), got " + std::to_string(prompt_tokens));
  if (steps > context - prompt_tokens)
    throw usage_error("--steps: expected at most " + std::to_string(context - prompt_tokens) + " (the model's " +
                      std::to_string(context) + "-token context less the " + std::to_string(prompt_tokens) +
                      "-token prompt), got " + std::to_string(steps));
  EngineOptions engine_options;
  engine_options.threads = 1;
  engine_options.max_tokens = prompt_tokens + steps;
  Engine<float> engine(model, engine_options);
  engine.set_attention(plan);

  const auto show = [&](int previous, int token) {
    if (tokenizer)
      out << tokenizer->decode(previous, token);
    else
      out << (previous < 0 ? "" : " ") << token;
    out.flush();
  };
  for (std::size_t i = 0; i < prompt.size(); ++i) show(i == 0 ? -1 : prompt[i - 1], prompt[i]);
  const auto prefill_start = Clock::now();
  Vector logits = engine.prefill(prompt, LogitRows::last).row(0).transpose();
  const double prefill_seconds = seconds_since(prefill_start);
  int previous = prompt.back();
  Index generated = 0;
  const auto decode_start = Clock::now();
  for (; generated < steps; ++generated) {
    const int token = next_token(logits, temperature, random);
    if (token == bos_token) break;
    show(previous, token);
    previous = token;
    if (generated + 1 < steps) logits = engine.decode(token);
  }
  const double decode_seconds = seconds_since(decode_start);
  out << "\n\nattention: " << describe(plan) << "\nprefill: " << prompt.size() << " tokens in "
      << fixed(1e3 * prefill_seconds, 2) << " ms\ndecode: " << generated << " tokens in "
      << fixed(1e3 * decode_seconds, 2) << " ms ("
      << (decode_seconds > 0 ? fixed(double(generated) / decode_seconds, 1) : std::string("-")) << " tokens/s)\n";
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// tokenize

CommandLine tokenize_options() {
  return CommandLine(program, "tokenize",
                     "Turns text into the token files the other commands read: each non-blank line of --text becomes\n"
                     "one sequence of token ids (BOS first), encoded with a llama2.c tokenizer.bin.",
                     {{"tokenizer", "FILE", "llama2.c tokenizer.bin", std::nullopt, true},
                      {"text", "FILE", "text, one sequence per line", std::nullopt, true},
                      {"out", "FILE", "token file to write (one sequence of ids per line)", std::nullopt, true},
                      {"max-tokens", "N", "cut each sequence to N tokens (0: no cut)", "0"}});
}

int tokenize_command(const std::vector<std::string>& arguments, std::ostream& out) {
  CommandLine line = tokenize_options();
  line.parse(arguments);
  if (line.help_requested()) {
    out << line.help();
    return 0;
  }
  const Tokenizer tokenizer = load_tokenizer(line.input_file("tokenizer"));
  const std::size_t max_tokens = std::size_t(line.integer("max-tokens", 0));
  std::ifstream text(line.input_file("text"));
  std::ostringstream tokens;
  std::size_t sequences = 0, total = 0;
  for (std::string sentence; std::getline(text, sentence);) {
    if (sentence.find_first_not_of(" \t\r") == std::string::npos) continue;
    std::vector<int> ids = tokenizer.encode(sentence);
    if (max_tokens > 0 && ids.size() > max_tokens) ids.resize(max_tokens);
    for (std::size_t t = 0; t < ids.size(); ++t) tokens << (t ? " " : "") << ids[t];
    tokens << "\n";
    ++sequences;
    total += ids.size();
  }
  if (sequences == 0) throw usage_error("--text: expected at least one non-blank line in " + line.text("text"));
  write_text_file(line.text("out"), tokens.str());
  out << "wrote " << line.text("out") << ": " << sequences << " sequences, " << total << " tokens\n";
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// table

CommandLine table_options() {
  return CommandLine(
      program, "table",
      "The accuracy table: calibrates on --calib (dense engine), then evaluates top-k and Top-θ in every threshold\n"
      "space, compensation and calibration method against dense attention on --eval, for each k; writes markdown.",
      {{"model", "FILE", "llama2.c checkpoint (legacy float32)", std::nullopt, true},
       {"calib", "FILE", "calibration token sequences", std::nullopt, true},
       {"eval", "FILE", "evaluation token sequences", std::nullopt, true},
       {"out", "FILE", "markdown file to write", std::nullopt, true},
       {"json", "FILE", "also write every row as JSON", std::nullopt},
       {"k", "K,K,...", "the k values", "16,20,24,32,64"},
       {"prefill-fraction", "F", "fraction of each evaluation sequence fed by prefill", "0.5"},
       {"max-sequences", "N", "evaluate on the first N sequences of --eval only (0: all)", "0"},
       {"max-calib-sequences", "N", "calibrate on the first N sequences of --calib only (0: all)", "0"},
       {"split-budgets", "K,K,...",
        "also a row per budget k split over the layers (budget-matched probability thresholds, VMC; see calibrate "
        "--split-layers)",
        std::nullopt},
       {"split-step", "S", "--split-budgets: k moved by one move", "2"},
       {"split-sequences", "N", "--split-budgets: calibration sequences the divergence is measured on (0: all)", "8"},
       {"threads", "N", "configurations evaluated at once (0: the hardware's threads)", "0"}});
}

int table_command(const std::vector<std::string>& arguments, std::ostream& out, const std::string& command_text) {
  CommandLine line = table_options();
  line.parse(arguments);
  if (line.help_requested()) {
    out << line.help();
    return 0;
  }
  const auto start = Clock::now();
  const std::clock_t cpu_start = std::clock();
  AccuracyTableOptions options;
  options.ks = line.integer_list("k", 1);
  options.feed.prefill_fraction = line.real("prefill-fraction", 0.0, 1.0);
  options.feed.max_sequences = Index(line.integer("max-sequences", 0));
  options.max_calibration_sequences = Index(line.integer("max-calib-sequences", 0));
  if (line.given("split-budgets")) options.split_budgets = line.integer_list("split-budgets", 1);
  options.split.step = Index(line.integer("split-step", 1));
  options.split.scoring_sequences = Index(line.integer("split-sequences", 0));
  const int threads = int(line.integer("threads", 0, 1024));
  options.threads = threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency()));
  options.progress = [&out](const std::string& text) { out << text << "\n" << std::flush; };
  const Model model = load(line);
  const auto calibration = read_token_file(line.input_file("calib"), model.config.vocab_size);
  const auto evaluation = read_token_file(line.input_file("eval"), model.config.vocab_size);

  const AccuracyTable table = run_accuracy_table(model, calibration, evaluation, options);
  const double seconds = seconds_since(start);
  AccuracyReportContext context;
  context.command = command_text;
  context.model = line.text("model");
  context.seconds = seconds;
  context.cpu_seconds = double(std::clock() - cpu_start) / CLOCKS_PER_SEC;
  context.threads = options.threads;
  write_text_file(line.text("out"), accuracy_markdown(table, context));
  if (line.given("json")) write_text_file(line.text("json"), accuracy_json(table).dump(2) + "\n");
  out << "wrote " << line.text("out") << " in " << fixed(seconds, 1) << " s\n";
  for (Index k : table.ks)
    if (const TableRow* best = table.best(k))
      out << "k = " << k << ": best " << best->name() << ": ppl " << std::showpos
          << fixed(100 * best->perplexity_increase(), 2) << std::noshowpos << " %, "
          << fixed(best->decode_v_reduction(), 2) << "x fewer decode V rows\n";
    else
      out << "k = " << k << ": no configuration reads >= 3x fewer decode V rows at <= 1 % perplexity increase\n";
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------

std::string program_help() {
  return std::string("usage: ") + program +
         " <command> [options]\n\n"
         "A llama2.c inference engine whose attention runs through toptheta: dense, top-k or Top-θ.\n\n"
         "commands:\n"
         "  calibrate   token sequences in, threshold file out\n"
         "  eval        accuracy and sparsity of an attention choice against dense attention\n"
         "  generate    greedy or sampled tokens, and decode speed\n"
         "  tokenize    text lines in, token files out (with a llama2.c tokenizer.bin)\n"
         "  table       the accuracy table over k, threshold spaces, compensations and calibration methods\n\n"
         "Run '" +
         program + " <command> --help' for a command's options.\n";
}

}  // namespace
}  // namespace cli

int run_command_line(const std::vector<std::string>& arguments, std::ostream& out, std::ostream& error) {
  try {
    if (arguments.empty() || arguments[0] == "--help" || arguments[0] == "-h" || arguments[0] == "help") {
      out << cli::program_help();
      return arguments.empty() ? 2 : 0;
    }
    const std::string& command = arguments[0];
    const std::vector<std::string> rest(arguments.begin() + 1, arguments.end());
    if (command == "calibrate") return cli::calibrate_command(rest, out);
    if (command == "eval") return cli::eval_command(rest, out);
    if (command == "generate") return cli::generate_command(rest, out);
    if (command == "tokenize") return cli::tokenize_command(rest, out);
    if (command == "table") {
      std::string text = cli::program;
      for (const std::string& word : arguments)
        text += " " + (word.find_first_of(" \t\"'") == std::string::npos ? word : "\"" + word + "\"");
      return cli::table_command(rest, out, text);
    }
    throw usage_error("unknown command \"" + command + "\"; expected calibrate, eval, generate, tokenize or table");
  } catch (const usage_error& e) {
    error << cli::program << ": " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    error << cli::program << ": error: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace llama2c
