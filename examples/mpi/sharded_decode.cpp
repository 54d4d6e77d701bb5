// Sharded decode over MPI: each rank holds one contiguous shard of a long KV cache (a synthetic Llama-3-8B layer:
// 32 query heads, 8 KV heads, head_dim 128), attends the decode step's query over its shard with
// `KeyRangeAttention`, and the partials meet through MPI collectives:
//   round 1 (row statistics; only for the rules that need them: row-relative spaces, caps, top-k)
//            MPI_Allgather of the byte counts, MPI_Allgatherv of the encoded statistics; every rank merges them;
//   round 2  MPI_Gather of the byte counts, MPI_Gatherv of the encoded partial outputs to rank 0, which merges
//            and finishes o_i.
// No K or V row leaves its rank. Rank 0 also runs the library's kernel over the whole cache and checks that the
// sharded result equals it; the exit status is 1 when any rule differs by more than the float tolerance.
//
//   mpirun -np 2 build/examples/mpi/toptheta_sharded_decode [tokens (default 16384)]
#include <mpi.h>

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
    each.emplace_back(all.begin() + offsets[std::size_t(r)], all.begin() + offsets[std::size_t(r)] + sizes[std::size_t(r)]);
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

/// Per-head thresholds of `space` for `k_budget` kept keys: the library's Calibrator over every causal row of a
/// calibration layer (the same heads, another text), mean of the rows' (k+1)-th largest values.
LayerThresholds calibrate(const SyntheticAttention<float>& layer, ThresholdSpace space) {
  const Index n = layer.shape.tokens, d = layer.shape.head_dim, heads = layer.shape.q_heads;
  const Index group = heads / layer.shape.kv_heads;
  CalibratorOptions options;
  options.shape = {1, heads, layer.shape.kv_heads, d};
  options.space = space;
  options.k = {k_budget};
  Calibrator calibrator(options);
  std::vector<Index> lengths(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) lengths[std::size_t(i)] = i + 1;
  for (Index h = 0; h < heads; ++h) {
    const Eigen::MatrixXd queries = layer.queries().head(h).cast<double>();
    const Eigen::MatrixXd scores =
        queries * layer.keys().head(h / group).cast<double>().transpose() / std::sqrt(double(d));
    std::vector<double> norms(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) norms[std::size_t(i)] = queries.row(i).norm();
    calibrator.observe_rows(0, h, scores, lengths, norms);
  }
  return calibrator.table().layer(0);
}

/// The thresholds of every space, calibrated once.
struct Tables {
  LayerThresholds probability, raw, minus_max, over_norm;
};

/// One rule's decode step, sharded and in one process.
struct Result {
  std::string name;
  Traffic traffic;              // this rank's
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
  run("dense", [&] { return sharded(DenseSelection{}, nullptr); },
      [&](AttentionStats& stats) { dense_attention(q, whole_k, whole_v, whole_view, attention, &stats); });
  const auto top_theta = [&](std::string name, const LayerThresholds& table, Compensation compensation, bool cap_k) {
    const TopThetaSelection selection(table, compensation, cap_k, Passes::automatic);
    run(std::move(name), [&] { return sharded(selection, value_sum.data()); },
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
  run("top-k, VMC", [&] { return sharded(top_k, value_sum.data()); },
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
    SyntheticAttentionOptions calibration_shape = shape;
    calibration_shape.tokens = std::min<Index>(tokens, 1024);
    calibration_shape.seed = 2;
    const SyntheticAttention<float> calibration(calibration_shape);
    const Tables tables{calibrate(calibration, ThresholdSpace::probability),
                        calibrate(calibration, ThresholdSpace::raw_score),
                        calibrate(calibration, ThresholdSpace::score_minus_max),
                        calibrate(calibration, ThresholdSpace::score_over_query_norm)};
    const std::vector<Result> in_float = decode_step<float>(shape, tables, rank, ranks);
    const std::vector<Result> in_double = decode_step<double>(shape, tables, rank, ranks);
    if (rank == 0) {
      std::printf("# Sharded decode: %d ranks, one decode step over %lld cached tokens (Llama-3-8B layer shape: "
                  "32 query heads, 8 KV heads, head_dim 128), k = %lld\n\n",
                  ranks, static_cast<long long>(tokens), static_cast<long long>(k_budget));
      std::printf("| Rule | rounds | messages per rank | bytes sent per rank, float (max) | V rows read, all ranks | "
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
                    static_cast<unsigned long long>(f.whole_v_rows_read), f.error, dbl.error,
                    equal ? "" : " FAILED");
        if (!equal) status = 1;
      }
      std::printf("\nA round is two collectives (the byte counts, then the bytes). Checked: in double, every rule's "
                  "output within 1e-12 of the one-process kernel's, and as many V rows read.\n%s\n",
                  status == 0 ? "Every rule equals the one-process kernel." : "Some rule differs: see FAILED.");
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "rank %d: %s\n", rank, error.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return status;
}
