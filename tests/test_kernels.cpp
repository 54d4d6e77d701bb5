// Every kernel against the double oracle (design.md §4).
#include "test_support.hpp"

using namespace toptheta;
using namespace toptheta_test;

namespace {

const ThresholdSpace all_spaces[] = {ThresholdSpace::raw_score, ThresholdSpace::probability,
                                     ThresholdSpace::score_minus_max, ThresholdSpace::score_over_query_norm};

Eigen::MatrixXd rows_of(const Eigen::MatrixXd& matrix, Index first, Index count) {
  return matrix.middleRows(first, count);
}

/// The oracle's output for Top-θ with `table`, `compensation` and `cap_k` on `problem`; adds the elements its
/// masks keep to `kept`.
template <class Scalar>
Eigen::MatrixXd top_theta_oracle(const Problem<Scalar>& problem, const AttentionOptions& attention,
                                 const LayerThresholds& table, const Compensation& compensation, bool cap_k,
                                 std::uint64_t& kept) {
  auto sparsity = top_theta_sparsity(table, compensation, cap_k);
  const auto keep = sparsity.keep;
  sparsity.keep = [&](const ReferenceRow& row) {
    auto mask = keep(row);
    kept += std::uint64_t(std::count(mask.begin(), mask.end(), true));
    return mask;
  };
  return reference_attention(problem.queries(), problem.keys(), problem.values(), attention, sparsity);
}

}  // namespace

TEMPLATE_TEST_CASE("dense tiled attention equals the reference", "[dense]", float, double, Eigen::half,
                   Eigen::bfloat16) {
  const Index head_dim = GENERATE(64, 80, 96, 128);
  const Index group = GENERATE(1, 2, 4, 8);
  const bool causal = GENERATE(true, false);
  Problem<TestType> problem(37, 57, 2 * group, 2, head_dim, unsigned(head_dim + group));
  AttentionOptions options;
  options.causal = causal;
  options.past = causal ? 20 : 0;
  dense_attention<Tiles<16, 32>>(problem.queries(), problem.keys(), problem.values(), problem.output(), options);
  const Eigen::MatrixXd expected = reference_attention(problem.queries(), problem.keys(), problem.values(), options);
  INFO(type_name<TestType>() << " head_dim " << head_dim << " group " << group << " causal " << causal);
  CHECK(relative_error(problem.output_matrix(), expected) <= tolerance<TestType>());
}

TEST_CASE("dense attention with the default tiles and strided heads-major buffers equals the reference", "[dense]") {
  const bool heads_major = GENERATE(false, true);
  Problem<float> problem(300, 300, 8, 2, 128, 7, 1.0, heads_major);
  dense_attention(problem.queries(), problem.keys(), problem.values(), problem.output());
  const Eigen::MatrixXd expected = reference_attention(problem.queries(), problem.keys(), problem.values());
  CHECK(relative_error(problem.output_matrix(), expected) <= tolerance<float>());
}

TEMPLATE_TEST_CASE("Top-θ with θ below every score equals dense attention", "[top_theta]", float, double) {
  const ThresholdSpace space = GENERATE(from_range(std::begin(all_spaces), std::end(all_spaces)));
  const Passes passes = GENERATE(Passes::automatic, Passes::two);
  Problem<TestType> problem(41, 41, 4, 2, 64, 3);
  const auto table = LayerThresholds::uniform(4, space, std::vector<double>(4, std::numeric_limits<double>::lowest()));
  TopThetaOptions options;
  options.passes = passes;
  options.compensation.v_mean = true;
  AttentionStats stats;
  top_theta_attention<Tiles<8, 16>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                    options, &stats);
  const Eigen::MatrixXd expected = reference_attention(problem.queries(), problem.keys(), problem.values());
  INFO(to_string(space));
  CHECK(relative_error(problem.output_matrix(), expected) <= tolerance<TestType>());
  CHECK(stats.kept_fraction() == 1.0);
}

