// The llama2c program (examples/llama2c): command-line errors name the flag, the accuracy metrics on hand-built
// logits, the llama2.c tokenizer file, and end-to-end runs on stories260K (skipped without ../shared).
#include "test_support.hpp"

#include "llama2c/engine/tokenizer.hpp"
#include "llama2c/tools/evaluation.hpp"
#include "llama2c/tools/tokens.hpp"
#include "model_support.hpp"

#include <toptheta/threshold_io.hpp>

#if __has_include(<nlohmann/json.hpp>)
#include "llama2c/tools/accuracy_report.hpp"
#include "llama2c/tools/accuracy_table.hpp"

#include <nlohmann/json.hpp>
#define LLAMA2C_CLI_HAVE_JSON 1
#endif
// Defined by CMake where the tools library (CLI11, nlohmann/json) is built.
#ifdef TOPTHETA_HAVE_LLAMA2C_TOOLS
#include "llama2c/tools/commands.hpp"
#include "llama2c/tools/options.hpp"
#endif

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

using toptheta_test::mentions;

using llama2c::Index;

#ifdef TOPTHETA_HAVE_LLAMA2C_TOOLS
namespace {

llama2c::CommandLine example_command_line() {
  return llama2c::CommandLine("llama2c", "example", "An example.",
                              {{"model", "FILE", "a file", std::nullopt, true},
                               {"k", "K", "an integer", "32"},
                               {"ks", "K,K", "integers", "16,32"},
                               {"fraction", "F", "a fraction", "0.5"},
                               {"space", "SPACE", "a choice", "probability"},
                               {"v-mean", "", "a flag", std::nullopt}});
}

/// The message of the `usage_error` that parsing `arguments` and then calling `use` throws ("" if none).
std::string usage_error_of(const std::vector<std::string>& arguments,
                           const std::function<void(const llama2c::CommandLine&)>& use = {}) {
  llama2c::CommandLine line = example_command_line();
  try {
    line.parse(arguments);
    if (use) use(line);
  } catch (const llama2c::usage_error& error) {
    return error.what();
  }
  return "";
}

}  // namespace

TEST_CASE("llama2c options: values are parsed, defaults apply and --help is recognised", "[llama2c][cli]") {
  llama2c::CommandLine line = example_command_line();
  line.parse({"--model", "m.bin", "--ks=8,24", "--v-mean", "--fraction", "0.25"});
  CHECK(line.text("model") == "m.bin");
  CHECK(line.integer("k", 1) == 32);
  CHECK_FALSE(line.given("k"));
  CHECK(line.integer_list("ks", 1) == std::vector<Index>{8, 24});
  CHECK(line.real("fraction", 0, 1) == 0.25);
  CHECK(line.flag("v-mean"));
  CHECK(line.choice("space", {"raw_score", "probability"}) == "probability");

  llama2c::CommandLine help = example_command_line();
  help.parse({"--help"});  // required options are not required for --help
  CHECK(help.help_requested());
  CHECK_THAT(help.help(), mentions("--model FILE"));
  CHECK_THAT(help.help(), mentions("--k K=32"));  // CLI11 shows the default after the value name
}

