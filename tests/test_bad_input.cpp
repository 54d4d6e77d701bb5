// Bad input (design.md §5): every invalid argument throws toptheta::invalid_argument whose message names the
// argument and what was expected; scores of ±1e4 and all-equal score rows give finite outputs.
#include "test_support.hpp"

using namespace toptheta;
using namespace toptheta_test;

namespace {

const double not_a_number = std::numeric_limits<double>::quiet_NaN();
const double infinity = std::numeric_limits<double>::infinity();

enum class Kernel { dense, top_theta, top_k };

const char* name(Kernel kernel) {
  switch (kernel) {
    case Kernel::dense:
      return "dense";
    case Kernel::top_theta:
      return "top_theta";
    case Kernel::top_k:
      return "top_k";
  }
  return "?";
}

/// Runs `kernel` with thresholds for `table_heads` query heads.
void attend(Kernel kernel, const TensorView<const float>& q, const TensorView<const float>& k,
            const TensorView<const float>& v, const TensorView<float>& out, const AttentionOptions& attention,
            Index table_heads) {
  const auto table = LayerThresholds::uniform(2, ThresholdSpace::raw_score, std::vector<double>(table_heads, 0.0));
  switch (kernel) {
    case Kernel::dense:
      dense_attention(q, k, v, out, attention);
      break;
    case Kernel::top_theta: {
      TopThetaOptions options;
      options.attention = attention;
      top_theta_attention(q, k, v, out, table, options);
      break;
    }
    case Kernel::top_k: {
      TopKOptions options;
      options.attention = attention;
      options.k = 2;
      top_k_attention(q, k, v, out, options);
      break;
    }
  }
}

// A valid call: 4 query rows, 6 keys, 4 query heads over 2 KV heads, head_dim 8.
struct Call {
  Problem<float> problem{4, 6, 4, 2, 8, 1};
  TensorView<const float> q = problem.queries(), k = problem.keys(), v = problem.values();
  TensorView<float> out = problem.output();
  AttentionOptions attention;
  Index table_heads = 4;
  void operator()(Kernel kernel) const { attend(kernel, q, k, v, out, attention, table_heads); }
};

/// max |<q_i, k_j>| over every query row and key of each query head's KV head: `m / max_abs_dot` is the scale
/// that makes the largest |a_ij| equal `m`.
template <class Scalar>
double max_abs_dot(const Problem<Scalar>& problem) {
  double largest = 0;
  const auto q = problem.queries(), k = problem.keys();
  const Index group = problem.q_heads / problem.kv_heads;
  for (Index h = 0; h < problem.q_heads; ++h)
    for (Index i = 0; i < problem.query_rows; ++i)
      for (Index j = 0; j < problem.key_rows; ++j) {
        double dot = 0;
        for (Index d = 0; d < problem.head_dim; ++d) dot += double(q.row(i, h)[d]) * double(k.row(j, h / group)[d]);
        largest = std::max(largest, std::abs(dot));
      }
  return largest;
}

/// Every output is finite and, being a sub-convex combination of V rows (p >= 0, Σ p <= 1; VMC gives the rest to
/// a mean of V rows), no larger in magnitude than the largest |v| entry.
template <class Scalar>
void check_finite_and_bounded(const Problem<Scalar>& problem) {
  const Eigen::MatrixXd out = problem.output_matrix();
  REQUIRE(out.allFinite());
  double largest_v = 0;
  for (const auto& value : problem.v) largest_v = std::max(largest_v, std::abs(double(value)));
  CHECK(out.cwiseAbs().maxCoeff() <= largest_v * (1 + 1e-5));
}

}  // namespace

