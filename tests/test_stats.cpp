// Statistics (design.md §1, "Statistics") exact on problems built by hand, where every score is known.
//
// The attention problem: head_dim 2, scale 1, one GQA group of two query heads over one KV head. Every query
// row has head 0 = [1, 0] and head 1 = [0, 1]; key j is [x_j, y_j], so head 0 scores x_j and head 1 scores
// y_j. With the raw-score threshold θ = 1, head 0 keeps {1, 3} and head 1 keeps {3, 5}: the V-row union is
// {1, 3, 5}. Value j is [j, 100 + j], so an output tells which rows were averaged.
#include "test_support.hpp"

using namespace toptheta;
using namespace toptheta_test;
namespace {

constexpr Index n_kv = 12;
// x_7 = 1 equals θ exactly: `a > θ` must not keep it.
const double x[n_kv] = {0, 5, -0.2, 5, -0.4, -0.5, -0.6, 1, -0.8, -0.9, -1.0, -1.1};
const double y[n_kv] = {0, -0.2, -0.4, 5, -0.8, 5, -1.2, -1.4, -1.6, -1.8, -2.0, -2.2};

Problem<double> group_problem(Index query_rows) {
  Problem<double> problem(query_rows, n_kv, 2, 1, 2, 1);
  for (Index i = 0; i < query_rows; ++i) {
    const std::size_t row = std::size_t(i * 4);
    problem.q[row + 0] = 1;  // head 0 = [1, 0]
    problem.q[row + 1] = 0;
    problem.q[row + 2] = 0;  // head 1 = [0, 1]
    problem.q[row + 3] = 1;
  }
  for (Index j = 0; j < n_kv; ++j) {
    problem.k[std::size_t(2 * j)] = x[j];
    problem.k[std::size_t(2 * j + 1)] = y[j];
    problem.v[std::size_t(2 * j)] = double(j);
    problem.v[std::size_t(2 * j + 1)] = 100.0 + double(j);
  }
  return problem;
}

/// Output of query row `i`, head `h`, as [o_0, o_1].
std::vector<double> output_of(const Problem<double>& problem, Index i, Index h) {
  const std::size_t at = std::size_t((i * 2 + h) * 2);
  return {problem.out[at], problem.out[at + 1]};
}

/// The average of V rows j and l: [(j + l) / 2, 100 + (j + l) / 2].
std::vector<double> mean_of_rows(double j, double l) { return {(j + l) / 2, 100 + (j + l) / 2}; }
std::vector<double> row(double j) { return {j, 100 + j}; }

/// The decode step at the last position.
TopThetaOptions decode_options() {
  TopThetaOptions options;
  options.attention.causal = true;
  options.attention.past = n_kv - 1;
  options.attention.scale = 1.0;
  return options;
}

using Counts = std::vector<std::uint64_t>;

// Hand-checked sparse probabilities of thresholded_softmax.
struct ExpectedRow {
  std::vector<Index> columns;
  std::vector<double> probabilities;
};

void check_rows(const SparseProbabilities<double>& result, const std::vector<ExpectedRow>& expected) {
  REQUIRE(result.row_offsets.size() == expected.size() + 1);
  REQUIRE(result.dropped_mass.size() == expected.size());
  CHECK(result.row_offsets.front() == 0);
  for (std::size_t r = 0; r < expected.size(); ++r) {
    INFO("row " << r);
    const auto first = std::size_t(result.row_offsets[r]), last = std::size_t(result.row_offsets[r + 1]);
    const std::vector<Index> columns(result.columns.begin() + long(first), result.columns.begin() + long(last));
    CHECK(columns == expected[r].columns);
    if (columns != expected[r].columns) continue;
    double kept = 0;
    for (std::size_t t = 0; t < columns.size(); ++t) {
      INFO("column " << columns[t]);
      CHECK(result.probabilities[first + t] == Approx(expected[r].probabilities[t]).margin(1e-13).epsilon(1e-12));
      kept += expected[r].probabilities[t];
    }
    CHECK(result.dropped_mass[r] == Approx(1 - kept).margin(1e-13));
  }
}

// Two score rows: row 0 = [0, 1, 2, 3, -1] (m = 3), row 1 = [2, 2, 0.5, -3, 1] (m = 2, a tie at the max).
Eigen::MatrixXd two_score_rows() {
  Eigen::MatrixXd scores(2, 5);
  scores << 0, 1, 2, 3, -1,  //
      2, 2, 0.5, -3, 1;
  return scores;
}

double e(double a) { return std::exp(a); }

}  // namespace

