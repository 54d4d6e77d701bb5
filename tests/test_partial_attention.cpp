// Partial attention of key ranges (a sharded KV cache): the ranges' partials, merged and finished, equal one
// kernel call over all keys for every rule; their bytes round-trip; bad ranges, partials and bytes are rejected.
#include "test_support.hpp"

#include <toptheta/key_range_attention.hpp>
#include <toptheta/partial_attention.hpp>
#include <toptheta/partial_encoding.hpp>

using namespace toptheta;
using namespace toptheta_test;

namespace {

/// One rule of every kernel: how the kernel is called on the whole cache and the selection a range uses.
struct Rule {
  const char* name;
  enum { dense, top_k, top_theta } family;
  ThresholdSpace space = ThresholdSpace::raw_score;
  double theta = 0;
  Compensation compensation{};
  bool cap_k = false;
  Passes passes = Passes::automatic;
};

Compensation with(DenominatorCompensation denominator, bool v_mean = false, bool of_pruned = false) {
  Compensation compensation;
  compensation.denominator = denominator;
  compensation.v_mean = v_mean;
  compensation.v_mean_of_pruned = of_pruned;
  return compensation;
}

const Rule every_rule[] = {
    {"dense", Rule::dense},
    {"top-k, V mean", Rule::top_k, ThresholdSpace::raw_score, 0, with(DenominatorCompensation::none, true)},
    {"top-k, exp-threshold", Rule::top_k, ThresholdSpace::raw_score, 0, with(DenominatorCompensation::exp_threshold)},
    {"probability, V mean", Rule::top_theta, ThresholdSpace::probability, 0.02,
     with(DenominatorCompensation::none, true)},
    {"probability, two passes", Rule::top_theta, ThresholdSpace::probability, 0.02,
     with(DenominatorCompensation::none, true), false, Passes::two},
    {"probability, cap", Rule::top_theta, ThresholdSpace::probability, 0.005, with(DenominatorCompensation::none),
     true},
    {"score_minus_max, exact", Rule::top_theta, ThresholdSpace::score_minus_max, -2.0,
     with(DenominatorCompensation::exact)},
    {"raw_score, exact", Rule::top_theta, ThresholdSpace::raw_score, 0.2, with(DenominatorCompensation::exact)},
    {"raw_score, exp-threshold, cap", Rule::top_theta, ThresholdSpace::raw_score, -0.3,
     with(DenominatorCompensation::exp_threshold), true},
    {"raw_score, V mean of pruned", Rule::top_theta, ThresholdSpace::raw_score, 0.4,
     with(DenominatorCompensation::exp_threshold, true, true)},
    {"raw_score, every row empty", Rule::top_theta, ThresholdSpace::raw_score, 50.0,
     with(DenominatorCompensation::none, true)},
    {"score_over_query_norm", Rule::top_theta, ThresholdSpace::score_over_query_norm, 0.05,
     with(DenominatorCompensation::none)},
    {"score_over_query_norm, calibrated SDC, V mean", Rule::top_theta, ThresholdSpace::score_over_query_norm, 0.1,
     with(DenominatorCompensation::calibrated, true)},
};

constexpr Index rule_k = 8;

LayerThresholds table_of(const Rule& rule, Index q_heads) {
  const std::vector<double> theta(std::size_t(q_heads), rule.theta), terms(std::size_t(q_heads), 0.75);
  if (rule.compensation.denominator == DenominatorCompensation::calibrated)
    return LayerThresholds::uniform(rule_k, rule.space, theta, terms);
  return LayerThresholds::uniform(rule_k, rule.space, theta);
}

/// `f(selection)` with the selection of `rule`.
template <class F>
void with_selection(const Rule& rule, const LayerThresholds& table, F&& f) {
  if (rule.family == Rule::dense) return f(DenseSelection{});
  if (rule.family == Rule::top_k) return f(TopKSelection(rule_k, rule.compensation));
  f(TopThetaSelection(table, rule.compensation, rule.cap_k, rule.passes));
}

/// The kernel on the whole cache.
template <class Scalar>
void whole_call(const Rule& rule, const LayerThresholds& table, Problem<Scalar>& problem,
                const AttentionOptions& attention, AttentionStats& stats) {
  if (rule.family == Rule::dense)
    return dense_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), attention, &stats);
  if (rule.family == Rule::top_k) {
    TopKOptions options;
    options.attention = attention;
    options.k = rule_k;
    options.compensation = rule.compensation;
    return top_k_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), options, &stats);
  }
  TopThetaOptions options;
  options.attention = attention;
  options.compensation = rule.compensation;
  options.cap_k = rule.cap_k;
  options.passes = rule.passes;
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), table, options, &stats);
}

