// Reliability: non-finite data, empty calls, aliasing outputs and options that overflow the accumulator never
// read outside the buffers, never crash, and never give a silently wrong number. The rules (README, "Bad and
// non-finite input"): a row without a softmax (a NaN or +inf score, or every score -inf) comes out NaN and reads
// no V row; a V row changes only the rows that weigh it; an empty call does nothing; an output that overlaps an
// input or itself is rejected.
#include "test_support.hpp"

#include <memory>

using namespace toptheta;
using namespace toptheta_test;

namespace {

const double not_a_number = std::numeric_limits<double>::quiet_NaN();
const double infinity = std::numeric_limits<double>::infinity();

/// One kernel configuration of the library: dense, top-k, or Top-θ in a space with one θ for every head.
struct KernelCase {
  const char* name;
  enum Kind { dense, top_k, top_theta } kind;
  ThresholdSpace space = ThresholdSpace::raw_score;
  double theta = 0;
  bool v_mean = false;
  Passes passes = Passes::automatic;
};

const KernelCase every_kernel[] = {
    {"dense", KernelCase::dense},
    {"top_k", KernelCase::top_k},
    {"top_theta raw_score", KernelCase::top_theta, ThresholdSpace::raw_score, 0.0},
    {"top_theta probability, V mean", KernelCase::top_theta, ThresholdSpace::probability, 0.01, true},
    {"top_theta probability, two passes", KernelCase::top_theta, ThresholdSpace::probability, 0.01, false, Passes::two},
    {"top_theta score_minus_max", KernelCase::top_theta, ThresholdSpace::score_minus_max, -2.0},
    {"top_theta score_over_query_norm", KernelCase::top_theta, ThresholdSpace::score_over_query_norm, 0.1},
};

template <class Scalar>
void attend(const KernelCase& kernel, const Problem<Scalar>& problem, TensorView<Scalar> out,
            const AttentionOptions& attention, AttentionStats* stats = nullptr, int threads = 2) {
  const OpenMPExecutor executor{threads};
  switch (kernel.kind) {
    case KernelCase::dense:
      dense_attention(problem.queries(), problem.keys(), problem.values(), out, attention, stats, executor);
      return;
    case KernelCase::top_k: {
      TopKOptions options;
      options.attention = attention;
      options.k = 8;
      top_k_attention(problem.queries(), problem.keys(), problem.values(), out, options, stats, executor);
      return;
    }
    case KernelCase::top_theta: {
      TopThetaOptions options;
      options.attention = attention;
      options.compensation.v_mean = kernel.v_mean;
      options.passes = kernel.passes;
      const auto table =
          LayerThresholds::uniform(8, kernel.space, std::vector<double>(std::size_t(problem.q_heads), kernel.theta));
      top_theta_attention(problem.queries(), problem.keys(), problem.values(), out, table, options, stats, executor);
      return;
    }
  }
}

template <class Scalar>
bool row_is_nan(const TensorView<Scalar>& out, Index t, Index h) {
  for (Index d = 0; d < out.head_dim(); ++d)
    if (!std::isnan(double(out.row(t, h)[d]))) return false;
  return true;
}

template <class Scalar>
bool row_is_finite(const TensorView<Scalar>& out, Index t, Index h) {
  for (Index d = 0; d < out.head_dim(); ++d)
    if (!std::isfinite(double(out.row(t, h)[d]))) return false;
  return true;
}

/// max_d |a - b| / max(1, max_d |b|) of one output row.
template <class Scalar>
double row_error(const TensorView<Scalar>& a, const TensorView<Scalar>& b, Index t, Index h) {
  double error = 0, scale = 1;
  for (Index d = 0; d < a.head_dim(); ++d) {
    error = std::max(error, std::abs(double(a.row(t, h)[d]) - double(b.row(t, h)[d])));
    scale = std::max(scale, std::abs(double(b.row(t, h)[d])));
  }
  return error / scale;
}

/// How far a row may move when only other rows of its block change: a block picks how it adds V rows (a GEMM,
/// a stream, gathers) from all of its rows' selections, and each way rounds differently.
template <class Scalar>
double rounding() {
  return 16 * double(std::numeric_limits<Scalar>::epsilon());
}

/// The calls every path of the tiled kernel takes: one decode row (streaming), a long decode row (split keys),
/// a chunk after a cached prefix (chunked prefill) and a prefill of several query blocks (GEMM blocks).
struct CallShape {
  const char* name;
  Index query_rows, key_rows;
};
const CallShape every_path[] = {
    {"decode", 1, 64}, {"split-key decode", 1, 700}, {"chunked prefill", 40, 130}, {"prefill", 150, 150}};

AttentionOptions causal_after(Index query_rows, Index key_rows) {
  AttentionOptions options;
  options.causal = true;
  options.past = key_rows - query_rows;
  return options;
}

}  // namespace

