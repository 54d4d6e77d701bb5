// The llama2.c example engine (examples/llama2c): checkpoint loading and its errors, dense logits against an
// independent float64 implementation on stories260K, prefill equal to token-by-token decode for dense and
// Top-θ attention, and Top-θ with keep-everything thresholds equal to dense.
#include "test_support.hpp"

#include "llama2c/engine/engine.hpp"
#include "llama2c/tools/calibration.hpp"
#include "llama2c/tools/evaluation.hpp"
#include "model_support.hpp"

#if __has_include(<nlohmann/json.hpp>)
#include <nlohmann/json.hpp>
#include <toptheta/threshold_io.hpp>
#define LLAMA2C_HAVE_JSON 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using llama2c::Index;

/// Largest logit difference float rounding makes on stories260K (measured ~1.1e-4 over 512 tokens against a
/// float64 implementation, ~5e-5 even with double matrix products): float engines are checked to this, and
/// the double engine to the 1e-4 of the reference file (it matches to ~1e-7).
constexpr double float_tolerance = 5e-4;

template <class Real>
double tolerance() {
  return std::is_same_v<Real, double> ? 1e-6 : float_tolerance;
}

/// Logits of `tokens` fed one token at a time: row t after token t.
template <class Engine>
typename Engine::Matrix decode_all(Engine& engine, const std::vector<int>& tokens) {
  typename Engine::Matrix logits(Index(tokens.size()), engine.config().vocab_size);
  for (std::size_t t = 0; t < tokens.size(); ++t) logits.row(Index(t)) = engine.decode(tokens[t]).transpose();
  return logits;
}

template <class A, class B>
double max_abs_difference(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  return (a.template cast<double>() - b.template cast<double>()).cwiseAbs().maxCoeff();
}

/// The value a threshold in `space` is compared with, for element j of an observed row.
double space_value(toptheta::ThresholdSpace space, const llama2c::ScoreRow& row, Index j) {
  const double a = row.scores(j);
  switch (space) {
    case toptheta::ThresholdSpace::raw_score:
      return a;
    case toptheta::ThresholdSpace::probability:
      return std::exp(a - row.max) / row.sum;
    case toptheta::ThresholdSpace::score_minus_max:
      return a - row.max;
    case toptheta::ThresholdSpace::score_over_query_norm:
      return a / row.query_norm;
  }
  return a;
}

/// Per-layer, per-head thresholds for `tokens` that keep about `keep_fraction` of each head's elements in
/// rows longer than `k`, each placed in the middle of a gap of at least `margin * |value|` between
/// neighbouring values, so that float rounding (prefill vs decode) cannot move an element across θ. Chosen
/// layer by layer with the earlier layers already sparse, since their output changes the later layers'
/// scores.
std::vector<toptheta::LayerThresholds> separated_thresholds(const llama2c::Model& model, const std::vector<int>& tokens,
                                                            toptheta::ThresholdSpace space, Index k,
                                                            const toptheta::Compensation& compensation,
                                                            double keep_fraction, double margin = 1e-3) {
  const llama2c::Config& config = model.config;
  std::vector<toptheta::LayerThresholds> tables;
  for (Index layer = 0; layer < config.layers; ++layer) {
    llama2c::AttentionPlan plan = llama2c::top_theta_plan(tables, compensation);
    plan.resize(std::size_t(config.layers), llama2c::DenseAttention{});
    std::vector<std::vector<double>> values(std::size_t(config.heads));
    llama2c::Engine<float> engine(model, one_thread());
    engine.set_attention(plan);
    engine.set_observer([&](const llama2c::ScoreRow& row) {
      if (row.layer != layer || row.length <= k) return;
      for (Index j = 0; j < row.length; ++j) values[std::size_t(row.query_head)].push_back(space_value(space, row, j));
    });
    engine.prefill(tokens, llama2c::LogitRows::last);

    std::vector<double> theta;
    for (auto& head_values : values) {
      std::sort(head_values.begin(), head_values.end(), std::greater<double>());
      REQUIRE(head_values.size() > 2);
      std::size_t t = std::size_t(keep_fraction * double(head_values.size()));
      while (t + 2 < head_values.size() &&
             head_values[t] - head_values[t + 1] < margin * std::max(std::abs(head_values[t]), 1e-30))
        ++t;
      theta.push_back(0.5 * (head_values[t] + head_values[t + 1]));
    }
    tables.push_back(toptheta::LayerThresholds::uniform(k, space, theta));
  }
  return tables;
}