/// Keys [first, end) of the problem's K or V.
template <class Scalar>
TensorView<const Scalar> key_range(const TensorView<const Scalar>& whole, Index first, Index end) {
  return {whole.row(first, 0), end - first, whole.heads(), whole.head_dim(), whole.token_stride(), whole.head_stride()};
}

/// The call split at `starts` (the first 0): every range's rounds, merged (through bytes when `as_bytes`) and
/// finished into the problem's output; the ranges' statistics merged into `stats`.
template <class Scalar>
void ranged_call(const Rule& rule, const LayerThresholds& table, Problem<Scalar>& problem,
                 const AttentionOptions& attention, const std::vector<Index>& starts, bool as_bytes,
                 AttentionStats& stats) {
  using Acc = accumulator_t<Scalar>;
  const auto through = [&](auto value, auto decode) {
    if (!as_bytes) return value;
    const std::vector<std::uint8_t> bytes = encode_partial(value);
    auto decoded = decode(bytes.data(), bytes.size());
    REQUIRE(encode_partial(decoded) == bytes);
    return decoded;
  };
  with_selection(rule, table, [&](const auto& selection) {
    using Selection = std::decay_t<decltype(selection)>;
    std::vector<std::unique_ptr<KeyRangeAttention<Scalar, Selection>>> ranges;
    std::vector<AttentionStats> range_stats(starts.size());
    std::vector<std::vector<double>> value_sums(starts.size());
    for (std::size_t s = 0; s < starts.size(); ++s) {
      const Index first = starts[s], end = s + 1 < starts.size() ? starts[s + 1] : problem.key_rows;
      const auto k = key_range(problem.keys(), first, end), v = key_range(problem.values(), first, end);
      // Every other range is given its V sum, as a cache keeps it; the others read their V rows.
      const double* value_sum = nullptr;
      if (s % 2 == 1) {
        value_sums[s].assign(std::size_t(problem.kv_heads * problem.head_dim), 0.0);
        for (Index t = 0; t < end - first; ++t)
          for (Index h = 0; h < problem.kv_heads; ++h)
            for (Index d = 0; d < problem.head_dim; ++d)
              value_sums[s][std::size_t(h * problem.head_dim + d)] += double(v.row(t, h)[d]);
        value_sum = value_sums[s].data();
      }
      ranges.push_back(std::make_unique<KeyRangeAttention<Scalar, Selection>>(
          problem.queries(), k, v, KeyRange{first, problem.key_rows}, attention, selection, value_sum,
          &range_stats[s]));
    }
    std::optional<PartialStatistics<Acc>> merged;
    if (ranges.front()->statistics().needed) {
      merged = through(ranges.front()->statistics(), decode_partial_statistics<Acc>);
      for (std::size_t s = 1; s < ranges.size(); ++s)
        merged->merge(through(ranges[s]->statistics(), decode_partial_statistics<Acc>));
    }
    PartialOutput<Acc> output =
        through(ranges.front()->partial(merged ? &*merged : nullptr), decode_partial_output<Acc>);
    for (std::size_t s = 1; s < ranges.size(); ++s)
      output.merge(through(ranges[s]->partial(merged ? &*merged : nullptr), decode_partial_output<Acc>));
    stats = AttentionStats{};
    for (const AttentionStats& each : range_stats) stats.merge(each);
    finish_partial_attention(output, selection, problem.output(), &stats);
  });
}

struct Placement {
  const char* name;
  Index query_rows, key_rows;
  AttentionOptions attention;
};

AttentionOptions placed(bool causal, Index past) {
  AttentionOptions options;
  options.causal = causal;
  options.past = past;
  return options;
}

