// Batched attention: one call over many sequences (each with its own length, placement, number of new query
// tokens, V prefix sum and statistics) gives every sequence exactly what its own call gives, for any thread
// count; bad sequences are named by index.
#include "test_support.hpp"

#include <memory>

using namespace toptheta;
using namespace toptheta_test;

namespace {

/// A batch of sequences of different shapes sharing the head layout: decode steps of short and long caches
/// (split keys), a speculative step of 3 tokens, a sequence with nothing to attend, and a chunked prefill.
template <class Scalar>
struct Batch {
  struct Sequence {
    std::unique_ptr<Problem<Scalar>> problem;
    Index past;
  };
  std::vector<Sequence> sequences;
  std::vector<std::vector<double>> prefix_sums;

  Batch(Index q_heads, Index kv_heads, Index dim, unsigned seed) {
    const std::pair<Index, Index> shapes[] = {{1, 40}, {1, 700}, {3, 90}, {0, 12}, {70, 200}, {1, 1}};
    for (const auto& [query_rows, key_rows] : shapes) {
      sequences.push_back({std::make_unique<Problem<Scalar>>(query_rows, key_rows, q_heads, kv_heads, dim, seed++),
                           key_rows - query_rows});
      // Σ_{j<past} v_j per KV head, as a KvCache keeps it.
      const Problem<Scalar>& p = *sequences.back().problem;
      std::vector<double> sum(std::size_t(kv_heads * dim), 0.0);
      for (Index j = 0; j < key_rows - query_rows; ++j)
        for (Index h = 0; h < kv_heads; ++h)
          for (Index d = 0; d < dim; ++d)
            sum[std::size_t(h * dim + d)] += double(p.v[std::size_t((j * kv_heads + h) * dim + d)]);
      prefix_sums.push_back(sum);
    }
  }

  std::vector<SequenceViews<Scalar>> views(std::vector<AttentionStats>& stats, bool prefix_sums_given) {
    stats.assign(sequences.size(), AttentionStats{});
    std::vector<SequenceViews<Scalar>> result;
    for (std::size_t s = 0; s < sequences.size(); ++s) {
      Problem<Scalar>& p = *sequences[s].problem;
      result.push_back({p.queries(), p.keys(), p.values(), p.output(), sequences[s].past,
                        prefix_sums_given ? prefix_sums[s].data() : nullptr, &stats[s]});
    }
    return result;
  }
};

enum class Kind {
  dense,
  top_k,
  top_theta_probability,
  top_theta_raw,
  top_theta_two_pass,
  top_theta_probability_pruned_mean,
  top_theta_raw_pruned_mean
};
const Kind every_kind[] = {Kind::dense,
                           Kind::top_k,
                           Kind::top_theta_probability,
                           Kind::top_theta_raw,
                           Kind::top_theta_two_pass,
                           Kind::top_theta_probability_pruned_mean,
                           Kind::top_theta_raw_pruned_mean};
const char* name(Kind kind) {
  switch (kind) {
    case Kind::dense:
      return "dense";
    case Kind::top_k:
      return "top_k";
    case Kind::top_theta_probability:
      return "top_theta probability, V mean";
    case Kind::top_theta_raw:
      return "top_theta raw_score";
    case Kind::top_theta_two_pass:
      return "top_theta probability, two passes";
    case Kind::top_theta_probability_pruned_mean:
      return "top_theta probability, V mean of the pruned rows";
    case Kind::top_theta_raw_pruned_mean:
      return "top_theta raw_score, V mean of the pruned rows";
  }
  return "";
}

LayerThresholds thresholds_for(Kind kind, Index q_heads) {
  const bool raw = kind == Kind::top_theta_raw || kind == Kind::top_theta_raw_pruned_mean;
  return LayerThresholds::uniform(8, raw ? ThresholdSpace::raw_score : ThresholdSpace::probability,
                                  std::vector<double>(std::size_t(q_heads), raw ? 0.2 : 0.02));
}

/// The Top-θ kinds' options.
TopThetaOptions top_theta_options(Kind kind) {
  TopThetaOptions options;
  options.compensation.v_mean = kind != Kind::top_theta_raw;
  options.compensation.v_mean_of_pruned =
      kind == Kind::top_theta_probability_pruned_mean || kind == Kind::top_theta_raw_pruned_mean;
  options.passes = kind == Kind::top_theta_two_pass ? Passes::two : Passes::automatic;
  return options;
}

template <class Scalar>
void attend_batch(Kind kind, const std::vector<SequenceViews<Scalar>>& batch, Index q_heads, int threads) {
  const OpenMPExecutor executor{threads};
  if (kind == Kind::dense) return dense_attention(batch, AttentionOptions{}, executor);
  if (kind == Kind::top_k) {
    TopKOptions options;
    options.k = 8;
    options.compensation.v_mean = true;
    return top_k_attention(batch, options, executor);
  }
  top_theta_attention(batch, thresholds_for(kind, q_heads), top_theta_options(kind), executor);
}

template <class Scalar>
void attend_alone(Kind kind, const SequenceViews<Scalar>& s, Index q_heads, int threads) {
  const OpenMPExecutor executor{threads};
  AttentionOptions attention;
  attention.past = s.past;
  if (kind == Kind::dense) return dense_attention(s.q, s.k, s.v, s.out, attention, s.stats, executor);
  if (kind == Kind::top_k) {
    TopKOptions options;
    options.attention = attention;
    options.k = 8;
    options.compensation.v_mean = true;
    options.value_prefix_sum = s.value_prefix_sum;
    return top_k_attention(s.q, s.k, s.v, s.out, options, s.stats, executor);
  }
  TopThetaOptions options = top_theta_options(kind);
  options.attention = attention;
  options.value_prefix_sum = s.value_prefix_sum;
  top_theta_attention(s.q, s.k, s.v, s.out, thresholds_for(kind, q_heads), options, s.stats, executor);
}

bool same_stats(const AttentionStats& a, const AttentionStats& b) {
  return a.elements_kept == b.elements_kept && a.elements_visible == b.elements_visible &&
         a.v_rows_kept == b.v_rows_kept && a.v_rows_visible == b.v_rows_visible && a.k_rows_read == b.k_rows_read &&
         a.v_rows_read == b.v_rows_read && a.kv_tiles == b.kv_tiles &&
         a.kv_tiles_without_survivor == b.kv_tiles_without_survivor && a.rows == b.rows &&
         a.dense_rows == b.dense_rows && a.empty_rows == b.empty_rows && a.capped_rows == b.capped_rows &&
         a.non_finite_rows == b.non_finite_rows;
}

}  // namespace

