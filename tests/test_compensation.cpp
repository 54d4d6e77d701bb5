// Each compensation formula of design.md §1 (steps 4–6, post-softmax, top-k) on one decode row small enough
// to write every expected output as a formula: one head, head_dim 1, scale 1, q = [1], keys a_j = j for j =
// 0..3, values w_j. Raw-score θ = 1.5 keeps S = {2, 3}, so m = 3 and D = e^-1 + 1.
#include "test_support.hpp"

using namespace toptheta;
using namespace toptheta_test;
namespace {

const double w[4] = {0.5, -1.25, 2.0, 4.0};             // v_j = [w_j]
const double vbar = (w[0] + w[1] + w[2] + w[3]) / 4.0;  // vbar(4)
const double calibrated_c = 0.3;                        // c_h(L) of the tables below

/// The decode row: q = [query] at position 3 over keys [0], [1], [2], [3].
template <class Scalar>
Problem<Scalar> decode_row(double query = 1.0) {
  Problem<Scalar> problem(1, 4, 1, 1, 1, 1);
  problem.q = {Scalar(query)};
  problem.k = {Scalar(0), Scalar(1), Scalar(2), Scalar(3)};
  problem.v = {Scalar(w[0]), Scalar(w[1]), Scalar(w[2]), Scalar(w[3])};
  return problem;
}

AttentionOptions decode_placement(double scale = 1.0) {
  AttentionOptions attention;
  attention.causal = true;
  attention.past = 3;
  attention.scale = scale;
  return attention;
}

/// o = (e^-1 w_2 + w_3) / (D + λC) + [VMC] (1 - D / (D + λC)) vbar, with D = e^-1 + 1: the output of any row
/// that keeps S = {2, 3} of a = {0, 1, 2, 3} and compensates with the term C.
double kept_23_output(double C, double lambda, bool v_mean) {
  const double D = std::exp(-1.0) + 1.0;
  const double denominator = D + lambda * C;
  double o = (std::exp(-1.0) * w[2] + w[3]) / denominator;
  if (v_mean) o += (1.0 - D / denominator) * vbar;
  return o;
}

template <class Scalar>
double first_output(const Problem<Scalar>& problem) {
  return double(problem.out[0]);
}

template <class Scalar>
double abs_tolerance() {
  return std::is_same_v<Scalar, double> ? 1e-13 : 2e-6;
}

}  // namespace

TEMPLATE_TEST_CASE("each softmax-denominator compensation of raw-score Top-θ matches its formula", "[compensation]",
                   float, double) {
  const DenominatorCompensation mode =
      GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact, DenominatorCompensation::exp_threshold,
               DenominatorCompensation::calibrated);
  const double lambda = GENERATE(0.5, 1.0);
  const bool v_mean = GENERATE(false, true);
  const Passes passes = GENERATE(Passes::one, Passes::two);

  double C = 0;
  switch (mode) {
    case DenominatorCompensation::none:
      C = 0;
      break;
    case DenominatorCompensation::exact:
      C = std::exp(0.0 - 3.0) + std::exp(1.0 - 3.0);
      break;
    case DenominatorCompensation::exp_threshold:
      C = 2 * std::exp(1.5 - 3.0);
      break;
    case DenominatorCompensation::calibrated:
      C = calibrated_c;
      break;
  }
  const double expected = kept_23_output(C, lambda, v_mean);

  auto problem = decode_row<TestType>();
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::raw_score, {1.5}, {calibrated_c});
  TopThetaOptions options;
  options.attention = decode_placement();
  options.compensation = {mode, lambda, v_mean};
  options.passes = passes;
  AttentionStats stats;
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options, &stats);

  INFO(type_name<TestType>() << " " << to_string(mode) << " lambda " << lambda << " v_mean " << v_mean << " passes "
                             << (passes == Passes::one ? "one" : "two"));
  CHECK(first_output(problem) == Approx(expected).margin(abs_tolerance<TestType>()).epsilon(0));
  CHECK(stats.elements_kept == std::vector<std::uint64_t>{2});
  CHECK(stats.v_rows_kept == std::vector<std::uint64_t>{2});
}

