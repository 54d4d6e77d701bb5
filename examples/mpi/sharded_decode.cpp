// Calibration and sharded decode over MPI.
// Calibration: each rank feeds its own texts to a `Calibrator`; the calibrators' states (calibrator_state.hpp)
// meet through MPI_Allgatherv and merge on every rank into the table one process would build.
// Decode: each rank holds one contiguous shard of a long KV cache (a synthetic Llama-3-8B layer: 32 query heads,
// 8 KV heads, head_dim 128), attends the decode step's query over its shard with `KeyRangeAttention`, and the
// partials meet through MPI collectives:
//   round 1 (row statistics; only for the rules that need them: row-relative spaces, caps, top-k)
//            MPI_Allgather of the byte counts, MPI_Allgatherv of the encoded statistics; every rank merges them;
//   round 2  MPI_Gather of the byte counts, MPI_Gatherv of the encoded partial outputs to rank 0, which merges
//            and finishes o_i.
// No K or V row leaves its rank. Rank 0 also runs the library's kernel over the whole cache and checks that the
// sharded result equals it (in double, to 1e-12, every rule); the exit status is 1 when any differs.
// With a llama2.c model directory and its threshold file it also checks a real model: stories260K decodes the
// first sequence of eval.tokens on every rank, and at its last step each layer's cache is sharded and attended
// with the layer's thresholds (probability space, V-mean compensation), checked against the kernel in float.
//
//   mpirun -np 2 build/examples/mpi/toptheta_sharded_decode [tokens (default 16384)]
//          [model directory (<dir>/stories260K.bin, <dir>/eval.tokens) thresholds.json]
#include <mpi.h>

#if TOPTHETA_HAVE_NLOHMANN_JSON
#include "llama2c/engine/engine.hpp"
#include "llama2c/tools/tokens.hpp"

#include <toptheta/threshold_io.hpp>

#include <filesystem>
#endif

#include <toptheta/calibrator_state.hpp>
#include <toptheta/key_range_attention.hpp>
#include <toptheta/partial_attention.hpp>
#include <toptheta/partial_encoding.hpp>
#include <toptheta/synthetic_attention.hpp>
#include <toptheta/toptheta.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <vector>

using namespace toptheta;