TEST_CASE("mismatched shapes throw naming the argument and the expected shape", "[bad_input]") {
  const Kernel kernel = GENERATE(Kernel::dense, Kernel::top_theta, Kernel::top_k);
  INFO(name(kernel));
  Call valid;
  REQUIRE_NOTHROW(valid(kernel));
  {
    Call call;
    call.k = TensorView<const float>(call.problem.k.data(), 6, 2, 4);
    REQUIRE_INVALID(call(kernel), "k.head_dim", "q.head_dim = 8");
  }
  {
    Call call;
    call.v = TensorView<const float>(call.problem.v.data(), 6, 2, 4);
    REQUIRE_INVALID(call(kernel), "v.head_dim", "q.head_dim = 8");
  }
  {
    Call call;
    call.v = TensorView<const float>(call.problem.v.data(), 5, 2, 8);
    REQUIRE_INVALID(call(kernel), "v.tokens", "k.tokens = 6");
  }
  {
    Call call;
    call.v = TensorView<const float>(call.problem.v.data(), 6, 1, 8);
    REQUIRE_INVALID(call(kernel), "v.heads", "k.heads = 2");
  }
  {
    Call call;
    call.out = TensorView<float>(call.problem.out.data(), 3, 4, 8);
    REQUIRE_INVALID(call(kernel), "out", "[4, 4, 8]");
  }
  {
    Call call;
    call.out = TensorView<float>(call.problem.out.data(), 4, 2, 8);
    REQUIRE_INVALID(call(kernel), "out", "[4, 4, 8]");
  }
  {
    Call call;
    call.out = TensorView<float>(call.problem.out.data(), 4, 4, 4);
    REQUIRE_INVALID(call(kernel), "out", "[4, 4, 8]");
  }
  {
    // Three query heads cannot share two KV heads.
    Call call;
    call.q = TensorView<const float>(call.problem.q.data(), 4, 3, 8);
    call.out = TensorView<float>(call.problem.out.data(), 4, 3, 8);
    call.table_heads = 3;
    REQUIRE_INVALID(call(kernel), "q.heads", "multiple of the KV heads (2)");
  }
}

TEST_CASE("a causal call whose past + query rows exceed the keys throws naming k.tokens", "[bad_input]") {
  const Kernel kernel = GENERATE(Kernel::dense, Kernel::top_theta, Kernel::top_k);
  INFO(name(kernel));
  Call call;
  call.attention.past = 2;  // 2 + 4 = 6 keys: fine
  REQUIRE_NOTHROW(call(kernel));
  call.attention.past = 3;
  REQUIRE_INVALID(call(kernel), "k.tokens", "past + query rows = 7");
  call.attention.past = std::numeric_limits<Index>::max() - 2;  // past + query rows overflows: still caught
  REQUIRE_INVALID(call(kernel), "k.tokens", "past + query rows = " + std::to_string(call.attention.past) + " + 4");
  call.attention.past = -1;
  REQUIRE_INVALID(call(kernel), "options.past", ">= 0");
  call.attention.past = 0;
  call.k = TensorView<const float>(call.problem.k.data(), 3, 2, 8);
  call.v = TensorView<const float>(call.problem.v.data(), 3, 2, 8);
  REQUIRE_INVALID(call(kernel), "k.tokens", "past + query rows = 4");
  call.attention.causal = false;  // without a mask 3 keys are enough
  REQUIRE_NOTHROW(call(kernel));
}

TEST_CASE("a NaN, zero, negative or infinite scale throws naming options.scale", "[bad_input]") {
  const Kernel kernel = GENERATE(Kernel::dense, Kernel::top_theta, Kernel::top_k);
  const double scale = GENERATE(as<double>{}, 0.0, -0.5, not_a_number, infinity);
  INFO(name(kernel) << " scale " << scale);
  Call call;
  call.attention.scale = scale;
  REQUIRE_INVALID(call(kernel), "options.scale", "a finite value > 0");
}

TEST_CASE("a tensor view with a negative size, no heads, no head_dim or no data throws naming it", "[bad_input]") {
  std::vector<float> data(64);
  REQUIRE_INVALID(TensorView<float>(data.data(), -1, 2, 8), "tokens", ">= 0");
  REQUIRE_INVALID(TensorView<float>(data.data(), 4, 0, 8), "heads", ">= 1");
  REQUIRE_INVALID(TensorView<float>(data.data(), 4, 2, 0), "head_dim", ">= 1");
  REQUIRE_INVALID(TensorView<float>(nullptr, 4, 2, 8), "data", "non-null");
  REQUIRE_INVALID(TensorView<float>(data.data(), 4, 2, 8, -16, 8), "strides", "non-negative");
}

TEST_CASE("a threshold table with the wrong number of heads throws naming the table", "[bad_input]") {
  Problem<float> problem(4, 6, 4, 2, 8, 1);
  const auto three_heads = LayerThresholds::uniform(2, ThresholdSpace::raw_score, {0, 0, 0}, {0.1, 0.1, 0.1});
  REQUIRE_INVALID(
      top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), three_heads),
      "thresholds", "one row per query head (4)");
  TopKOptions options;
  options.k = 2;
  options.thresholds = &three_heads;
  options.compensation.denominator = DenominatorCompensation::calibrated;
  REQUIRE_INVALID(top_k_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), options),
                  "options.thresholds", "one row per query head (4)");
  options.compensation.denominator = DenominatorCompensation::none;  // a table given is checked even if unused
  REQUIRE_INVALID(top_k_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), options),
                  "options.thresholds", "one row per query head (4)");
}