// ---- checkpoint files written by the test ----

/// A small random checkpoint in the legacy format; `vocab_size < 0` appends a separate classifier.
std::vector<char> synthetic_checkpoint(std::vector<std::int32_t> header, unsigned seed = 7) {
  llama2c::Config c;
  c.dim = header[0];
  c.hidden_dim = header[1];
  c.layers = header[2];
  c.heads = header[3];
  c.kv_heads = header[4];
  c.vocab_size = std::abs(header[5]);
  c.shared_classifier = header[5] > 0;
  c.seq_len = header[6];
  std::vector<char> bytes(header.size() * sizeof(std::int32_t));
  std::memcpy(bytes.data(), header.data(), bytes.size());
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  for (Index i = 0; i < llama2c::detail::checkpoint_floats(c); ++i) {
    const float value = normal(rng);
    const char* raw = reinterpret_cast<const char*>(&value);
    bytes.insert(bytes.end(), raw, raw + sizeof(float));
  }
  return bytes;
}

const std::vector<std::int32_t> small_header = {16, 24, 2, 4, 2, 32, 64};  // hs = 4, GQA 2:1

}  // namespace

TEST_CASE("llama2c dense logits match the float64 reference of stories260K", "[llama2c]") {
  LLAMA2C_REQUIRE_MODEL();
#ifndef LLAMA2C_HAVE_JSON
  TOPTHETA_SKIP("llama2c reference-logits test skipped: nlohmann/json.hpp not found");
#else
  const SerialEigen serial_eigen;
  std::ifstream file(model_directory() + "/reference-logits.json");
  const nlohmann::json reference = nlohmann::json::parse(file);
  const auto tokens = reference.at("tokens").get<std::vector<int>>();
  const auto positions = reference.at("positions").get<std::vector<Index>>();
  const llama2c::Model& model = stories260k();
  CHECK(model.config.dim == 64);
  CHECK(model.config.layers == 5);
  CHECK(model.config.shared_classifier);

  const auto check = [&](const auto& logits, const char* what, double tolerance) {
    double worst = 0, nll = 0;
    for (Index p : positions) {
      const auto expected = reference.at("logits").at(std::to_string(p)).get<std::vector<double>>();
      REQUIRE(Index(expected.size()) == logits.cols());
      for (Index v = 0; v < logits.cols(); ++v)
        worst = std::max(worst, std::abs(double(logits(p, v)) - expected[std::size_t(v)]));
    }
    for (Index t = 0; t + 1 < logits.rows(); ++t) {  // mean NLL of each next token
      const Eigen::VectorXd row = logits.row(t).transpose().template cast<double>();
      const double log_sum = row.maxCoeff() + std::log((row.array() - row.maxCoeff()).exp().sum());
      nll += log_sum - row(tokens[std::size_t(t + 1)]);
    }
    nll /= double(logits.rows() - 1);
    INFO(what << ": max |logit - reference| = " << worst << " (tolerance " << tolerance << "), mean NLL " << nll
              << " (reference " << reference.at("mean_nll").get<double>() << ")");
    CHECK(worst < tolerance);
    CHECK(std::abs(nll - reference.at("mean_nll").get<double>()) < tolerance);
  };
  llama2c::Engine<double> reference_engine(model, one_thread());
  check(reference_engine.prefill(tokens), "double prefill", tolerance<double>());
  reference_engine.reset();
  check(decode_all(reference_engine, tokens), "double decode", tolerance<double>());

  llama2c::Engine<float> engine(model, one_thread());
  check(engine.prefill(tokens), "float prefill", tolerance<float>());
  engine.reset();
  check(decode_all(engine, tokens), "float decode", tolerance<float>());
  llama2c::Engine<float, double> double_kv_engine(model, one_thread());
  check(double_kv_engine.prefill(tokens), "float with double KV, prefill", tolerance<float>());
  llama2c::Engine<float, Eigen::bfloat16> bfloat16_kv_engine(model, one_thread());
  check(bfloat16_kv_engine.prefill(tokens), "float with bfloat16 KV, prefill", 0.5);
#endif
}