TEMPLATE_TEST_CASE("Top-θ equals the oracle on the explicitly built mask with the same compensation", "[top_theta]",
                   float, double, Eigen::half, Eigen::bfloat16) {
  const ThresholdSpace space = GENERATE(from_range(std::begin(all_spaces), std::end(all_spaces)));
  const DenominatorCompensation denominator =
      GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact, DenominatorCompensation::exp_threshold,
               DenominatorCompensation::calibrated);
  const int v_mean = GENERATE(0, 1, 2);  // off, over every visible row, over the pruned rows
  const bool cap_k = GENERATE(false, true);
  const bool causal = GENERATE(true, false);
  if (space == ThresholdSpace::probability && denominator != DenominatorCompensation::none) return;

  Problem<TestType> problem(45, 51, 4, 2, 64, 11, 1.5);
  AttentionOptions attention;
  attention.causal = causal;
  attention.past = causal ? 6 : 0;
  const Index k = 5;
  const auto thresholds = separated_thresholds(problem, attention, space, k, 0.15);
  const auto table = LayerThresholds::uniform(k, space, thresholds, {0.5, 0.25, 1.0, 2.0});
  TopThetaOptions options;
  options.attention = attention;
  options.compensation = {denominator, 0.8, v_mean > 0, v_mean == 2};
  options.cap_k = cap_k;
  AttentionStats stats;
  top_theta_attention<Tiles<8, 16>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                    options, &stats);

  std::uint64_t oracle_kept = 0;
  const Eigen::MatrixXd expected =
      top_theta_oracle(problem, attention, table, options.compensation, cap_k, oracle_kept);
  INFO(type_name<TestType>() << " " << to_string(space) << " " << to_string(denominator) << " v_mean " << v_mean
                             << " cap_k " << cap_k << " causal " << causal);
  CHECK(AttentionStats::total(stats.elements_kept) == oracle_kept);
  CHECK(relative_error(problem.output_matrix(), expected) <= tolerance<TestType>());
  CHECK(stats.kept_fraction() < 0.6);
}

TEST_CASE("one-pass Top-θ equals two-pass Top-θ in every space, path and compensation", "[top_theta]") {
  // Decode (one query row: split keys, streamed rows) and prefill (GEMM blocks, causal); probability and
  // score_minus_max keep candidates until each row's max and sum are known (design.md §6).
  const ThresholdSpace space = GENERATE(from_range(std::begin(all_spaces), std::end(all_spaces)));
  const bool decode = GENERATE(true, false);
  const DenominatorCompensation denominator =
      GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact, DenominatorCompensation::exp_threshold);
  const bool cap_k = GENERATE(false, true);
  if (space == ThresholdSpace::probability && denominator != DenominatorCompensation::none) return;  // invalid
  const Index query_rows = decode ? 1 : 60, keys = decode ? 700 : 60;
  Problem<double> one(query_rows, keys, 4, 1, 96, 5, 1.5), two = one;
  AttentionOptions attention;
  attention.causal = true;
  attention.past = keys - query_rows;
  const Index k = 8;
  const auto thresholds = separated_thresholds(one, attention, space, k, 0.1);
  const auto table = LayerThresholds::uniform(k, space, thresholds, {0.1, 0.2, 0.3, 0.4});
  TopThetaOptions options;
  options.attention = attention;
  options.compensation = {denominator, 1.0, true};
  options.cap_k = cap_k;
  AttentionStats one_stats, two_stats;
  options.passes = Passes::one;
  top_theta_attention<Tiles<16, 16>>(one.queries(), one.keys(), one.values(), one.output(), table, options, &one_stats);
  options.passes = Passes::two;
  top_theta_attention<Tiles<16, 16>>(two.queries(), two.keys(), two.values(), two.output(), table, options, &two_stats);
  INFO(to_string(space) << (decode ? " decode " : " prefill ") << to_string(denominator) << " cap_k " << cap_k);
  CHECK(relative_error(one.output_matrix(), two.output_matrix()) <= 1e-12);
  CHECK(one_stats.elements_kept == two_stats.elements_kept);
  CHECK(one_stats.v_rows_kept == two_stats.v_rows_kept);
  CHECK(one_stats.empty_rows == two_stats.empty_rows);
  CHECK(one_stats.capped_rows == two_stats.capped_rows);
  CHECK(one_stats.kept_fraction() < 0.5);
}

