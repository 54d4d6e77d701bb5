// Calibration (design.md §1, "Calibration"): length buckets, sample thresholds and denominator terms per row,
// mean + σ_add·std, count-matched thresholds, sampling, merging, and the tables they produce.
#include "test_support.hpp"

#include <toptheta/calibrator.hpp>
#include <toptheta/threshold_io.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>

using namespace toptheta;
using namespace toptheta_test;
namespace {

const ThresholdSpace all_spaces[] = {ThresholdSpace::raw_score, ThresholdSpace::probability,
                                     ThresholdSpace::score_minus_max, ThresholdSpace::score_over_query_norm};

/// Random score rows with the features that make rows differ: per-row scale and offset, a sink at 0, a few
/// salient keys.
struct RandomRows {
  std::vector<Eigen::VectorXd> scores;
  std::vector<double> norms;

  RandomRows(std::size_t count, Index min_length, Index max_length, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::uniform_int_distribution<Index> length(min_length, max_length);
    for (std::size_t r = 0; r < count; ++r) {
      const Index n = length(rng);
      const double scale = std::exp(0.4 * normal(rng)), offset = normal(rng);
      Eigen::VectorXd row(n);
      for (Index j = 0; j < n; ++j) row(j) = offset + scale * normal(rng);
      row(0) += 6;
      for (Index j = 1; j < n; j += 17) row(j) += 3;
      scores.push_back(row);
      norms.push_back(std::exp(0.3 * normal(rng)) * 5);
    }
  }
};

/// The value of score `a` of a row in `space` (design.md §1), written out plainly.
double value_in(ThresholdSpace space, double a, const Eigen::VectorXd& row, double norm) {
  const double max = row.maxCoeff(), sum = (row.array() - max).exp().sum();
  switch (space) {
    case ThresholdSpace::raw_score:
      return a;
    case ThresholdSpace::probability:
      return std::exp(a - max) / sum;
    case ThresholdSpace::score_minus_max:
      return a - max;
    case ThresholdSpace::score_over_query_norm:
      return a / norm;
  }
  return a;
}

/// The (k+1)-th largest value of the row in `space`, and its C_i (the mass not above it), by sorting.
std::pair<double, double> sample_threshold(ThresholdSpace space, const Eigen::VectorXd& row, double norm, Index k) {
  std::vector<double> sorted(row.data(), row.data() + row.size());
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  const double cut = sorted[std::size_t(k)], max = row.maxCoeff();
  double pruned = 0;
  for (Index j = 0; j < row.size(); ++j)
    if (row(j) <= cut) pruned += std::exp(row(j) - max);
  return {value_in(space, cut, row, norm), pruned};
}

CalibratorOptions one_head(ThresholdSpace space, Index k, LengthBuckets buckets = {}) {
  CalibratorOptions options;
  options.shape = {1, 1, 1, 64};
  options.space = space;
  options.k = {k};
  options.buckets = buckets;
  return options;
}

/// 300 rows of lengths 64..`max_length` for each of two heads of layer 0, observed by `calibrator` and returned:
/// head 0's flat (normal scores of spread 0.5), head 1's peaked (spread 3).
std::array<std::vector<Eigen::VectorXd>, 2> observe_flat_and_peaked_rows(Calibrator& calibrator, Index max_length,
                                                                         unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_int_distribution<Index> length(64, max_length);
  std::array<std::vector<Eigen::VectorXd>, 2> rows;
  for (Index head = 0; head < 2; ++head)
    for (int r = 0; r < 300; ++r) {
      Eigen::VectorXd row(length(rng));
      for (Index j = 0; j < row.size(); ++j) row(j) = (head == 0 ? 0.5 : 3.0) * normal(rng);
      calibrator.observe_row(0, head, row);
      rows[std::size_t(head)].push_back(row);
    }
  return rows;
}

bool same_table(const ThresholdTable& a, const ThresholdTable& b, double relative) {
  if (a.layers() != b.layers()) return false;
  for (Index l = 0; l < a.layers(); ++l) {
    const auto &x = a.layer(l), &y = b.layer(l);
    if (x.lengths() != y.lengths() || a.samples(l) != b.samples(l)) return false;
    const double theta_scale = std::max(1e-300, y.theta().cwiseAbs().maxCoeff());
    if ((x.theta() - y.theta()).cwiseAbs().maxCoeff() > relative * theta_scale) return false;
    if (x.has_denominator_terms() != y.has_denominator_terms()) return false;
    if (x.has_denominator_terms()) {
      const double term_scale = std::max(1e-300, y.denominator_terms().cwiseAbs().maxCoeff());
      if ((x.denominator_terms() - y.denominator_terms()).cwiseAbs().maxCoeff() > relative * term_scale) return false;
    }
  }
  return true;
}

}  // namespace