/// Runs `plan` over `tokens` as one prefill, token by token, and in two chunks, checks that all three give
/// the same logits and keep the same elements, and returns the decode statistics.
template <class Real>
toptheta::AttentionStats check_prefill_equals_decode(const llama2c::Model& model, const std::vector<int>& tokens,
                                                     const llama2c::AttentionPlan& plan, const std::string& name) {
  llama2c::Engine<Real> engine(model, one_thread());
  engine.set_attention(plan);
  const auto prefill = engine.prefill(tokens);
  engine.reset();
  const auto decode = decode_all(engine, tokens);
  engine.reset();
  const std::size_t split = tokens.size() / 3;
  typename llama2c::Engine<Real>::Matrix chunked(prefill.rows(), prefill.cols());
  chunked.topRows(Index(split)) = engine.prefill({tokens.begin(), tokens.begin() + std::ptrdiff_t(split)});
  chunked.bottomRows(Index(tokens.size() - split)) =
      engine.prefill({tokens.begin() + std::ptrdiff_t(split), tokens.end()});

  const auto prefill_stats = llama2c::EngineStats::total(engine.stats().prefill);
  const auto decode_stats = llama2c::EngineStats::total(engine.stats().decode);
  INFO(name << " in " << (std::is_same_v<Real, double> ? "double" : "float")
            << ": max |prefill - decode| = " << max_abs_difference(prefill, decode)
            << ", max |prefill - chunked| = " << max_abs_difference(prefill, chunked) << "; kept "
            << 100 * prefill_stats.kept_fraction() << "% of elements in prefill, " << 100 * decode_stats.kept_fraction()
            << "% in decode; decode kept " << 100 * decode_stats.v_rows_kept_fraction() << "% of V rows");
  CHECK(max_abs_difference(prefill, decode) < tolerance<Real>());
  CHECK(max_abs_difference(prefill, chunked) < tolerance<Real>());
  // The same rows keep the same elements: one-shot and chunked prefill saw every row once each, decode once.
  CHECK(toptheta::AttentionStats::total(prefill_stats.elements_kept) ==
        2 * toptheta::AttentionStats::total(decode_stats.elements_kept));
  CHECK(decode_stats.rows == std::uint64_t(model.config.layers * model.config.heads) * tokens.size());
  return decode_stats;
}

TEST_CASE("llama2c prefill equals token-by-token decode and chunked prefill", "[llama2c]") {
  LLAMA2C_REQUIRE_MODEL();
  const SerialEigen serial_eigen;
  const llama2c::Model& model = stories260k();
  std::vector<int> tokens = first_eval_line();
  REQUIRE(tokens.size() >= 256);
  tokens.resize(256);

  const auto compare = [&](const llama2c::AttentionPlan& plan, const std::string& name) {
    check_prefill_equals_decode<double>(model, tokens, plan, name);
    return check_prefill_equals_decode<float>(model, tokens, plan, name);
  };

  compare(llama2c::dense_plan(model.config.layers), "dense");

  toptheta::Compensation v_mean;
  v_mean.v_mean = true;
  const auto post_softmax =
      separated_thresholds(model, tokens, toptheta::ThresholdSpace::probability, 16, v_mean, 0.05);
  const auto sparse = compare(llama2c::top_theta_plan(post_softmax, v_mean), "top_theta probability + vmc");
  CHECK(sparse.kept_fraction() < 0.5);  // the thresholds do prune

  toptheta::Compensation exp_threshold;
  exp_threshold.denominator = toptheta::DenominatorCompensation::exp_threshold;
  exp_threshold.v_mean = true;
  const auto minus_max =
      separated_thresholds(model, tokens, toptheta::ThresholdSpace::score_minus_max, 8, exp_threshold, 0.05);
  compare(llama2c::top_theta_plan(minus_max, exp_threshold, /*cap_k=*/true), "top_theta score_minus_max + sdc");

  compare(llama2c::top_k_plan(std::vector<Index>(std::size_t(model.config.layers), 16)), "top_k 16");
}