TEST_CASE("llama2c options: every bad flag or value is an error naming the flag and what was expected",
          "[llama2c][cli]") {
  using Use = std::function<void(const llama2c::CommandLine&)>;
  const std::vector<std::string> model{"--model", "m.bin"};
  const auto plus = [&](std::vector<std::string> more) {
    more.insert(more.begin(), model.begin(), model.end());
    return more;
  };
  CHECK_THAT(usage_error_of({"--k", "8"}), mentions("--model is required"));
  CHECK_THAT(usage_error_of(plus({"--colour", "red"})), mentions("not expected") && mentions("--colour"));
  CHECK_THAT(usage_error_of(plus({"--k"})), mentions("--k: 1 required K missing"));
  CHECK_THAT(usage_error_of(plus({"--k", "1", "--k", "2"})), mentions("--k: At Most 1 required but received 2"));
  CHECK_THAT(usage_error_of(plus({"--v-mean=yes"})), mentions("v-mean was given a disallowed flag override"));
  CHECK_THAT(usage_error_of(plus({"stray"})), mentions("not expected: stray"));
  const Use k = [](const llama2c::CommandLine& line) { line.integer("k", 1); };
  CHECK_THAT(usage_error_of(plus({"--k", "abc"}), k), mentions("--k: expected an integer >= 1, got \"abc\""));
  CHECK_THAT(usage_error_of(plus({"--k", "0"}), k), mentions("--k: expected an integer >= 1, got \"0\""));
  CHECK_THAT(usage_error_of(plus({"--k", "12x"}), k), mentions("--k"));
  const Use ks = [](const llama2c::CommandLine& line) { line.integer_list("ks", 1); };
  CHECK_THAT(usage_error_of(plus({"--ks", "8,,9"}), ks), mentions("--ks: expected comma-separated integers >= 1"));
  const Use fraction = [](const llama2c::CommandLine& line) { line.real("fraction", 0, 1); };
  CHECK_THAT(usage_error_of(plus({"--fraction", "1.5"}), fraction),
             mentions("--fraction: expected a number in [0, 1], got \"1.5\""));
  CHECK_THAT(usage_error_of(plus({"--fraction", "nan"}), fraction), mentions("--fraction"));
  const Use space = [](const llama2c::CommandLine& line) { line.choice("space", {"raw_score", "probability"}); };
  CHECK_THAT(usage_error_of(plus({"--space", "logits"}), space),
             mentions("--space: expected one of raw_score, probability, got \"logits\""));
  const Use file = [](const llama2c::CommandLine& line) { line.input_file("model"); };
  CHECK_THAT(usage_error_of({"--model", "/nonexistent/m.bin"}, file), mentions("--model: expected an existing file"));
}

TEST_CASE("llama2c program: a bad command line exits with status 2 and a message naming the flag", "[llama2c][cli]") {
  const auto run = [](const std::vector<std::string>& arguments, std::string& error_text) {
    std::ostringstream out, error;
    const int status = llama2c::run_command_line(arguments, out, error);
    error_text = error.str();
    return status;
  };
  std::string error;
  CHECK(run({"frobnicate"}, error) == 2);
  CHECK_THAT(error, mentions("unknown command \"frobnicate\""));
  CHECK(run({"eval", "--tokens", "x"}, error) == 2);
  CHECK_THAT(error, mentions("eval: --model is required"));
  CHECK(run({"calibrate", "--model", "/nonexistent.bin", "--tokens", "t", "--out", "o"}, error) == 2);
  CHECK_THAT(error, mentions("--model: expected an existing file"));
  CHECK(run({"table", "--model", "m", "--calib", "c", "--eval", "e", "--out", "o", "--k", "16,x"}, error) == 2);
  CHECK_THAT(error, mentions("--k: expected comma-separated integers >= 1, got \"16,x\""));
  for (const char* command : {"calibrate", "eval", "generate", "table"}) {
    std::ostringstream out, err;
    CHECK(llama2c::run_command_line({command, "--help"}, out, err) == 0);
    CHECK_THAT(out.str(), mentions(std::string("Usage: llama2c ") + command));
  }
}
#endif

TEST_CASE("prediction metrics: equal distributions give KL 0, agreement 1 and perplexity ratio 1", "[llama2c][cli]") {
  Eigen::VectorXf logits(5);
  logits << 0.5f, -1.0f, 2.0f, 0.0f, 1.5f;
  llama2c::PredictionMetrics metrics;
  metrics.add(logits, logits, 2);
  metrics.add(logits, (logits.array() + 7.0f).matrix(), 4);  // softmax ignores a constant shift
  CHECK(metrics.positions == 2);
  CHECK(metrics.mean_kl() == Approx(0).margin(1e-12));
  CHECK(metrics.top1_agreement() == 1.0);
  CHECK(metrics.perplexity_ratio() == Approx(1).epsilon(1e-12));
  const Eigen::VectorXd log_p = llama2c::log_softmax(logits);
  CHECK(metrics.mean_nll() == Approx(-(log_p(2) + log_p(4)) / 2).epsilon(1e-12));
}