template <class Scalar>
void check_every_rule(Index q_heads, Index kv_heads, Index dim) {
  const Placement placements[] = {
      {"decode", 1, 300, placed(true, 299)},
      {"prefill chunk", 7, 90, placed(true, 83)},
      {"prefill from 0", 12, 12, placed(true, 0)},
      {"no causal mask", 3, 130, placed(false, 0)},
  };
  for (const Placement& placement : placements)
    for (const Rule& rule : every_rule)
      for (const std::vector<Index>& starts :
           {std::vector<Index>{0}, std::vector<Index>{0, placement.key_rows / 2},
            std::vector<Index>{0, 1, placement.key_rows / 3, placement.key_rows - 1}}) {
        if (starts.back() >= placement.key_rows && starts.size() > 1) continue;
        Problem<Scalar> problem(placement.query_rows, placement.key_rows, q_heads, kv_heads, dim, 17);
        const LayerThresholds table = table_of(rule, q_heads);
        AttentionStats whole_stats, ranged_stats;
        whole_call(rule, table, problem, placement.attention, whole_stats);
        const Eigen::MatrixXd expected = problem.output_matrix();
        for (bool as_bytes : {false, true}) {
          ranged_call(rule, table, problem, placement.attention, starts, as_bytes, ranged_stats);
          INFO(type_name<Scalar>() << ", " << placement.name << ", " << rule.name << ", " << starts.size()
                                   << " ranges, GQA " << q_heads << "/" << kv_heads << ", d " << dim
                                   << (as_bytes ? ", through bytes" : ""));
          CHECK(relative_error(problem.output_matrix(), expected) <= tolerance<Scalar>());
          CHECK(ranged_stats.elements_kept == whole_stats.elements_kept);
          CHECK(ranged_stats.elements_visible == whole_stats.elements_visible);
          CHECK(ranged_stats.v_rows_kept == whole_stats.v_rows_kept);
          CHECK(ranged_stats.v_rows_visible == whole_stats.v_rows_visible);
          CHECK(ranged_stats.rows == whole_stats.rows);
          CHECK(ranged_stats.dense_rows == whole_stats.dense_rows);
          CHECK(ranged_stats.empty_rows == whole_stats.empty_rows);
          CHECK(ranged_stats.capped_rows == whole_stats.capped_rows);
          CHECK(ranged_stats.non_finite_rows == whole_stats.non_finite_rows);
        }
      }
}

}  // namespace

TEST_CASE("partial attention: key ranges merged equal one call over all keys, for every rule", "[partial]") {
  check_every_rule<double>(4, 2, 64);
  check_every_rule<float>(4, 1, 80);
  check_every_rule<float>(2, 2, 32);
}

TEST_CASE("partial attention: the rules that decide each key alone need no round of row statistics", "[partial]") {
  Problem<float> problem(1, 64, 2, 1, 32, 3);
  const AttentionOptions attention = placed(true, 63);
  for (const Rule& rule : every_rule) {
    const LayerThresholds table = table_of(rule, 2);
    with_selection(rule, table, [&](const auto& selection) {
      using Selection = std::decay_t<decltype(selection)>;
      KeyRangeAttention<float, Selection> range(problem.queries(), key_range(problem.keys(), 0, 32),
                                                key_range(problem.values(), 0, 32), KeyRange{0, 64}, attention,
                                                selection);
      const bool row_relative = rule.family == Rule::top_theta && needs_row_statistics(rule.space);
      INFO(rule.name);
      CHECK(range.statistics().needed == (rule.family == Rule::top_k || row_relative || rule.cap_k));
      if (range.statistics().needed) {
        REQUIRE_INVALID(range.partial(nullptr), "merged", "merged row statistics");
      } else {
        // Each decode row ships O(head_dim) values: 77 bytes of masses and rule, its numerator and at most
        // three more vectors (kept V sum, V sum, the max-score V row); header 25 bytes.
        const auto bytes = encode_partial(range.partial(nullptr));
        CHECK(bytes.size() <= 25 + 2 * (77 + 4 * 32 * 4));
      }
    });
  }
}

TEST_CASE("partial attention: a NaN score in one range makes the row NaN, as in one call", "[partial]") {
  Problem<double> problem(1, 50, 2, 1, 16, 5);
  problem.k[std::size_t(40 * 16 + 3)] = std::numeric_limits<double>::quiet_NaN();
  const Rule rule = every_rule[3];  // probability, V mean
  const LayerThresholds table = table_of(rule, 2);
  AttentionStats whole_stats, ranged_stats;
  whole_call(rule, table, problem, placed(true, 49), whole_stats);
  ranged_call(rule, table, problem, placed(true, 49), {0, 25}, true, ranged_stats);
  CHECK(ranged_stats.non_finite_rows == 2);
  CHECK(whole_stats.non_finite_rows == 2);
  for (double x : problem.out) CHECK(std::isnan(x));
}