TEMPLATE_TEST_CASE("the exp-threshold compensation converts θ back to score units in every pre-softmax space",
                   "[compensation]", float, double) {
  // score_minus_max: a - m > θ = -1.2  ⇔  a > 1.8, C = 2 e^((m + θ) - m).
  // score_over_query_norm: q = [2], scale 0.5 (so a_j = j again), ||q|| = 2, a / ||q|| > θ = 0.8  ⇔  a > 1.6,
  //   C = 2 e^(θ ||q|| - m).
  const ThresholdSpace space =
      GENERATE(ThresholdSpace::raw_score, ThresholdSpace::score_minus_max, ThresholdSpace::score_over_query_norm);
  const bool v_mean = GENERATE(false, true);
  double theta = 0, query = 1, scale = 1, C = 0;
  switch (space) {
    case ThresholdSpace::raw_score:
      theta = 1.7;
      C = 2 * std::exp(1.7 - 3.0);
      break;
    case ThresholdSpace::score_minus_max:
      theta = -1.2;
      C = 2 * std::exp((3.0 + -1.2) - 3.0);
      break;
    case ThresholdSpace::score_over_query_norm:
      theta = 0.8;
      query = 2;
      scale = 0.5;
      C = 2 * std::exp(0.8 * 2.0 - 3.0);
      break;
    case ThresholdSpace::probability:
      break;
  }
  auto problem = decode_row<TestType>(query);
  const auto table = LayerThresholds::uniform(1, space, {theta});
  TopThetaOptions options;
  options.attention = decode_placement(scale);
  options.compensation = {DenominatorCompensation::exp_threshold, 1.0, v_mean};
  AttentionStats stats;
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options, &stats);
  INFO(type_name<TestType>() << " " << to_string(space) << " v_mean " << v_mean);
  CHECK(stats.elements_kept == std::vector<std::uint64_t>{2});
  CHECK(first_output(problem) == Approx(kept_23_output(C, 1.0, v_mean)).margin(abs_tolerance<TestType>()).epsilon(0));
}

TEMPLATE_TEST_CASE("compensation of an empty row: the max-score key is kept and the others are compensated",
                   "[compensation]", float, double) {
  // θ = 3.5 is above every score: S = {3} (never empty), D = 1; exact C = e^-3 + e^-2 + e^-1;
  // exp-threshold C = 3 e^(3.5 - 3) > the pruned mass, since θ lies above the max.
  const DenominatorCompensation mode =
      GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact, DenominatorCompensation::exp_threshold,
               DenominatorCompensation::calibrated);
  const bool v_mean = GENERATE(false, true);
  double C = 0;
  switch (mode) {
    case DenominatorCompensation::none:
      C = 0;
      break;
    case DenominatorCompensation::exact:
      C = std::exp(-3.0) + std::exp(-2.0) + std::exp(-1.0);
      break;
    case DenominatorCompensation::exp_threshold:
      C = 3 * std::exp(3.5 - 3.0);
      break;
    case DenominatorCompensation::calibrated:
      C = calibrated_c;
      break;
  }
  const double lambda = 0.5;
  double expected = w[3] / (1 + lambda * C);
  if (v_mean) expected += (1 - 1 / (1 + lambda * C)) * vbar;

  auto problem = decode_row<TestType>();
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::raw_score, {3.5}, {calibrated_c});
  TopThetaOptions options;
  options.attention = decode_placement();
  options.compensation = {mode, lambda, v_mean};
  AttentionStats stats;
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options, &stats);
  INFO(type_name<TestType>() << " " << to_string(mode) << " v_mean " << v_mean);
  CHECK(stats.empty_rows == 1);
  CHECK(first_output(problem) == Approx(expected).margin(abs_tolerance<TestType>()).epsilon(0));
}