TEST_CASE("Top-θ decode statistics: elements per query head, the V-row union per KV head, tiles without survivor",
          "[stats][top_theta]") {
  const Passes passes = GENERATE(Passes::one, Passes::two);
  auto problem = group_problem(1);
  const auto table = LayerThresholds::uniform(2, ThresholdSpace::raw_score, {1.0, 1.0});
  TopThetaOptions options = decode_options();
  options.passes = passes;
  AttentionStats stats;
  // KV tiles [0, 4), [4, 8), [8, 12): survivors {1, 3}, {5}, none.
  top_theta_attention<Tiles<1, 4>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                   options, &stats);
  INFO("passes " << (passes == Passes::one ? "one" : "two"));
  CHECK(stats.elements_kept == Counts{2, 2});
  CHECK(stats.elements_visible == Counts{12, 12});
  CHECK(stats.v_rows_kept == Counts{3});
  CHECK(stats.v_rows_visible == Counts{12});
  CHECK(stats.k_rows_read == Counts{12});
  CHECK(stats.v_rows_read == Counts{3});
  CHECK(stats.kv_tiles == 3);
  CHECK(stats.kv_tiles_without_survivor == 1);
  CHECK(stats.rows == 2);
  CHECK(stats.dense_rows == 0);
  CHECK(stats.empty_rows == 0);
  CHECK(stats.capped_rows == 0);
  CHECK(stats.extrapolated_rows == 0);
  CHECK(stats.kept_fraction() == Approx(4.0 / 24.0));
  CHECK(stats.v_rows_kept_fraction() == Approx(3.0 / 12.0));
  // Equal kept scores and no compensation: each head averages its two kept V rows.
  CHECK(output_of(problem, 0, 0) == mean_of_rows(1, 3));
  CHECK(output_of(problem, 0, 1) == mean_of_rows(3, 5));

  // One KV tile of 128 holds the whole row: it has survivors, and the union is read once.
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options, &stats);
  CHECK(stats.kv_tiles == 1);
  CHECK(stats.kv_tiles_without_survivor == 0);
  CHECK(stats.v_rows_read == Counts{3});
  CHECK(stats.v_rows_kept == Counts{3});
  CHECK(stats.k_rows_read == Counts{12});
}

TEST_CASE("a row with no survivor keeps its max-score key, ties to the larger position, and counts as empty",
          "[stats][top_theta]") {
  auto problem = group_problem(1);
  // θ = 100 is above every score. Head 0's max 5 sits at 1 and 3 (one tile), head 1's at 3 and 5 (two tiles).
  const auto table = LayerThresholds::uniform(2, ThresholdSpace::raw_score, {100.0, 100.0});
  AttentionStats stats;
  top_theta_attention<Tiles<1, 4>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                   decode_options(), &stats);
  CHECK(stats.empty_rows == 2);
  CHECK(stats.elements_kept == Counts{1, 1});
  CHECK(stats.v_rows_kept == Counts{2});
  CHECK(stats.v_rows_read == Counts{2});
  CHECK(stats.kv_tiles == 3);
  CHECK(stats.kv_tiles_without_survivor == 3);
  CHECK(output_of(problem, 0, 0) == row(3));
  CHECK(output_of(problem, 0, 1) == row(5));

  // The same through the two-pass kernel and through one tile.
  TopThetaOptions two = decode_options();
  two.passes = Passes::two;
  top_theta_attention<Tiles<1, 16>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table, two,
                                    &stats);
  CHECK(stats.empty_rows == 2);
  CHECK(output_of(problem, 0, 0) == row(3));
  CHECK(output_of(problem, 0, 1) == row(5));
}