TEST_CASE("partial attention: bad ranges, missing or mismatched partials are rejected", "[partial][bad input]") {
  Problem<float> problem(2, 40, 2, 1, 16, 7);
  const LayerThresholds table = LayerThresholds::uniform(4, ThresholdSpace::probability, {0.05, 0.05});
  const TopThetaSelection selection(table, Compensation{}, false, Passes::automatic);
  const auto k = key_range(problem.keys(), 10, 30), v = key_range(problem.values(), 10, 30);
  using Range = KeyRangeAttention<float, TopThetaSelection>;
  REQUIRE_INVALID(Range(problem.queries(), k, v, KeyRange{25, 40}, placed(true, 38), selection), "range.total_keys",
                  "range.first + k.tokens()");
  REQUIRE_INVALID(Range(problem.queries(), k, v, KeyRange{-1, 40}, placed(true, 38), selection), "range.first", ">= 0");
  REQUIRE_INVALID(Range(problem.queries(), k, v, KeyRange{10, 40}, placed(true, 39), selection), "range.total_keys",
                  "past + query rows");
  REQUIRE_INVALID(
      Range(problem.queries(), k, key_range(problem.values(), 10, 29), KeyRange{10, 40}, placed(true, 38), selection),
      "v.tokens", "k.tokens");
  const LayerThresholds three_heads = LayerThresholds::uniform(4, ThresholdSpace::probability, {0.05, 0.05, 0.05});
  const TopThetaSelection other_heads(three_heads, Compensation{}, false, Passes::automatic);
  Problem<float> wide(2, 40, 4, 1, 16, 7);
  REQUIRE_INVALID(Range(wide.queries(), key_range(wide.keys(), 10, 30), key_range(wide.values(), 10, 30),
                        KeyRange{10, 40}, placed(true, 38), other_heads),
                  "q.heads", "a query head of the threshold table");

  Range range(problem.queries(), k, v, KeyRange{10, 40}, placed(true, 38), selection);
  REQUIRE(range.statistics().needed);
  PartialStatistics<float> statistics = range.statistics();
  PartialStatistics<float> fewer = statistics;
  fewer.query_rows = 1;
  fewer.rows.resize(2);
  REQUIRE_INVALID(statistics.merge(fewer), "other", "row statistics of the same rows and rule");
  REQUIRE_INVALID(range.partial(&fewer), "merged", "row statistics of this call");
  PartialOutput<float> output = range.partial(&statistics);
  PartialOutput<float> narrower = output;
  narrower.head_dim = 8;
  REQUIRE_INVALID(output.merge(narrower), "other", "a partial output of the same shape");
  PartialOutput<float> other_rule = output;
  other_rule.rows[1].state.mass.length += 1;
  REQUIRE_INVALID(output.merge(other_rule), "other", "decided by the same rule");
  Problem<float> small(1, 40, 2, 1, 16, 7);
  REQUIRE_INVALID(finish_partial_attention(output, selection, small.output()), "out", "of the partial");
}

TEST_CASE("partial encoding: every byte string but a whole valid encoding is rejected", "[partial][bad input]") {
  Problem<float> problem(2, 40, 2, 1, 16, 11);
  const LayerThresholds table = LayerThresholds::uniform(4, ThresholdSpace::probability, {0.05, 0.05});
  const TopThetaSelection selection(table, with(DenominatorCompensation::none, true), true, Passes::automatic);
  KeyRangeAttention<float, TopThetaSelection> range(problem.queries(), key_range(problem.keys(), 0, 40),
                                                    key_range(problem.values(), 0, 40), KeyRange{0, 40},
                                                    placed(true, 38), selection);
  const auto statistics = encode_partial(range.statistics());
  const auto output = encode_partial(range.partial(&range.statistics()));
  REQUIRE(encode_partial(decode_partial_statistics<float>(statistics.data(), statistics.size())) == statistics);
  REQUIRE(encode_partial(decode_partial_output<float>(output.data(), output.size())) == output);
  for (std::size_t size = 0; size < output.size(); ++size)
    REQUIRE_THROWS_AS(decode_partial_output<float>(output.data(), size), invalid_argument);
  for (std::size_t size = 0; size < statistics.size(); ++size)
    REQUIRE_THROWS_AS(decode_partial_statistics<float>(statistics.data(), size), invalid_argument);
  const auto changed = [](std::vector<std::uint8_t> bytes, std::size_t at, std::uint8_t value) {
    bytes[at] = value;
    return bytes;
  };
  const auto decode = [](const std::vector<std::uint8_t>& bytes) {
    return decode_partial_output<float>(bytes.data(), bytes.size());
  };
  REQUIRE_INVALID(decode(changed(output, 0, 'X')), "bytes", "magic");
  REQUIRE_INVALID(decode(changed(output, 4, 2)), "bytes", "encoding version 1");
  REQUIRE_INVALID(decode(changed(output, 5, 1)), "bytes", "a partial output (kind 2)");
  REQUIRE_INVALID(decode(changed(output, 6, 8)), "bytes", "values of 4 bytes");
  REQUIRE_INVALID(decode_partial_output<double>(output.data(), output.size()), "bytes", "values of 8 bytes");
  REQUIRE_INVALID(decode(changed(output, 24, 4)), "bytes", "V sum flags without unknown bits");
  REQUIRE_INVALID(decode(changed(output, 25, 64)), "bytes", "row flags without unknown bits");
  std::vector<std::uint8_t> longer = output;
  longer.push_back(0);
  REQUIRE_INVALID(decode(longer), "bytes", "the end at offset");
  REQUIRE_INVALID(decode(changed(output, 8, 0xff)), "bytes", "rows of at least");
}