TEST_CASE("k < 1 throws naming k, in a threshold table and in top-k options", "[bad_input]") {
  const Index k = GENERATE(0, -3);
  INFO("k " << k);
  Eigen::MatrixXd theta(1, 2);
  theta << 0.5, 1.0;
  REQUIRE_INVALID(LayerThresholds(k, ThresholdSpace::raw_score, {4, 8}, theta), "k", "k >= 1");
  REQUIRE_INVALID(LayerThresholds::uniform(k, ThresholdSpace::raw_score, {0.5}), "k", "k >= 1");
  Problem<float> problem(4, 6, 4, 2, 8, 1);
  TopKOptions options;
  options.k = k;
  REQUIRE_INVALID(top_k_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), options), "k",
                  "k >= 1");
  REQUIRE_INVALID(TopKSelection(k, {}), "k", "k >= 1");
}

TEST_CASE("a NaN or infinite threshold throws naming its head and length", "[bad_input][threshold_table]") {
  const double bad = GENERATE(as<double>{}, not_a_number, infinity, -infinity);
  INFO("theta " << bad);
  Eigen::MatrixXd theta(2, 3);
  theta << 0.1, 0.2, 0.3,  //
      0.4, 0.5, 0.6;
  theta(1, 2) = bad;
  REQUIRE_INVALID(LayerThresholds(4, ThresholdSpace::raw_score, {8, 16, 32}, theta), "theta(head 1, length 32)",
                  "a finite threshold");
  REQUIRE_INVALID(LayerThresholds::uniform(4, ThresholdSpace::probability, {0.1, bad}), "theta(head 1",
                  "a finite threshold");
}

TEST_CASE("a NaN, infinite or negative denominator term throws naming its head and length",
          "[bad_input][threshold_table]") {
  const double bad = GENERATE(as<double>{}, not_a_number, infinity, -infinity, -0.25);
  INFO("term " << bad);
  Eigen::MatrixXd theta = Eigen::MatrixXd::Zero(2, 3), terms = Eigen::MatrixXd::Ones(2, 3);
  terms(0, 1) = bad;
  REQUIRE_INVALID(LayerThresholds(4, ThresholdSpace::raw_score, {8, 16, 32}, theta, terms),
                  "denominator_terms(head 0, length 16)", "a finite value >= 0");
  REQUIRE_INVALID(LayerThresholds::uniform(4, ThresholdSpace::raw_score, {0.0, 0.0}, {bad, 1.0}),
                  "denominator_terms(head 0", "a finite value >= 0");
}

TEST_CASE("malformed calibrated lengths and table shapes throw naming the argument", "[bad_input][threshold_table]") {
  const Eigen::MatrixXd theta = Eigen::MatrixXd::Zero(2, 3);
  // Not increasing.
  REQUIRE_INVALID(LayerThresholds(4, ThresholdSpace::raw_score, {8, 8, 32}, theta), "lengths[1]",
                  "increasing order, > 8");
  REQUIRE_INVALID(LayerThresholds(4, ThresholdSpace::raw_score, {8, 16, 12}, theta), "lengths[2]",
                  "increasing order, > 16");
  REQUIRE_INVALID(LayerThresholds(4, ThresholdSpace::raw_score, {0, 16, 32}, theta), "lengths[0]", "a row length >= 1");
  // Column count != number of lengths.
  REQUIRE_INVALID(LayerThresholds(4, ThresholdSpace::raw_score, {8, 16}, theta), "theta",
                  "2 columns (one per calibrated length)");
  REQUIRE_INVALID(LayerThresholds(4, ThresholdSpace::raw_score, {8, 16, 32, 64}, theta), "theta",
                  "4 columns (one per calibrated length)");
  REQUIRE_INVALID(LayerThresholds(4, ThresholdSpace::raw_score, {}, Eigen::MatrixXd::Zero(2, 0)), "lengths",
                  "at least one calibrated row length");
  REQUIRE_INVALID(LayerThresholds::uniform(4, ThresholdSpace::raw_score, {}), "theta", "at least one head");
  // Denominator terms of another shape.
  REQUIRE_INVALID(LayerThresholds(4, ThresholdSpace::raw_score, {8, 16, 32}, theta, Eigen::MatrixXd::Zero(2, 2)),
                  "denominator_terms", "the shape of theta");
  REQUIRE_INVALID(LayerThresholds::uniform(4, ThresholdSpace::raw_score, {0.0, 0.0}, {0.5}), "denominator_terms",
                  "the shape of theta");
}