TEST_CASE("length buckets: exact lengths up to the limit, then log-linear buckets that tile every length",
          "[calibration][buckets]") {
  const LengthBuckets buckets{64, 16};
  for (Index length = 1; length <= 64; ++length) {
    CHECK(buckets.bucket(length) == length - 1);
    CHECK(buckets.representative(length - 1) == length);
  }
  // Consecutive buckets tile the lengths without gaps; each geometric bucket spans at most a factor 1 + 1/16.
  const Index last_bucket = buckets.bucket(Index(1) << 24);
  for (Index b = 0; b < last_bucket; ++b) {
    INFO("bucket " << b);
    REQUIRE(buckets.first_length(b + 1) == buckets.last_length(b) + 1);
    REQUIRE(buckets.bucket(buckets.first_length(b)) == b);
    REQUIRE(buckets.bucket(buckets.last_length(b)) == b);
    const Index representative = buckets.representative(b);
    REQUIRE(representative >= buckets.first_length(b));
    REQUIRE(representative <= buckets.last_length(b));
    if (b >= 64) REQUIRE(double(buckets.last_length(b) + 1) <= (1 + 1.0 / 16) * double(buckets.first_length(b)) + 1e-9);
  }
  CHECK(buckets.first_length(64) == 65);
  // Bounded: 64 exact lengths plus 16 buckets per doubling (2^e starts a new doubling).
  CHECK(buckets.bucket_count(4095) == 64 + 6 * 16);
  CHECK(buckets.bucket_count(4096) == 64 + 6 * 16 + 1);
  CHECK(buckets.bucket_count((Index(1) << 17) - 1) == 64 + 11 * 16);
  CHECK(buckets.bucket_count(LengthBuckets::max_length) == 64 + 44 * 16 + 1);
  // The same with one bucket per doubling, and with a limit that is not a power of two.
  const LengthBuckets coarse{5, 1};
  CHECK(coarse.bucket(5) == 4);
  CHECK(coarse.bucket(6) == 5);  // [6, 7]
  CHECK(coarse.last_length(5) == 7);
  CHECK(coarse.bucket(8) == 6);  // [8, 15]
  CHECK(coarse.first_length(6) == 8);
  CHECK(coarse.last_length(6) == 15);
  CHECK(coarse.representative(6) == 11);
}

TEST_CASE("length bucket schemes and lengths out of range are rejected by name", "[calibration][buckets]") {
  CHECK_THROWS_WITH(LengthBuckets({0, 1}).validate(), mentions("buckets.exact_limit"));
  CHECK_THROWS_WITH(LengthBuckets({64, 12}).validate(), mentions("power of two"));
  CHECK_THROWS_WITH(LengthBuckets({8, 16}).validate(), mentions("at most exact_limit"));
  CHECK_THROWS_WITH(LengthBuckets{}.bucket(0), mentions("length"));
  CHECK_THROWS_WITH(LengthBuckets{}.bucket(LengthBuckets::max_length + 1), mentions("2^50"));
  CHECK_THROWS_AS(LengthBuckets{}.first_length(-1), toptheta::invalid_argument);
}

TEST_CASE("each row contributes its (k+1)-th largest value and the mass not above it, in every space",
          "[calibration]") {
  const ThresholdSpace space = GENERATE(from_range(std::begin(all_spaces), std::end(all_spaces)));
  const Index k = 5;
  const LengthBuckets exact{64, 1};
  Calibrator calibrator(one_head(space, k, exact));
  const RandomRows rows(40, 20, 20, 3);  // one length: one bucket
  std::vector<double> thresholds, terms;
  for (std::size_t r = 0; r < rows.scores.size(); ++r) {
    calibrator.observe_row(0, 0, rows.scores[r], rows.norms[r]);
    const auto [threshold, term] = sample_threshold(space, rows.scores[r], rows.norms[r], k);
    thresholds.push_back(threshold);
    terms.push_back(term);
  }
  const double mean = std::accumulate(thresholds.begin(), thresholds.end(), 0.0) / 40;
  double squares = 0;
  for (double t : thresholds) squares += (t - mean) * (t - mean);
  const double deviation = std::sqrt(squares / 40);  // population standard deviation
  const double term_mean = std::accumulate(terms.begin(), terms.end(), 0.0) / 40;

  INFO(to_string(space));
  const BucketStatistics statistics = calibrator.statistics(0, 0, exact.bucket(20));
  CHECK(statistics.rows == 40);
  CHECK(statistics.threshold_mean == Approx(mean).epsilon(1e-12));
  CHECK(statistics.threshold_std == Approx(deviation).epsilon(1e-10));
  CHECK(statistics.denominator_mean == Approx(term_mean).epsilon(1e-12));
  CHECK(statistics.values == 40 * 20);

  for (double sigma : {0.0, 1.0, -0.5, 2.0}) {
    TableOptions options;
    options.sigma_add = sigma;
    const ThresholdTable table = calibrator.table(options);
    INFO("σ_add " << sigma);
    CHECK(table.layer(0).lengths() == std::vector<Index>{20});
    CHECK(table.lookup(0, 0, 20).theta == Approx(mean + sigma * deviation).epsilon(1e-10));
    CHECK(table.lookup(0, 0, 20).denominator_term == Approx(term_mean).epsilon(1e-12));
    CHECK(table.samples(0)(0, 0) == 40);
    CHECK(table.sigma_add() == sigma);
    CHECK(table.method() == CalibrationMethod::mean_of_thresholds);
  }
}

TEST_CASE("long rows (sampled selection floor) contribute their exact (k+1)-th largest value, float and double",
          "[calibration]") {
  const ThresholdSpace space = GENERATE(from_range(std::begin(all_spaces), std::end(all_spaces)));
  for (const Index k : {16, 64}) {
    const RandomRows rows(6, 1500, 5000, 41 + unsigned(k));
    for (std::size_t r = 0; r < rows.scores.size(); ++r) {
      const Eigen::VectorXd& row = rows.scores[r];
      const Index length = row.size();
      const LengthBuckets exact{8192, 1};
      Calibrator doubles(one_head(space, k, exact)), floats(one_head(space, k, exact));
      doubles.observe_row(0, 0, row, rows.norms[r]);
      const Eigen::VectorXf row_float = row.cast<float>();
      floats.observe_row(0, 0, row_float.data(), length, rows.norms[r]);
      const auto [threshold, term] = sample_threshold(space, row, rows.norms[r], k);
      const auto [threshold_float, term_float] = sample_threshold(space, row_float.cast<double>(), rows.norms[r], k);
      INFO(to_string(space) << ", k " << k << ", length " << length);
      const BucketStatistics d = doubles.statistics(0, 0, exact.bucket(length));
      const BucketStatistics f = floats.statistics(0, 0, exact.bucket(length));
      CHECK(d.threshold_mean == Approx(threshold).epsilon(1e-12));
      CHECK(d.denominator_mean == Approx(term).epsilon(1e-10));
      CHECK(f.threshold_mean == Approx(threshold_float).epsilon(1e-5));  // float exp and sums in the row
      CHECK(f.denominator_mean == Approx(term_float).epsilon(1e-4));
    }
  }
}