TEST_CASE("cap_k keeps the k survivors with the largest positions and counts capped rows", "[stats][top_theta]") {
  auto problem = group_problem(1);
  const bool cap_k = GENERATE(false, true);
  const Index k = GENERATE(1, 2);
  const auto table = LayerThresholds::uniform(k, ThresholdSpace::raw_score, {1.0, 1.0});
  TopThetaOptions options = decode_options();
  options.cap_k = cap_k;
  AttentionStats stats;
  top_theta_attention<Tiles<1, 4>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                   options, &stats);
  INFO("cap_k " << cap_k << " k " << k);
  if (cap_k && k == 1) {  // {1, 3} -> {3}, {3, 5} -> {5}
    CHECK(stats.capped_rows == 2);
    CHECK(stats.elements_kept == Counts{1, 1});
    CHECK(stats.v_rows_kept == Counts{2});
    CHECK(output_of(problem, 0, 0) == row(3));
    CHECK(output_of(problem, 0, 1) == row(5));
  } else {  // no cap, or |S| = 2 <= k
    CHECK(stats.capped_rows == 0);
    CHECK(stats.elements_kept == Counts{2, 2});
    CHECK(stats.v_rows_kept == Counts{3});
    CHECK(output_of(problem, 0, 0) == mean_of_rows(1, 3));
    CHECK(output_of(problem, 0, 1) == mean_of_rows(3, 5));
  }
}

TEST_CASE("rows with L <= k stay dense and are counted as dense rows", "[stats][top_theta]") {
  auto problem = group_problem(1);
  const Index k = GENERATE(11, 12, 20);
  const auto table = LayerThresholds::uniform(k, ThresholdSpace::raw_score, {1.0, 1.0});
  AttentionStats stats;
  top_theta_attention<Tiles<1, 4>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                   decode_options(), &stats);
  INFO("k " << k);
  if (k >= n_kv) {
    CHECK(stats.dense_rows == 2);
    CHECK(stats.elements_kept == Counts{12, 12});
    CHECK(stats.v_rows_kept == Counts{12});
    CHECK(stats.v_rows_read == Counts{12});
    CHECK(stats.kv_tiles_without_survivor == 0);
  } else {
    CHECK(stats.dense_rows == 0);
    CHECK(stats.elements_kept == Counts{2, 2});
  }
}

TEST_CASE("rows whose threshold lookup leaves the calibrated lengths are counted as extrapolated",
          "[stats][top_theta]") {
  auto problem = group_problem(1);
  struct Case {
    std::vector<Index> lengths;
    std::uint64_t extrapolated;
  };
  const Case cases[] = {{{4, 8}, 2}, {{4, 12}, 0}, {{12, 20}, 0}, {{13, 20}, 2}, {{5, 11, 12, 30}, 0}};
  for (const Case& c : cases) {
    const Eigen::MatrixXd theta = Eigen::MatrixXd::Ones(2, Index(c.lengths.size()));
    const LayerThresholds table(2, ThresholdSpace::raw_score, c.lengths, theta);
    AttentionStats stats;
    top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, decode_options(),
                        &stats);
    INFO("first calibrated length " << c.lengths.front() << ", last " << c.lengths.back());
    CHECK(stats.extrapolated_rows == c.extrapolated);
    CHECK(stats.elements_kept == Counts{2, 2});
  }
}

TEST_CASE("causal prefill statistics: dense, empty and extrapolated rows and kept elements per row length",
          "[stats][top_theta][prefill]") {
  // Twelve query rows (L = 1..12), k = 2, θ = 1 calibrated at L = 4 and 8.
  // Head 0 keeps: L <= 2 dense (L), L = 3 {1}, L >= 4 {1, 3}: 1 + 2 + 1 + 9 * 2 = 22.
  // Head 1 keeps: L <= 2 dense, L = 3 nothing survives -> max-score key 0, L = 4, 5 {3}, L >= 6 {3, 5}:
  //   1 + 2 + 1 + 2 * 1 + 7 * 2 = 20.
  auto problem = group_problem(n_kv);
  const Eigen::MatrixXd theta = Eigen::MatrixXd::Ones(2, 2);
  const LayerThresholds table(2, ThresholdSpace::raw_score, {4, 8}, theta);
  TopThetaOptions options;
  options.attention.scale = 1.0;
  AttentionStats stats;
  top_theta_attention<Tiles<4, 4>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                   options, &stats);
  CHECK(stats.rows == 24);
  CHECK(stats.dense_rows == 4);
  CHECK(stats.extrapolated_rows == 2 * (1 + 4));  // L = 3 and L = 9..12, per head (dense rows look up nothing)
  CHECK(stats.empty_rows == 1);
  CHECK(stats.elements_kept == Counts{22, 20});
  CHECK(stats.elements_visible == Counts{78, 78});
  CHECK(stats.v_rows_kept == Counts{4});  // {0, 1} (dense rows and head 1's empty row), {1, 3}, {3, 5}
  CHECK(stats.v_rows_visible == Counts{12});
  CHECK(output_of(problem, 2, 1) == row(0));  // head 1, L = 3: the max-score key y_0 = 0
  CHECK(output_of(problem, 2, 0) == row(1));  // head 0, L = 3: {1}
}

