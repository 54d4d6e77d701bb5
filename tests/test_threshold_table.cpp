// LayerThresholds::lookup (design.md §1, "Calibration"): exact calibrated lengths, linear interpolation
// between them, the nearest value (flagged as extrapolated) outside them, and length-independent tables.
#include "test_support.hpp"

using namespace toptheta;
using namespace toptheta_test;
namespace {

/// Two heads calibrated at L = 10, 20, 40.
LayerThresholds three_length_table(bool with_terms = true) {
  Eigen::MatrixXd theta(2, 3), terms(2, 3);
  theta << 1.0, 2.0, 4.0,  //
      -1.0, 0.5, 0.5;
  terms << 0.1, 0.3, 0.2,  //
      2.0, 1.0, 0.0;
  if (!with_terms) terms.resize(0, 0);
  return LayerThresholds(3, ThresholdSpace::score_minus_max, {10, 20, 40}, theta, terms);
}

constexpr double exact = 1e-12;

}  // namespace

TEST_CASE("a threshold table reports its k, space, heads and calibrated lengths", "[threshold_table]") {
  const auto table = three_length_table();
  CHECK(table.k() == 3);
  CHECK(table.space() == ThresholdSpace::score_minus_max);
  CHECK(table.heads() == 2);
  CHECK(table.lengths() == std::vector<Index>{10, 20, 40});
  CHECK_FALSE(table.length_independent());
  CHECK(table.has_denominator_terms());
  CHECK_FALSE(three_length_table(false).has_denominator_terms());
}

TEST_CASE("lookup at a calibrated length returns that column exactly and does not extrapolate", "[threshold_table]") {
  const auto table = three_length_table();
  const Index lengths[] = {10, 20, 40};
  const double theta[2][3] = {{1.0, 2.0, 4.0}, {-1.0, 0.5, 0.5}};
  const double terms[2][3] = {{0.1, 0.3, 0.2}, {2.0, 1.0, 0.0}};
  for (Index h = 0; h < 2; ++h)
    for (int l = 0; l < 3; ++l) {
      const auto found = table.lookup(h, lengths[l]);
      INFO("head " << h << " length " << lengths[l]);
      CHECK(found.theta == theta[h][l]);
      CHECK(found.denominator_term == terms[h][l]);
      CHECK_FALSE(found.extrapolated);
    }
}

TEST_CASE("lookup between calibrated lengths interpolates θ and c linearly", "[threshold_table]") {
  const auto table = three_length_table();
  struct Case {
    Index head, length;
    double theta, term;
  };
  // θ(L) = θ_left + (L - L_left) / (L_right - L_left) (θ_right - θ_left), the same for c.
  const Case cases[] = {
      {0, 15, 1.0 + 0.5 * (2.0 - 1.0), 0.1 + 0.5 * (0.3 - 0.1)},
      {0, 12, 1.0 + 0.2 * (2.0 - 1.0), 0.1 + 0.2 * (0.3 - 0.1)},
      {0, 19, 1.0 + 0.9 * (2.0 - 1.0), 0.1 + 0.9 * (0.3 - 0.1)},
      {0, 30, 2.0 + 0.5 * (4.0 - 2.0), 0.3 + 0.5 * (0.2 - 0.3)},
      {0, 21, 2.0 + 0.05 * (4.0 - 2.0), 0.3 + 0.05 * (0.2 - 0.3)},
      {0, 39, 2.0 + 0.95 * (4.0 - 2.0), 0.3 + 0.95 * (0.2 - 0.3)},
      {1, 15, -1.0 + 0.5 * (0.5 - -1.0), 2.0 + 0.5 * (1.0 - 2.0)},
      {1, 11, -1.0 + 0.1 * (0.5 - -1.0), 2.0 + 0.1 * (1.0 - 2.0)},
      {1, 25, 0.5, 1.0 + 0.25 * (0.0 - 1.0)},
  };
  for (const Case& c : cases) {
    const auto found = table.lookup(c.head, c.length);
    INFO("head " << c.head << " length " << c.length);
    CHECK(found.theta == Approx(c.theta).margin(exact));
    CHECK(found.denominator_term == Approx(c.term).margin(exact));
    CHECK_FALSE(found.extrapolated);
  }
}

TEST_CASE("lookup outside the calibrated lengths answers the nearest length and says it extrapolated",
          "[threshold_table]") {
  const auto table = three_length_table();
  for (Index length : {Index(1), Index(5), Index(9)}) {
    INFO("length " << length);
    const auto head0 = table.lookup(0, length), head1 = table.lookup(1, length);
    CHECK(head0.theta == 1.0);
    CHECK(head0.denominator_term == 0.1);
    CHECK(head0.extrapolated);
    CHECK(head1.theta == -1.0);
    CHECK(head1.denominator_term == 2.0);
    CHECK(head1.extrapolated);
  }
  for (Index length : {Index(41), Index(100), Index(1) << 40}) {
    INFO("length " << length);
    const auto head0 = table.lookup(0, length), head1 = table.lookup(1, length);
    CHECK(head0.theta == 4.0);
    CHECK(head0.denominator_term == 0.2);
    CHECK(head0.extrapolated);
    CHECK(head1.theta == 0.5);
    CHECK(head1.denominator_term == 0.0);
    CHECK(head1.extrapolated);
  }
}