TEST_CASE("one-pass row-relative Top-θ equals the oracle when candidates outgrow their room or go stale",
          "[top_theta]") {
  // Scores rising, falling or random along the row, over 96 small tiles: the running threshold climbs with
  // every tile (stale candidates forgotten), stays put (nothing to forget), or wanders. Loose thresholds keep
  // hundreds of keys per row, more than one tile's room.
  const ThresholdSpace space = GENERATE(ThresholdSpace::probability, ThresholdSpace::score_minus_max);
  const int order = GENERATE(-1, 0, 1);
  const double keep_fraction = GENERATE(0.02, 0.4);
  const Index keys = 3000, dim = 32;
  Problem<double> problem(1, keys, 4, 1, dim, 7, 1.0);
  if (order != 0)  // k_j = t_j q_h-ish: the score grows (or falls) with j for every head
    for (Index j = 0; j < keys; ++j)
      for (Index d = 0; d < dim; ++d)
        problem.k[std::size_t(j * dim + d)] =
            0.02 * problem.k[std::size_t(j * dim + d)] + double(order) * 4.0 * double(j) / double(keys);
  AttentionOptions attention;
  attention.past = keys - 1;
  const Index k = 16;
  const auto thresholds = separated_thresholds(problem, attention, space, k, keep_fraction);
  const auto table = LayerThresholds::uniform(k, space, thresholds);
  TopThetaOptions options;
  options.attention = attention;
  options.compensation.v_mean = true;
  AttentionStats stats;
  top_theta_attention<Tiles<4, 32>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                    options, &stats);
  std::uint64_t oracle_kept = 0;
  const Eigen::MatrixXd expected =
      top_theta_oracle(problem, attention, table, options.compensation, false, oracle_kept);
  INFO(to_string(space) << " order " << order << " keep " << keep_fraction << " kept " << oracle_kept);
  CHECK(AttentionStats::total(stats.elements_kept) == oracle_kept);
  CHECK(relative_error(problem.output_matrix(), expected) <= 1e-12);
  CHECK(oracle_kept > (keep_fraction > 0.1 ? 4u * 200u : 4u));
}

TEST_CASE("Top-θ with length-dependent thresholds equals the oracle", "[top_theta]") {
  Problem<double> problem(70, 70, 2, 1, 80, 21, 1.5);
  Eigen::MatrixXd theta(2, 3), terms(2, 3);
  theta << 1.0, 1.5, 2.5, 0.5, 0.8, 1.2;
  terms << 0.1, 0.5, 2.0, 0.2, 0.4, 0.8;
  const LayerThresholds table(4, ThresholdSpace::raw_score, {10, 30, 60}, theta, terms);
  TopThetaOptions options;
  options.compensation = {DenominatorCompensation::calibrated, 1.0, true};
  AttentionStats stats;
  top_theta_attention<Tiles<16, 16>>(problem.queries(), problem.keys(), problem.values(), problem.output(), table,
                                     options, &stats);
  const Eigen::MatrixXd expected = reference_attention(problem.queries(), problem.keys(), problem.values(), {},
                                                       top_theta_sparsity(table, options.compensation, false));
  CHECK(relative_error(problem.output_matrix(), expected) <= 1e-12);
  // Rows of length 1..9 and 61..70 lie outside the calibrated lengths; rows of length <= k = 4 stay dense.
  CHECK(stats.extrapolated_rows == 2 * (9 - 4 + 10));
  CHECK(stats.dense_rows == 2 * 4);
}