TEST_CASE("V rows read count every query block's loads, so two blocks keeping the same rows read them twice",
          "[stats][top_theta][prefill]") {
  // Two identical query rows, non-causal, one query row per block: each block keeps the union {1, 3, 5}.
  auto problem = group_problem(2);
  const auto table = LayerThresholds::uniform(2, ThresholdSpace::raw_score, {1.0, 1.0});
  TopThetaOptions options;
  options.attention.causal = false;
  options.attention.scale = 1.0;
  AttentionStats stats;
  top_theta_attention<Tiles<1, 4>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                   options, &stats);
  CHECK(stats.v_rows_kept == Counts{3});
  CHECK(stats.v_rows_read == Counts{6});
  CHECK(stats.k_rows_read == Counts{24});
  CHECK(stats.kv_tiles == 6);
  CHECK(stats.kv_tiles_without_survivor == 2);
  CHECK(stats.elements_kept == Counts{4, 4});
  CHECK(stats.elements_visible == Counts{24, 24});
  CHECK(stats.rows == 4);
  CHECK(stats.v_rows_visible == Counts{12});

  // Both rows in one block: the block loads the union once.
  top_theta_attention<Tiles<2, 4>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                   options, &stats);
  CHECK(stats.v_rows_read == Counts{3});
  CHECK(stats.k_rows_read == Counts{12});
  CHECK(stats.kv_tiles == 3);
}

TEST_CASE("causal tiles above the diagonal are never scored: K rows read and KV tiles of a causal prefill",
          "[stats][dense][prefill]") {
  // Dense, n = 12. Tiles<1, 4>: row i scores ceil((i + 1) / 4) tiles and i + 1 K rows: 24 tiles, 78 rows.
  // Tiles<4, 4>: block b (rows 4b..4b+3) scores b + 1 tiles and 4b + 4 K rows: 6 tiles, 24 rows.
  auto problem = group_problem(n_kv);
  AttentionOptions options;
  options.scale = 1.0;
  AttentionStats stats;
  dense_attention<Tiles<1, 4>>(problem.queries(), problem.keys(), problem.values(), problem.output(), options, &stats);
  CHECK(stats.kv_tiles == 24);
  CHECK(stats.k_rows_read == Counts{78});
  CHECK(stats.v_rows_read == Counts{78});
  CHECK(stats.elements_kept == Counts{78, 78});
  CHECK(stats.elements_visible == Counts{78, 78});
  CHECK(stats.dense_rows == 24);
  CHECK(stats.rows == 24);
  CHECK(stats.kv_tiles_without_survivor == 0);
  CHECK(stats.v_rows_kept == Counts{12});
  CHECK(stats.v_rows_visible == Counts{12});

  dense_attention<Tiles<4, 4>>(problem.queries(), problem.keys(), problem.values(), problem.output(), options, &stats);
  CHECK(stats.kv_tiles == 6);
  CHECK(stats.k_rows_read == Counts{24});
  CHECK(stats.v_rows_read == Counts{24});
  CHECK(stats.elements_kept == Counts{78, 78});
}