TEST_CASE("prediction metrics: KL, top-1 agreement and perplexity ratio of two hand-built distributions",
          "[llama2c][cli]") {
  // method q = (1/2, 1/4, 1/4), reference p = (1/4, 1/2, 1/4), target 0:
  // NLL -log 1/2 against -log 1/4, so the perplexity ratio is exp(log 2 - log 4) = 1/2;
  // KL(p ‖ q) = 1/4 log(1/2) + 1/2 log 2 + 0 = (1/4) log 2; the argmaxes differ.
  const Eigen::Vector3d q(std::log(0.5), std::log(0.25), std::log(0.25));
  const Eigen::Vector3d p(std::log(0.25), std::log(0.5), std::log(0.25));
  llama2c::PredictionMetrics metrics;
  metrics.add(q, p, 0);
  CHECK(metrics.mean_nll() == Approx(std::log(2.0)).epsilon(1e-12));
  CHECK(metrics.reference_mean_nll() == Approx(std::log(4.0)).epsilon(1e-12));
  CHECK(metrics.perplexity_ratio() == Approx(0.5).epsilon(1e-12));
  CHECK(metrics.mean_kl() == Approx(0.25 * std::log(2.0)).epsilon(1e-12));
  CHECK(metrics.top1_agreement() == 0.0);

  llama2c::PredictionMetrics agreeing;  // same argmax, different distributions: KL > 0, agreement 1
  agreeing.add(Eigen::Vector3d(2.0, 0.0, 0.0), Eigen::Vector3d(1.0, 0.0, 0.0), 1);
  CHECK(agreeing.top1_agreement() == 1.0);
  CHECK(agreeing.mean_kl() > 0);
  metrics.merge(agreeing);
  CHECK(metrics.positions == 2);
  CHECK(metrics.top1_agreement() == 0.5);
  CHECK_THROWS_WITH(metrics.add(q, p, 3), mentions("target"));
}

namespace {

/// A tokenizer file written byte by byte: max_token_length, then per token score, length, bytes.
std::string tokenizer_bytes(std::int32_t max_token_length, const std::vector<std::pair<std::string, float>>& tokens) {
  std::string bytes;
  const auto put = [&](const void* data, std::size_t size) { bytes.append(static_cast<const char*>(data), size); };
  put(&max_token_length, 4);
  for (const auto& [piece, score] : tokens) {
    const std::int32_t length = std::int32_t(piece.size());
    put(&score, 4);
    put(&length, 4);
    bytes += piece;
  }
  return bytes;
}

const std::vector<std::pair<std::string, float>> small_vocabulary{
    {"<unk>", 0.0f}, {"\n<s>\n", 0.0f}, {"\n</s>\n", 0.0f}, {"<0x0A>", 0.0f}, {" ", -5.0f},
    {"a", -5.0f},    {"b", -5.0f},      {" a", -1.0f},      {"ab", -2.0f},    {" ab", -0.5f}};

}  // namespace

TEST_CASE("llama2.c tokenizer: a hand-written file loads, encodes by greedy merges and decodes", "[llama2c][cli]") {
  const TemporaryFile file("tokenizer.bin");
  std::ofstream(file.path, std::ios::binary) << tokenizer_bytes(7, small_vocabulary);
  const llama2c::Tokenizer tokenizer = llama2c::load_tokenizer(file.path, Index(small_vocabulary.size()));
  REQUIRE(tokenizer.size() == Index(small_vocabulary.size()));
  CHECK(tokenizer.max_token_length() == 7);
  for (std::size_t id = 0; id < small_vocabulary.size(); ++id) {
    CHECK(tokenizer.piece(int(id)) == small_vocabulary[id].first);
    CHECK(tokenizer.score(int(id)) == small_vocabulary[id].second);
  }
  CHECK(llama2c::load_tokenizer(file.path).size() == tokenizer.size());  // vocab_size 0: up to the end

  // " ab a": " "+"a" (-1) merges first, then " a"+"b" = " ab" (-0.5), then " "+"a".
  const std::vector<int> ids = tokenizer.encode("ab a");
  CHECK(ids == std::vector<int>{llama2c::bos_token, 9, 7});
  CHECK(tokenizer.decode(llama2c::bos_token, 9) == "ab");  // the first piece after BOS loses its space
  CHECK(tokenizer.decode(9, 7) == " a");
  CHECK(tokenizer.decode(7, 3) == "\n");  // a byte piece is its byte
  CHECK(tokenizer.encode("", false).empty());
}