TEST_CASE("a negative, NaN or infinite compensation scale λ throws naming options.compensation.lambda", "[bad_input]") {
  const double lambda = GENERATE(as<double>{}, -0.5, not_a_number, infinity);
  INFO("lambda " << lambda);
  Problem<float> problem(4, 6, 4, 2, 8, 1);
  const auto table = LayerThresholds::uniform(2, ThresholdSpace::raw_score, {0, 0, 0, 0});
  TopThetaOptions top_theta;
  top_theta.compensation = {DenominatorCompensation::exact, lambda, false};
  REQUIRE_INVALID(
      top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, top_theta),
      "options.compensation.lambda", "a finite value >= 0");
  TopKOptions top_k;
  top_k.k = 2;
  top_k.compensation = {DenominatorCompensation::exact, lambda, false};
  REQUIRE_INVALID(top_k_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), top_k),
                  "options.compensation.lambda", "a finite value >= 0");
  REQUIRE_INVALID((Compensation{DenominatorCompensation::none, lambda, false}.validate()), "compensation.lambda",
                  "a finite value >= 0");
}

TEST_CASE("denominator compensation with the probability space throws naming options.compensation.denominator",
          "[bad_input]") {
  const DenominatorCompensation mode = GENERATE(DenominatorCompensation::exact, DenominatorCompensation::exp_threshold,
                                                DenominatorCompensation::calibrated);
  INFO(to_string(mode));
  Problem<float> problem(4, 6, 4, 2, 8, 1);
  const auto table = LayerThresholds::uniform(2, ThresholdSpace::probability, {0.1, 0.1, 0.1, 0.1}, {1, 1, 1, 1});
  TopThetaOptions options;
  options.compensation = {mode, 1.0, true};
  REQUIRE_INVALID(
      top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options),
      "options.compensation.denominator", std::string("got ") + to_string(mode));
}

TEST_CASE("calibrated compensation without calibrated denominator terms throws naming the table", "[bad_input]") {
  Problem<float> problem(4, 6, 4, 2, 8, 1);
  const auto no_terms = LayerThresholds::uniform(2, ThresholdSpace::raw_score, {0, 0, 0, 0});
  TopThetaOptions top_theta;
  top_theta.compensation.denominator = DenominatorCompensation::calibrated;
  REQUIRE_INVALID(
      top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), no_terms, top_theta),
      "thresholds", "calibrated denominator terms");

  TopKOptions top_k;
  top_k.k = 2;
  top_k.compensation.denominator = DenominatorCompensation::calibrated;
  REQUIRE_INVALID(top_k_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), top_k),
                  "options.thresholds", "calibrated denominator terms");
  top_k.thresholds = &no_terms;
  REQUIRE_INVALID(top_k_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), top_k),
                  "options.thresholds", "calibrated denominator terms");
}

TEST_CASE("KvCache rejects appends beyond its capacity, of the wrong shape, or with unequal K and V tokens",
          "[bad_input][kv_cache]") {
  KvCache<float> cache(2, 8, 4);
  std::vector<float> keys(5 * 2 * 8, 1.0f), values(5 * 2 * 8, 2.0f);
  REQUIRE_INVALID(
      cache.append(TensorView<const float>(keys.data(), 5, 2, 8), TensorView<const float>(values.data(), 5, 2, 8)),
      "keys.tokens", "at most 4 (free capacity)");
  REQUIRE_NOTHROW(
      cache.append(TensorView<const float>(keys.data(), 3, 2, 8), TensorView<const float>(values.data(), 3, 2, 8)));
  REQUIRE_INVALID(
      cache.append(TensorView<const float>(keys.data(), 2, 2, 8), TensorView<const float>(values.data(), 2, 2, 8)),
      "keys.tokens", "at most 1 (free capacity)");
  REQUIRE_INVALID(
      cache.append(TensorView<const float>(keys.data(), 1, 1, 8), TensorView<const float>(values.data(), 1, 1, 8)),
      "keys", "[tokens, 2, 8] like the cache");
  REQUIRE_INVALID(
      cache.append(TensorView<const float>(keys.data(), 1, 2, 4), TensorView<const float>(values.data(), 1, 2, 4)),
      "keys", "[tokens, 2, 8] like the cache");
  REQUIRE_INVALID(
      cache.append(TensorView<const float>(keys.data(), 1, 2, 8), TensorView<const float>(values.data(), 1, 1, 8)),
      "values", "the shape of keys, [1, 2, 8]");
  REQUIRE_INVALID(
      cache.append(TensorView<const float>(keys.data(), 1, 2, 8), TensorView<const float>(values.data(), 2, 2, 8)),
      "values", "the shape of keys, [1, 2, 8]");
  CHECK(cache.length() == 3);  // failed appends change nothing
  REQUIRE_INVALID(KvCache<float>(0, 8, 4), "kv_heads", ">= 1");
  REQUIRE_INVALID(KvCache<float>(2, 0, 4), "head_dim", ">= 1");
  REQUIRE_INVALID(KvCache<float>(2, 8, 0), "capacity", ">= 1");
}