TEST_CASE("AttentionStats::merge adds every counter, and an empty one takes the other's shape", "[stats]") {
  AttentionStats a, b;
  a.reset(2, 1);
  b.reset(2, 1);
  a.elements_kept = {1, 2};
  b.elements_kept = {10, 20};
  a.elements_visible = {3, 4};
  b.elements_visible = {30, 40};
  a.v_rows_kept = {5};
  b.v_rows_kept = {50};
  a.v_rows_visible = {6};
  b.v_rows_visible = {60};
  a.k_rows_read = {7};
  b.k_rows_read = {70};
  a.v_rows_read = {8};
  b.v_rows_read = {80};
  a.kv_tiles = 9, b.kv_tiles = 90;
  a.kv_tiles_without_survivor = 11, b.kv_tiles_without_survivor = 110;
  a.rows = 12, b.rows = 120;
  a.dense_rows = 13, b.dense_rows = 130;
  a.empty_rows = 14, b.empty_rows = 140;
  a.capped_rows = 15, b.capped_rows = 150;
  a.extrapolated_rows = 16, b.extrapolated_rows = 160;

  AttentionStats total;  // empty: takes the shape of the first merged
  total.merge(a);
  total.merge(b);
  CHECK(total.elements_kept == Counts{11, 22});
  CHECK(total.elements_visible == Counts{33, 44});
  CHECK(total.v_rows_kept == Counts{55});
  CHECK(total.v_rows_visible == Counts{66});
  CHECK(total.k_rows_read == Counts{77});
  CHECK(total.v_rows_read == Counts{88});
  CHECK(total.kv_tiles == 99);
  CHECK(total.kv_tiles_without_survivor == 121);
  CHECK(total.rows == 132);
  CHECK(total.dense_rows == 143);
  CHECK(total.empty_rows == 154);
  CHECK(total.capped_rows == 165);
  CHECK(total.extrapolated_rows == 176);
  CHECK(total.kept_fraction() == Approx(33.0 / 77.0));
  CHECK(total.v_rows_kept_fraction() == Approx(55.0 / 66.0));

  // Merging the stats of two kernel calls (two decode steps) adds their counters.
  auto problem = group_problem(1);
  const auto table = LayerThresholds::uniform(2, ThresholdSpace::raw_score, {1.0, 1.0});
  AttentionStats step, steps;
  for (int s = 0; s < 2; ++s) {
    top_theta_attention<Tiles<1, 4>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                     decode_options(), &step);
    steps.merge(step);
  }
  CHECK(steps.elements_kept == Counts{4, 4});
  CHECK(steps.elements_visible == Counts{24, 24});
  CHECK(steps.v_rows_kept == Counts{6});
  CHECK(steps.v_rows_read == Counts{6});
  CHECK(steps.kv_tiles == 6);
  CHECK(steps.kv_tiles_without_survivor == 2);
  CHECK(steps.rows == 4);
}

TEST_CASE("a kernel's stats are reset by each call, not accumulated", "[stats]") {
  auto problem = group_problem(1);
  const auto table = LayerThresholds::uniform(2, ThresholdSpace::raw_score, {1.0, 1.0});
  AttentionStats stats;
  for (int call = 0; call < 2; ++call) {
    top_theta_attention<Tiles<1, 4>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                     decode_options(), &stats);
    INFO("call " << call);
    CHECK(stats.elements_kept == Counts{2, 2});
    CHECK(stats.rows == 2);
  }
}

TEMPLATE_TEST_CASE("top-k keeps min(L, k) elements per row", "[stats][top_k]", float, double) {
  const Index k = GENERATE(1, 3, 12, 13);
  const bool causal = GENERATE(true, false);
  Problem<TestType> problem(12, 12, 4, 2, 16, 3);
  TopKOptions options;
  options.k = k;
  options.attention.causal = causal;
  AttentionStats stats;
  top_k_attention<Tiles<4, 8>>(problem.queries(), problem.keys(), problem.values(), problem.output(), options, &stats);
  std::uint64_t kept = 0, visible = 0, dense = 0;
  for (Index i = 0; i < 12; ++i) {
    const Index L = causal ? i + 1 : 12;
    kept += std::uint64_t(std::min(L, k));
    visible += std::uint64_t(L);
    dense += L <= k;
  }
  INFO("k " << k << " causal " << causal);
  CHECK(stats.elements_kept == Counts(4, kept));
  CHECK(stats.elements_visible == Counts(4, visible));
  CHECK(stats.dense_rows == 4 * dense);
  CHECK(stats.rows == 48);
  CHECK(stats.empty_rows == 0);
}

TEST_CASE("top-k decode keeps the k largest scores, ties to the larger position, with the group's V-row union",
          "[stats][top_k]") {
  auto problem = group_problem(1);
  TopKOptions options;
  options.attention = decode_options().attention;
  options.k = 2;
  AttentionStats stats;
  top_k_attention<Tiles<1, 4>>(problem.queries(), problem.keys(), problem.values(), problem.output(), options, &stats);
  CHECK(stats.elements_kept == Counts{2, 2});
  CHECK(stats.v_rows_kept == Counts{3});
  CHECK(stats.v_rows_read == Counts{3});
  CHECK(stats.kv_tiles_without_survivor == 1);
  CHECK(output_of(problem, 0, 0) == mean_of_rows(1, 3));
  CHECK(output_of(problem, 0, 1) == mean_of_rows(3, 5));

  options.k = 1;  // ties of the max: 3 beats 1 for head 0, 5 beats 3 for head 1
  top_k_attention<Tiles<1, 4>>(problem.queries(), problem.keys(), problem.values(), problem.output(), options, &stats);
  CHECK(stats.elements_kept == Counts{1, 1});
  CHECK(stats.v_rows_kept == Counts{2});
  CHECK(output_of(problem, 0, 0) == row(3));
  CHECK(output_of(problem, 0, 1) == row(5));
}