TEST_CASE("llama2.c tokenizer: damaged files are errors naming the file and the token", "[llama2c][cli]") {
  const TemporaryFile file("tokenizer.bin");
  const std::string bytes = tokenizer_bytes(7, small_vocabulary);
  std::ofstream(file.path, std::ios::binary) << bytes.substr(0, bytes.size() - 2);
  CHECK_THROWS_WITH(llama2c::load_tokenizer(file.path, 10), mentions(file.path) && mentions("token 9"));
  std::ofstream(file.path, std::ios::binary) << bytes;
  CHECK_THROWS_WITH(llama2c::load_tokenizer(file.path, 9), mentions("bytes left after 9 tokens"));
  std::ofstream(file.path, std::ios::binary) << tokenizer_bytes(3, small_vocabulary);
  CHECK_THROWS_WITH(llama2c::load_tokenizer(file.path, 10), mentions("token 0: length 5"));
  CHECK_THROWS_WITH(llama2c::load_tokenizer(file.path + ".missing"), mentions("cannot open"));
}

#ifdef TOPTHETA_HAVE_LLAMA2C_TOOLS
TEST_CASE("llama2c tokenize: each text line becomes one token sequence the other commands read", "[llama2c][cli]") {
  const TemporaryFile tokenizer_file("tokenizer.bin"), text("text.txt"), tokens("tokens.txt");
  std::ofstream(tokenizer_file.path, std::ios::binary) << tokenizer_bytes(7, small_vocabulary);
  std::ofstream(text.path) << "ab a\n\n  \nab\n";
  std::ostringstream out, error;
  REQUIRE(llama2c::run_command_line(
              {"tokenize", "--tokenizer", tokenizer_file.path, "--text", text.path, "--out", tokens.path}, out,
              error) == 0);
  const auto sequences = llama2c::read_token_file(tokens.path);
  // " ab a" -> BOS, " ab", " a" (the tokenizer test above derives it); "ab" -> BOS, " ab".
  CHECK(sequences == std::vector<std::vector<int>>{{llama2c::bos_token, 9, 7}, {llama2c::bos_token, 9}});
  CHECK_THAT(out.str(), mentions("2 sequences, 5 tokens"));

  std::ofstream(text.path) << "\n \n";
  CHECK(llama2c::run_command_line(
            {"tokenize", "--tokenizer", tokenizer_file.path, "--text", text.path, "--out", tokens.path}, out, error) ==
        2);
  CHECK_THAT(error.str(), mentions("--text"));
}
#endif

TEST_CASE("stories260K: dense evaluated against dense gives perplexity ratio 1, KL 0 and agreement 1",
          "[llama2c][cli]") {
  LLAMA2C_REQUIRE_MODEL();
  const SerialEigen serial_eigen;
  const auto sequences = model_tokens("eval.tokens");
  llama2c::FeedOptions feed;
  feed.max_sequences = 2;
  const auto selected = feed.select(sequences);
  REQUIRE(selected.size() == 2);
  llama2c::Engine<float> engine(stories260k(), one_thread());
  const auto reference = llama2c::feed_sequences(engine, selected, feed);
  const llama2c::Evaluation dense =
      llama2c::evaluate(engine, llama2c::dense_plan(engine.config().layers), selected, reference, feed);
  const llama2c::PredictionMetrics all = dense.all();
  CHECK(all.positions == Index(selected[0].size() + selected[1].size() - 2));
  CHECK(dense.prefill.positions == Index(selected[0].size() / 2 + selected[1].size() / 2));
  CHECK(all.perplexity_ratio() == 1.0);
  CHECK(all.mean_kl() == Approx(0).margin(1e-12));
  CHECK(all.top1_agreement() == 1.0);
  CHECK(std::exp(all.reference_mean_nll()) > 1.0);
  CHECK(llama2c::EngineStats::total(dense.stats.decode).kept_fraction() == 1.0);

  // top-k keeps fewer elements and V rows in decode, and changes the predictions.
  const llama2c::Evaluation top_k =
      llama2c::evaluate(engine, llama2c::top_k_plan(std::vector<Index>(std::size_t(engine.config().layers), 32)),
                        selected, reference, feed);
  const auto decode = llama2c::EngineStats::total(top_k.stats.decode);
  CHECK(decode.kept_fraction() < 0.2);
  CHECK(decode.v_rows_kept_fraction() < 0.3);
  CHECK(top_k.all().mean_kl() > 0);
  CHECK(top_k.all().reference_mean_nll() == all.reference_mean_nll());
}

