// The streaming (decode) path: row products that widen bfloat16 / half in registers, and split-key decode that
// sweeps the KV heads in address order, against plain double arithmetic and the double oracle.
#include "test_support.hpp"

#include <toptheta/detail/exp_sum.hpp>
#include <toptheta/detail/row_candidates.hpp>
#include <toptheta/detail/row_products.hpp>
#include <toptheta/detail/threshold_scan.hpp>

using namespace toptheta;
using namespace toptheta_test;

namespace {

/// Normal numbers of standard deviation `spread`, stored as `Scalar`.
template <class Scalar>
std::vector<Scalar> random_values(Index count, unsigned seed, double spread = 1.0) {
  std::mt19937 generator(seed);
  std::normal_distribution<double> normal(0.0, spread);
  std::vector<Scalar> values(std::size_t(count), Scalar(0));
  for (auto& value : values) value = Scalar(normal(generator));
  return values;
}

template <class Scalar>
double as_double(Scalar value) {
  return double(value);
}

}  // namespace

TEMPLATE_TEST_CASE("row products equal the same sums in double, for every row and key count", "[row_products]", float,
                   double, Eigen::half, Eigen::bfloat16) {
  using Acc = accumulator_t<TestType>;
  const Index dim = GENERATE(1, 7, 16, 40, 64, 80, 96, 128, 131);
  const Index rows = GENERATE(1, 2, 3, 4, 5, 8);
  const Index count = GENERATE(1, 3, 4, 5, 17, 37);
  const Index stride = dim + 5;  // rows of a strided `[tokens, heads, d]` buffer
  const auto stored = random_values<TestType>(count * stride, unsigned(dim * 100 + count));
  const auto queries = random_values<Acc>(rows * dim, unsigned(rows + 7));
  const auto weights = random_values<Acc>(rows * count, unsigned(rows + count));
  std::vector<Acc> scores(std::size_t(rows * count), Acc(0));
  auto output = random_values<Acc>(rows * dim, 3);
  const std::vector<Acc> initial_output = output;

  detail::dot_rows(detail::RowBlock<const Acc>{queries.data(), dim}, rows, stored.data(), stride, count, dim,
                   detail::RowBlock<Acc>{scores.data(), count});
  detail::add_weighted_rows(detail::RowBlock<const Acc>{weights.data(), count}, rows, stored.data(), stride, count, dim,
                            detail::RowBlock<Acc>{output.data(), dim});

  // Rounding of Acc sums of `dim` (or `count`) terms, relative to the sum of the terms' magnitudes.
  const double epsilon = std::is_same_v<Acc, double> ? 1e-14 : 1e-5;
  INFO(type_name<TestType>() << " dim " << dim << " rows " << rows << " count " << count);
  for (Index r = 0; r < rows; ++r) {
    for (Index j = 0; j < count; ++j) {
      double dot = 0, magnitude = 0;
      for (Index d = 0; d < dim; ++d) {
        const double term = double(queries[std::size_t(r * dim + d)]) * as_double(stored[std::size_t(j * stride + d)]);
        dot += term;
        magnitude += std::abs(term);
      }
      CHECK(std::abs(double(scores[std::size_t(r * count + j)]) - dot) <= epsilon * (magnitude + 1));
    }
    for (Index d = 0; d < dim; ++d) {
      double sum = double(initial_output[std::size_t(r * dim + d)]), magnitude = std::abs(sum);
      for (Index j = 0; j < count; ++j) {
        const double term =
            double(weights[std::size_t(r * count + j)]) * as_double(stored[std::size_t(j * stride + d)]);
        sum += term;
        magnitude += std::abs(term);
      }
      CHECK(std::abs(double(output[std::size_t(r * dim + d)]) - sum) <= epsilon * (magnitude + 1));
    }
  }

  // Asking for next rows (here: rows of the same buffer, fewer than or as many as the current ones) only
  // prefetches: the sums are the same bits.
  const Index next_count = GENERATE_COPY(count / 2, count);
  const detail::NextRows<TestType> next{stored.data(), next_count};
  std::vector<Acc> scores_with_next(scores.size(), Acc(0));
  auto output_with_next = initial_output;
  detail::dot_rows(detail::RowBlock<const Acc>{queries.data(), dim}, rows, stored.data(), stride, count, dim,
                   detail::RowBlock<Acc>{scores_with_next.data(), count}, next);
  detail::add_weighted_rows(detail::RowBlock<const Acc>{weights.data(), count}, rows, stored.data(), stride, count, dim,
                            detail::RowBlock<Acc>{output_with_next.data(), dim}, next);
  CHECK(scores_with_next == scores);
  CHECK(output_with_next == output);
}