TEST_CASE("a NaN or -inf query row comes out NaN and changes no other row beyond rounding",
          "[reliability][non_finite]") {
  const KernelCase kernel = GENERATE(from_range(std::begin(every_kernel), std::end(every_kernel)));
  const CallShape path = GENERATE(from_range(std::begin(every_path), std::end(every_path)));
  const double poison = GENERATE(0, 1) == 0 ? not_a_number : -infinity;  // (GENERATE of a negated double dangles)
  INFO(kernel.name << ", " << path.name << ", query value " << poison);
  Problem<float> clean(path.query_rows, path.key_rows, 4, 2, 16, 3);
  if (poison < 0)  // q = (-inf, 0, ...) and every k[., 0] > 0: every score of the row is -inf
    for (Index j = 0; j < clean.key_rows; ++j)
      for (Index h = 0; h < clean.kv_heads; ++h)
        clean.k[std::size_t((j * clean.kv_heads + h) * clean.head_dim)] = 0.5f + 0.01f * float(j % 7);
  const AttentionOptions attention = causal_after(path.query_rows, path.key_rows);
  attend(kernel, clean, clean.output(), attention);

  Problem<float> poisoned = clean;
  const Index bad_row = path.query_rows - 1, bad_head = 1;
  float* query = poisoned.q.data() + (bad_row * poisoned.q_heads + bad_head) * poisoned.head_dim;
  std::fill_n(query, poisoned.head_dim, poison < 0 ? 0.0f : float(poison));
  query[0] = float(poison);
  AttentionStats stats;
  attend(kernel, poisoned, poisoned.output(), attention, &stats);
  CHECK(stats.non_finite_rows == 1);
  CHECK(stats.empty_rows == 0);
  const auto out = poisoned.output(), expected = clean.output();
  for (Index t = 0; t < path.query_rows; ++t)
    for (Index h = 0; h < poisoned.q_heads; ++h) {
      INFO("row " << t << ", head " << h);
      if (t == bad_row && h == bad_head) {
        CHECK(row_is_nan(out, t, h));
      } else {
        CHECK(row_error(out, expected, t, h) <= rounding<float>());
      }
    }
}

TEST_CASE("the issue's case: f32 decode of 64 keys with an all-NaN query reads no V row -1",
          "[reliability][non_finite]") {
  const KernelCase kernel = GENERATE(from_range(std::begin(every_kernel), std::end(every_kernel)));
  INFO(kernel.name);
  Problem<float> problem(1, 64, 1, 1, 16, 1);
  std::fill(problem.q.begin(), problem.q.end(), std::numeric_limits<float>::quiet_NaN());
  std::fill(problem.k.begin(), problem.k.end(), 0.5f);
  std::fill(problem.v.begin(), problem.v.end(), 1.0f);
  AttentionStats stats;
  attend(kernel, problem, problem.output(), causal_after(1, 64), &stats);
  CHECK(row_is_nan(problem.output(), 0, 0));
  CHECK(stats.non_finite_rows == 1);
  if (kernel.kind != KernelCase::dense) CHECK(AttentionStats::total(stats.v_rows_read) == 0);  // nothing selected
}