#ifdef TOPTHETA_HAVE_LLAMA2C_TOOLS
TEST_CASE("stories260K: calibrate writes a threshold file that eval runs, and eval's JSON holds its numbers",
          "[llama2c][cli]") {
  LLAMA2C_REQUIRE_MODEL();
  const SerialEigen serial_eigen;
  const TemporaryFile thresholds("thresholds.json"), results("eval.json");
  const std::string model = model_directory() + "/stories260K.bin";
  std::ostringstream out, error;
  REQUIRE(llama2c::run_command_line(
              {"calibrate", "--model", model, "--tokens", model_directory() + "/calib.tokens", "--out", thresholds.path,
               "--k", "32", "--space", "probability", "--max-sequences", "2"},
              out, error) == 0);
  CHECK_THAT(out.str(), mentions("layer 4: k = 32"));
  const toptheta::ThresholdTable table = toptheta::load_thresholds(thresholds.path);
  CHECK(table.space() == toptheta::ThresholdSpace::probability);
  CHECK(table.method() == toptheta::CalibrationMethod::count_matched);

  REQUIRE(llama2c::run_command_line(
              {"eval", "--model", model, "--tokens", model_directory() + "/eval.tokens", "--thresholds",
               thresholds.path, "--v-mean", "--max-sequences", "2", "--json", results.path},
              out, error) == 0);
  INFO(error.str());
  nlohmann::json json;
  std::ifstream(results.path) >> json;
  const auto& all = json.at("metrics").at("all");
  CHECK(json.at("sequences") == 2);
  CHECK(all.at("perplexity_ratio").get<double>() > 0.9);
  CHECK(all.at("perplexity_ratio").get<double>() < 1.2);
  CHECK(all.at("top1_agreement").get<double>() > 0.8);
  const auto& decode = json.at("attention").at("decode");
  CHECK(decode.at("layers").size() == 5);
  CHECK(decode.at("total").at("v_rows_reduction").get<double>() > 1.5);

  // A probability-space table accepts no denominator compensation: a usage error naming the flag.
  CHECK(llama2c::run_command_line({"eval", "--model", model, "--tokens", model_directory() + "/eval.tokens",
                                   "--thresholds", thresholds.path, "--denominator", "exp_threshold"},
                                  out, error) == 2);
  CHECK_THAT(error.str(), mentions("--denominator: expected none for a probability-space table"));
}

TEST_CASE("stories260K: generate is reproducible for a seed, greedy at temperature 0", "[llama2c][cli]") {
  LLAMA2C_REQUIRE_MODEL();
  const SerialEigen serial_eigen;
  const std::string model = model_directory() + "/stories260K.bin";
  const auto generate = [&](const std::vector<std::string>& more) {
    std::vector<std::string> arguments{"generate", "--model", model, "--prompt-tokens", "1 403 407", "--steps", "20"};
    arguments.insert(arguments.end(), more.begin(), more.end());
    std::ostringstream out, error;
    REQUIRE(llama2c::run_command_line(arguments, out, error) == 0);
    const std::string text = out.str();
    CHECK_THAT(text, mentions("tokens/s"));
    return text.substr(0, text.find("\n\n"));  // the tokens, without the timing lines
  };
  const std::string greedy = generate({});
  CHECK(generate({}) == greedy);
  CHECK(greedy.rfind("1 403 407 ", 0) == 0);
  CHECK(generate({"--temperature", "1", "--seed", "5"}) == generate({"--temperature", "1", "--seed", "5"}));
  CHECK(generate({"--top-k", "8", "--v-mean", "--denominator", "exp_threshold"}).rfind("1 403 407 ", 0) == 0);
  // Steps past the model's 512-token context are a usage error naming --steps, however large.
  for (const char* steps : {"510", "600", "9223372036854775807"}) {
    std::ostringstream out, error;
    CHECK(llama2c::run_command_line({"generate", "--model", model, "--prompt-tokens", "1 403 407", "--steps", steps},
                                    out, error) == 2);
    CHECK_THAT(error.str(), mentions("--steps: expected at most 509 (the model's 512-token context less the 3-token "
                                     "prompt), got " +
                                     std::string(steps)));
  }
}
#endif