// float only: batching changes which items run together, not how a call computes (the single-call tests cover
// the stored types), and every further type costs CI a full instantiation of the kernels.
TEMPLATE_TEST_CASE("a batched call gives every sequence its own call's output and statistics, bit for bit", "[batch]",
                   float) {
  const Kind kind = GENERATE(from_range(std::begin(every_kind), std::end(every_kind)));
  const int threads = GENERATE(1, 2, 3);
  const bool prefix_sums = GENERATE(false, true);
  INFO(name(kind) << ", " << type_name<TestType>() << ", " << threads << " threads, V prefix sums " << prefix_sums);
  const Index q_heads = 6, kv_heads = 2, dim = 24;
  Batch<TestType> batched(q_heads, kv_heads, dim, 17), alone(q_heads, kv_heads, dim, 17);
  std::vector<AttentionStats> batched_stats, alone_stats;
  attend_batch(kind, batched.views(batched_stats, prefix_sums), q_heads, threads);
  const auto singles = alone.views(alone_stats, prefix_sums);
  for (const auto& single : singles) attend_alone(kind, single, q_heads, 1);
  for (std::size_t s = 0; s < singles.size(); ++s) {
    INFO("sequence " << s);
    CHECK(batched.sequences[s].problem->out == alone.sequences[s].problem->out);
    CHECK(same_stats(batched_stats[s], alone_stats[s]));
  }
  CHECK(batched_stats[3].rows == 0);  // nothing to attend
  CHECK(batched_stats[4].rows == std::uint64_t(70 * q_heads));
}