/// Checks that Top-θ with thresholds at `lowest()` (every key kept) gives dense attention's logits.
template <class Real>
void check_keep_everything_equals_dense(const llama2c::Model& model, const std::vector<int>& tokens) {
  llama2c::Engine<Real> engine(model, one_thread());
  const auto dense = engine.prefill(tokens);
  for (auto space : {toptheta::ThresholdSpace::raw_score, toptheta::ThresholdSpace::score_over_query_norm,
                     toptheta::ThresholdSpace::score_minus_max}) {
    const std::vector<toptheta::LayerThresholds> keep_all(
        std::size_t(model.config.layers),
        toptheta::LayerThresholds::uniform(
            1, space, std::vector<double>(std::size_t(model.config.heads), std::numeric_limits<double>::lowest())));
    engine.reset();
    engine.reset_stats();
    engine.set_attention(llama2c::top_theta_plan(keep_all));
    const auto sparse = engine.prefill(tokens);
    // In float the one-pass and two-pass kernels round differently from the dense one; in double they agree.
    INFO(toptheta::to_string(space) << " in " << (std::is_same_v<Real, double> ? "double" : "float")
                                    << ": max |top_theta - dense| = " << max_abs_difference(sparse, dense));
    CHECK(max_abs_difference(sparse, dense) < (std::is_same_v<Real, double> ? 1e-9 : float_tolerance));
    CHECK(llama2c::EngineStats::total(engine.stats().prefill).kept_fraction() == 1.0);
  }
}

TEST_CASE("llama2c Top-theta with keep-everything thresholds equals dense", "[llama2c]") {
  LLAMA2C_REQUIRE_MODEL();
  const SerialEigen serial_eigen;
  std::vector<int> tokens = first_eval_line();
  tokens.resize(200);
  check_keep_everything_equals_dense<double>(stories260k(), tokens);
  check_keep_everything_equals_dense<float>(stories260k(), tokens);
}

TEST_CASE("llama2c observer sees every score row of prefill and decode alike", "[llama2c]") {
  TemporaryFile file("observer.bin");
  file.write(synthetic_checkpoint(small_header));
  const llama2c::Model model = llama2c::load_model(file.path);
  const std::vector<int> tokens = {1, 5, 9, 2, 31, 7, 7, 0, 12, 3};
  const Index n = Index(tokens.size()), layers = model.config.layers, heads = model.config.heads;

  // rows[(layer * heads + head) * n + position] = the scores the observer saw
  using Rows = std::vector<Eigen::VectorXd>;
  const auto observe = [&](bool decode) {
    Rows rows(std::size_t(layers * heads * n));
    llama2c::Engine<float> engine(model, one_thread());
    Index calls = 0;
    engine.set_observer([&](const llama2c::ScoreRow& row) {
      ++calls;
      CHECK(row.decode == decode);
      CHECK(row.length == row.position + 1);
      CHECK(row.kv_head == row.query_head / 2);
      CHECK(row.max == row.scores.maxCoeff());
      CHECK(std::abs(row.sum - (row.scores.array() - row.max).exp().sum()) < 1e-12 * row.sum);
      rows[std::size_t((row.layer * heads + row.query_head) * n + row.position)] = row.scores;
    });
    if (decode)
      for (int token : tokens) engine.decode(token);
    else
      engine.prefill(tokens);
    CHECK(calls == layers * heads * n);
    return rows;
  };
  const Rows prefill = observe(false), decode = observe(true);
  for (std::size_t r = 0; r < prefill.size(); ++r) {
    const Index length = Index(r) % n + 1;
    REQUIRE(prefill[r].size() == length);
    REQUIRE(decode[r].size() == length);
    CHECK((prefill[r] - decode[r]).cwiseAbs().maxCoeff() < 1e-5);
  }
}