TEST_CASE("the r-th largest by branch-free quickselect equals nth_element, with ties", "[calibration]") {
  std::mt19937 rng(5);
  std::vector<float> buffer;
  for (const Index count : {1, 2, 47, 48, 49, 300, 4096}) {
    for (const int distinct : {2, 7, 1000000}) {  // few distinct values: many ties
      std::uniform_int_distribution<int> value(0, distinct - 1);
      std::vector<float> values(static_cast<std::size_t>(count));
      for (float& v : values) v = float(value(rng)) * 0.25f - 3.0f;
      const std::vector<float> original = values;
      for (const Index rank : {Index(1), (count + 1) / 2, count}) {
        std::vector<float> sorted = original;
        std::sort(sorted.begin(), sorted.end(), std::greater<float>());
        INFO("count " << count << ", distinct " << distinct << ", rank " << rank);
        CHECK(detail::rank_largest(values.data(), count, rank, buffer) == sorted[std::size_t(rank - 1)]);
        CHECK(values == original);
      }
    }
  }
}

TEST_CASE("gathering the values at or above a floor keeps them in order, for float and double", "[calibration]") {
  std::mt19937 rng(9);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (const Index count : {0, 1, 15, 16, 17, 100, 1023}) {
    std::vector<double> values(static_cast<std::size_t>(count));
    for (double& v : values) v = std::round(normal(rng) * 4) / 4;  // ties at the floor
    const std::vector<float> floats(values.begin(), values.end());
    for (const double floor : {-10.0, -0.5, 0.0, 1.25, 10.0}) {
      std::vector<double> expected;
      for (double v : values)
        if (v >= floor) expected.push_back(v);
      std::vector<double> out_double(values.size() + 1);
      std::vector<float> out_float(values.size() + 1);
      const Index gathered_double = detail::gather_at_least(values.data(), count, floor, out_double.data());
      const Index gathered_float = detail::gather_at_least(floats.data(), count, float(floor), out_float.data());
      INFO("count " << count << ", floor " << floor);
      REQUIRE(gathered_double == Index(expected.size()));
      REQUIRE(gathered_float == Index(expected.size()));
      for (std::size_t i = 0; i < expected.size(); ++i) {
        CHECK(out_double[i] == expected[i]);
        CHECK(out_float[i] == float(expected[i]));
      }
    }
  }
}

TEST_CASE("count-matched thresholds do not depend on summing masses, also for values below the window",
          "[calibration][count_matched]") {
  const ThresholdSpace space = GENERATE(from_range(std::begin(all_spaces), std::end(all_spaces)));
  CalibratorOptions counts_only = one_head(space, 4, LengthBuckets{16, 1});
  CalibratorOptions with_masses = counts_only;
  with_masses.summary_masses = true;
  Calibrator a(counts_only), b(with_masses);
  RandomRows rows(300, 20, 60, 13);
  // Rows of tiny and of large scores: the window (24 binades below the largest value) leaves some values below
  // it, which take the histogram's other counting path.
  for (std::size_t r = 0; r < rows.scores.size(); r += 3) rows.scores[r] *= r % 2 == 0 ? 1e-9 : 1e4;
  for (std::size_t r = 0; r < rows.scores.size(); ++r) {
    a.observe_row(0, 0, rows.scores[r], rows.norms[r]);
    b.observe_row(0, 0, rows.scores[r], rows.norms[r]);
  }
  TableOptions options;
  options.method = CalibrationMethod::count_matched;
  INFO(to_string(space));
  CHECK(a.table(options).layer(0).theta() == b.table(options).layer(0).theta());
  CHECK(a.memory_bytes() < b.memory_bytes());
}

TEST_CASE("rows of length <= k stay dense and are not calibrated", "[calibration]") {
  Calibrator calibrator(one_head(ThresholdSpace::raw_score, 8));
  const RandomRows rows(30, 1, 8, 4);
  for (const auto& row : rows.scores) calibrator.observe_row(0, 0, row);
  CHECK(calibrator.rows_offered() == 30);
  CHECK(calibrator.rows_dense() == 30);
  CHECK(calibrator.rows_used() == 0);
  CHECK_THROWS_WITH(calibrator.table(), mentions("layer 0") && mentions("longer than k = 8"));
  TableOptions keep_all;
  keep_all.missing = MissingCalibration::keep_all;
  const ThresholdTable table = calibrator.table(keep_all);
  CHECK(table.layer(0).length_independent());
  CHECK(table.lookup(0, 0, 1000).theta == std::numeric_limits<double>::lowest());
  CHECK(table.samples(0)(0, 0) == 0);
}

TEST_CASE("a tie of the top k+1 scores cuts every element, and C_i leaves out the kept max-score key",
          "[calibration]") {
  Calibrator calibrator(one_head(ThresholdSpace::raw_score, 2, {64, 1}));
  const Eigen::VectorXd row = (Eigen::VectorXd(6) << 1.0, 3.0, 3.0, 0.0, 3.0, -1.0).finished();
  calibrator.observe_row(0, 0, row);
  const BucketStatistics statistics = calibrator.statistics(0, 0, 5);
  CHECK(statistics.threshold_mean == 3.0);
  // S_i = {a > 3} is empty, so the kernel keeps one key of score 3: C_i = Z - 1 with Z = 3 + e^-2 + e^-3 + e^-4.
  CHECK(statistics.denominator_mean == Approx(2 + std::exp(-2.0) + std::exp(-3.0) + std::exp(-4.0)).epsilon(1e-14));
}