TEMPLATE_TEST_CASE("top-k attention equals a brute-force top-k, ties to the larger position", "[top_k]", float, double,
                   Eigen::half, Eigen::bfloat16) {
  const DenominatorCompensation denominator =
      GENERATE(DenominatorCompensation::none, DenominatorCompensation::exact, DenominatorCompensation::exp_threshold,
               DenominatorCompensation::calibrated);
  const int v_mean = GENERATE(0, 1, 2);  // off, over every visible row, over the pruned rows
  // Half and bfloat16 always use small integers: their scores are then exact in float and double alike, so
  // rounding cannot reorder the k-th and (k+1)-th largest.
  const bool ties = GENERATE(false, true) || !std::is_floating_point_v<TestType>;
  Problem<TestType> problem(39, 39, 4, 2, 64, 13);
  if (ties)  // small integers: many equal scores
    for (auto* data : {&problem.q, &problem.k})
      for (auto& x : *data) x = TestType(std::round(double(x)));
  const Index k = 7;
  const auto terms = LayerThresholds::uniform(k, ThresholdSpace::raw_score, {0, 0, 0, 0}, {0.3, 0.6, 0.9, 1.2});
  TopKOptions options;
  options.k = k;
  options.compensation = {denominator, 1.0, v_mean > 0, v_mean == 2};
  options.thresholds = &terms;
  options.attention.scale = 0.25;
  AttentionStats stats;
  top_k_attention<Tiles<8, 16>>(problem.queries(), problem.keys(), problem.values(), problem.output(), options, &stats);

  ReferenceSparsity sparsity;
  sparsity.keep = [&](const ReferenceRow& row) { return top_k_kept(row, k); };
  sparsity.denominator_term = [&](const ReferenceRow& row, const std::vector<bool>& kept) {
    std::vector<double> sorted(row.scores.data(), row.scores.data() + row.length);
    std::sort(sorted.begin(), sorted.end(), std::greater<double>());
    const double largest_pruned = row.length > k ? sorted[std::size_t(k)] : 0.0;
    return denominator_term(denominator, row, kept, largest_pruned, 0.3 * double(row.query_head + 1));
  };
  sparsity.v_mean = v_mean > 0;
  sparsity.v_mean_of_pruned = v_mean == 2;
  const Eigen::MatrixXd expected =
      reference_attention(problem.queries(), problem.keys(), problem.values(), options.attention, sparsity);
  INFO(type_name<TestType>() << " " << to_string(denominator) << " v_mean " << v_mean << " ties " << ties);
  CHECK(relative_error(problem.output_matrix(), expected) <= tolerance<TestType>());
  std::uint64_t expected_kept = 0;
  for (Index i = 0; i < 39; ++i) expected_kept += std::uint64_t(std::min(i + 1, k)) * 4;
  CHECK(AttentionStats::total(stats.elements_kept) == expected_kept);
}

TEST_CASE("chunked prefill equals one-shot prefill", "[prefill][kv_cache]") {
  const ThresholdSpace space =
      GENERATE(ThresholdSpace::raw_score, ThresholdSpace::probability, ThresholdSpace::score_over_query_norm);
  Problem<double> problem(50, 50, 4, 2, 64, 17, 1.5);
  const auto thresholds = separated_thresholds(problem, {}, space, 6, 0.2);
  const auto table = LayerThresholds::uniform(6, space, thresholds);
  TopThetaOptions options;
  options.compensation.v_mean = true;
  if (space != ThresholdSpace::probability) options.compensation.denominator = DenominatorCompensation::exact;
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options);
  const Eigen::MatrixXd one_shot = problem.output_matrix();

  KvCache<double> cache(2, 64, 50);
  std::vector<double> chunked(problem.out.size());
  const Index row_values = 4 * 64, kv_row_values = 2 * 64;
  for (Index chunk : {7, 13, 1, 29}) {
    const Index past = cache.length();
    cache.append(TensorView<const double>(problem.k.data() + past * kv_row_values, chunk, 2, 64),
                 TensorView<const double>(problem.v.data() + past * kv_row_values, chunk, 2, 64));
    TopThetaOptions step = options;
    step.attention.past = past;
    step.value_prefix_sum = cache.value_sum_before(past);
    top_theta_attention(TensorView<const double>(problem.q.data() + past * row_values, chunk, 4, 64), cache.keys(),
                        cache.values(), TensorView<double>(chunked.data() + past * row_values, chunk, 4, 64), table,
                        step);
  }
  problem.out = chunked;
  INFO(to_string(space));
  CHECK(relative_error(problem.output_matrix(), one_shot) <= 1e-12);
}