TEST_CASE("KvCache::value_sum_before accepts only the length or the latest append start", "[bad_input][kv_cache]") {
  KvCache<double> cache(1, 2, 8);
  std::vector<double> keys(8 * 2, 0.0), values(8 * 2);
  for (std::size_t t = 0; t < values.size(); ++t) values[t] = double(t);  // v_j = [2j, 2j + 1]
  cache.append(TensorView<const double>(keys.data(), 3, 1, 2), TensorView<const double>(values.data(), 3, 1, 2));
  cache.append(TensorView<const double>(keys.data() + 6, 2, 1, 2),
               TensorView<const double>(values.data() + 6, 2, 1, 2));
  // Σ_{j<3} v_j = [0 + 2 + 4, 1 + 3 + 5]; Σ_{j<5} v_j = [0 + 2 + 4 + 6 + 8, 1 + 3 + 5 + 7 + 9].
  CHECK(cache.value_sum_before(3)[0] == 6.0);
  CHECK(cache.value_sum_before(3)[1] == 9.0);
  CHECK(cache.value_sum_before(5)[0] == 20.0);
  CHECK(cache.value_sum_before(5)[1] == 25.0);
  for (Index position : {0, 1, 2, 4, 6, -1}) {
    INFO("position " << position);
    REQUIRE_INVALID(cache.value_sum_before(position), "position",
                    "the cache length (5) or the start of the latest append (3)");
  }
}

TEST_CASE("thresholded_softmax rejects row lengths and query norms of the wrong size", "[bad_input]") {
  const Eigen::MatrixXd scores = Eigen::MatrixXd::Zero(3, 4);
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::raw_score, {0.5});
  const TopThetaSelection selection(table, {}, false, Passes::automatic);
  ScoreRows rows;
  rows.lengths = {4, 4};
  REQUIRE_INVALID(thresholded_softmax(scores, selection, rows), "rows.lengths", "one length per score row (3)");
  rows.lengths = {4, 0, 4};
  REQUIRE_INVALID(thresholded_softmax(scores, selection, rows), "rows.lengths[1]", "a length in [1, 4]");
  rows.lengths = {4, 4, 5};
  REQUIRE_INVALID(thresholded_softmax(scores, selection, rows), "rows.lengths[2]", "a length in [1, 4]");
  rows.lengths.clear();
  rows.query_norms = {1.0, 1.0, 1.0, 1.0};
  REQUIRE_INVALID(thresholded_softmax(scores, selection, rows), "rows.query_norms", "one norm per score row (3)");

  const auto over_norm = LayerThresholds::uniform(1, ThresholdSpace::score_over_query_norm, {0.5});
  const TopThetaSelection needs_norms(over_norm, {}, false, Passes::automatic);
  REQUIRE_INVALID(thresholded_softmax(scores, needs_norms, ScoreRows{}), "rows.query_norms",
                  "one norm per row for the score_over_query_norm space");
  ScoreRows with_norms;
  with_norms.query_norms = {1.0, 2.0, 3.0};
  REQUIRE_NOTHROW(thresholded_softmax(scores, needs_norms, with_norms));
}

TEST_CASE("thresholded_softmax rejects a query head the threshold table does not have", "[bad_input]") {
  const Eigen::MatrixXd scores = Eigen::MatrixXd::Zero(2, 4);
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::raw_score, {0.5});
  const TopThetaSelection selection(table, {}, false, Passes::automatic);
  ScoreRows rows;
  rows.query_head = 3;
  REQUIRE_INVALID(thresholded_softmax(scores, selection, rows), "rows.query_head", "1");
  rows.query_head = -1;
  REQUIRE_INVALID(thresholded_softmax(scores, selection, rows), "rows.query_head", "1");
}