TEMPLATE_TEST_CASE("a dense row (L <= k) is plain softmax attention whatever the compensation", "[compensation]", float,
                   double) {
  // Nothing is pruned, so every compensation term is 0 and V-mean compensation adds nothing.
  const DenominatorCompensation mode =
      GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact, DenominatorCompensation::exp_threshold,
               DenominatorCompensation::calibrated);
  const bool v_mean = GENERATE(false, true);
  const double Z = std::exp(-3.0) + std::exp(-2.0) + std::exp(-1.0) + 1.0;
  const double expected = (std::exp(-3.0) * w[0] + std::exp(-2.0) * w[1] + std::exp(-1.0) * w[2] + w[3]) / Z;
  auto problem = decode_row<TestType>();
  const auto table = LayerThresholds::uniform(4, ThresholdSpace::raw_score, {1.5}, {calibrated_c});
  TopThetaOptions options;
  options.attention = decode_placement();
  options.compensation = {mode, 1.0, v_mean};
  AttentionStats stats;
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options, &stats);
  INFO(type_name<TestType>() << " " << to_string(mode) << " v_mean " << v_mean);
  CHECK(stats.dense_rows == 1);
  CHECK(first_output(problem) == Approx(expected).margin(abs_tolerance<TestType>()).epsilon(0));
}

TEMPLATE_TEST_CASE("post-softmax Top-θ keeps the full softmax probabilities without renormalising", "[compensation]",
                   float, double) {
  // P_j = e^(a_j - 3) / Z: P = {0.032, 0.087, 0.237, 0.644}; θ = 0.15 keeps S = {2, 3}.
  const bool v_mean = GENERATE(false, true);
  const Passes passes = GENERATE(Passes::automatic, Passes::two);
  const double Z = std::exp(0.0 - 3.0) + std::exp(1.0 - 3.0) + std::exp(2.0 - 3.0) + std::exp(3.0 - 3.0);
  const double P2 = std::exp(2.0 - 3.0) / Z, P3 = std::exp(3.0 - 3.0) / Z;
  double expected = P2 * w[2] + P3 * w[3];
  if (v_mean) expected += (1 - P2 - P3) * vbar;

  auto problem = decode_row<TestType>();
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::probability, {0.15});
  TopThetaOptions options;
  options.attention = decode_placement();
  options.compensation.v_mean = v_mean;
  options.passes = passes;
  AttentionStats stats;
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options, &stats);
  INFO(type_name<TestType>() << " v_mean " << v_mean);
  CHECK(stats.elements_kept == std::vector<std::uint64_t>{2});
  CHECK(first_output(problem) == Approx(expected).margin(abs_tolerance<TestType>()).epsilon(0));
}

TEMPLATE_TEST_CASE("post-softmax Top-θ of an empty row keeps the max-score key at its full softmax probability",
                   "[compensation]", float, double) {
  // θ = 0.9 is above every P_j: S = {3}, o = P_3 w_3 (+ (1 - P_3) vbar).
  const bool v_mean = GENERATE(false, true);
  const double Z = std::exp(-3.0) + std::exp(-2.0) + std::exp(-1.0) + 1.0;
  double expected = w[3] / Z;
  if (v_mean) expected += (1 - 1 / Z) * vbar;
  auto problem = decode_row<TestType>();
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::probability, {0.9});
  TopThetaOptions options;
  options.attention = decode_placement();
  options.compensation.v_mean = v_mean;
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options);
  INFO(type_name<TestType>() << " v_mean " << v_mean);
  CHECK(first_output(problem) == Approx(expected).margin(abs_tolerance<TestType>()).epsilon(0));
}