#ifdef LLAMA2C_CLI_HAVE_JSON
TEST_CASE("accuracy table: the configurations of one k cover top-k and every valid Top-θ combination once",
          "[llama2c][cli]") {
  const auto configurations = llama2c::table_configurations(32);
  // top-k: 3; probability: 3 methods (with budget_matched) x VMC off/on; three score spaces: 2 methods x (none,
  // and 2 SDC x VMC off/on).
  CHECK(configurations.size() == 3 + 6 + 3 * 2 * 5);
  std::vector<std::string> names;
  for (const auto& c : configurations) {
    CHECK(c.k == 32);
    if (c.space == toptheta::ThresholdSpace::probability)
      CHECK(c.compensation.denominator == toptheta::DenominatorCompensation::none);
    names.push_back(c.name());
  }
  std::sort(names.begin(), names.end());
  CHECK(std::adjacent_find(names.begin(), names.end()) == names.end());
  CHECK(std::count(names.begin(), names.end(), "top-θ probability, count_matched, VMC") == 1);
  CHECK(std::count(names.begin(), names.end(), "top-θ probability, budget_matched, VMC") == 1);
  CHECK(std::count(names.begin(), names.end(), "top-θ raw_score, budget_matched") == 0);
  CHECK(std::count(names.begin(), names.end(), "top-k, SDC exp_threshold, VMC") == 1);
}

TEST_CASE("accuracy table: perplexity at equal V-row reduction is interpolated in log(reduction) between two k",
          "[llama2c][cli]") {
  // One configuration at k = 32 (5x fewer V rows, +1 %) and k = 16 (10x, +3 %), built by hand.
  llama2c::AccuracyTable table;
  table.ks = {16, 32};
  const auto add_row = [&](Index k, double increase, std::uint64_t v_rows_kept) {
    llama2c::TableRow row;
    row.configuration = {k,
                         toptheta::ThresholdSpace::probability,
                         toptheta::CalibrationMethod::count_matched,
                         toptheta::Compensation{toptheta::DenominatorCompensation::none, 1.0, true},
                         {}};
    row.evaluation.decode.positions = 1;
    row.evaluation.decode.nll = std::log1p(increase);
    toptheta::AttentionStats decode;
    decode.reset(1, 1);
    decode.v_rows_kept = {v_rows_kept};
    decode.v_rows_visible = {100};
    row.evaluation.stats.decode = {decode};
    table.rows.push_back(row);
  };
  add_row(16, 0.03, 10);
  add_row(32, 0.01, 20);
  const std::string name = table.rows.front().name();
  using llama2c::report::increase_at_reduction;
  CHECK(increase_at_reduction(table, name, 10).value() == Approx(0.03));
  CHECK(increase_at_reduction(table, name, 5).value() == Approx(0.01));
  CHECK(increase_at_reduction(table, name, std::sqrt(50.0)).value() == Approx(0.02));  // halfway in log
  CHECK_FALSE(increase_at_reduction(table, name, 4).has_value());
  CHECK_FALSE(increase_at_reduction(table, name, 10.5).has_value());
  CHECK_FALSE(increase_at_reduction(table, "top-k", 6).has_value());
  // 6x: t = log(1.2) / log(2); 8x: t = log(1.6) / log(2); 10x: +3 %. 3x and 4x lie outside.
  const std::string section = llama2c::report::equal_cost_section(table);
  const double at6 = 0.01 + 0.02 * std::log(1.2) / std::log(2.0), at8 = 0.01 + 0.02 * std::log(1.6) / std::log(2.0);
  CHECK_THAT(section, mentions("| " + name + " | | | **" + llama2c::report::signed_percent(at6) + "** | **" +
                               llama2c::report::signed_percent(at8) + "** | **+3.00 %** |"));
  table.ks = {16};  // one k: nothing to compare at equal cost
  CHECK(llama2c::report::equal_cost_section(table).empty());
}