TEST_CASE("threshold_space_from_string parses every space name and rejects any other text naming the argument",
          "[bad_input]") {
  for (auto space : {ThresholdSpace::raw_score, ThresholdSpace::probability, ThresholdSpace::score_minus_max,
                     ThresholdSpace::score_over_query_norm})
    CHECK(threshold_space_from_string(to_string(space)) == space);
  REQUIRE_INVALID(threshold_space_from_string("raw"), "space",
                  "one of raw_score, probability, score_minus_max, score_over_query_norm, got raw");
  REQUIRE_INVALID(threshold_space_from_string("", "layer 3 space"), "layer 3 space", "one of raw_score");
  REQUIRE_INVALID(threshold_space_from_string("Probability"), "space", "got Probability");
}

// ---- large and all-equal scores ----

TEMPLATE_TEST_CASE("scores of ±1e4 give finite outputs bounded by the V rows for every kernel and compensation",
                   "[bad_input][numerics]", float, double) {
  // Normal q and k, scale chosen so the largest |a_ij| is 1e4: rows spread over ±1e4, so exp(a - m)
  // underflows for most keys and θ in score units sits far from m.
  Problem<TestType> problem(24, 24, 4, 2, 16, 29);
  AttentionOptions attention;
  attention.scale = 1e4 / max_abs_dot(problem);
  const DenominatorCompensation modes[] = {DenominatorCompensation::none, DenominatorCompensation::exact,
                                           DenominatorCompensation::exp_threshold};

  INFO(type_name<TestType>());
  {
    INFO("dense");
    dense_attention<Tiles<8, 8>>(problem.queries(), problem.keys(), problem.values(), problem.output(), attention);
    check_finite_and_bounded(problem);
  }

  // a / ||q|| lies within ±s max ||k||.
  double largest_key = 0;
  for (Index j = 0; j < problem.key_rows; ++j)
    for (Index h = 0; h < problem.kv_heads; ++h)
      largest_key = std::max(largest_key, problem.keys().head(h).row(j).template cast<double>().norm());
  const double span = *attention.scale * largest_key;
  struct Thresholds {
    ThresholdSpace space;
    std::vector<double> levels;  // keeping many, few, nothing (every row left with only its max-score key)
  };
  const Thresholds spaces[] = {
      {ThresholdSpace::raw_score, {-5e3, 5e3, 2e4}},
      {ThresholdSpace::probability, {1e-30, 0.5, 1.0}},
      {ThresholdSpace::score_minus_max, {-1e4, -1e2, 1.0}},
      {ThresholdSpace::score_over_query_norm, {-0.5 * span, 0.5 * span, 2 * span}},
  };
  for (const auto& thresholds : spaces)
    for (const double theta : thresholds.levels)
      for (const auto mode : modes)
        for (const bool v_mean : {false, true}) {
          if (thresholds.space == ThresholdSpace::probability && mode != DenominatorCompensation::none) continue;
          const auto table = LayerThresholds::uniform(3, thresholds.space, std::vector<double>(4, theta));
          TopThetaOptions options;
          options.attention = attention;
          options.compensation = {mode, 1.0, v_mean};
          AttentionStats stats;
          top_theta_attention<Tiles<8, 8>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                           options, &stats);
          INFO("Top-θ " << to_string(thresholds.space) << " θ " << theta << " " << to_string(mode) << " v_mean "
                        << v_mean << " kept fraction " << stats.kept_fraction());
          check_finite_and_bounded(problem);
        }

  for (const auto mode : modes)
    for (const bool v_mean : {false, true}) {
      TopKOptions options;
      options.attention = attention;
      options.k = 3;
      options.compensation = {mode, 1.0, v_mean};
      top_k_attention<Tiles<8, 8>>(problem.queries(), problem.keys(), problem.values(), problem.output(), options);
      INFO("top-k " << to_string(mode) << " v_mean " << v_mean);
      check_finite_and_bounded(problem);
    }
}