// ---- thresholded_softmax, the standalone primitive ----

TEST_CASE("thresholded_softmax with a raw-score θ keeps a > θ and each compensation matches its formula",
          "[stats][thresholded_softmax]") {
  // θ = 1.5, k = 1. Row 0 keeps {2, 3}: m = 3, D = e^-1 + 1, pruned {0, 1, 4}.
  // Row 1 keeps {0, 1}: m = 2, D = 2, pruned {2, 3, 4}.
  const DenominatorCompensation mode =
      GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact, DenominatorCompensation::exp_threshold,
               DenominatorCompensation::calibrated);
  const double lambda = GENERATE(0.5, 1.0);
  const double c = 0.3;
  double C0 = 0, C1 = 0;
  switch (mode) {
    case DenominatorCompensation::none:
      break;
    case DenominatorCompensation::exact:
      C0 = e(0 - 3.0) + e(1 - 3.0) + e(-1 - 3.0);
      C1 = e(0.5 - 2.0) + e(-3 - 2.0) + e(1 - 2.0);
      break;
    case DenominatorCompensation::exp_threshold:
      C0 = 3 * e(1.5 - 3.0);
      C1 = 3 * e(1.5 - 2.0);
      break;
    case DenominatorCompensation::calibrated:
      C0 = C1 = c;
      break;
  }
  const double den0 = e(-1) + 1 + lambda * C0, den1 = 2 + lambda * C1;
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::raw_score, {1.5}, {c});
  const TopThetaSelection selection(table, {mode, lambda, false}, false, Passes::automatic);
  AttentionStats stats;
  const auto result = thresholded_softmax(two_score_rows(), selection, {}, &stats);
  INFO(to_string(mode) << " lambda " << lambda);
  check_rows(result, {{{2, 3}, {e(-1) / den0, 1 / den0}}, {{0, 1}, {1 / den1, 1 / den1}}});
  CHECK(stats.elements_kept == Counts{4});
  CHECK(stats.elements_visible == Counts{10});
  CHECK(stats.rows == 2);
  CHECK(stats.dense_rows == 0);
  CHECK(stats.empty_rows == 0);
  CHECK(stats.capped_rows == 0);
  CHECK(stats.extrapolated_rows == 0);
}

TEST_CASE("thresholded_softmax in the probability space keeps P > θ at the full softmax probability",
          "[stats][thresholded_softmax]") {
  // θ = 0.2: row 0 P = {0.032, 0.086, 0.234, 0.636, 0.012} keeps {2, 3}; row 1 P = {0.385, 0.385, 0.086,
  // 0.002, 0.142} keeps {0, 1}.
  const double Z0 = e(-3) + e(-2) + e(-1) + 1 + e(-4), Z1 = 1 + 1 + e(-1.5) + e(-5) + e(-1);
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::probability, {0.2});
  const TopThetaSelection selection(table, {}, false, Passes::automatic);
  AttentionStats stats;
  const auto result = thresholded_softmax(two_score_rows(), selection, {}, &stats);
  check_rows(result, {{{2, 3}, {e(-1) / Z0, 1 / Z0}}, {{0, 1}, {1 / Z1, 1 / Z1}}});
  CHECK(stats.elements_kept == Counts{4});
}