TEST_CASE("llama2c loads a separate classifier and runs a synthetic model", "[llama2c]") {
  std::vector<std::int32_t> header = small_header;
  header[5] = -header[5];  // separate classifier after the RoPE tables
  const std::vector<char> bytes = synthetic_checkpoint(header);
  TemporaryFile file("separate_classifier.bin");
  file.write(bytes);
  const llama2c::Model model = llama2c::load_model(file.path);
  CHECK_FALSE(model.config.shared_classifier);
  CHECK(model.config.vocab_size == 32);
  REQUIRE(model.classifier.rows() == 32);
  REQUIRE(model.classifier.cols() == 16);
  CHECK(&model.output_weights() == &model.classifier);
  // The classifier is the file's last vocab x dim floats.
  float last = 0;
  std::memcpy(&last, bytes.data() + bytes.size() - sizeof(float), sizeof(float));
  CHECK(model.classifier(31, 15) == last);

  llama2c::Engine<float> engine(model, one_thread());
  const std::vector<int> tokens = {1, 4, 8, 15, 16, 23, 31, 0};
  const llama2c::Matrix prefill = engine.prefill(tokens);
  engine.reset();
  CHECK(max_abs_difference(prefill, decode_all(engine, tokens)) < 1e-5);
  CHECK(prefill.allFinite());
}

TEST_CASE("llama2c engine rejects bad tokens and plans naming what is wrong", "[llama2c]") {
  TemporaryFile file("engine_errors.bin");
  file.write(synthetic_checkpoint(small_header));
  const llama2c::Model model = llama2c::load_model(file.path);
  llama2c::EngineOptions options = one_thread();
  options.max_tokens = 8;
  llama2c::Engine<float> engine(model, options);
  using toptheta_test::mentions;
  CHECK_THROWS_WITH(engine.prefill({1, 32}), mentions("tokens[1]") && mentions("[0, 32)"));
  CHECK_THROWS_WITH(engine.prefill(std::vector<int>(9, 1)), mentions("at most 8"));
  CHECK_THROWS_WITH(engine.prefill({}), mentions("at least one token"));
  CHECK_THROWS_WITH(engine.set_attention(llama2c::dense_plan(1)), mentions("one policy per layer (2)"));
  auto plan = llama2c::top_theta_plan(std::vector<toptheta::LayerThresholds>(
      2, toptheta::LayerThresholds::uniform(4, toptheta::ThresholdSpace::raw_score, {0.0, 0.0})));
  CHECK_THROWS_WITH(engine.set_attention(plan), mentions("layer 0") && mentions("one row per query head (4)"));
  toptheta::Compensation calibrated;
  calibrated.denominator = toptheta::DenominatorCompensation::calibrated;
  CHECK_THROWS_WITH(engine.set_attention(llama2c::top_k_plan({4, 4}, calibrated)),
                    mentions("layer 0") && mentions("calibrated"));
  CHECK(engine.position() == 0);
  engine.prefill({1, 2, 3});
  CHECK(engine.position() == 3);
}