TEST_CASE("observing a block of rows equals observing them one by one, for float and double scores", "[calibration]") {
  const ThresholdSpace space = GENERATE(ThresholdSpace::raw_score, ThresholdSpace::score_over_query_norm);
  const Index k = 4;
  const Index rows = 50, columns = 70;
  std::mt19937 rng(9);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> block(rows, columns);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < columns; ++j) block(i, j) = normal(rng) + (j == 0 ? 4.0f : 0.0f);
  std::vector<Index> lengths;
  std::vector<double> norms;
  for (Index i = 0; i < rows; ++i) {
    lengths.push_back(20 + i);  // causal rows of a prefill with past = 19
    norms.push_back(1.0 + 0.01 * double(i));
  }
  Calibrator by_block(one_head(space, k)), by_row(one_head(space, k)), by_pointer(one_head(space, k));
  by_block.observe_rows(0, 0, block, lengths, norms);
  for (Index i = 0; i < rows; ++i) {
    by_row.observe_row(0, 0, block.row(i).head(lengths[std::size_t(i)]), norms[std::size_t(i)]);
    by_pointer.observe_row(0, 0, block.row(i).data(), lengths[std::size_t(i)], norms[std::size_t(i)]);
  }
  const ThresholdTable a = by_block.table(), b = by_row.table(), c = by_pointer.table();
  CHECK(same_table(a, b, 0.0));
  CHECK(same_table(a, c, 0.0));
  // A column-major double copy of the scores gives the same table to float precision (float rows are
  // calibrated in float).
  Calibrator from_double(one_head(space, k));
  const Eigen::MatrixXd doubles = block.cast<double>();
  from_double.observe_rows(0, 0, doubles, lengths, norms);
  CHECK(same_table(from_double.table(), a, 1e-5));
}

TEST_CASE("two calibrators fed disjoint rows, merged, give the table of one calibrator fed all rows",
          "[calibration][merge]") {
  const ThresholdSpace space = GENERATE(from_range(std::begin(all_spaces), std::end(all_spaces)));
  CalibratorOptions options;
  options.shape = {2, 3, 1, 64};
  options.space = space;
  options.k = {4, 9};
  options.buckets = {16, 4};
  options.summary_masses = true;  // for the table_threshold denominator terms
  const RandomRows rows(600, 5, 300, 11);
  Calibrator all(options), first(options), second(options);
  for (std::size_t r = 0; r < rows.scores.size(); ++r) {
    const Index layer = Index(r % 2), head = Index((r / 2) % 3);
    all.observe_row(layer, head, rows.scores[r], rows.norms[r]);
    (r % 5 < 2 ? first : second).observe_row(layer, head, rows.scores[r], rows.norms[r]);
  }
  Calibrator merged = first;
  merged.merge(second);
  CHECK(merged.rows_offered() == all.rows_offered());
  CHECK(merged.rows_used() == all.rows_used());
  CHECK(merged.rows_dense() == all.rows_dense());
  INFO(to_string(space));
  for (const auto method : {CalibrationMethod::mean_of_thresholds, CalibrationMethod::count_matched})
    for (const auto terms : {DenominatorTermSource::row_threshold, DenominatorTermSource::table_threshold}) {
      TableOptions table_options;
      table_options.method = method;
      table_options.sigma_add = method == CalibrationMethod::mean_of_thresholds ? 0.7 : 0.0;
      table_options.denominator_terms = terms;
      const ThresholdTable expected = all.table(table_options), got = merged.table(table_options);
      INFO(to_string(method) << ", denominator terms " << int(terms));
      CHECK(same_table(got, expected, 1e-12));
      for (Index l = 0; l < 2; ++l) CHECK(got.samples(l) == expected.samples(l));  // bitwise
      if (method == CalibrationMethod::count_matched)                              // from exact histogram counts
        for (Index l = 0; l < 2; ++l) CHECK(got.layer(l).theta() == expected.layer(l).theta());
    }
}

TEST_CASE("calibrators with different options do not merge", "[calibration][merge]") {
  const Calibrator base(one_head(ThresholdSpace::raw_score, 4));
  Calibrator other_k(one_head(ThresholdSpace::raw_score, 5)), other_space(one_head(ThresholdSpace::probability, 4));
  Calibrator other_buckets(one_head(ThresholdSpace::raw_score, 4, {32, 8}));
  Calibrator copy = base;
  CHECK_THROWS_WITH(copy.merge(other_k), mentions("same k"));
  CHECK_THROWS_WITH(copy.merge(other_space), mentions("raw_score space"));
  CHECK_THROWS_WITH(copy.merge(other_buckets), mentions("same length buckets"));
  CalibratorOptions different_seed = one_head(ThresholdSpace::raw_score, 4);
  different_seed.seed = 77;
  different_seed.sample_fraction = 0.5;
  CHECK_NOTHROW(copy.merge(Calibrator(different_seed)));
}

TEST_CASE("row sampling is deterministic for a seed and observation order and uses about the fraction",
          "[calibration][sampling]") {
  const RandomRows rows(2000, 10, 40, 5);
  auto run = [&](std::uint64_t seed, double fraction) {
    CalibratorOptions options = one_head(ThresholdSpace::raw_score, 4);
    options.seed = seed;
    options.sample_fraction = fraction;
    Calibrator calibrator(options);
    for (const auto& row : rows.scores) calibrator.observe_row(0, 0, row);
    return calibrator;
  };
  const Calibrator a = run(42, 0.25), b = run(42, 0.25), c = run(43, 0.25), everything = run(42, 1.0);
  CHECK(a.rows_used() == b.rows_used());
  CHECK(same_table(a.table(), b.table(), 0.0));
  CHECK_FALSE(same_table(a.table(), c.table(), 0.0));
  CHECK(everything.rows_used() == 2000);
  // Binomial(2000, 0.25): mean 500, standard deviation 19.4; ±5σ.
  CHECK(a.rows_used() > 400);
  CHECK(a.rows_used() < 600);
  CHECK(a.rows_offered() == 2000);
}