TEMPLATE_TEST_CASE("cap_k with scores of ±1e4 gives a finite output (the kept keys are far below the row max)",
                   "[bad_input][numerics]", float, double) {
  // One head, head_dim 1, scale 1, q = [1], keys a = {1e4, -1e4, -1e4}, θ = -2e4, k = 1, cap_k: all three
  // survive, the cap keeps the largest position {2}. With no denominator compensation design.md §1 step 5
  // gives p_2 = e^(a_2 - m) / e^(a_2 - m) = 1, so o = v_2; with exact compensation p_2 = e^-2e4 / (e^-2e4 + 1
  // + e^-2e4), i.e. o = 0 (+ vbar under V-mean compensation).
  const DenominatorCompensation mode = GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact);
  Problem<TestType> problem(1, 3, 1, 1, 1, 1);
  problem.q = {TestType(1)};
  problem.k = {TestType(1e4), TestType(-1e4), TestType(-1e4)};
  problem.v = {TestType(1), TestType(2), TestType(4)};
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::raw_score, {-2e4});
  TopThetaOptions options;
  options.attention.past = 2;
  options.attention.scale = 1.0;
  options.cap_k = true;
  options.compensation.denominator = mode;
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options);
  INFO(type_name<TestType>() << " " << to_string(mode) << " output " << double(problem.out[0]));
  REQUIRE(std::isfinite(double(problem.out[0])));
  CHECK(double(problem.out[0]) == Approx(mode == DenominatorCompensation::none ? 4.0 : 0.0).margin(1e-6));
}

TEMPLATE_TEST_CASE("thresholded_softmax with cap_k and scores of ±1e4 gives finite probabilities",
                   "[bad_input][numerics][thresholded_softmax]", float, double) {
  // The same row as above through the primitive: a = {1e4, -1e4, -1e4}, θ = -2e4, k = 1, cap_k keeps {2};
  // with no denominator compensation p_2 = 1 and the dropped mass is 0.
  Eigen::Matrix<TestType, Eigen::Dynamic, Eigen::Dynamic> scores(1, 3);
  scores << TestType(1e4), TestType(-1e4), TestType(-1e4);
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::raw_score, {-2e4});
  const TopThetaSelection selection(table, {}, true, Passes::automatic);
  const auto result = thresholded_softmax(scores, selection);
  REQUIRE(result.columns == std::vector<Index>{2});
  INFO(type_name<TestType>() << " p " << double(result.probabilities[0]) << " dropped "
                             << double(result.dropped_mass[0]));
  CHECK(std::isfinite(double(result.probabilities[0])));
  CHECK(double(result.probabilities[0]) == Approx(1.0).margin(1e-6));
  CHECK(double(result.dropped_mass[0]) == Approx(0.0).margin(1e-6));
}

TEMPLATE_TEST_CASE("all-equal score rows: dense attention outputs the mean of the visible V rows",
                   "[bad_input][numerics]", float, double) {
  // Every key is [1, 0, ..., 0], so a_ij = s q_i0 for every j: exactly equal scores in a row, whatever the
  // summation order. q_i0 = ±magnitude makes the common score ±magnitude.
  const double magnitude = GENERATE(1.0, 1e4);
  const bool causal = GENERATE(true, false);
  Problem<TestType> problem(20, 20, 4, 2, 16, 31);
  for (Index j = 0; j < 20; ++j)
    for (Index d = 0; d < 16 * 2; ++d) problem.k[std::size_t(j * 32 + d)] = TestType(d % 16 == 0 ? 1 : 0);
  for (Index i = 0; i < 20 * 4; ++i) problem.q[std::size_t(i * 16)] = TestType(i % 2 == 0 ? magnitude : -magnitude);
  AttentionOptions attention;
  attention.causal = causal;
  attention.scale = 1.0;
  dense_attention<Tiles<8, 8>>(problem.queries(), problem.keys(), problem.values(), problem.output(), attention);

  Eigen::MatrixXd expected(20, 4 * 16);
  for (Index i = 0; i < 20; ++i) {
    const Index L = causal ? i + 1 : 20;
    for (Index h = 0; h < 4; ++h)
      for (Index d = 0; d < 16; ++d) {
        double sum = 0;
        for (Index j = 0; j < L; ++j) sum += double(problem.values().row(j, h / 2)[d]);
        expected(i, h * 16 + d) = sum / double(L);
      }
  }
  const Eigen::MatrixXd out = problem.output_matrix();
  INFO(type_name<TestType>() << " magnitude " << magnitude << " causal " << causal << " max difference "
                             << (out - expected).cwiseAbs().maxCoeff());
  REQUIRE(out.allFinite());
  CHECK(relative_error(out, expected) <= 4 * tolerance<TestType>());
}