TEST_CASE("llama2c checkpoint errors name the file and the problem", "[llama2c]") {
  using toptheta_test::mentions;
  const std::vector<char> good = synthetic_checkpoint(small_header);
  const auto load_bytes = [](const std::vector<char>& bytes, const std::string& name) {
    TemporaryFile file(name);
    file.write(bytes);
    llama2c::load_model(file.path);
  };

  const std::string missing = (std::filesystem::temp_directory_path() / "toptheta_llama2c_no_such_file.bin").string();
  CHECK_THROWS_AS(llama2c::load_model(missing), llama2c::checkpoint_error);
  CHECK_THROWS_WITH(llama2c::load_model(missing), mentions(missing) && mentions("cannot open"));

  CHECK_NOTHROW(load_bytes(good, "good.bin"));
  CHECK_THROWS_WITH(
      load_bytes(std::vector<char>(good.begin(), good.begin() + std::ptrdiff_t(good.size() / 2)), "truncated.bin"),
      mentions("_truncated.bin") && mentions("truncated"));
  CHECK_THROWS_WITH(load_bytes(std::vector<char>(good.begin(), good.begin() + 10), "header_only.bin"),
                    mentions("_header_only.bin") && mentions("header alone needs 28"));
  std::vector<char> longer = good;
  longer.resize(good.size() + 4);
  CHECK_THROWS_WITH(load_bytes(longer, "too_long.bin"), mentions("too_long.bin") && mentions("too long"));

  const auto with_header_field = [&](int field, std::int32_t value) {
    std::vector<char> bytes = good;
    std::memcpy(bytes.data() + field * sizeof(std::int32_t), &value, sizeof(value));
    return bytes;
  };
  CHECK_THROWS_WITH(load_bytes(with_header_field(3, 0), "zero_heads.bin"), mentions("n_heads = 0"));
  CHECK_THROWS_WITH(load_bytes(with_header_field(4, 3), "kv_heads.bin"), mentions("multiple of n_kv_heads = 3"));
  CHECK_THROWS_WITH(load_bytes(with_header_field(0, 0x616b3432), "v2.bin"), mentions("ak42"));

  std::vector<char> not_finite = good;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(not_finite.data() + 28 + 5 * sizeof(float), &nan, sizeof(nan));
  CHECK_THROWS_WITH(load_bytes(not_finite, "nan.bin"), mentions("nan.bin") && mentions("token_embedding"));

  if (model_present()) {  // a truncated copy of the real checkpoint
    std::ifstream in(model_directory() + "/stories260K.bin", std::ios::binary);
    std::vector<char> real((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    real.resize(real.size() - 100);
    CHECK_THROWS_WITH(load_bytes(real, "stories260K_truncated.bin"),
                      mentions("stories260K_truncated.bin") && mentions("truncated"));
  }
}

namespace {

/// The recommended configuration's thresholds for `k`: probability thresholds, budget-matched, calibrated on
/// calib.tokens (held out from the evaluation) with `engine` (dense).
std::vector<toptheta::LayerThresholds> recommended_thresholds(llama2c::Engine<float>& engine, Index k) {
  toptheta::CalibratorOptions options;
  options.shape = llama2c::model_shape(engine.config());
  options.space = toptheta::ThresholdSpace::probability;
  options.k = {k};
  toptheta::Calibrator calibrator(options);
  llama2c::calibrate(engine, model_tokens("calib.tokens"), {&calibrator});
  toptheta::TableOptions table_options;
  table_options.method = toptheta::CalibrationMethod::budget_matched;
  return llama2c::layer_tables(calibrator.table(table_options));
}

}  // namespace

TEST_CASE(
    "stories260K: the recommended default (budget-matched probability thresholds, V-mean compensation) at "
    "k = 32 costs at most 0.5 % perplexity at 5x fewer decode V rows or more",
    "[llama2c]") {
  LLAMA2C_REQUIRE_MODEL();
  const SerialEigen serial_eigen;
  llama2c::Engine<float> engine(stories260k(), one_thread());
  const std::vector<toptheta::LayerThresholds> layers = recommended_thresholds(engine, 32);
  toptheta::Compensation v_mean;
  v_mean.v_mean = true;
  const auto sequences = model_tokens("eval.tokens");
  const llama2c::FeedOptions feed;
  const auto reference = llama2c::feed_sequences(engine, sequences, feed);
  const llama2c::Evaluation top_theta =
      llama2c::evaluate(engine, llama2c::top_theta_plan(layers, v_mean), sequences, reference, feed);
  const double reduction = 1 / llama2c::EngineStats::total(top_theta.stats.decode).v_rows_kept_fraction();
  INFO(sequences.size() << " sequences: perplexity ratio " << top_theta.all().perplexity_ratio() << " at " << reduction
                        << "x fewer decode V rows");
  CHECK(top_theta.all().perplexity_ratio() <= 1.005);
  CHECK(reduction >= 5.0);
}

TEST_CASE(
    "stories260K: 84 kept keys per row split over the layers (docs/thresholds/stories260K-split-84.json) "
    "cost at most 1 % perplexity at 10x fewer decode V rows or more",
    "[llama2c]") {
  LLAMA2C_REQUIRE_MODEL();
#ifndef LLAMA2C_HAVE_JSON
  TOPTHETA_SKIP("threshold-file test skipped: nlohmann/json.hpp not found");
#else
  const SerialEigen serial_eigen;
  // The file `llama2c calibrate --split-layers --split-total 84 --split-step 1` wrote from calib.tokens (README);
  // evaluated here on the held-out eval.tokens with the engine and kernels of this build.
  const toptheta::ThresholdTable table =
      toptheta::load_thresholds(std::string(TOPTHETA_DOCS_DIR) + "/thresholds/stories260K-split-84.json");
  REQUIRE(table.method() == toptheta::CalibrationMethod::budget_matched);
  Index total = 0;
  for (Index l = 0; l < table.layers(); ++l) total += table.k(l);
  CHECK(total == 84);
  llama2c::Engine<float> engine(stories260k(), one_thread());
  toptheta::Compensation v_mean;
  v_mean.v_mean = true;
  const auto sequences = model_tokens("eval.tokens");
  const llama2c::FeedOptions feed;
  const auto reference = llama2c::feed_sequences(engine, sequences, feed);
  const llama2c::Evaluation top_theta = llama2c::evaluate(
      engine, llama2c::top_theta_plan(llama2c::layer_tables(table), v_mean), sequences, reference, feed);
  const double reduction = 1 / llama2c::EngineStats::total(top_theta.stats.decode).v_rows_kept_fraction();
  INFO(sequences.size() << " sequences: perplexity ratio " << top_theta.all().perplexity_ratio() << " at " << reduction
                        << "x fewer decode V rows");
  CHECK(top_theta.all().perplexity_ratio() <= 1.01);
  CHECK(reduction >= 10.0);
#endif
}

TEST_CASE(
    "stories260K with an int8 KV cache: dense within 0.5 % of the f32 cache's perplexity, recommended Top-theta "
    "within 1 %",
    "[llama2c][q8]") {
  LLAMA2C_REQUIRE_MODEL();
  const SerialEigen serial_eigen;
  const llama2c::Model& model = stories260k();
  // Blocks of 8 values: head_dim is 8, so one half scale per token and KV head (q8_0's 32 do not divide it).
  using Int8 = toptheta::BlockQ8<8>;
  llama2c::Engine<float> engine(model, one_thread());
  llama2c::Engine<float, Int8> int8_engine(model, one_thread());
  // The recommended configuration at k = 32.
  const std::vector<toptheta::LayerThresholds> layers = recommended_thresholds(engine, 32);
  toptheta::Compensation v_mean;
  v_mean.v_mean = true;

  const auto sequences = model_tokens("eval.tokens");
  const llama2c::FeedOptions feed;
  const auto reference = llama2c::feed_sequences(engine, sequences, feed);  // dense, f32 cache
  const double dense =
      llama2c::evaluate(int8_engine, llama2c::dense_plan(model.config.layers), sequences, reference, feed)
          .all()
          .perplexity_ratio();
  const llama2c::Evaluation top_theta =
      llama2c::evaluate(int8_engine, llama2c::top_theta_plan(layers, v_mean), sequences, reference, feed);
  const double reduction = 1 / llama2c::EngineStats::total(top_theta.stats.decode).v_rows_kept_fraction();
  INFO("int8 cache, " << sequences.size() << " sequences: dense perplexity ratio " << dense << ", Top-theta k = 32 "
                      << top_theta.all().perplexity_ratio() << " at " << reduction << "x fewer decode V rows");
  CHECK(dense > 1.0);  // quantization changes the predictions
  CHECK(dense <= 1.005);
  CHECK(top_theta.all().perplexity_ratio() <= 1.01);
  CHECK(reduction > 5.0);
}