TEST_CASE("stories260K: the accuracy table does not depend on the thread count, and its markdown marks the target",
          "[llama2c][cli]") {
  LLAMA2C_REQUIRE_MODEL();
  const SerialEigen serial_eigen;
  llama2c::AccuracyTableOptions options;
  options.ks = {16};
  options.feed.max_sequences = 1;
  options.max_calibration_sequences = 1;
  // One split budget that is not among the k: its row gets a k of its own. One move of 8 keeps the search short.
  options.split_budgets = {20};
  options.split.step = 8;
  options.split.max_moves = 1;
  options.split.scoring_sequences = 1;
  // The first 160 tokens of each sequence keep the test short; rows up to 160 still exceed k = 16.
  const auto shortened = [](std::vector<std::vector<int>> sequences) {
    for (auto& tokens : sequences) tokens.resize(std::min<std::size_t>(tokens.size(), 160));
    return sequences;
  };
  const auto calibration = shortened(model_tokens("calib.tokens")), evaluation = shortened(model_tokens("eval.tokens"));
  options.threads = 1;
  const llama2c::AccuracyTable serial = llama2c::run_accuracy_table(stories260k(), calibration, evaluation, options);
  options.threads = 2;
  const llama2c::AccuracyTable parallel = llama2c::run_accuracy_table(stories260k(), calibration, evaluation, options);
  REQUIRE(serial.rows.size() == llama2c::table_configurations(16).size() + 1);
  REQUIRE(parallel.rows.size() == serial.rows.size());
  CHECK(serial.ks == std::vector<Index>{16, 20});
  const llama2c::TableRow& split = serial.rows.back();
  REQUIRE(split.configuration.split());
  CHECK(split.k() == 20);
  CHECK(split.name() == "top-θ probability, budget_matched, VMC, split over layers");
  CHECK(split.configuration.layer_k == parallel.rows.back().configuration.layer_k);
  const Index layers = stories260k().config.layers;
  REQUIRE(Index(split.configuration.layer_k.size()) == layers);
  CHECK(std::accumulate(split.configuration.layer_k.begin(), split.configuration.layer_k.end(), Index(0)) ==
        20 * layers);
  CHECK(split.decode().v_rows_kept_fraction() > 0);
  for (std::size_t i = 0; i < serial.rows.size(); ++i) {
    const auto &a = serial.rows[i], &b = parallel.rows[i];
    INFO(a.name());
    CHECK(a.name() == b.name());
    CHECK(a.evaluation.all().nll == b.evaluation.all().nll);
    CHECK(a.evaluation.all().kl == b.evaluation.all().kl);
    CHECK(a.decode().v_rows_kept == b.decode().v_rows_kept);
    CHECK(a.prefill().elements_kept == b.prefill().elements_kept);
  }
  CHECK(serial.evaluation_sequences == 1);
  CHECK(serial.evaluation_sequences_given == Index(evaluation.size()));

  llama2c::AccuracyReportContext context;
  context.command = "llama2c table --k 16";
  const std::string markdown = llama2c::accuracy_markdown(serial, context);
  CHECK_THAT(markdown, mentions("```sh\nllama2c table --k 16\n```"));
  CHECK_THAT(markdown, mentions("the first 1 of the " + std::to_string(evaluation.size())));
  CHECK_THAT(markdown, mentions("*Split over layers*"));
  CHECK_THAT(markdown, mentions("k = 20 as " + split.configuration.layer_k_text() + ": "));
  const nlohmann::json json = llama2c::accuracy_json(serial);
  CHECK(json["rows"].back()["layer_k"].get<std::vector<Index>>() == split.configuration.layer_k);
  CHECK(json["rows"].front()["layer_k"].empty());
  for (const auto& row : serial.rows) {
    INFO(row.name());
    const std::string name = llama2c::report::split_name(row);
    const std::string cell = "| " + name + " |", bold = "| **" + name + "** |";
    const auto at = markdown.find(markdown.find(bold) != std::string::npos ? bold : cell);
    REQUIRE(at != std::string::npos);
    const std::string line = markdown.substr(at, markdown.find('\n', at) - at);
    CHECK((line.find("✓") != std::string::npos) == row.meets_target());
  }
}