TEMPLATE_TEST_CASE("gathered row products equal the same sums in double, for any picked rows", "[row_products]", float,
                   double, Eigen::half, Eigen::bfloat16) {
  using Acc = accumulator_t<TestType>;
  const Index dim = GENERATE(1, 7, 16, 40, 64, 80, 96, 128, 131, 256);
  const Index count = GENERATE(0, 1, 3, 9, 37);
  const Index value_rows = 41, stride = dim + 5;
  const auto stored = random_values<TestType>(value_rows * stride, unsigned(dim * 10 + count));
  const auto weights = random_values<Acc>(count, unsigned(count + 1));
  std::vector<std::int32_t> columns(static_cast<std::size_t>(count));
  for (Index t = 0; t < count; ++t) columns[std::size_t(t)] = std::int32_t((t * 17 + 3) % value_rows);  // repeats
  auto output = random_values<Acc>(dim, 5);
  const std::vector<Acc> initial_output = output;

  detail::add_gathered_rows(
      weights.data(), columns.data(), count, [&](std::int32_t column) { return stored.data() + column * stride; }, dim,
      output.data());

  const double epsilon = std::is_same_v<Acc, double> ? 1e-14 : 1e-5;
  INFO(type_name<TestType>() << " dim " << dim << " count " << count);
  for (Index d = 0; d < dim; ++d) {
    double sum = double(initial_output[std::size_t(d)]), magnitude = std::abs(sum);
    for (Index t = 0; t < count; ++t) {
      const double term =
          double(weights[std::size_t(t)]) * as_double(stored[std::size_t(columns[std::size_t(t)] * stride + d)]);
      sum += term;
      magnitude += std::abs(term);
    }
    CHECK(std::abs(double(output[std::size_t(d)]) - sum) <= epsilon * (magnitude + 1));
  }
}

TEMPLATE_TEST_CASE("the threshold scan finds the survivors and the max of a plain loop", "[threshold_scan]", float,
                   double) {
  const Index count = GENERATE(1, 2, 15, 16, 17, 31, 32, 33, 100, 128, 257);
  const double quantile = GENERATE(0.0, 0.5, 0.94, 1.0);
  auto scores = random_values<TestType>(count, unsigned(count * 3 + 1));
  for (Index c = 0; c < count; c += 5) scores[std::size_t(c)] = scores[0];  // ties with the threshold
  std::vector<TestType> sorted = scores;
  std::sort(sorted.begin(), sorted.end());
  const TestType threshold = quantile >= 1.0 ? sorted.back() + 1 : sorted[std::size_t(quantile * double(count - 1))];
  std::vector<std::int32_t> columns(std::size_t(count + detail::scan_slack), -1);
  std::vector<TestType> kept(std::size_t(count + detail::scan_slack), TestType(0));
  TestType max = 0;
  const Index survivors = detail::scan_above(scores.data(), count, threshold, columns.data(), kept.data(), max);

  INFO(type_name<TestType>() << " count " << count << " quantile " << quantile);
  CHECK(max == sorted.back());
  std::vector<std::int32_t> expected;
  for (Index c = 0; c < count; ++c)
    if (scores[std::size_t(c)] > threshold) expected.push_back(std::int32_t(c));
  REQUIRE(survivors == Index(expected.size()));
  for (Index t = 0; t < survivors; ++t) {
    CHECK(columns[std::size_t(t)] == expected[std::size_t(t)]);
    CHECK(kept[std::size_t(t)] == scores[std::size_t(expected[std::size_t(t)])]);
  }
}

TEMPLATE_TEST_CASE("the max's position is the last position holding it", "[threshold_scan]", float, double) {
  const Index count = GENERATE(1, 2, 15, 16, 17, 31, 32, 33, 100, 257);
  const Index copies = GENERATE(1, 2, 3);  // the max at 1 to 3 positions spread over the row
  auto scores = random_values<TestType>(count, unsigned(count * 7 + copies));
  const TestType max = *std::max_element(scores.begin(), scores.end()) + 1;
  for (Index copy = 0; copy < copies; ++copy) scores[std::size_t(copy * (count - 1) / 2)] = max;
  Index expected = count - 1;
  while (scores[std::size_t(expected)] != max) --expected;  // plain backwards search
  INFO(type_name<TestType>() << " count " << count << " copies " << copies);
  CHECK(detail::last_position_of(scores.data(), count, max) == expected);
}