TEST_CASE("a head without rows in some buckets is filled from its own calibrated buckets with 0 samples",
          "[calibration]") {
  CalibratorOptions options = one_head(ThresholdSpace::raw_score, 2, {64, 1});
  options.shape.q_heads = 2;
  options.shape.kv_heads = 1;
  Calibrator calibrator(options);
  auto constant_gap_row = [](Index length, double top) {  // the 3rd largest is top - 2
    Eigen::VectorXd row = Eigen::VectorXd::Constant(length, top - 5);
    row(0) = top;
    row(1) = top - 1;
    row(2) = top - 2;
    return row;
  };
  calibrator.observe_row(0, 0, constant_gap_row(10, 2.0));
  calibrator.observe_row(0, 0, constant_gap_row(30, 6.0));
  calibrator.observe_row(0, 1, constant_gap_row(10, 1.0));
  calibrator.observe_row(0, 1, constant_gap_row(20, 3.0));
  calibrator.observe_row(0, 1, constant_gap_row(30, 5.0));
  const ThresholdTable table = calibrator.table();
  REQUIRE(table.layer(0).lengths() == std::vector<Index>{10, 20, 30});
  CHECK(table.samples(0)(0, 1) == 0);  // head 0 never saw length 20
  CHECK(table.samples(0)(1, 1) == 1);
  CHECK(table.layer(0).theta()(0, 0) == 0.0);
  CHECK(table.layer(0).theta()(0, 1) == Approx(2.0).margin(1e-15));  // halfway between 0 and 4
  CHECK(table.layer(0).theta()(0, 2) == 4.0);
  CHECK(table.layer(0).theta()(1, 1) == 1.0);

  // A head with no row at all.
  options.shape.q_heads = 3;
  Calibrator partial(options);
  partial.observe_row(0, 0, constant_gap_row(10, 2.0));
  CHECK_THROWS_WITH(partial.table(), mentions("layer 0 head 1"));
  TableOptions keep_all;
  keep_all.missing = MissingCalibration::keep_all;
  const ThresholdTable filled = partial.table(keep_all);
  CHECK(filled.lookup(0, 2, 10).theta == std::numeric_limits<double>::lowest());
  CHECK(filled.samples(0)(2, 0) == 0);
}

TEST_CASE("table lookups interpolate between bucket representatives and extrapolate only outside the buckets",
          "[calibration]") {
  const LengthBuckets buckets{8, 2};  // 9..11, 12..15, 16..23, 24..31, ...
  Calibrator calibrator(one_head(ThresholdSpace::raw_score, 2, buckets));
  calibrator.observe_row(0, 0, Eigen::VectorXd::LinSpaced(12, 0.0, 11.0));  // bucket 12..15, rep 13, θ = 9
  calibrator.observe_row(0, 0, Eigen::VectorXd::LinSpaced(20, 0.0, 19.0));  // bucket 16..23, rep 19, θ = 17
  const ThresholdTable table = calibrator.table();
  CHECK(table.layer(0).lengths() == std::vector<Index>{13, 19});
  CHECK(table.lookup(0, 0, 13).theta == 9.0);
  CHECK(table.lookup(0, 0, 16).theta == Approx(9.0 + 8.0 * 3 / 6).epsilon(1e-14));
  CHECK_FALSE(table.lookup(0, 0, 12).extrapolated);  // in the first calibrated bucket
  CHECK(table.lookup(0, 0, 12).theta == 9.0);
  CHECK_FALSE(table.lookup(0, 0, 23).extrapolated);  // in the last calibrated bucket
  CHECK(table.lookup(0, 0, 11).extrapolated);
  CHECK(table.lookup(0, 0, 24).extrapolated);
  CHECK(table.lookup(0, 0, 24).theta == 17.0);
  CHECK_THROWS_WITH(table.lookup(1, 0, 10), mentions("layer"));
  CHECK_THROWS_WITH(table.lookup(0, 1, 10), mentions("head"));
}

TEST_CASE("count-matched thresholds keep k on average over the calibration rows, to the histogram's resolution",
          "[calibration][count_matched]") {
  const ThresholdSpace space = GENERATE(from_range(std::begin(all_spaces), std::end(all_spaces)));
  const Index k = 8;
  const LengthBuckets one_bucket{16, 1};  // lengths 64..127 share one bucket
  CalibratorOptions calibrator_options = one_head(space, k, one_bucket);
  calibrator_options.summary_masses = true;  // for the table_threshold denominator term
  Calibrator calibrator(calibrator_options);
  const RandomRows rows(400, 64, 127, 21);
  for (std::size_t r = 0; r < rows.scores.size(); ++r) calibrator.observe_row(0, 0, rows.scores[r], rows.norms[r]);
  TableOptions options;
  options.method = CalibrationMethod::count_matched;
  options.denominator_terms = DenominatorTermSource::table_threshold;
  const ThresholdTable table = calibrator.table(options);
  REQUIRE(table.layer(0).lengths().size() == 1);
  const double theta = table.layer(0).theta()(0, 0), term = table.layer(0).denominator_terms()(0, 0);
  // Survivors and pruned mass at θ, counted exactly.
  double kept = 0, pruned_mass = 0, kept_by_mean = 0;
  const double mean_theta = calibrator.statistics(0, 0, one_bucket.bucket(64)).threshold_mean;
  for (std::size_t r = 0; r < rows.scores.size(); ++r) {
    const Eigen::VectorXd& row = rows.scores[r];
    const double max = row.maxCoeff();
    for (Index j = 0; j < row.size(); ++j) {
      const double value = value_in(space, row(j), row, rows.norms[r]);
      kept += value > theta;
      kept_by_mean += value > mean_theta;
      if (!(value > theta)) pruned_mass += std::exp(row(j) - max);
    }
  }
  const double mean_kept = kept / 400, mean_pruned = pruned_mass / 400;
  INFO(to_string(space) << ": mean survivors " << mean_kept << " (mean of thresholds: " << kept_by_mean / 400
                        << "), k = " << k);
  CHECK(std::abs(mean_kept - double(k)) <= 0.01 * double(k));
  CHECK(term == Approx(mean_pruned).epsilon(0.01));
  CHECK(table.method() == CalibrationMethod::count_matched);
  CHECK_FALSE(table.sigma_add().has_value());
}