TEMPLATE_TEST_CASE("each compensation of top-k matches its formula; exp-threshold bounds by the (k+1)-th score",
                   "[compensation][top_k]", float, double) {
  // k = 2 keeps S = {2, 3}; the (k+1)-th largest score is a_1 = 1, so exp-threshold C = 2 e^(1 - 3).
  const DenominatorCompensation mode =
      GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact, DenominatorCompensation::exp_threshold,
               DenominatorCompensation::calibrated);
  const double lambda = GENERATE(0.5, 1.0);
  const bool v_mean = GENERATE(false, true);
  double C = 0;
  switch (mode) {
    case DenominatorCompensation::none:
      C = 0;
      break;
    case DenominatorCompensation::exact:
      C = std::exp(0.0 - 3.0) + std::exp(1.0 - 3.0);
      break;
    case DenominatorCompensation::exp_threshold:
      C = 2 * std::exp(1.0 - 3.0);
      break;
    case DenominatorCompensation::calibrated:
      C = calibrated_c;
      break;
  }
  auto problem = decode_row<TestType>();
  const auto terms = LayerThresholds::uniform(2, ThresholdSpace::raw_score, {0.0}, {calibrated_c});
  TopKOptions options;
  options.k = 2;
  options.attention = decode_placement();
  options.compensation = {mode, lambda, v_mean};
  options.thresholds = &terms;
  AttentionStats stats;
  top_k_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), options, &stats);
  INFO(type_name<TestType>() << " " << to_string(mode) << " lambda " << lambda << " v_mean " << v_mean);
  CHECK(stats.elements_kept == std::vector<std::uint64_t>{2});
  CHECK(first_output(problem) ==
        Approx(kept_23_output(C, lambda, v_mean)).margin(abs_tolerance<TestType>()).epsilon(0));
}

TEMPLATE_TEST_CASE("V-mean compensation over the pruned rows gives the dropped mass to their mean",
                   "[compensation][v_mean_of_pruned]", float, double) {
  // S = {2, 3} prunes {0, 1}: their mean (w_0 + w_1) / 2 replaces vbar(4) = (w_0 + ... + w_3) / 4.
  const double pruned_mean = (w[0] + w[1]) / 2;
  SECTION("raw-score thresholds, every denominator compensation, one and two passes") {
    const DenominatorCompensation mode =
        GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact, DenominatorCompensation::exp_threshold);
    const Passes passes = GENERATE(Passes::one, Passes::two);
    const double C = mode == DenominatorCompensation::none    ? 0
                     : mode == DenominatorCompensation::exact ? std::exp(-3.0) + std::exp(-2.0)
                                                              : 2 * std::exp(1.5 - 3.0);
    const double D = std::exp(-1.0) + 1.0;
    const double expected = (std::exp(-1.0) * w[2] + w[3]) / (D + C) + (1 - D / (D + C)) * pruned_mean;
    auto problem = decode_row<TestType>();
    TopThetaOptions options;
    options.attention = decode_placement();
    options.compensation = {mode, 1.0, true, true};
    options.passes = passes;
    top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(),
                        LayerThresholds::uniform(1, ThresholdSpace::raw_score, {1.5}), options);
    INFO(type_name<TestType>() << " " << to_string(mode) << " passes " << (passes == Passes::one ? "one" : "two"));
    CHECK(first_output(problem) == Approx(expected).margin(abs_tolerance<TestType>()).epsilon(0));
  }
  SECTION("probability thresholds (candidates in one pass, or two passes)") {
    const Passes passes = GENERATE(Passes::automatic, Passes::two);
    const double Z = std::exp(-3.0) + std::exp(-2.0) + std::exp(-1.0) + 1.0;
    const double P2 = std::exp(-1.0) / Z, P3 = 1 / Z;
    auto problem = decode_row<TestType>();
    TopThetaOptions options;
    options.attention = decode_placement();
    options.compensation.v_mean = options.compensation.v_mean_of_pruned = true;
    options.passes = passes;
    top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(),
                        LayerThresholds::uniform(1, ThresholdSpace::probability, {0.15}), options);
    CHECK(first_output(problem) ==
          Approx(P2 * w[2] + P3 * w[3] + (1 - P2 - P3) * pruned_mean).margin(abs_tolerance<TestType>()).epsilon(0));
  }
  SECTION("an empty row keeps its max-score key; the other three are pruned") {
    const double Z = std::exp(-3.0) + std::exp(-2.0) + std::exp(-1.0) + 1.0;
    auto problem = decode_row<TestType>();
    TopThetaOptions options;
    options.attention = decode_placement();
    options.compensation.v_mean = options.compensation.v_mean_of_pruned = true;
    top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(),
                        LayerThresholds::uniform(1, ThresholdSpace::probability, {0.9}), options);
    CHECK(first_output(problem) ==
          Approx(w[3] / Z + (1 - 1 / Z) * (w[0] + w[1] + w[2]) / 3).margin(abs_tolerance<TestType>()).epsilon(0));
  }
  SECTION("top-k") {
    auto problem = decode_row<TestType>();
    TopKOptions options;
    options.k = 2;
    options.attention = decode_placement();
    options.compensation = {DenominatorCompensation::exact, 1.0, true, true};
    top_k_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), options);
    const double D = std::exp(-1.0) + 1.0, C = std::exp(-3.0) + std::exp(-2.0);
    CHECK(first_output(problem) == Approx((std::exp(-1.0) * w[2] + w[3]) / (D + C) + (1 - D / (D + C)) * pruned_mean)
                                       .margin(abs_tolerance<TestType>())
                                       .epsilon(0));
  }
  SECTION("nothing pruned adds nothing") {
    auto problem = decode_row<TestType>();
    TopThetaOptions options;
    options.attention = decode_placement();
    options.compensation = {DenominatorCompensation::exact, 1.0, true, true};
    top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(),
                        LayerThresholds::uniform(1, ThresholdSpace::raw_score, {-10.0}), options);
    const double Z = std::exp(-3.0) + std::exp(-2.0) + std::exp(-1.0) + 1.0;
    CHECK(first_output(problem) ==
          Approx((std::exp(-3.0) * w[0] + std::exp(-2.0) * w[1] + std::exp(-1.0) * w[2] + w[3]) / Z)
              .margin(abs_tolerance<TestType>())
              .epsilon(0));
  }
  SECTION("it needs v_mean") {
    auto problem = decode_row<TestType>();
    TopThetaOptions options;
    options.attention = decode_placement();
    options.compensation.v_mean_of_pruned = true;
    CHECK_THROWS_WITH(top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(),
                                          LayerThresholds::uniform(1, ThresholdSpace::raw_score, {1.5}), options),
                      mentions("v_mean_of_pruned"));
  }
}