TEMPLATE_TEST_CASE("the row's exp-sum is within 3e-7 of the exact sum, for spreads up to scores of ±1e4", "[exp_sum]",
                   float, double) {
  // Every count up to 300 (whole vectors, tails), narrow and wide rows: terms near 1, and terms that underflow.
  const double spread = GENERATE(0.5, 3.0, 40.0, 1e4);
  double worst = 0;
  for (Index count = 1; count <= 300; ++count) {
    const auto scores = random_values<TestType>(count, unsigned(count * 31 + spread), spread);
    const TestType max = *std::max_element(scores.begin(), scores.end());
    double exact = 0;
    for (TestType a : scores) exact += std::exp(double(a) - double(max));
    const double sum = double(detail::exp_sum(scores.data(), count, max));
    worst = std::max(worst, std::abs(sum - exact) / exact);
  }
  INFO(type_name<TestType>() << " spread " << spread << " worst relative error " << worst);
  CHECK(worst <= 3e-7);
}

TEMPLATE_TEST_CASE("row candidates hold every key above the last floor, through forgetting, growth and merging",
                   "[row_candidates]", float, double) {
  // Chunks of scores arrive with a rising floor (a running threshold); whatever was forgotten to make room
  // (first in 48 lent entries, then in storage of their own), the candidates above the last floor are exactly
  // the keys above it, at their positions.
  const Index chunk = GENERATE(1, 16, 37, 256);
  const double rise = GENERATE(0.0, 0.02, 0.5);
  const Index count = 3000;
  const auto scores = random_values<TestType>(count, unsigned(chunk + 7), 2.0);
  std::vector<std::int32_t> lent_positions(48);
  std::vector<TestType> lent_scores(48);
  detail::RowCandidates<TestType> first_half, second_half;
  first_half.use_room(lent_positions.data(), lent_scores.data(), 48);
  detail::ScannedKeys<TestType> scanned;
  TestType floor = TestType(-3);
  for (Index from = 0; from < count; from += chunk, floor += TestType(rise)) {
    const Index width = std::min(chunk, count - from);
    (from < count / 2 ? first_half : second_half).add_above(scores.data() + from, width, from, floor, scanned);
  }
  first_half.append_above(second_half, floor);
  first_half.keep_above(floor);
  const detail::RowCandidates<TestType> copy = first_half;
  std::vector<std::pair<std::int32_t, TestType>> held, copied, expected;
  for (Index t = 0; t < first_half.size(); ++t) held.emplace_back(first_half.positions()[t], first_half.scores()[t]);
  for (Index t = 0; t < copy.size(); ++t) copied.emplace_back(copy.positions()[t], copy.scores()[t]);
  for (Index j = 0; j < count; ++j)
    if (scores[std::size_t(j)] > floor) expected.emplace_back(std::int32_t(j), scores[std::size_t(j)]);
  CHECK(copied == held);
  std::sort(held.begin(), held.end());
  INFO(type_name<TestType>() << " chunk " << chunk << " rise " << rise << " expected " << expected.size());
  CHECK(held == expected);
  // The cap keeps the largest positions.
  const Index limit = std::min<Index>(5, first_half.size());
  first_half.keep_largest_positions(limit);
  REQUIRE(first_half.size() == limit);
  for (Index t = 0; t < limit; ++t)
    CHECK(first_half.positions()[t] == expected[expected.size() - 1 - std::size_t(t)].first);
}

TEMPLATE_TEST_CASE("split-key decode equals the reference for every stored type, head dim and group", "[dense][decode]",
                   float, double, Eigen::half, Eigen::bfloat16) {
  const Index head_dim = GENERATE(64, 80, 96, 128, 72);
  const Index group = GENERATE(1, 2, 4, 8);
  const Index keys = GENERATE(1, 37, 1000, 2071);  // one key, less than a tile, odd lengths over many tiles
  Problem<TestType> problem(1, keys, 2 * group, 2, head_dim, unsigned(head_dim + group + keys));
  AttentionOptions options;
  options.past = keys - 1;
  dense_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), options);
  const Eigen::MatrixXd expected = reference_attention(problem.queries(), problem.keys(), problem.values(), options);
  INFO(type_name<TestType>() << " head_dim " << head_dim << " group " << group << " keys " << keys);
  CHECK(relative_error(problem.output_matrix(), expected) <= tolerance<TestType>());
}

