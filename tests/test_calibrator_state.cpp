// Calibrator state as bytes: calibrators of separate processes merge through them exactly as in one process, and
// every byte string but one valid state of the same options is rejected with the calibrator unchanged.
#include "test_support.hpp"

#include <toptheta/calibrator.hpp>
#include <toptheta/calibrator_state.hpp>

#include <cstring>
#include <random>
#include <vector>

using namespace toptheta;
using namespace toptheta_test;

namespace {

CalibratorOptions state_options(ThresholdSpace space) {
  CalibratorOptions options;
  options.shape = {2, 2, 1, 16};
  options.space = space;
  options.k = {4, 6};
  options.summary_masses = true;
  return options;
}

/// Feeds `calibrator` causal score rows of `sequences` random sequences (seeded by `first_seed` on): every
/// (layer, head) sees rows of lengths 1 to 80.
void observe(Calibrator& calibrator, unsigned first_seed, int sequences) {
  for (int s = 0; s < sequences; ++s) {
    std::mt19937 rng(first_seed + unsigned(s));
    std::normal_distribution<double> normal(0.0, 2.0);
    for (Index layer = 0; layer < 2; ++layer)
      for (Index head = 0; head < 2; ++head) {
        Eigen::MatrixXd scores(80, 80);
        for (Index i = 0; i < 80; ++i)
          for (Index j = 0; j < 80; ++j) scores(i, j) = normal(rng);
        std::vector<Index> lengths(80);
        for (Index i = 0; i < 80; ++i) lengths[std::size_t(i)] = i + 1;
        calibrator.observe_rows(layer, head, scores, lengths);
      }
  }
}

std::vector<std::uint8_t> state_of(const Calibrator& calibrator) { return encode_calibrator_state(calibrator); }

void merge_bytes(Calibrator& calibrator, const std::vector<std::uint8_t>& bytes) {
  merge_calibrator_state(calibrator, bytes.data(), bytes.size());
}

/// Largest |a - b| / max(1, |b|) over every θ and denominator term of two tables of the same shape.
double table_difference(const ThresholdTable& a, const ThresholdTable& b) {
  double difference = 0;
  for (Index l = 0; l < a.layers(); ++l) {
    REQUIRE(a.layer(l).lengths() == b.layer(l).lengths());
    const auto relative = [](const Eigen::MatrixXd& x, const Eigen::MatrixXd& y) {
      return ((x - y).array().abs() / y.array().abs().max(1.0)).maxCoeff();
    };
    difference = std::max(difference, relative(a.layer(l).theta(), b.layer(l).theta()));
    if (a.layer(l).has_denominator_terms())
      difference = std::max(difference, relative(a.layer(l).denominator_terms(), b.layer(l).denominator_terms()));
  }
  return difference;
}

}  // namespace

TEST_CASE("calibrator state: merged through bytes equals merged in one process, bit for bit", "[calibration][state]") {
  for (ThresholdSpace space : {ThresholdSpace::raw_score, ThresholdSpace::probability}) {
    const CalibrationMethod histogram_method =
        space == ThresholdSpace::probability ? CalibrationMethod::budget_matched : CalibrationMethod::count_matched;
    for (CalibrationMethod method : {CalibrationMethod::mean_of_thresholds, histogram_method}) {
      INFO(to_string(space) << ", " << to_string(method));
      CalibratorOptions options = state_options(space);
      Calibrator left(options), right(options), whole(options);
      observe(left, 1, 3);
      observe(right, 4, 2);
      observe(whole, 1, 5);
      Calibrator in_process(options), through_bytes(options);
      in_process.merge(left);
      in_process.merge(right);
      merge_bytes(through_bytes, state_of(left));
      merge_bytes(through_bytes, state_of(right));
      TableOptions table_options;
      table_options.method = method;
      const ThresholdTable expected = in_process.table(table_options);
      CHECK(table_difference(through_bytes.table(table_options), expected) == 0.0);
      CHECK(state_of(through_bytes) == state_of(in_process));
      CHECK(through_bytes.rows_used() == whole.rows_used());
      // Against one calibrator fed every row: counts exactly, means to the rounding of Chan's merge.
      for (Index b = 0; b < 80; ++b) {
        CHECK(through_bytes.statistics(1, 1, b).rows == whole.statistics(1, 1, b).rows);
        CHECK(through_bytes.statistics(1, 1, b).values == whole.statistics(1, 1, b).values);
      }
      CHECK(table_difference(through_bytes.table(table_options), whole.table(table_options)) <= 1e-12);
      // A state merged into an empty calibrator is that state again.
      Calibrator copy(options);
      merge_bytes(copy, state_of(left));
      CHECK(state_of(copy) == state_of(left));
    }
  }
}