TEMPLATE_TEST_CASE("all-equal score rows give finite Top-θ and top-k outputs: all kept, none kept, or ties",
                   "[bad_input][numerics]", float, double) {
  // Same construction as above (every row's scores equal), causal prefill. Checked values, with no
  // denominator compensation: θ below the common score keeps all (the mean of the visible V rows); θ above it
  // keeps only the max-score key with the largest position, L - 1 (o = v_{L-1}, or P v_{L-1} = v_{L-1} / L
  // post-softmax); top-k keeps the k largest positions.
  const double magnitude = GENERATE(1.0, 1e4);
  const DenominatorCompensation mode =
      GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact, DenominatorCompensation::exp_threshold);
  const bool v_mean = GENERATE(false, true);
  Problem<TestType> problem(20, 20, 2, 1, 8, 37);
  for (Index j = 0; j < 20; ++j)
    for (Index d = 0; d < 8; ++d) problem.k[std::size_t(j * 8 + d)] = TestType(d == 0 ? 1 : 0);
  for (Index i = 0; i < 20 * 2; ++i) problem.q[std::size_t(i * 8)] = TestType(i % 2 == 0 ? magnitude : -magnitude);
  const Index k = 3;
  auto value = [&](Index j, Index d) { return double(problem.v[std::size_t(j * 8 + d)]); };
  auto check_rows = [&](const std::function<double(Index L, Index d)>& expected) {
    const Eigen::MatrixXd out = problem.output_matrix();
    REQUIRE(out.allFinite());
    if (mode != DenominatorCompensation::none || v_mean) return;
    for (Index i = 0; i < 20; ++i)
      for (Index h = 0; h < 2; ++h)
        for (Index d = 0; d < 8; ++d) {
          INFO("row " << i << " head " << h << " dim " << d);
          CHECK(out(i, h * 8 + d) == Approx(expected(i + 1, d)).margin(4 * tolerance<TestType>()));
        }
  };
  auto mean_of = [&](Index first, Index last, Index d) {
    double sum = 0;
    for (Index j = first; j < last; ++j) sum += value(j, d);
    return sum / double(last - first);
  };
  INFO(type_name<TestType>() << " magnitude " << magnitude << " " << to_string(mode) << " v_mean " << v_mean);
  for (const ThresholdSpace space : {ThresholdSpace::score_minus_max, ThresholdSpace::probability}) {
    if (space == ThresholdSpace::probability && mode != DenominatorCompensation::none) continue;
    INFO(to_string(space));
    // a - m = 0 and P = 1 / L for every key: θ = -1 (resp. 1e-9) keeps all, θ = 0.5 (resp. 0.99) none.
    for (const bool keep_all : {true, false}) {
      const double theta =
          space == ThresholdSpace::score_minus_max ? (keep_all ? -1.0 : 0.5) : (keep_all ? 1e-9 : 0.99);
      const auto table = LayerThresholds::uniform(k, space, {theta, theta});
      TopThetaOptions options;
      options.attention.scale = 1.0;
      options.compensation = {mode, 1.0, v_mean};
      top_theta_attention<Tiles<8, 8>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                       options);
      INFO("keep all " << keep_all);
      check_rows([&](Index L, Index d) {
        if (keep_all || L <= k) return mean_of(0, L, d);
        // Only the last key: renormalised to 1 before softmax, at its probability 1 / L after.
        return space == ThresholdSpace::probability ? value(L - 1, d) / double(L) : value(L - 1, d);
      });
    }
  }
  // Raw-score θ around the common score ±magnitude: exactly at it (nothing is > θ) and below it.
  for (const double theta : {magnitude, -magnitude, -2 * magnitude}) {
    const auto table = LayerThresholds::uniform(k, ThresholdSpace::raw_score, {theta, theta});
    TopThetaOptions options;
    options.attention.scale = 1.0;
    options.compensation = {mode, 1.0, v_mean};
    top_theta_attention<Tiles<8, 8>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                     options);
    REQUIRE(problem.output_matrix().allFinite());
  }
  TopKOptions options;
  options.attention.scale = 1.0;
  options.k = k;
  options.compensation = {mode, 1.0, v_mean};
  top_k_attention<Tiles<8, 8>>(problem.queries(), problem.keys(), problem.values(), problem.output(), options);
  check_rows([&](Index L, Index d) { return mean_of(std::max(Index(0), L - k), L, d); });
}