TEMPLATE_TEST_CASE("V-mean compensation uses the KV cache's V prefix sum like the V rows themselves",
                   "[compensation][kv_cache]", float, double) {
  // The same decode row attended from a cache: vbar(4) built from value_sum_before(3) plus v_3.
  auto problem = decode_row<TestType>();
  KvCache<TestType> cache(1, 1, 4);
  cache.append(TensorView<const TestType>(problem.k.data(), 3, 1, 1),
               TensorView<const TestType>(problem.v.data(), 3, 1, 1));
  cache.append(TensorView<const TestType>(problem.k.data() + 3, 1, 1, 1),
               TensorView<const TestType>(problem.v.data() + 3, 1, 1, 1));
  CHECK(cache.value_sum_before(3)[0] == Approx(w[0] + w[1] + w[2]).margin(1e-12));
  CHECK(cache.value_sum_before(4)[0] == Approx(w[0] + w[1] + w[2] + w[3]).margin(1e-12));
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::raw_score, {1.5});
  TopThetaOptions options;
  options.attention = decode_placement();
  options.compensation = {DenominatorCompensation::exp_threshold, 1.0, true};
  options.value_prefix_sum = cache.value_sum_before(3);
  top_theta_attention(problem.queries(), cache.keys(), cache.values(), problem.output(), table, options);
  CHECK(first_output(problem) ==
        Approx(kept_23_output(2 * std::exp(1.5 - 3.0), 1.0, true)).margin(abs_tolerance<TestType>()).epsilon(0));
}