TEST_CASE("mass-matched thresholds leave out the target mass on average, keeping more of flat rows than peaked",
          "[calibration][mass_matched]") {
  // Head 0 sees flat rows (scores of spread 0.5), head 1 peaked ones (spread 3): the same ε must keep more keys
  // of the flat head. The mean pruned mass at θ is counted exactly from the rows.
  const double epsilon = GENERATE(0.005, 0.02, 0.1);
  const Index k = 8;
  const LengthBuckets one_bucket{16, 1};  // lengths 64..127 share one bucket
  CalibratorOptions calibrator_options = one_head(ThresholdSpace::probability, k, one_bucket);
  calibrator_options.shape.q_heads = 2;
  Calibrator calibrator(calibrator_options);
  const auto rows = observe_flat_and_peaked_rows(calibrator, 127, 5);
  TableOptions options;
  options.method = CalibrationMethod::mass_matched;
  options.pruned_mass = epsilon;
  const ThresholdTable table = calibrator.table(options);
  REQUIRE(table.layer(0).lengths().size() == 1);
  double mean_kept[2];
  for (Index head = 0; head < 2; ++head) {
    const double theta = table.layer(0).theta()(head, 0);
    double pruned = 0, kept = 0;
    for (const Eigen::VectorXd& row : rows[head])
      for (Index j = 0; j < row.size(); ++j) {
        const double p = value_in(ThresholdSpace::probability, row(j), row, 0);
        if (p <= theta)
          pruned += p;
        else
          kept += 1;
      }
    const double mean_pruned = pruned / double(rows[head].size());
    mean_kept[head] = kept / double(rows[head].size());
    INFO("head " << head << " ε " << epsilon << ": mean pruned mass " << mean_pruned << ", mean kept "
                 << mean_kept[head]);
    // Bins are 1/16 of their values wide (4 mantissa bits), so the masses summed per bin are within 3.2 %.
    CHECK(std::abs(mean_pruned - epsilon) <= 0.04 * epsilon);
  }
  CHECK(mean_kept[0] > 2 * mean_kept[1]);
  CHECK(table.method() == CalibrationMethod::mass_matched);
  CHECK_FALSE(table.sigma_add().has_value());
  // The method survives a save and load.
  CHECK(thresholds_from_json(thresholds_to_json(table)).method() == CalibrationMethod::mass_matched);
}

TEST_CASE("mass- and budget-matched calibration need probability thresholds, mass-matched a mass in (0, 1)",
          "[calibration][mass_matched][budget_matched][bad_input]") {
  TableOptions options;
  Calibrator raw(one_head(ThresholdSpace::raw_score, 4));
  raw.observe_row(0, 0, Eigen::VectorXd::LinSpaced(10, 0.0, 1.0));
  options.method = CalibrationMethod::budget_matched;
  CHECK_THROWS_WITH(raw.table(options), mentions("options.method") && mentions("probability"));
  options.method = CalibrationMethod::mass_matched;
  CHECK_THROWS_WITH(raw.table(options), mentions("options.method") && mentions("probability"));
  Calibrator probability(one_head(ThresholdSpace::probability, 4));
  probability.observe_row(0, 0, Eigen::VectorXd::LinSpaced(10, 0.0, 1.0));
  for (const double bad : {0.0, 1.0, -0.1, std::numeric_limits<double>::quiet_NaN()}) {
    options.pruned_mass = bad;
    CHECK_THROWS_WITH(probability.table(options), mentions("options.pruned_mass"));
  }
  options.pruned_mass = 0.01;
  options.sigma_add = 1;
  CHECK_THROWS_WITH(probability.table(options), mentions("options.sigma_add"));
  // A table file cannot claim mass-matched thresholds in another space.
  std::string text = thresholds_to_json(raw.table());
  const std::string method = "\"method\": \"mean_of_thresholds\"";
  REQUIRE(text.find(method) != std::string::npos);
  text.replace(text.find(method), method.size(), "\"method\": \"mass_matched\"");
  const std::string sigma = "\"sigma_add\": ";
  const std::size_t at = text.find(sigma);
  REQUIRE(at != std::string::npos);
  text.replace(at, text.find(',', at) - at, "\"sigma_add\": null");
  CHECK_THROWS_WITH(thresholds_from_json(text), mentions("mass_matched only with probability thresholds"));
  text.replace(text.find("mass_matched"), std::string("mass_matched").size(), "budget_matched");
  CHECK_THROWS_WITH(thresholds_from_json(text), mentions("budget_matched only with probability thresholds"));
}

TEST_CASE("a budget-matched layer spends its k per row where the probabilities are largest, over its heads",
          "[calibration][budget_matched]") {
  // k = 2 for 2 rows: 4 survivors in all. Pooled, the 4 largest probabilities are 0.7 of the peaked head and
  // 0.3, 0.28, 0.22 of the flat one (count-matched per head would keep 2 of each).
  CalibratorOptions calibrator_options = one_head(ThresholdSpace::probability, 2);
  calibrator_options.shape.q_heads = 2;
  Calibrator calibrator(calibrator_options);
  const Eigen::Vector4d peaked(0.7, 0.2, 0.06, 0.04), flat(0.3, 0.28, 0.22, 0.2);
  calibrator.observe_row(0, 0, Eigen::VectorXd(peaked.array().log()));
  calibrator.observe_row(0, 1, Eigen::VectorXd(flat.array().log()));
  TableOptions options;
  options.method = CalibrationMethod::budget_matched;
  const ThresholdTable table = calibrator.table(options);
  const double theta = table.layer(0).theta()(0, 0);
  CHECK(table.layer(0).theta()(1, 0) == theta);
  INFO("θ = " << theta);
  CHECK(theta >= 0.2);
  CHECK(theta < 0.22);
  CHECK(table.method() == CalibrationMethod::budget_matched);
  CHECK_FALSE(table.sigma_add().has_value());
  CHECK(thresholds_from_json(thresholds_to_json(table)).method() == CalibrationMethod::budget_matched);
}