TEST_CASE("thresholded_softmax in the score_minus_max and score_over_query_norm spaces",
          "[stats][thresholded_softmax]") {
  const bool over_norm = GENERATE(false, true);
  std::vector<ExpectedRow> expected;
  ScoreRows rows;
  double theta = 0;
  if (over_norm) {
    // ||q|| = {2, 0.5}, θ = 0.8: τ = {1.6, 0.4}; row 0 keeps {2, 3}, row 1 keeps {0, 1, 2, 4}.
    // Exp-threshold: C0 = 3 e^(1.6 - 3), C1 = 1 e^(0.4 - 2).
    theta = 0.8;
    rows.query_norms = {2.0, 0.5};
    const double den0 = e(-1) + 1 + 3 * e(1.6 - 3), den1 = 2 + e(-1.5) + e(-1) + e(0.4 - 2);
    expected = {{{2, 3}, {e(-1) / den0, 1 / den0}}, {{0, 1, 2, 4}, {1 / den1, 1 / den1, e(-1.5) / den1, e(-1) / den1}}};
  } else {
    // θ = -1.2: τ = m - 1.2 = {1.8, 0.8}; row 0 keeps {2, 3}, row 1 keeps {0, 1, 4}.
    // Exp-threshold: C0 = 3 e^(-1.2), C1 = 2 e^(-1.2).
    theta = -1.2;
    const double den0 = e(-1) + 1 + 3 * e(-1.2), den1 = 2 + e(-1) + 2 * e(-1.2);
    expected = {{{2, 3}, {e(-1) / den0, 1 / den0}}, {{0, 1, 4}, {1 / den1, 1 / den1, e(-1) / den1}}};
  }
  const auto table = LayerThresholds::uniform(
      1, over_norm ? ThresholdSpace::score_over_query_norm : ThresholdSpace::score_minus_max, {theta});
  const TopThetaSelection selection(table, {DenominatorCompensation::exp_threshold, 1.0, false}, false,
                                    Passes::automatic);
  INFO((over_norm ? "score_over_query_norm" : "score_minus_max"));
  check_rows(thresholded_softmax(two_score_rows(), selection, rows), expected);
}

TEST_CASE("thresholded_softmax never returns an empty row: the max-score key, ties to the larger position",
          "[stats][thresholded_softmax]") {
  // θ = 10 is above every score: row 0 keeps {3} (m = 3), row 1 keeps {1} (the tie 2 at 0 and 1).
  const bool exact = GENERATE(false, true);
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::raw_score, {10.0});
  const TopThetaSelection selection(
      table, {exact ? DenominatorCompensation::exact : DenominatorCompensation::none, 1.0, false}, false,
      Passes::automatic);
  AttentionStats stats;
  const auto result = thresholded_softmax(two_score_rows(), selection, {}, &stats);
  const double den0 = exact ? 1 + e(-3) + e(-2) + e(-1) + e(-4) : 1.0;
  const double den1 = exact ? 1 + 1 + e(-1.5) + e(-5) + e(-1) : 1.0;
  INFO("exact " << exact);
  check_rows(result, {{{3}, {1 / den0}}, {{1}, {1 / den1}}});
  CHECK(stats.empty_rows == 2);
  CHECK(stats.elements_kept == Counts{2});
}

TEST_CASE("thresholded_softmax with cap_k keeps the k survivors with the largest positions",
          "[stats][thresholded_softmax]") {
  // θ = 1.5, k = 1: row 0 {2, 3} -> {3}, row 1 {0, 1} -> {1}. The capped survivor counts as pruned.
  const DenominatorCompensation mode =
      GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact, DenominatorCompensation::exp_threshold);
  double C0 = 0, C1 = 0;
  if (mode == DenominatorCompensation::exact) {
    C0 = e(-1) + e(-2) + e(-3) + e(-4);
    C1 = 1 + e(-1.5) + e(-5) + e(-1);
  } else if (mode == DenominatorCompensation::exp_threshold) {  // (L - |S|) e^(θ - m)
    C0 = 4 * e(1.5 - 3);
    C1 = 4 * e(1.5 - 2);
  }
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::raw_score, {1.5});
  const TopThetaSelection selection(table, {mode, 1.0, false}, true, Passes::automatic);
  AttentionStats stats;
  const auto result = thresholded_softmax(two_score_rows(), selection, {}, &stats);
  INFO(to_string(mode));
  check_rows(result, {{{3}, {1 / (1 + C0)}}, {{1}, {1 / (1 + C1)}}});
  CHECK(stats.capped_rows == 2);
  CHECK(stats.elements_kept == Counts{2});
}