TEST_CASE("calibrator state: other options, other versions and damaged bytes are rejected, the calibrator unchanged",
          "[calibration][state][bad input]") {
  const CalibratorOptions options = state_options(ThresholdSpace::probability);
  Calibrator source(options);
  observe(source, 7, 1);
  const std::vector<std::uint8_t> bytes = state_of(source);
  Calibrator target(options);
  observe(target, 9, 1);
  const std::vector<std::uint8_t> before = state_of(target);

  CalibratorOptions other_k = options;
  other_k.k = {4, 7};
  Calibrator other(other_k);
  REQUIRE_INVALID(merge_bytes(other, bytes), "bytes", "this one's options");
  CalibratorOptions other_space = options;
  other_space.space = ThresholdSpace::raw_score;
  Calibrator raw(other_space);
  REQUIRE_INVALID(merge_bytes(raw, bytes), "bytes", "this one's options");
  // Sampling settings are not part of the state: calibrators that differ only in them merge.
  CalibratorOptions sampled = options;
  sampled.seed = 99;
  sampled.sample_fraction = 0.5;
  Calibrator sampling(sampled);
  merge_bytes(sampling, bytes);
  CHECK(sampling.rows_used() == source.rows_used());

  for (std::size_t size = 0; size < bytes.size(); size += 1 + size / 64) {
    REQUIRE_THROWS_AS(merge_calibrator_state(target, bytes.data(), size), invalid_argument);
    REQUIRE(state_of(target) == before);
  }
  const auto changed = [&](std::size_t at, std::uint8_t value) {
    std::vector<std::uint8_t> damaged = bytes;
    damaged[at] = value;
    return damaged;
  };
  REQUIRE_INVALID(merge_bytes(target, changed(0, 'X')), "bytes", "a calibrator state (magic");
  REQUIRE_INVALID(merge_bytes(target, changed(4, 2)), "bytes", "calibrator state version 1");
  std::vector<std::uint8_t> longer = bytes;
  longer.push_back(0);
  REQUIRE_INVALID(merge_bytes(target, longer), "bytes", "the end at offset");
  // The rows-used counter (after the 5-byte header, 55 bytes of options and two counters) beyond rows offered.
  REQUIRE_INVALID(merge_bytes(target, changed(5 + 55 + 16 + 7, 0xff)), "bytes", "rows dense + rows used");
  // The last histogram's total (before its largest value, the state's last 8 bytes) off by one.
  const std::size_t total_at = bytes.size() - 16;
  REQUIRE_INVALID(merge_bytes(target, changed(total_at, std::uint8_t(bytes[total_at] + 1))), "bytes",
                  "a histogram total equal to its bin and underflow counts");
  // Its largest value moved above its bins.
  std::vector<std::uint8_t> larger = bytes;
  const double huge = 1e300;
  std::memcpy(larger.data() + bytes.size() - 8, &huge, 8);
  REQUIRE_INVALID(merge_bytes(target, larger), "bytes", "a finite largest value within the histogram's bins");
  CHECK(state_of(target) == before);
}