TEST_CASE(
    "budget-matched thresholds keep k per row over a layer's heads and lengths, leaving out less mass than "
    "count-matched ones",
    "[calibration][budget_matched]") {
  // Head 0 sees flat rows, head 1 peaked ones, of lengths 64..511 in several buckets. Survivors and pruned
  // masses are counted exactly from the rows at each table's θ.
  const Index k = 8;
  CalibratorOptions calibrator_options = one_head(ThresholdSpace::probability, k);
  calibrator_options.shape.q_heads = 2;
  Calibrator calibrator(calibrator_options);
  const auto rows = observe_flat_and_peaked_rows(calibrator, 511, 9);
  TableOptions options;
  options.method = CalibrationMethod::budget_matched;
  const ThresholdTable budget = calibrator.table(options);
  options.method = CalibrationMethod::count_matched;
  const ThresholdTable count = calibrator.table(options);
  REQUIRE(budget.layer(0).lengths().size() > 4);
  const double theta = budget.layer(0).theta()(0, 0);
  CHECK((budget.layer(0).theta().array() == theta).all());
  const auto kept_and_pruned = [&](const ThresholdTable& table, Index head) {
    double kept = 0, pruned = 0;
    for (const Eigen::VectorXd& row : rows[head]) {
      const double row_theta = table.layer(0).lookup(head, row.size()).theta;
      for (Index j = 0; j < row.size(); ++j) {
        const double p = value_in(ThresholdSpace::probability, row(j), row, 0);
        if (p > row_theta)
          kept += 1;
        else
          pruned += p;
      }
    }
    return std::pair<double, double>(kept, pruned);
  };
  const auto [budget_flat, budget_flat_pruned] = kept_and_pruned(budget, 0);
  const auto [budget_peaked, budget_peaked_pruned] = kept_and_pruned(budget, 1);
  const auto [count_flat, count_flat_pruned] = kept_and_pruned(count, 0);
  const auto [count_peaked, count_peaked_pruned] = kept_and_pruned(count, 1);
  const double rows_total = 600, budget_kept = budget_flat + budget_peaked, count_kept = count_flat + count_peaked;
  INFO("budget: kept " << budget_flat / 300 << " + " << budget_peaked / 300 << " per row, pruned "
                       << (budget_flat_pruned + budget_peaked_pruned) / rows_total << "; count-matched: kept "
                       << count_flat / 300 << " + " << count_peaked / 300 << ", pruned "
                       << (count_flat_pruned + count_peaked_pruned) / rows_total);
  // Bins are 1/16 of their values wide (4 mantissa bits): the survivor count is within 1 % of k R.
  CHECK(std::abs(budget_kept / rows_total - double(k)) <= 0.01 * double(k));
  CHECK(std::abs(count_kept / rows_total - double(k)) <= 0.02 * double(k));
  CHECK(budget_peaked > 2 * budget_flat);
  // Keeping the largest probabilities of the pooled rows leaves out less mass than any other split of as many
  // survivors, such as count-matched's k of each head and length (which here keeps a few more, and still
  // leaves out more).
  CHECK(budget_kept <= count_kept);
  CHECK(budget_flat_pruned + budget_peaked_pruned < count_flat_pruned + count_peaked_pruned);
}

TEST_CASE("calibration arguments are checked by name", "[calibration][bad_input]") {
  CalibratorOptions options = one_head(ThresholdSpace::raw_score, 4);
  options.k = {0};
  CHECK_THROWS_WITH(Calibrator(options), mentions("options.k[0]"));
  options.k = {4, 4};
  CHECK_THROWS_WITH(Calibrator(options), mentions("options.k") && mentions("one per layer (1)"));
  options.k = {4};
  options.sample_fraction = 0;
  CHECK_THROWS_WITH(Calibrator(options), mentions("options.sample_fraction"));
  options.sample_fraction = 1;
  options.shape.kv_heads = 2;
  CHECK_THROWS_WITH(Calibrator(options), mentions("options.shape.kv_heads"));
  options.shape.kv_heads = 1;
  options.summary_mantissa_bits = 40;
  CHECK_THROWS_WITH(Calibrator(options), mentions("options.summary.mantissa_bits"));
  options.summary_mantissa_bits = 6;

  Calibrator calibrator(options);
  Eigen::VectorXd row = Eigen::VectorXd::LinSpaced(10, 0.0, 1.0);
  CHECK_THROWS_WITH(calibrator.observe_row(1, 0, row), mentions("layer"));
  CHECK_THROWS_WITH(calibrator.observe_row(0, 1, row), mentions("head"));
  row(7) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(calibrator.observe_row(0, 0, row), mentions("scores[7]") && mentions("finite"));
  row(7) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(calibrator.observe_row(0, 0, row), mentions("scores[7]"));
  CHECK_THROWS_WITH(calibrator.observe_row(0, 0, Eigen::MatrixXd::Zero(3, 3)), mentions("vector"));
  const Eigen::MatrixXd block = Eigen::MatrixXd::Zero(2, 10);
  CHECK_THROWS_WITH(calibrator.observe_rows(0, 0, block, {10, 11}), mentions("lengths[1]"));
  CHECK_THROWS_WITH(calibrator.observe_rows(0, 0, block, {10}), mentions("lengths"));

  Calibrator over_norm(one_head(ThresholdSpace::score_over_query_norm, 4));
  CHECK_THROWS_WITH(over_norm.observe_row(0, 0, Eigen::VectorXd::Ones(10)), mentions("query_norm"));
  CHECK_THROWS_WITH(over_norm.observe_row(0, 0, Eigen::VectorXd::Ones(10), -1.0), mentions("query_norm"));

  Calibrator plain(one_head(ThresholdSpace::raw_score, 4));
  plain.observe_row(0, 0, Eigen::VectorXd::LinSpaced(10, 0.0, 1.0));
  TableOptions count_matched;
  count_matched.method = CalibrationMethod::count_matched;
  count_matched.sigma_add = 1;
  CHECK_THROWS_WITH(plain.table(count_matched), mentions("options.sigma_add"));
  CalibratorOptions no_summary = one_head(ThresholdSpace::raw_score, 4);
  no_summary.count_summary = false;
  Calibrator small(no_summary);
  small.observe_row(0, 0, Eigen::VectorXd::LinSpaced(10, 0.0, 1.0));
  count_matched.sigma_add = 0;
  CHECK_THROWS_WITH(small.table(count_matched), mentions("count_summary"));
  TableOptions table_terms;
  table_terms.denominator_terms = DenominatorTermSource::table_threshold;
  CHECK_THROWS_WITH(plain.table(table_terms), mentions("summary_masses"));
  CHECK(small.table().lookup(0, 0, 10).theta == Approx(5.0 / 9.0).epsilon(1e-14));
  CHECK(small.memory_bytes() < plain.memory_bytes());
}