TEST_CASE("thresholded_softmax honours row lengths and the per-row dense rule", "[stats][thresholded_softmax]") {
  const auto table = LayerThresholds::uniform(1, ThresholdSpace::raw_score, {1.5});
  const TopThetaSelection selection(table, {DenominatorCompensation::exact, 1.0, false}, false, Passes::automatic);
  AttentionStats stats;
  {
    // Lengths {3, 5}: row 0 sees [0, 1, 2], keeps {2} (m = 2, D = 1), pruned e^-2 + e^-1.
    ScoreRows rows;
    rows.lengths = {3, 5};
    const auto result = thresholded_softmax(two_score_rows(), selection, rows, &stats);
    const double den1 = 2 + e(-1.5) + e(-5) + e(-1);
    check_rows(result, {{{2}, {1 / (1 + e(-2) + e(-1))}}, {{0, 1}, {1 / den1, 1 / den1}}});
    CHECK(stats.elements_visible == Counts{8});
    CHECK(stats.elements_kept == Counts{3});
    CHECK(stats.dense_rows == 0);
  }
  {
    // Lengths {1, 2}: row 0 (L = 1 <= k) is dense; row 1 sees [2, 2], both above θ.
    ScoreRows rows;
    rows.lengths = {1, 2};
    const auto result = thresholded_softmax(two_score_rows(), selection, rows, &stats);
    check_rows(result, {{{0}, {1.0}}, {{0, 1}, {0.5, 0.5}}});
    CHECK(stats.dense_rows == 1);
    CHECK(stats.elements_visible == Counts{3});
    CHECK(stats.elements_kept == Counts{3});
  }
  {
    // k = 5 >= L: both rows dense, the plain softmax.
    const auto dense_table = LayerThresholds::uniform(5, ThresholdSpace::raw_score, {1.5});
    const TopThetaSelection dense(dense_table, {DenominatorCompensation::exact, 1.0, false}, false, Passes::automatic);
    const auto result = thresholded_softmax(two_score_rows(), dense, {}, &stats);
    const double Z0 = e(-3) + e(-2) + e(-1) + 1 + e(-4), Z1 = 1 + 1 + e(-1.5) + e(-5) + e(-1);
    check_rows(result, {{{0, 1, 2, 3, 4}, {e(-3) / Z0, e(-2) / Z0, e(-1) / Z0, 1 / Z0, e(-4) / Z0}},
                        {{0, 1, 2, 3, 4}, {1 / Z1, 1 / Z1, e(-1.5) / Z1, e(-5) / Z1, e(-1) / Z1}}});
    CHECK(stats.dense_rows == 2);
  }
}

TEST_CASE("thresholded_softmax looks up θ for the given query head and row length, flagging extrapolation",
          "[stats][thresholded_softmax]") {
  // Head 0 would keep nothing (θ = 100); head 1 uses θ = 1.5, calibrated at L = 5 and 10, so L = 3
  // extrapolates.
  Eigen::MatrixXd theta(2, 2);
  theta << 100, 100,  //
      1.5, 1.5;
  const LayerThresholds table(1, ThresholdSpace::raw_score, {5, 10}, theta);
  const TopThetaSelection selection(table, {}, false, Passes::automatic);
  ScoreRows rows;
  rows.query_head = 1;
  rows.lengths = {3, 5};
  AttentionStats stats;
  const auto result = thresholded_softmax(two_score_rows(), selection, rows, &stats);
  check_rows(result, {{{2}, {1.0}}, {{0, 1}, {0.5, 0.5}}});
  CHECK(stats.extrapolated_rows == 1);
  CHECK(stats.empty_rows == 0);
}

TEST_CASE("thresholded_softmax with top-k keeps the k largest and bounds pruned terms by the (k+1)-th",
          "[stats][thresholded_softmax][top_k]") {
  // k = 2: row 0 keeps {2, 3}, (k+1)-th largest 1; row 1 keeps {0, 1}, (k+1)-th largest 1.
  const bool exp_threshold = GENERATE(false, true);
  const TopKSelection selection(
      2, {exp_threshold ? DenominatorCompensation::exp_threshold : DenominatorCompensation::none, 1.0, false});
  AttentionStats stats;
  const auto result = thresholded_softmax(two_score_rows(), selection, {}, &stats);
  const double den0 = e(-1) + 1 + (exp_threshold ? 3 * e(1 - 3.0) : 0.0);
  const double den1 = 2 + (exp_threshold ? 3 * e(1 - 2.0) : 0.0);
  INFO("exp_threshold " << exp_threshold);
  check_rows(result, {{{2, 3}, {e(-1) / den0, 1 / den0}}, {{0, 1}, {1 / den1, 1 / den1}}});
  CHECK(stats.elements_kept == Counts{4});
  CHECK(stats.rows == 2);
}