TEST_CASE("a NaN or +inf key gives NaN exactly to the rows that see it", "[reliability][non_finite]") {
  const KernelCase kernel = GENERATE(from_range(std::begin(every_kernel), std::end(every_kernel)));
  const CallShape path = GENERATE(from_range(std::begin(every_path), std::end(every_path)));
  const double poison = GENERATE(0, 1) == 0 ? not_a_number : infinity;
  INFO(kernel.name << ", " << path.name << ", key value " << poison);
  Problem<double> clean(path.query_rows, path.key_rows, 4, 2, 16, 5);
  const AttentionOptions attention = causal_after(path.query_rows, path.key_rows);
  attend(kernel, clean, clean.output(), attention);
  Problem<double> poisoned = clean;
  const Index bad_key = path.key_rows - path.query_rows / 2 - 1, bad_kv_head = 0;
  std::fill_n(poisoned.k.data() + (bad_key * poisoned.kv_heads + bad_kv_head) * poisoned.head_dim, poisoned.head_dim,
              poison);
  AttentionStats stats;
  attend(kernel, poisoned, poisoned.output(), attention, &stats);
  std::uint64_t sees_it = 0;
  const auto out = poisoned.output(), expected = clean.output();
  for (Index t = 0; t < path.query_rows; ++t)
    for (Index h = 0; h < poisoned.q_heads; ++h) {
      INFO("row " << t << ", head " << h);
      const bool sees = h / 2 == bad_kv_head && attention.past + t >= bad_key;
      sees_it += sees;
      if (sees) {
        CHECK(row_is_nan(out, t, h));
      } else {
        CHECK(row_error(out, expected, t, h) <= rounding<double>());
      }
    }
  CHECK(stats.non_finite_rows == sees_it);
}

TEST_CASE("scores that overflow to +inf from finite data give NaN rows, not wrong numbers",
          "[reliability][non_finite]") {
  const KernelCase kernel = GENERATE(from_range(std::begin(every_kernel), std::end(every_kernel)));
  INFO(kernel.name);
  Problem<float> problem(1, 40, 2, 1, 8, 2);
  for (float& x : problem.q) x *= 1e20f;
  for (float& x : problem.k) x *= 1e20f;
  AttentionStats stats;
  attend(kernel, problem, problem.output(), causal_after(1, 40), &stats);
  CHECK(stats.non_finite_rows == 2);
  CHECK(row_is_nan(problem.output(), 0, 0));
  CHECK(row_is_nan(problem.output(), 0, 1));
}

TEST_CASE("a non-finite V row changes only the rows that weigh it", "[reliability][non_finite]") {
  const KernelCase kernel = GENERATE(from_range(std::begin(every_kernel), std::end(every_kernel)));
  const double poison = GENERATE(0, 1) == 0 ? infinity : not_a_number;
  const Index tokens = GENERATE(4, 16, 300);
  INFO(kernel.name << ", " << tokens << " causal tokens, V value " << poison);
  // The case: f64, q = k = v [tokens, 2, 16], V[3, head 0, :] poisoned; rows 0-2 cannot see key 3.
  Problem<double> clean(tokens, tokens, 2, 2, 16, 7);
  clean.k = clean.q;
  clean.v = clean.q;
  const AttentionOptions attention = causal_after(tokens, tokens);
  attend(kernel, clean, clean.output(), attention);
  Problem<double> poisoned = clean;
  std::fill_n(poisoned.v.data() + (3 * poisoned.kv_heads + 0) * poisoned.head_dim, poisoned.head_dim, poison);
  attend(kernel, poisoned, poisoned.output(), attention);
  const auto out = poisoned.output(), expected = clean.output();
  for (Index t = 0; t < tokens; ++t)
    for (Index h = 0; h < 2; ++h) {
      if (h == 0 && t >= 3) continue;  // may weigh V row 3
      INFO("row " << t << ", head " << h);
      CHECK(row_is_finite(out, t, h));
      CHECK(row_error(out, expected, t, h) <= rounding<double>());
    }
}

TEST_CASE("a non-finite V row that every row prunes changes no output", "[reliability][non_finite]") {
  const Index tokens = GENERATE(64, 300);
  const bool causal = GENERATE(false, true);
  INFO(tokens << " tokens, causal " << causal);
  Problem<float> clean(tokens, tokens, 2, 1, 16, 9);
  // Every query positive and key 1 all -50: its score is far below the raw-score threshold 0 in every row.
  for (float& x : clean.q) x = std::abs(x) + 1;
  std::fill_n(clean.k.data() + 16, 16, -50.0f);
  AttentionOptions attention;
  attention.causal = causal;
  attention.past = 0;
  const KernelCase raw{"top_theta raw_score", KernelCase::top_theta, ThresholdSpace::raw_score, 0.0};
  attend(raw, clean, clean.output(), attention);
  Problem<float> poisoned = clean;
  std::fill_n(poisoned.v.data() + 16, 16, std::numeric_limits<float>::infinity());
  AttentionStats stats;
  attend(raw, poisoned, poisoned.output(), attention, &stats);
  const auto out = poisoned.output(), expected = clean.output();
  for (Index t = causal ? 8 : 0; t < tokens; ++t)  // causal rows of length <= k = 8 are dense: they weigh key 1
    for (Index h = 0; h < 2; ++h) {
      INFO("row " << t << ", head " << h);
      REQUIRE(row_is_finite(out, t, h));
      CHECK(row_error(out, expected, t, h) <= rounding<float>());
    }
}