namespace {

constexpr Index k_budget = 32;  // the kept keys per row every threshold is calibrated for

/// Bytes and messages one rank sent in one decode step.
struct Traffic {
  std::uint64_t bytes = 0;
  int messages = 0;
  std::uint64_t v_rows_read = 0;  // by every rank (filled on rank 0)
};

/// Every rank's `bytes`, in rank order, on every rank (MPI_Allgather of the sizes, then MPI_Allgatherv).
std::vector<std::vector<std::uint8_t>> all_gather(const std::vector<std::uint8_t>& bytes, Traffic& traffic) {
  int ranks = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  const int size = int(bytes.size());
  std::vector<int> sizes(static_cast<std::size_t>(ranks)), offsets(static_cast<std::size_t>(ranks));
  MPI_Allgather(&size, 1, MPI_INT, sizes.data(), 1, MPI_INT, MPI_COMM_WORLD);
  int total = 0;
  for (int r = 0; r < ranks; ++r) {
    offsets[std::size_t(r)] = total;
    total += sizes[std::size_t(r)];
  }
  std::vector<std::uint8_t> all(static_cast<std::size_t>(total));
  MPI_Allgatherv(bytes.data(), size, MPI_BYTE, all.data(), sizes.data(), offsets.data(), MPI_BYTE, MPI_COMM_WORLD);
  traffic.bytes += sizeof(int) + bytes.size();
  traffic.messages += 2;
  std::vector<std::vector<std::uint8_t>> each;
  for (int r = 0; r < ranks; ++r)
    each.emplace_back(all.begin() + offsets[std::size_t(r)],
                      all.begin() + offsets[std::size_t(r)] + sizes[std::size_t(r)]);
  return each;
}

/// Every rank's `bytes`, in rank order, on rank 0 (MPI_Gather of the sizes, then MPI_Gatherv); empty elsewhere.
std::vector<std::vector<std::uint8_t>> gather(const std::vector<std::uint8_t>& bytes, int rank, Traffic& traffic) {
  int ranks = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  const int size = int(bytes.size());
  std::vector<int> sizes(static_cast<std::size_t>(ranks)), offsets(static_cast<std::size_t>(ranks));
  MPI_Gather(&size, 1, MPI_INT, sizes.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  int total = 0;
  for (int r = 0; r < ranks; ++r) {
    offsets[std::size_t(r)] = total;
    total += sizes[std::size_t(r)];
  }
  std::vector<std::uint8_t> all(std::size_t(rank == 0 ? total : 0));
  MPI_Gatherv(bytes.data(), size, MPI_BYTE, all.data(), sizes.data(), offsets.data(), MPI_BYTE, 0, MPI_COMM_WORLD);
  traffic.bytes += sizeof(int) + bytes.size();
  traffic.messages += 2;
  std::vector<std::vector<std::uint8_t>> each;
  if (rank == 0)
    for (int r = 0; r < ranks; ++r)
      each.emplace_back(all.begin() + offsets[std::size_t(r)],
                        all.begin() + offsets[std::size_t(r)] + sizes[std::size_t(r)]);
  return each;
}

/// One decode step of `selection` over this rank's shard: both rounds through MPI; o_i on rank 0 into `out`.
template <class Scalar, class Selection>
Traffic sharded_step(const TensorView<const Scalar>& q, const TensorView<const Scalar>& k_shard,
                     const TensorView<const Scalar>& v_shard, KeyRange range, const AttentionOptions& attention,
                     const Selection& selection, const double* value_sum, int rank, const TensorView<Scalar>& out,
                     std::uint64_t& v_rows_read) {
  using Acc = accumulator_t<Scalar>;
  Traffic traffic;
  AttentionStats stats;
  KeyRangeAttention<Scalar, Selection> shard(q, k_shard, v_shard, range, attention, selection, value_sum, &stats);
  std::optional<PartialStatistics<Acc>> merged;
  if (shard.statistics().needed)
    for (const auto& bytes : all_gather(encode_partial(shard.statistics()), traffic)) {
      auto statistics = decode_partial_statistics<Acc>(bytes.data(), bytes.size());
      if (merged)
        merged->merge(statistics);
      else
        merged = std::move(statistics);
    }
  const auto partials = gather(encode_partial(shard.partial(merged ? &*merged : nullptr)), rank, traffic);
  std::uint64_t read = AttentionStats::total(stats.v_rows_read);
  MPI_Reduce(rank == 0 ? MPI_IN_PLACE : &read, &read, 1, MPI_UINT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
  v_rows_read = read;
  if (rank != 0) return traffic;
  std::optional<PartialOutput<Acc>> output;
  for (const auto& bytes : partials) {
    auto partial = decode_partial_output<Acc>(bytes.data(), bytes.size());
    if (output)
      output->merge(partial);
    else
      output = std::move(partial);
  }
  finish_partial_attention(*output, selection, out);
  return traffic;
}

/// Feeds `calibrator` every causal score row of every query head of one synthetic text.
void observe(Calibrator& calibrator, const SyntheticAttention<float>& text) {
  const Index n = text.shape.tokens, d = text.shape.head_dim, heads = text.shape.q_heads;
  const Index group = heads / text.shape.kv_heads;
  std::vector<Index> lengths(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) lengths[std::size_t(i)] = i + 1;
  for (Index h = 0; h < heads; ++h) {
    const Eigen::MatrixXd queries = text.queries().head(h).cast<double>();
    const Eigen::MatrixXd scores =
        queries * text.keys().head(h / group).cast<double>().transpose() / std::sqrt(double(d));
    std::vector<double> norms(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) norms[std::size_t(i)] = queries.row(i).norm();
    calibrator.observe_rows(0, h, scores, lengths, norms);
  }
}

/// How a calibration split over the ranks compared with one process.
struct CalibrationCheck {
  std::uint64_t most_bytes = 0;            // the largest state a rank sent
  bool same_as_merged_in_process = false;  // bit for bit
  bool counts_as_one_calibrator = false;   // rows and values of every bucket
  double difference = 0;                   // largest relative difference of a θ from one calibrator fed every text
};

/// Per-head thresholds of `space` for `k_budget` kept keys (budget- or count-matched), calibrated in parallel: rank r
/// observes texts r, r + ranks, ... of `texts` synthetic texts through the layer's heads, the calibrators' states
/// meet on every rank (MPI_Allgatherv) and merge in rank order. Rank 0 checks the result against the same
/// calibrators merged in one process and against one calibrator fed every text.
LayerThresholds calibrate_in_parallel(const SyntheticAttentionOptions& shape, ThresholdSpace space, int texts, int rank,
                                      int ranks, CalibrationCheck& check) {
  CalibratorOptions options;
  options.shape = {1, shape.q_heads, shape.kv_heads, shape.head_dim};
  options.space = space;
  options.k = {k_budget};
  options.summary_masses = true;
  const auto text = [&](int t) {
    SyntheticAttentionOptions text_shape = shape;
    text_shape.seed = 100 + unsigned(t);  // the same heads (model seed), another text
    return SyntheticAttention<float>(text_shape);
  };
  const auto rank_calibrator = [&](int r) {
    Calibrator calibrator(options);
    for (int t = r; t < texts; t += ranks) observe(calibrator, text(t));
    return calibrator;
  };
  Traffic traffic;
  Calibrator merged(options);
  for (const auto& bytes : all_gather(encode_calibrator_state(rank_calibrator(rank)), traffic))
    merge_calibrator_state(merged, bytes.data(), bytes.size());
  check.most_bytes = traffic.bytes;
  MPI_Reduce(rank == 0 ? MPI_IN_PLACE : &check.most_bytes, &check.most_bytes, 1, MPI_UINT64_T, MPI_MAX, 0,
             MPI_COMM_WORLD);
  TableOptions table_options;  // budget-matched where the values are masses (probability), else count-matched
  table_options.method =
      space == ThresholdSpace::probability ? CalibrationMethod::budget_matched : CalibrationMethod::count_matched;
  const ThresholdTable table = merged.table(table_options);
  if (rank == 0) {
    Calibrator in_process(options), whole(options);
    for (int r = 0; r < ranks; ++r) in_process.merge(rank_calibrator(r));
    for (int t = 0; t < texts; ++t) observe(whole, text(t));
    check.same_as_merged_in_process = encode_calibrator_state(in_process) == encode_calibrator_state(merged);
    check.counts_as_one_calibrator = merged.rows_used() == whole.rows_used();
    const Index buckets = options.buckets.bucket(shape.tokens) + 1;
    for (Index h = 0; h < shape.q_heads; ++h)
      for (Index b = 0; b < buckets; ++b)
        check.counts_as_one_calibrator = check.counts_as_one_calibrator &&
                                         merged.statistics(0, h, b).rows == whole.statistics(0, h, b).rows &&
                                         merged.statistics(0, h, b).values == whole.statistics(0, h, b).values;
    const ThresholdTable whole_table = whole.table(table_options);
    const Eigen::MatrixXd &theta = table.layer(0).theta(), &expected = whole_table.layer(0).theta();
    check.difference = ((theta - expected).array().abs() / expected.array().abs().max(1e-300)).maxCoeff();
  }
  return table.layer(0);
}

/// The thresholds of every space, calibrated once.
struct Tables {
  LayerThresholds probability, raw, minus_max, over_norm;
};

/// One rule's decode step, sharded and in one process.
struct Result {
  std::string name;
  Traffic traffic;               // this rank's
  std::uint64_t most_bytes = 0;  // the most any rank sent
  std::uint64_t v_rows_read = 0, whole_v_rows_read = 0;
  double error = 0;  // max |sharded - one process| / max |one process|, on rank 0
};

/// One decode step of every rule over `tokens` cached tokens of the synthetic layer stored as `Scalar`: this
/// rank's shard through `sharded_step`, and on rank 0 the kernel over the whole cache to compare with.
template <class Scalar>
std::vector<Result> decode_step(SyntheticAttentionOptions shape, const Tables& tables, int rank, int ranks) {
  const Index tokens = shape.tokens;
  // Every rank draws the same layer and keeps its shard; a real deployment holds only the shard.
  const SyntheticAttention<Scalar> layer(shape);
  const Index d = shape.head_dim, first = tokens * rank / ranks, end = tokens * (rank + 1) / ranks;
  const TensorView<const Scalar> whole_q = layer.queries(), whole_k = layer.keys(), whole_v = layer.values();
  const TensorView<const Scalar> q(whole_q.row(tokens - 1, 0), 1, shape.q_heads, d);  // the decode step's query
  const auto shard = [&](const TensorView<const Scalar>& whole) {
    return TensorView<const Scalar>(whole.row(first, 0), end - first, shape.kv_heads, d);
  };
  const TensorView<const Scalar> k_shard = shard(whole_k), v_shard = shard(whole_v);
  std::vector<double> value_sum(static_cast<std::size_t>(shape.kv_heads * d), 0.0);  // a cache keeps it as it appends
  for (Index t = 0; t < end - first; ++t)
    for (Index h = 0; h < shape.kv_heads; ++h)
      for (Index c = 0; c < d; ++c) value_sum[std::size_t(h * d + c)] += double(v_shard.row(t, h)[c]);
  AttentionOptions attention;
  attention.past = tokens - 1;
  const KeyRange range{first, tokens};
  Compensation vmc;
  vmc.v_mean = true;
  Compensation exact;
  exact.denominator = DenominatorCompensation::exact;

  std::vector<Scalar> sharded_out(static_cast<std::size_t>(shape.q_heads * d)), whole_out(sharded_out.size());
  const TensorView<Scalar> sharded_view(sharded_out.data(), 1, shape.q_heads, d),
      whole_view(whole_out.data(), 1, shape.q_heads, d);
  std::vector<Result> results;
  // `sharded` runs this rank's step; `whole` the kernel on rank 0.
  const auto run = [&](std::string name, auto&& sharded, auto&& whole) {
    Result result;
    result.name = std::move(name);
    result.traffic = sharded();
    result.most_bytes = result.traffic.bytes;
    MPI_Reduce(rank == 0 ? MPI_IN_PLACE : &result.most_bytes, &result.most_bytes, 1, MPI_UINT64_T, MPI_MAX, 0,
               MPI_COMM_WORLD);
    if (rank == 0) {
      AttentionStats whole_stats;
      whole(whole_stats);
      result.whole_v_rows_read = AttentionStats::total(whole_stats.v_rows_read);
      double error = 0, scale = 0;
      for (std::size_t t = 0; t < whole_out.size(); ++t) {
        error = std::max(error, std::abs(double(sharded_out[t]) - double(whole_out[t])));
        scale = std::max(scale, std::abs(double(whole_out[t])));
      }
      result.error = error / scale;
    }
    results.push_back(std::move(result));
  };
  const auto sharded = [&](const auto& selection, const double* sums) {
    std::uint64_t read = 0;
    Traffic traffic = sharded_step(q, k_shard, v_shard, range, attention, selection, sums, rank, sharded_view, read);
    traffic.v_rows_read = read;
    return traffic;
  };
  run(
      "dense", [&] { return sharded(DenseSelection{}, nullptr); },
      [&](AttentionStats& stats) { dense_attention(q, whole_k, whole_v, whole_view, attention, &stats); });
  const auto top_theta = [&](std::string name, const LayerThresholds& table, Compensation compensation, bool cap_k) {
    const TopThetaSelection selection(table, compensation, cap_k, Passes::automatic);
    run(
        std::move(name), [&] { return sharded(selection, value_sum.data()); },
        [&](AttentionStats& stats) {
          TopThetaOptions options;
          options.attention = attention;
          options.compensation = compensation;
          options.cap_k = cap_k;
          top_theta_attention(q, whole_k, whole_v, whole_view, table, options, &stats);
        });
  };
  top_theta("top-θ probability, VMC (recommended)", tables.probability, vmc, false);
  top_theta("top-θ probability, cap k", tables.probability, Compensation{}, true);
  top_theta("top-θ score - max, exact SDC", tables.minus_max, exact, false);
  top_theta("top-θ raw score, exact SDC", tables.raw, exact, false);
  top_theta("top-θ score / |q|, VMC", tables.over_norm, vmc, false);
  const TopKSelection top_k(k_budget, vmc);
  run(
      "top-k, VMC", [&] { return sharded(top_k, value_sum.data()); },
      [&](AttentionStats& stats) {
        TopKOptions options;
        options.attention = attention;
        options.k = k_budget;
        options.compensation = vmc;
        top_k_attention(q, whole_k, whole_v, whole_view, options, &stats);
      });
  for (Result& result : results) result.v_rows_read = result.traffic.v_rows_read;
  return results;
}

#if TOPTHETA_HAVE_NLOHMANN_JSON
/// The real-model check (see the top of this file). Returns whether every layer's sharded step equals the
/// kernel's on rank 0 (float, rows of at most 512 keys: the test suite's float tolerance, 1e-5).
bool real_model_check(const std::string& model_dir, const std::string& thresholds_path, int rank, int ranks) {
  const llama2c::Model model = llama2c::load_model(model_dir + "/stories260K.bin");
  const std::vector<int> sequence =
      llama2c::read_token_file(model_dir + "/eval.tokens", model.config.vocab_size).front();
  const ThresholdTable table = load_thresholds(thresholds_path);
  llama2c::EngineOptions options;
  options.threads = 1;
  options.collect_stats = false;
  llama2c::Engine<float> engine(model, options);
  const Index tokens = Index(sequence.size());
  engine.prefill(std::vector<int>(sequence.begin(), sequence.end() - 1), llama2c::LogitRows::last);
  struct Call {  // one layer's decode step: its query and cache, copied
    std::vector<float> q, k, v;
    Index past = 0;
  };
  std::vector<Call> calls(std::size_t(model.config.layers));
  engine.set_call_observer(
      [&](Index layer, const TensorView<const float>& queries, const KvCache<float>& cache, Index past) {
        Call& call = calls[std::size_t(layer)];
        call.past = past;
        const auto copy = [](const TensorView<const float>& view, std::vector<float>& into) {
          into.resize(std::size_t(view.tokens() * view.heads() * view.head_dim()));
          for (Index t = 0; t < view.tokens(); ++t)
            for (Index h = 0; h < view.heads(); ++h)
              std::copy_n(view.row(t, h), view.head_dim(), into.data() + (t * view.heads() + h) * view.head_dim());
        };
        copy(queries, call.q);
        copy(cache.keys(), call.k);
        copy(cache.values(), call.v);
      });
  engine.decode(sequence.back());
  const Index heads = model.config.heads, kv_heads = model.config.kv_heads, d = model.config.head_dim();
  const Index first = tokens * rank / ranks, end = tokens * (rank + 1) / ranks;
  Compensation vmc;
  vmc.v_mean = true;
  if (rank == 0)
    std::printf(
        "\n# Real model: stories260K, decode step %lld of eval.tokens' first sequence, each layer's cache "
        "sharded over %d ranks; thresholds %s (probability, V-mean compensation)\n\n"
        "| Layer | k | rounds | bytes sent per rank (max) | V rows read, all ranks | V rows read, one process "
        "| error vs one process, float |\n|---|---:|---:|---:|---:|---:|---:|\n",
        static_cast<long long>(tokens), ranks, std::filesystem::path(thresholds_path).filename().c_str());
  bool every_equal = true;
  for (Index l = 0; l < model.config.layers; ++l) {
    const Call& call = calls[std::size_t(l)];
    const TensorView<const float> q(call.q.data(), 1, heads, d), k(call.k.data(), tokens, kv_heads, d),
        v(call.v.data(), tokens, kv_heads, d);
    const auto shard = [&](const TensorView<const float>& whole) {
      return TensorView<const float>(whole.row(first, 0), end - first, kv_heads, d);
    };
    std::vector<double> value_sum(std::size_t(kv_heads * d), 0.0);
    for (Index t = first; t < end; ++t)
      for (Index h = 0; h < kv_heads; ++h)
        for (Index c = 0; c < d; ++c) value_sum[std::size_t(h * d + c)] += double(v.row(t, h)[c]);
    AttentionOptions attention;
    attention.past = call.past;
    const TopThetaSelection rule(table.layer(l), vmc, false, Passes::automatic);
    std::vector<float> sharded(std::size_t(heads * d)), whole(sharded.size());
    std::uint64_t read = 0;
    const Traffic traffic = sharded_step(q, shard(k), shard(v), KeyRange{first, tokens}, attention, rule,
                                         value_sum.data(), rank, TensorView<float>(sharded.data(), 1, heads, d), read);
    std::uint64_t most_bytes = traffic.bytes;
    MPI_Reduce(rank == 0 ? MPI_IN_PLACE : &most_bytes, &most_bytes, 1, MPI_UINT64_T, MPI_MAX, 0, MPI_COMM_WORLD);
    if (rank != 0) continue;
    TopThetaOptions kernel_options;
    kernel_options.attention = attention;
    kernel_options.compensation = vmc;
    AttentionStats stats;
    top_theta_attention(q, k, v, TensorView<float>(whole.data(), 1, heads, d), table.layer(l), kernel_options, &stats);
    double error = 0, scale = 0;
    for (std::size_t t = 0; t < whole.size(); ++t) {
      error = std::max(error, std::abs(double(sharded[t]) - double(whole[t])));
      scale = std::max(scale, std::abs(double(whole[t])));
    }
    const bool equal = error <= 1e-5 * scale && read == AttentionStats::total(stats.v_rows_read);
    every_equal = every_equal && equal;
    std::printf("| %lld | %lld | %d | %llu | %llu | %llu | %.1e%s |\n", static_cast<long long>(l),
                static_cast<long long>(table.layer(l).k()), traffic.messages / 2,
                static_cast<unsigned long long>(most_bytes), static_cast<unsigned long long>(read),
                static_cast<unsigned long long>(AttentionStats::total(stats.v_rows_read)), error / scale,
                equal ? "" : " FAILED");
  }
  return every_equal;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  int status = 0;
  try {
    const Index tokens = argc > 1 ? Index(std::stoll(argv[1])) : 16384;
    detail::require(tokens >= ranks && tokens >= 2 * k_budget, "tokens",
                    "at least " + std::to_string(std::max<Index>(ranks, 2 * k_budget)), tokens);
    SyntheticAttentionOptions shape;
    shape.tokens = tokens;
    shape.q_heads = 32;
    shape.kv_heads = 8;
    shape.head_dim = 128;
    shape.model_seed = 7;
    // Calibration on 4 other texts of 512 tokens through the same heads, split over the ranks.
    SyntheticAttentionOptions calibration_shape = shape;
    calibration_shape.tokens = 512;
    const ThresholdSpace spaces[] = {ThresholdSpace::probability, ThresholdSpace::raw_score,
                                     ThresholdSpace::score_minus_max, ThresholdSpace::score_over_query_norm};
    std::vector<LayerThresholds> calibrated;
    std::vector<CalibrationCheck> checks(4);
    for (int s = 0; s < 4; ++s)
      calibrated.push_back(calibrate_in_parallel(calibration_shape, spaces[s], 4, rank, ranks, checks[std::size_t(s)]));
    if (rank == 0) {
      std::printf(
          "# Calibration split over %d ranks: 4 texts of 512 tokens, budget-matched (probability) and count-matched "
          "thresholds for k = %lld\n\n"
          "| Space | state bytes sent per rank (max) | equals the calibrators merged in one process | "
          "row and value counts of one calibrator fed every text | θ vs that calibrator |\n"
          "|---|---:|---|---|---:|\n",
          ranks, static_cast<long long>(k_budget));
      for (int s = 0; s < 4; ++s) {
        const CalibrationCheck& check = checks[std::size_t(s)];
        const bool equal =
            check.same_as_merged_in_process && check.counts_as_one_calibrator && check.difference <= 1e-12;
        std::printf("| %s | %llu | %s | %s | %.1e%s |\n", to_string(spaces[s]),
                    static_cast<unsigned long long>(check.most_bytes),
                    check.same_as_merged_in_process ? "bit for bit" : "NO",
                    check.counts_as_one_calibrator ? "equal" : "NO", check.difference, equal ? "" : " FAILED");
        if (!equal) status = 1;
      }
      std::printf("\n");
    }
    const Tables tables{calibrated[0], calibrated[1], calibrated[2], calibrated[3]};
    const std::vector<Result> in_float = decode_step<float>(shape, tables, rank, ranks);
    const std::vector<Result> in_double = decode_step<double>(shape, tables, rank, ranks);
    if (rank == 0) {
      std::printf(
          "# Sharded decode: %d ranks, one decode step over %lld cached tokens (Llama-3-8B layer shape: "
          "32 query heads, 8 KV heads, head_dim 128), k = %lld\n\n",
          ranks, static_cast<long long>(tokens), static_cast<long long>(k_budget));
      std::printf(
          "| Rule | rounds | messages per rank | bytes sent per rank, float (max) | V rows read, all ranks | "
          "V rows read, one process | error vs one process, float | error, double |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|\n");
      for (std::size_t r = 0; r < in_float.size(); ++r) {
        const Result &f = in_float[r], &dbl = in_double[r];
        // Double: the merge algebra is exact, so the two agree to rounding. Float: sums over thousands of keys in
        // two orders; printed, not checked.
        const bool equal = dbl.error <= 1e-12 && f.v_rows_read == f.whole_v_rows_read;
        std::printf("| %s | %d | %d | %llu | %llu | %llu | %.1e | %.1e%s |\n", f.name.c_str(), f.traffic.messages / 2,
                    f.traffic.messages, static_cast<unsigned long long>(f.most_bytes),
                    static_cast<unsigned long long>(f.v_rows_read),
                    static_cast<unsigned long long>(f.whole_v_rows_read), f.error, dbl.error, equal ? "" : " FAILED");
        if (!equal) status = 1;
      }
      std::printf(
          "\nA round is two collectives (the byte counts, then the bytes). Checked: in double, every rule's "
          "output within 1e-12 of the one-process kernel's, and as many V rows read.\n");
    }
    if (argc > 3) {
#if TOPTHETA_HAVE_NLOHMANN_JSON
      if (std::filesystem::exists(std::string(argv[2]) + "/stories260K.bin")) {
        if (!real_model_check(argv[2], argv[3], rank, ranks) && rank == 0) status = 1;
      } else if (rank == 0) {
        std::printf("\nReal-model check skipped: no %s/stories260K.bin.\n", argv[2]);
      }
#else
      if (rank == 0) std::printf("\nReal-model check skipped: built without nlohmann/json (threshold files).\n");
#endif
    }
    if (rank == 0)
      std::printf("%s\n", status == 0 ? "Every rule equals the one-process kernel." : "Some rule differs: see FAILED.");
  } catch (const std::exception& error) {
    std::fprintf(stderr, "rank %d: %s\n", rank, error.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return status;
}