/// Runs Top-θ with `table` and `denominator` compensation on `problem` (statistics into `stats`) and returns its
/// relative error vs the oracle on the explicitly built mask.
template <class Scalar>
double top_theta_error_vs_oracle(Problem<Scalar>& problem, const AttentionOptions& attention,
                                 const LayerThresholds& table, DenominatorCompensation denominator,
                                 AttentionStats& stats) {
  TopThetaOptions options;
  options.attention = attention;
  options.compensation = {denominator, 1.0, false};
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options, &stats);
  const Eigen::MatrixXd expected = reference_attention(problem.queries(), problem.keys(), problem.values(), attention,
                                                       top_theta_sparsity(table, options.compensation, false));
  return relative_error(problem.output_matrix(), expected);
}

TEMPLATE_TEST_CASE("split-key Top-θ decode equals the oracle on the explicitly built mask", "[top_theta][decode]",
                   float, double, Eigen::half, Eigen::bfloat16) {
  // Raw scores select as keys arrive; probability and score_minus_max keep candidates until each row's max and
  // sum are merged over the key ranges (design.md §6).
  const ThresholdSpace space =
      GENERATE(ThresholdSpace::raw_score, ThresholdSpace::probability, ThresholdSpace::score_minus_max);
  const DenominatorCompensation denominator =
      GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact, DenominatorCompensation::exp_threshold);
  if (space == ThresholdSpace::probability && denominator != DenominatorCompensation::none) return;  // invalid
  const double kept_fraction = GENERATE(0.02, 0.3, 0.9);  // sparse tiles, streamed tiles, nearly dense
  const Index head_dim = GENERATE(80, 128);
  const Index keys = 1500;
  Problem<TestType> problem(1, keys, 8, 2, head_dim, 31, 1.5);
  AttentionOptions attention;
  attention.past = keys - 1;
  const Index k = 8;
  const auto thresholds = separated_thresholds(problem, attention, space, k, kept_fraction);
  const auto table = LayerThresholds::uniform(k, space, thresholds);
  AttentionStats stats;
  const double error = top_theta_error_vs_oracle(problem, attention, table, denominator, stats);
  INFO(type_name<TestType>() << " " << to_string(space) << " " << to_string(denominator) << " kept " << kept_fraction
                             << " head_dim " << head_dim);
  CHECK(error <= tolerance<TestType>());
  CHECK(stats.kept_fraction() < 1.0);
}

TEST_CASE("split-key decode is identical for any thread count", "[decode][executor]") {
  Problem<Eigen::bfloat16> problem(1, 3000, 8, 2, 128, 41);
  AttentionOptions options;
  options.past = 2999;
  dense_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), options, nullptr,
                  SerialExecutor{});
  const std::vector<Eigen::bfloat16> serial = problem.out;
  for (int threads : {1, 2, 3}) {
    dense_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), options, nullptr,
                    OpenMPExecutor{threads});
    CHECK(problem.out == serial);
  }
  // One-pass probability thresholds merge the key ranges' candidates in the finishing items.
  const auto table = LayerThresholds::uniform(8, ThresholdSpace::probability, std::vector<double>(8, 2e-3));
  TopThetaOptions top_theta;
  top_theta.attention = options;
  top_theta.compensation.v_mean = true;
  top_theta.cap_k = true;
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, top_theta, nullptr,
                      SerialExecutor{});
  const std::vector<Eigen::bfloat16> serial_top_theta = problem.out;
  for (int threads : {1, 2, 3}) {
    top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, top_theta,
                        nullptr, OpenMPExecutor{threads});
    CHECK(problem.out == serial_top_theta);
  }
}