TEST_CASE("thresholded_softmax lists a NaN row's columns with NaN probabilities, never column -1",
          "[reliability][non_finite]") {
  const Eigen::MatrixXd scores = Eigen::MatrixXd::Constant(1, 10, not_a_number);
  const auto table = LayerThresholds::uniform(2, ThresholdSpace::raw_score, {0.0});
  const TopThetaSelection selection(table, {}, false, Passes::automatic);
  AttentionStats stats;
  const auto result = thresholded_softmax(scores, selection, ScoreRows{}, &stats);
  REQUIRE(result.columns.size() == 10);
  for (std::size_t t = 0; t < 10; ++t) {
    CHECK(result.columns[t] == Index(t));
    CHECK(std::isnan(result.probabilities[t]));
  }
  CHECK(std::isnan(result.dropped_mass[0]));
  CHECK(stats.non_finite_rows == 1);
  CHECK(stats.empty_rows == 0);
}

TEST_CASE("a call with no query rows does nothing and counts nothing", "[reliability][empty]") {
  const KernelCase kernel = GENERATE(from_range(std::begin(every_kernel), std::end(every_kernel)));
  INFO(kernel.name);
  Problem<float> problem(0, 5, 2, 1, 8, 1);  // q [0, 2, 8], k and v [5, 1, 8], past 5
  AttentionStats stats;
  REQUIRE_NOTHROW(attend(kernel, problem, problem.output(), causal_after(0, 5), &stats));
  CHECK(stats.rows == 0);
  CHECK(AttentionStats::total(stats.k_rows_read) == 0);
  AttentionOptions non_causal;
  non_causal.causal = false;
  REQUIRE_NOTHROW(attend(kernel, problem, problem.output(), non_causal, &stats));
  CHECK(stats.rows == 0);
}

TEST_CASE("a zero query in the score/||q|| space keeps every key under a keep-everything threshold",
          "[reliability][non_finite]") {
  Problem<double> problem(1, 40, 1, 1, 8, 4);
  std::fill(problem.q.begin(), problem.q.end(), 0.0);
  TopThetaOptions options;
  options.attention = causal_after(1, 40);
  AttentionStats stats;
  const auto keep_all =
      LayerThresholds::uniform(4, ThresholdSpace::score_over_query_norm, {std::numeric_limits<double>::lowest()});
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), keep_all, options, &stats);
  Eigen::VectorXd mean = Eigen::VectorXd::Zero(8);
  for (Index j = 0; j < 40; ++j)
    for (Index d = 0; d < 8; ++d) mean(d) += problem.v[std::size_t(j * 8 + d)] / 40;
  for (Index d = 0; d < 8; ++d) CHECK(problem.out[std::size_t(d)] == Approx(mean(d)).epsilon(1e-12));
  CHECK(AttentionStats::total(stats.elements_kept) == 40);
  // A threshold >= 0: the value 0 does not pass, and the never-empty rule keeps the last key (all scores tie).
  const auto keep_none = LayerThresholds::uniform(4, ThresholdSpace::score_over_query_norm, {0.0});
  top_theta_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), keep_none, options,
                      &stats);
  CHECK(stats.empty_rows == 1);
  for (Index d = 0; d < 8; ++d) CHECK(problem.out[std::size_t(d)] == problem.v[std::size_t(39 * 8 + d)]);
}

TEMPLATE_TEST_CASE("a scale that is finite in double but not in the accumulator is rejected naming options.scale",
                   "[reliability][bad_input]", float, Eigen::half, Eigen::bfloat16) {
  Problem<TestType> problem(1, 4, 1, 1, 8, 1);
  AttentionOptions attention = causal_after(1, 4);
  for (const double scale : {1e39, 1e-50}) {
    attention.scale = scale;
    REQUIRE_INVALID(dense_attention(problem.queries(), problem.keys(), problem.values(), problem.output(), attention),
                    "options.scale", "float accumulator");
  }
}