TEST_CASE(
    "stories260K: splitting the budget over layers keeps its sum, takes only moves that lower the divergence, "
    "and tables each layer as a calibration with its own k would",
    "[llama2c][cli][split]") {
  LLAMA2C_REQUIRE_MODEL();
  const SerialEigen serial_eigen;
  // Four calibration sequences cut to 160 tokens, two of them scored: a short search with the real mechanism.
  auto calibration = model_tokens("calib.tokens");
  calibration.resize(4);
  for (auto& tokens : calibration) tokens.resize(std::min<std::size_t>(tokens.size(), 160));
  toptheta::CalibratorOptions calibrator_options;
  calibrator_options.shape = llama2c::model_shape(stories260k().config);
  calibrator_options.space = toptheta::ThresholdSpace::probability;
  toptheta::TableOptions table_options;
  table_options.method = toptheta::CalibrationMethod::budget_matched;
  table_options.denominator_terms = toptheta::DenominatorTermSource::none;
  toptheta::Compensation compensation;
  compensation.v_mean = true;
  llama2c::LayerSplitOptions options;
  options.k = 16;
  options.step = 8;
  options.max_moves = 2;
  options.scoring_sequences = 2;
  options.threads = 2;
  const llama2c::LayerSplit split =
      llama2c::split_layers(stories260k(), calibration, calibrator_options, table_options, compensation, options);
  const Index layers = stories260k().config.layers;
  REQUIRE(Index(split.k().size()) == layers);
  Index total = 0;
  for (Index k : split.k()) {
    total += k;
    CHECK(k >= 8);
    CHECK(k % 8 == 0);
  }
  CHECK(total == 16 * layers);
  REQUIRE(!split.path.empty());
  CHECK(split.path.front().k == std::vector<Index>(std::size_t(layers), 16));
  CHECK(Index(split.path.size()) <= 1 + options.max_moves);
  for (std::size_t step = 1; step < split.path.size(); ++step)
    CHECK(split.path[step].mean_kl < split.path[step - 1].mean_kl);
  CHECK(split.scoring_sequences == 2);

  // Each layer of the table is that layer of a calibration with the layer's k alone, on the same sequences.
  llama2c::EngineOptions engine_options;
  engine_options.threads = 1;
  llama2c::Engine<float> engine(stories260k(), engine_options);
  for (Index l = 0; l < layers; ++l) {
    toptheta::CalibratorOptions alone = calibrator_options;
    alone.k = {split.k()[std::size_t(l)]};
    toptheta::Calibrator calibrator(alone);
    llama2c::calibrate(engine, calibration, {&calibrator});
    const toptheta::ThresholdTable expected = calibrator.table(table_options);
    INFO("layer " << l << ", k = " << split.k()[std::size_t(l)]);
    CHECK(split.table.k(l) == split.k()[std::size_t(l)]);
    CHECK(split.table.layer(l).theta() == expected.layer(l).theta());
    CHECK(split.table.layer(l).lengths() == expected.layer(l).lengths());
  }
  // The divergence it reports is that of its table, evaluated again.
  auto scored = calibration;
  scored.resize(2);
  engine.set_attention(llama2c::dense_plan(layers));
  const auto reference = llama2c::feed_sequences(engine, scored, options.feed);
  const auto evaluation =
      llama2c::evaluate(engine, llama2c::top_theta_plan(llama2c::layer_tables(split.table), compensation), scored,
                        reference, options.feed);
  CHECK(evaluation.all().mean_kl() == split.mean_kl());

  // A budget that is no multiple of the layers starts from the most even split and keeps its sum.
  options.total = 16 * layers + 2;
  options.max_moves = 1;
  const llama2c::LayerSplit uneven =
      llama2c::split_layers(stories260k(), calibration, calibrator_options, table_options, compensation, options);
  std::vector<Index> start(std::size_t(layers), 16);
  start[0] = start[1] = 17;
  CHECK(uneven.path.front().k == start);
  CHECK(std::accumulate(uneven.k().begin(), uneven.k().end(), Index(0)) == 16 * layers + 2);
  options.total = layers - 1;
  CHECK_THROWS_WITH(
      llama2c::split_layers(stories260k(), calibration, calibrator_options, table_options, compensation, options),
      mentions("a total of 0 or >= "));
  options.total = 0;

  options.step = 0;
  CHECK_THROWS_WITH(
      llama2c::split_layers(stories260k(), calibration, calibrator_options, table_options, compensation, options),
      mentions("step >= 1"));
}
#endif