TEST_CASE("scores of ±1e4 and all-equal rows calibrate to finite values", "[calibration][bad_input]") {
  const ThresholdSpace space = GENERATE(from_range(std::begin(all_spaces), std::end(all_spaces)));
  Calibrator calibrator(one_head(space, 3));
  Eigen::VectorXd extreme = Eigen::VectorXd::Constant(50, -1e4);
  extreme.head(10).setConstant(1e4);
  calibrator.observe_row(0, 0, extreme, 2.0);
  calibrator.observe_row(0, 0, Eigen::VectorXd::Constant(50, 0.25), 2.0);
  for (const auto method : {CalibrationMethod::mean_of_thresholds, CalibrationMethod::count_matched}) {
    TableOptions options;
    options.method = method;
    const ThresholdTable table = calibrator.table(options);
    const ThresholdLookup found = table.lookup(0, 0, 50);
    INFO(to_string(space) << " " << to_string(method));
    CHECK(std::isfinite(found.theta));
    CHECK(std::isfinite(found.denominator_term));
    CHECK(found.denominator_term >= 0);
  }
}

TEST_CASE("histogram keys are monotone and equal for a float and its double", "[calibration][count_matched]") {
  std::mt19937 rng(8);
  std::uniform_int_distribution<std::uint32_t> bits;
  for (const int min_exponent : {-64, -6, -2}) {
    const detail::HistogramGrid grid{6, min_exponent, 24};
    const detail::HistogramKeys key(grid);
    REQUIRE(detail::HistogramKeys::float_exact(grid));
    std::vector<float> values = {0.0f,
                                 -0.0f,
                                 1e-45f,
                                 -1e-45f,
                                 std::ldexp(1.0f, min_exponent),
                                 -std::ldexp(1.0f, min_exponent),
                                 std::nextafter(std::ldexp(1.0f, min_exponent), 0.0f),
                                 std::numeric_limits<float>::max(),
                                 std::numeric_limits<float>::lowest()};
    while (values.size() < 20000) {
      const std::uint32_t pattern = bits(rng);
      float value;
      std::memcpy(&value, &pattern, sizeof value);
      if (std::isfinite(value)) values.push_back(value);
    }
    std::sort(values.begin(), values.end());
    INFO("min_exponent " << min_exponent);
    for (std::size_t i = 0; i < values.size(); ++i) {
      const std::int64_t from_double = key(double(values[i]));
      REQUIRE(std::int64_t(key(values[i])) == from_double);
      REQUIRE(key.lower(from_double) <= double(values[i]));
      REQUIRE(double(values[i]) <= key.upper(from_double));
      if (i > 0) REQUIRE(key(double(values[i - 1])) <= from_double);
    }
  }
}

TEST_CASE("a calibration does not depend on where the heap puts the calibrator's buffers", "[calibration]") {
  // Live allocations of 1, 17, 33, ... bytes move the calibrator's row buffers to different offsets within a
  // vector register's alignment; every table must come out with the same bits.
  const ThresholdSpace space = GENERATE(from_range(std::begin(all_spaces), std::end(all_spaces)));
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<Eigen::VectorXf> rows;
  for (Index r = 0; r < 200; ++r) {
    Eigen::VectorXf row(37 + 3 * r);
    for (Index j = 0; j < row.size(); ++j) row(j) = normal(rng);
    rows.push_back(row);
  }
  std::vector<std::unique_ptr<char[]>> pads;
  std::vector<ThresholdTable> tables;
  for (std::size_t pad = 0; pad < 8; ++pad) {
    pads.emplace_back(new char[16 * pad + 1]);
    Calibrator calibrator(one_head(space, 8));
    for (const Eigen::VectorXf& row : rows) calibrator.observe_row(0, 0, row, 1.5);
    for (const auto method : {CalibrationMethod::mean_of_thresholds, CalibrationMethod::count_matched}) {
      TableOptions table_options;
      table_options.method = method;
      tables.push_back(calibrator.table(table_options));
    }
  }
  INFO(to_string(space));
  for (std::size_t t = 2; t < tables.size(); ++t) {
    CHECK(tables[t].layer(0).theta() == tables[t % 2].layer(0).theta());
    CHECK(tables[t].layer(0).denominator_terms() == tables[t % 2].layer(0).denominator_terms());
  }
}