TEMPLATE_TEST_CASE("prefill with the default tiles equals the oracle where few elements survive, dense rows among them",
                   "[top_theta][prefill]", float, double, Eigen::bfloat16) {
  // Stacked blocks of 64 rows x 4 heads: tiles whose survivors are gathered row by row, tiles with a dense row
  // (L_i <= k) or many survivors that use a GEMM, and rows whose tile has no survivor.
  const ThresholdSpace space = GENERATE(ThresholdSpace::raw_score, ThresholdSpace::score_over_query_norm,
                                        ThresholdSpace::probability, ThresholdSpace::score_minus_max);
  const DenominatorCompensation denominator = GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact);
  if (space == ThresholdSpace::probability && denominator != DenominatorCompensation::none) return;  // invalid
  const double keep_fraction = GENERATE(0.03, 0.3);
  Problem<TestType> problem(300, 300, 8, 2, 128, 17, 1.5);
  AttentionOptions attention;
  attention.causal = true;
  const Index k = 6;
  const auto thresholds = separated_thresholds(problem, attention, space, k, keep_fraction);
  const auto table = LayerThresholds::uniform(k, space, thresholds, std::vector<double>(8, 0.5));
  AttentionStats stats;
  const double error = top_theta_error_vs_oracle(problem, attention, table, denominator, stats);
  INFO(type_name<TestType>() << " " << to_string(space) << " " << to_string(denominator) << " keep " << keep_fraction);
  CHECK(error <= tolerance<TestType>());
  if (keep_fraction < 0.1) CHECK(stats.kept_fraction() < 0.15);  // mostly sparse tiles (0.3 keeps most: GEMMs)
}

TEMPLATE_TEST_CASE("prefill in chunks of one query block is bit-identical to one call, which prepares K and V",
                   "[prefill]", float, Eigen::bfloat16) {
  // One call of 580 tokens: 10 query blocks of 64 rows x the group's heads read K tiles [0, 256) and
  // [256, 512), packed once for all of them, and V copied head by head; a chunk of 64 rows is one block that
  // packs its own K tiles and reads V where it lies. Dense and Top-θ (survivors gathered row by row, and GEMM
  // tiles); without GQA the last block's 4 rows stream K and V.
  const int kernel = GENERATE(0, 1);
  const Index group = GENERATE(1, 4);
  const Index tokens = 580, chunk = 64, kv_heads = 2, q_heads = kv_heads * group, dim = 64, k = 8;
  Problem<TestType> problem(tokens, tokens, q_heads, kv_heads, dim, 23, 1.5);
  AttentionOptions attention;
  attention.causal = true;
  const ThresholdSpace space = ThresholdSpace::score_over_query_norm;
  const auto table = LayerThresholds::uniform(k, space, separated_thresholds(problem, attention, space, k, 0.05));
  const auto attend = [&](const TensorView<const TestType>& q, const TensorView<const TestType>& keys,
                          const TensorView<const TestType>& values, const TensorView<TestType>& out, Index past) {
    AttentionOptions step = attention;
    step.past = past;
    if (kernel == 0) return dense_attention(q, keys, values, out, step);
    TopThetaOptions options;
    options.attention = step;
    top_theta_attention(q, keys, values, out, table, options);
  };
  attend(problem.queries(), problem.keys(), problem.values(), problem.output(), 0);
  const std::vector<TestType> whole = problem.out;

  std::vector<TestType> chunked(problem.out.size());
  const Index row_values = q_heads * dim;
  for (Index past = 0; past < tokens; past += chunk) {
    const Index rows = std::min(chunk, tokens - past);
    attend(TensorView<const TestType>(problem.q.data() + past * row_values, rows, q_heads, dim),
           TensorView<const TestType>(problem.k.data(), past + rows, kv_heads, dim),
           TensorView<const TestType>(problem.v.data(), past + rows, kv_heads, dim),
           TensorView<TestType>(chunked.data() + past * row_values, rows, q_heads, dim), past);
  }
  // Rows of full chunks are the same blocks either way. The last 4 rows: without GQA their own call splits the
  // keys (the decode path), so they agree to rounding.
  const std::size_t full_chunks = std::size_t(tokens / chunk * chunk * row_values);
  Index differing = 0;
  double last_rows_error = 0, last_rows_scale = 0;
  for (std::size_t e = 0; e < whole.size(); ++e) {
    if (e < full_chunks) {
      differing += !(chunked[e] == whole[e]);
    } else {
      last_rows_error = std::max(last_rows_error, std::abs(double(chunked[e]) - double(whole[e])));
      last_rows_scale = std::max(last_rows_scale, std::abs(double(whole[e])));
    }
  }
  INFO(type_name<TestType>() << (kernel == 0 ? " dense" : " top_theta") << " group " << group);
  CHECK(differing == 0);
  CHECK(last_rows_error <= tolerance<TestType>() * last_rows_scale);
}