TEST_CASE("a batch of many decode steps, some collecting statistics and some not, gives each its own bits", "[batch]") {
  // 24 sequences of 700 keys: 3 key ranges each, so the first calls fill a group of work items whose merges run
  // while the later calls' ranges start, on blocks the merges gave back.
  const Kind kind = GENERATE(Kind::top_theta_probability, Kind::top_theta_raw_pruned_mean);
  const int threads = GENERATE(1, 2);
  const Index q_heads = 4, kv_heads = 2, dim = 16, count = 24;
  std::vector<std::unique_ptr<Problem<float>>> batched, alone;
  std::vector<AttentionStats> batched_stats(count), alone_stats(count);
  std::vector<SequenceViews<float>> views;
  for (Index s = 0; s < count; ++s) {
    batched.push_back(std::make_unique<Problem<float>>(1, 700, q_heads, kv_heads, dim, unsigned(40 + s)));
    alone.push_back(std::make_unique<Problem<float>>(1, 700, q_heads, kv_heads, dim, unsigned(40 + s)));
    const bool stats = s < 22 || s % 2 == 1;
    views.push_back({batched.back()->queries(), batched.back()->keys(), batched.back()->values(),
                     batched.back()->output(), 699, nullptr, stats ? &batched_stats[std::size_t(s)] : nullptr});
  }
  INFO(name(kind) << ", " << threads << " threads");
  attend_batch(kind, views, q_heads, threads);
  for (Index s = 0; s < count; ++s) {
    const bool stats = s < 22 || s % 2 == 1;
    Problem<float>& p = *alone[std::size_t(s)];
    attend_alone(kind,
                 SequenceViews<float>{p.queries(), p.keys(), p.values(), p.output(), 699, nullptr,
                                      stats ? &alone_stats[std::size_t(s)] : nullptr},
                 q_heads, 1);
    INFO("sequence " << s);
    CHECK(batched[std::size_t(s)]->out == p.out);
    if (stats) CHECK(same_stats(batched_stats[std::size_t(s)], alone_stats[std::size_t(s)]));
  }
}

TEST_CASE("a non-finite V value in one sequence of a batch leaves the others' bits alone", "[batch][non_finite]") {
  const Index q_heads = 4, kv_heads = 2, dim = 16;
  Batch<float> batched(q_heads, kv_heads, dim, 3), alone(q_heads, kv_heads, dim, 3);
  for (Batch<float>* batch : {&batched, &alone})  // V row 5 of the 200-key sequence, KV head 0
    std::fill_n(batch->sequences[4].problem->v.data() + 5 * kv_heads * dim, dim,
                std::numeric_limits<float>::infinity());
  std::vector<AttentionStats> batched_stats, alone_stats;
  attend_batch(Kind::dense, batched.views(batched_stats, false), q_heads, 2);
  for (const auto& single : alone.views(alone_stats, false)) attend_alone(Kind::dense, single, q_heads, 2);
  for (std::size_t s = 0; s < batched.sequences.size(); ++s) {
    INFO("sequence " << s);
    CHECK(batched.sequences[s].problem->out == alone.sequences[s].problem->out);
  }
}

TEST_CASE("a bad sequence of a batch is named by its index, before any output is written", "[batch][bad_input]") {
  const Index q_heads = 4, kv_heads = 2, dim = 8;
  Batch<float> batch(q_heads, kv_heads, dim, 1);
  std::vector<AttentionStats> stats;
  auto views = batch.views(stats, false);
  const std::vector<float> before = batch.sequences[0].problem->out;
  views[2].past = 200;  // beyond its keys
  REQUIRE_INVALID(dense_attention(views), "sequences[2].k.tokens", "for causal attention");
  CHECK(batch.sequences[0].problem->out == before);
  views = batch.views(stats, false);
  views[1].out = TensorView<float>(const_cast<float*>(views[1].v.data()), 1, q_heads, dim, 0, 0);
  REQUIRE_INVALID(dense_attention(views), "sequences[1].out", "rows that do not overlap");
  views = batch.views(stats, false);
  AttentionOptions shared;
  shared.past = 3;
  REQUIRE_INVALID(dense_attention(views, shared), "options.past", "set SequenceViews::past per sequence");
  const auto table = LayerThresholds::uniform(8, ThresholdSpace::raw_score, {0.0, 0.0});
  REQUIRE_INVALID(top_theta_attention(views, table), "thresholds", "one row per query head of sequences[0] (4)");
  REQUIRE_NOTHROW(dense_attention(std::vector<SequenceViews<float>>{}));
}