TEST_CASE("decode steps equal the last rows of prefill", "[decode][kv_cache]") {
  const int kernel = GENERATE(0, 1, 2);  // dense, Top-θ, top-k
  Problem<float> problem(48, 48, 8, 2, 128, 19, 1.5);
  const auto thresholds = separated_thresholds(problem, {}, ThresholdSpace::score_over_query_norm, 8, 0.2);
  const auto table = LayerThresholds::uniform(8, ThresholdSpace::score_over_query_norm, thresholds);
  auto attend = [&](const TensorView<const float>& q, const TensorView<const float>& k,
                    const TensorView<const float>& v, const TensorView<float>& out, Index past,
                    const double* value_sum) {
    SparseAttentionOptions common;
    common.attention.past = past;
    common.compensation = {DenominatorCompensation::exp_threshold, 1.0, true};
    common.value_prefix_sum = value_sum;
    if (kernel == 0) dense_attention(q, k, v, out, common.attention);
    if (kernel == 1) top_theta_attention(q, k, v, out, table, TopThetaOptions{common});
    if (kernel == 2) top_k_attention(q, k, v, out, TopKOptions{common, 8});
  };
  attend(problem.queries(), problem.keys(), problem.values(), problem.output(), 0, nullptr);
  const Eigen::MatrixXd prefill = problem.output_matrix();

  const Index prompt = 40, row_values = 8 * 128, kv_row_values = 2 * 128;
  KvCache<float> cache(2, 128, 48);
  cache.append(TensorView<const float>(problem.k.data(), prompt, 2, 128),
               TensorView<const float>(problem.v.data(), prompt, 2, 128));
  std::fill(problem.out.begin(), problem.out.end(), 0.0f);
  for (Index position = prompt; position < 48; ++position) {
    cache.append(TensorView<const float>(problem.k.data() + position * kv_row_values, 1, 2, 128),
                 TensorView<const float>(problem.v.data() + position * kv_row_values, 1, 2, 128));
    attend(TensorView<const float>(problem.q.data() + position * row_values, 1, 8, 128), cache.keys(), cache.values(),
           TensorView<float>(problem.out.data() + position * row_values, 1, 8, 128), position,
           cache.value_sum_before(position));
  }
  INFO("kernel " << kernel);
  CHECK(relative_error(rows_of(problem.output_matrix(), prompt, 8), rows_of(prefill, prompt, 8)) <= 1e-5);
}

TEST_CASE("results are identical for any executor and thread count", "[executor]") {
  Problem<float> problem(200, 200, 8, 2, 64, 23, 1.5);
  const auto thresholds = separated_thresholds(problem, {}, ThresholdSpace::raw_score, 16, 0.1);
  const auto table = LayerThresholds::uniform(16, ThresholdSpace::raw_score, thresholds);
  TopThetaOptions options;
  options.compensation = {DenominatorCompensation::exact, 1.0, true};
  AttentionStats serial_stats, parallel_stats;
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options,
                      &serial_stats, SerialExecutor{});
  const std::vector<float> serial = problem.out;
  for (int threads : {1, 2, 3}) {
    top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options,
                        &parallel_stats, OpenMPExecutor{threads});
    CHECK(problem.out == serial);
    CHECK(parallel_stats.elements_kept == serial_stats.elements_kept);
    CHECK(parallel_stats.v_rows_kept == serial_stats.v_rows_kept);
  }
}