TEST_CASE("a table calibrated at one length answers it exactly and extrapolates every other length",
          "[threshold_table]") {
  Eigen::MatrixXd theta(1, 1);
  theta << 0.25;
  const LayerThresholds table(2, ThresholdSpace::raw_score, {8}, theta);
  CHECK_FALSE(table.lookup(0, 8).extrapolated);
  CHECK(table.lookup(0, 8).theta == 0.25);
  for (Index length : {1, 7, 9, 1000}) {
    INFO("length " << length);
    CHECK(table.lookup(0, length).extrapolated);
    CHECK(table.lookup(0, length).theta == 0.25);
  }
}

TEST_CASE("a uniform table answers every length with its per-head value and never extrapolates", "[threshold_table]") {
  const auto table = LayerThresholds::uniform(4, ThresholdSpace::probability, {0.01, 0.02, 0.03}, {0.5, 0.0, 7.0});
  CHECK(table.length_independent());
  CHECK(table.heads() == 3);
  CHECK(table.k() == 4);
  CHECK(table.space() == ThresholdSpace::probability);
  CHECK(table.has_denominator_terms());
  const double theta[] = {0.01, 0.02, 0.03}, terms[] = {0.5, 0.0, 7.0};
  for (Index h = 0; h < 3; ++h)
    for (Index length : {Index(1), Index(2), Index(5), Index(4096), Index(1) << 40}) {
      const auto found = table.lookup(h, length);
      INFO("head " << h << " length " << length);
      CHECK(found.theta == theta[h]);
      CHECK(found.denominator_term == terms[h]);
      CHECK_FALSE(found.extrapolated);
    }
}

TEST_CASE("a table without denominator terms looks up c = 0", "[threshold_table]") {
  const auto uniform = LayerThresholds::uniform(4, ThresholdSpace::raw_score, {1.0, 2.0});
  CHECK_FALSE(uniform.has_denominator_terms());
  CHECK(uniform.lookup(1, 100).theta == 2.0);
  CHECK(uniform.lookup(1, 100).denominator_term == 0.0);
  const auto table = three_length_table(false);
  CHECK(table.lookup(0, 15).theta == Approx(1.5).margin(exact));
  CHECK(table.lookup(0, 15).denominator_term == 0.0);
  CHECK(table.lookup(1, 100).denominator_term == 0.0);
}

TEST_CASE("the kernel uses the interpolated θ of each row length", "[threshold_table][top_theta]") {
  // One head, head_dim 1, scale 1, q = [1], keys with a_j = 0.1 j + 0.05, values v_j = j^2, causal prefill, k
  // = 2. θ(L) runs linearly from 0.2 at L = 4 to 1.0 at L = 12: θ(L) = 0.1 (L - 2), so a_j > θ(L) ⇔ j >= L -
  // 2 and rows L = 4..12 keep {L - 2, L - 1} (a margin of 0.05 from θ: no rounding can flip it). Outside [4,
  // 12] the nearest θ answers: L = 3 uses 0.2 and keeps {2}; L = 13, 14 use 1.0 and keep j >= 10. L = 1, 2
  // stay dense.
  const Index n = 14;
  Problem<double> problem(n, n, 1, 1, 1, 5);
  for (Index j = 0; j < n; ++j) {
    problem.q[std::size_t(j)] = 1.0;
    problem.k[std::size_t(j)] = 0.1 * double(j) + 0.05;
    problem.v[std::size_t(j)] = double(j * j);
  }
  Eigen::MatrixXd theta(1, 2);
  theta << 0.2, 1.0;
  const LayerThresholds table(2, ThresholdSpace::raw_score, {4, 12}, theta);
  TopThetaOptions options;
  options.attention.scale = 1.0;
  AttentionStats stats;
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options, &stats);
  std::uint64_t expected_kept = 1 + 2 + 1;  // L = 1, 2 (dense), 3
  for (Index L = 4; L <= 12; ++L) expected_kept += 2;
  expected_kept += 3 + 4;  // L = 13: {10, 11, 12}; L = 14: {10, ..., 13}
  CHECK(stats.elements_kept == std::vector<std::uint64_t>{expected_kept});
  CHECK(stats.extrapolated_rows == 3);  // L = 3, 13, 14
  CHECK(stats.dense_rows == 2);
  // No compensation: row L = 3 outputs v_2; rows L = 4..12 the softmax of {L - 2, L - 1}, a gap of 0.1.
  CHECK(problem.out[2] == Approx(4.0).margin(1e-12));
  for (Index L = 4; L <= 12; ++L) {
    const double a = double((L - 2) * (L - 2)), b = double((L - 1) * (L - 1));
    INFO("row length " << L);
    CHECK(problem.out[std::size_t(L - 1)] == Approx((std::exp(-0.1) * a + b) / (std::exp(-0.1) + 1)).epsilon(1e-12));
  }
}