TEST_CASE("an output that overlaps q, k, v or itself is rejected naming out", "[reliability][aliasing]") {
  Problem<float> problem(65, 65, 1, 1, 16, 1);
  const AttentionOptions attention = causal_after(65, 65);
  std::vector<float> values = problem.v;
  const TensorView<const float> v(values.data(), 65, 1, 16);
  const TensorView<float> out_on_v(values.data(), 65, 1, 16);
  REQUIRE_INVALID(dense_attention(problem.queries(), problem.keys(), v, out_on_v, attention), "out",
                  "memory apart from v");
  std::vector<float> queries = problem.q;
  REQUIRE_INVALID(dense_attention(TensorView<const float>(queries.data(), 65, 1, 16), problem.keys(), problem.values(),
                                  TensorView<float>(queries.data(), 65, 1, 16), attention),
                  "out", "memory apart from q");
  std::vector<float> three_rows(16);
  const Problem<float> small(3, 3, 1, 1, 16, 2);
  REQUIRE_INVALID(dense_attention(small.queries(), small.keys(), small.values(),
                                  TensorView<float>(three_rows.data(), 3, 1, 16, 0, 16), causal_after(3, 3)),
                  "out", "rows that do not overlap");
  // Half a row apart: rows overlap.
  std::vector<float> half_apart(3 * 8 + 8);
  REQUIRE_INVALID(dense_attention(small.queries(), small.keys(), small.values(),
                                  TensorView<float>(half_apart.data(), 3, 1, 16, 8, 16), causal_after(3, 3)),
                  "out", "rows that do not overlap");
}

TEST_CASE("q, k, v and out as head ranges of one fused buffer are accepted and give the separate result",
          "[reliability][aliasing]") {
  // One buffer [tokens, 4 + 2 + 2 + 4 heads, 16]: q heads 0-3, k 4-5, v 6-7, out 8-11 of every token.
  const Index tokens = 70, dim = 16, stride = 12 * dim;
  const Problem<float> problem(tokens, tokens, 4, 2, dim, 8);
  std::vector<float> fused(std::size_t(tokens * stride), 0.0f);
  for (Index t = 0; t < tokens; ++t) {
    std::copy_n(problem.q.data() + t * 4 * dim, 4 * dim, fused.data() + t * stride);
    std::copy_n(problem.k.data() + t * 2 * dim, 2 * dim, fused.data() + t * stride + 4 * dim);
    std::copy_n(problem.v.data() + t * 2 * dim, 2 * dim, fused.data() + t * stride + 6 * dim);
  }
  const auto view = [&](Index first_head, Index heads) {
    return TensorView<float>(fused.data() + first_head * dim, tokens, heads, dim, stride, dim);
  };
  const AttentionOptions attention = causal_after(tokens, tokens);
  dense_attention(TensorView<const float>(view(0, 4)), TensorView<const float>(view(4, 2)),
                  TensorView<const float>(view(6, 2)), view(8, 4), attention);
  Problem<float> separate = problem;
  dense_attention(separate.queries(), separate.keys(), separate.values(), separate.output(), attention);
  for (Index t = 0; t < tokens; ++t)
    for (Index h = 0; h < 4; ++h)
      for (Index d = 0; d < dim; ++d)
        REQUIRE(fused[std::size_t(t * stride + (8 + h) * dim + d)] == separate.out[std::size_t((t * 4 + h) * dim + d)]);
}

TEST_CASE("a KV cache capacity whose storage cannot be addressed is rejected naming capacity",
          "[reliability][kv_cache]") {
  const Index huge = std::numeric_limits<Index>::max() / 2;
  REQUIRE_INVALID(KvCache<float>(4, 8, huge), "capacity", "must be addressable");
  REQUIRE_INVALID(KvCache<float>(4, huge, 1), "head_dim", "must be addressable");
}

TEST_CASE(
    "KvCache::append rejects non-finite K or V values by default, naming the token and head, and changes "
    "nothing",
    "[reliability][kv_cache]") {
  const int which = GENERATE(0, 1, 2);
  const double poison = which == 0 ? not_a_number : which == 1 ? infinity : -infinity;
  const bool in_values = GENERATE(false, true);
  INFO("value " << poison << (in_values ? " in V" : " in K"));
  KvCache<float> cache(2, 4, 8);
  std::vector<float> keys(3 * 2 * 4, 0.5f), values(3 * 2 * 4, 1.0f);
  REQUIRE(cache.check_finite());
  cache.append(TensorView<const float>(keys.data(), 1, 2, 4), TensorView<const float>(values.data(), 1, 2, 4));
  (in_values ? values : keys)[std::size_t((1 * 2 + 1) * 4 + 2)] = float(poison);  // token 1, KV head 1
  REQUIRE_INVALID(
      cache.append(TensorView<const float>(keys.data(), 3, 2, 4), TensorView<const float>(values.data(), 3, 2, 4)),
      std::string(in_values ? "values" : "keys") + " (token 2, KV head 1, element 2)", "finite values");
  CHECK(cache.length() == 1);
  CHECK(cache.value_sum_before(1)[0] == 1.0);
  cache.check_finite(false);
  REQUIRE_NOTHROW(
      cache.append(TensorView<const float>(keys.data(), 3, 2, 4), TensorView<const float>(values.data(), 3, 2, 4)));
  CHECK(cache.length() == 4);
}

TEST_CASE("property: random shapes with NaN in q or k, or NaN or inf in v, never touch rows that do not see them",
          "[reliability][non_finite][property]") {
  const KernelCase kernel = GENERATE(from_range(std::begin(every_kernel), std::end(every_kernel)));
  std::mt19937 rng(11);
  const auto uniform = [&](Index low, Index high) { return std::uniform_int_distribution<Index>(low, high)(rng); };
  for (int trial = 0; trial < 24; ++trial) {
    const Index kv_heads = uniform(1, 2), group = uniform(1, 3), dim = uniform(1, 20);
    const Index query_rows = uniform(1, 70), extra_keys = uniform(0, 1) ? uniform(0, 300) : uniform(0, 4);
    const bool causal = uniform(0, 3) != 0;
    const int where = int(uniform(0, 2));  // 0: q, 1: k, 2: v
    const double poison = where == 2 && uniform(0, 1) ? infinity : not_a_number;
    Problem<float> clean(query_rows, query_rows + extra_keys, kv_heads * group, kv_heads, dim, unsigned(trial));
    AttentionOptions attention;
    attention.causal = causal;
    attention.past = causal ? extra_keys : 0;
    attend(kernel, clean, clean.output(), attention);
    Problem<float> poisoned = clean;
    const Index tokens = where == 0 ? query_rows : clean.key_rows, heads = where == 0 ? clean.q_heads : kv_heads;
    const Index bad_token = uniform(0, tokens - 1), bad_head = uniform(0, heads - 1);
    std::vector<float>& target = where == 0 ? poisoned.q : where == 1 ? poisoned.k : poisoned.v;
    target[std::size_t((bad_token * heads + bad_head) * dim + uniform(0, dim - 1))] = float(poison);
    AttentionStats stats;
    attend(kernel, poisoned, poisoned.output(), attention, &stats, int(uniform(1, 2)));
    INFO("trial " << trial << ": q [" << query_rows << ", " << clean.q_heads << ", " << dim << "], keys "
                  << clean.key_rows << ", causal " << causal << ", poison " << poison << " in "
                  << "qkv"[where] << " token " << bad_token << " head " << bad_head);
    const auto out = poisoned.output(), expected = clean.output();
    std::uint64_t nan_rows = 0;
    for (Index t = 0; t < query_rows; ++t)
      for (Index h = 0; h < clean.q_heads; ++h) {
        const Index length = causal ? attention.past + t + 1 : clean.key_rows;
        const bool sees = where == 0 ? t == bad_token && h == bad_head : h / group == bad_head && bad_token < length;
        INFO("row " << t << ", head " << h);
        if (where < 2 && sees) {
          CHECK(row_is_nan(out, t, h));
          ++nan_rows;
        } else if (!sees) {
          CHECK(row_is_finite(out, t, h));
          CHECK(row_error(out, expected, t, h) <= rounding<float>());
        }
      }
    if (where < 2) CHECK(stats.non_finite_rows == nan_rows);
  }
}
