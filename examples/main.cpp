// Runs every kernel on one synthetic attention layer (prefill, then one decode step) and prints, for each,
// the error against dense attention, the attention elements kept and the V rows read.
//
//   toptheta_main [--tokens N] [--k K] [--threads T]
#include <toptheta/synthetic_attention.hpp>
#include <toptheta/toptheta.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

using namespace toptheta;

namespace {

using RowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Per-head thresholds: the mean over causal rows longer than k of each row's (k+1)-th largest value, and the
/// mean exact denominator term under that threshold (design.md §1, "Calibration"; a full calibrator with
/// per-length tables is the library's next step).
LayerThresholds calibrate(const SyntheticAttention<float>& layer, ThresholdSpace space, Index k) {
  const Index n = layer.shape.tokens, d = layer.shape.head_dim, heads = layer.shape.q_heads;
  const Index group = heads / layer.shape.kv_heads;
  std::vector<double> theta(static_cast<std::size_t>(heads)), terms(static_cast<std::size_t>(heads));
  for (Index h = 0; h < heads; ++h) {
    const Eigen::MatrixXd queries = layer.queries().head(h).cast<double>();
    const RowMatrix scores = (queries * layer.keys().head(h / group).cast<double>().transpose()) / std::sqrt(double(d));
    std::vector<double> values;
    std::vector<double> maxes(static_cast<std::size_t>(n)), sums(static_cast<std::size_t>(n));
    double theta_sum = 0;
    for (Index i = k; i < n; ++i) {  // rows of length L = i + 1 > k
      const auto row = scores.row(i).head(i + 1);
      maxes[std::size_t(i)] = row.maxCoeff();
      sums[std::size_t(i)] = (row.array() - maxes[std::size_t(i)]).exp().sum();
      values.resize(std::size_t(i + 1));
      for (Index j = 0; j <= i; ++j)
        values[std::size_t(j)] =
            value_in_space(space, row(j), maxes[std::size_t(i)], sums[std::size_t(i)], queries.row(i).norm());
      std::nth_element(values.begin(), values.begin() + k, values.end(), std::greater<double>());
      theta_sum += values[std::size_t(k)];
    }
    theta[std::size_t(h)] = theta_sum / double(n - k);
    double term_sum = 0;
    for (Index i = k; i < n; ++i)
      for (Index j = 0; j <= i; ++j) {
        const double a = scores(i, j);
        if (!(value_in_space(space, a, maxes[std::size_t(i)], sums[std::size_t(i)], queries.row(i).norm()) >
              theta[std::size_t(h)]))
          term_sum += std::exp(a - maxes[std::size_t(i)]);
      }
    terms[std::size_t(h)] = term_sum / double(n - k);
  }
  return LayerThresholds::uniform(k, space, theta, terms);
}

struct Method {
  std::string name;
  std::function<void(const TensorView<const float>&, const TensorView<const float>&, const TensorView<const float>&,
                     const TensorView<float>&, const SparseAttentionOptions&, AttentionStats*)>
      attend;
};

double relative_error(const std::vector<float>& output, const std::vector<float>& reference) {
  double error = 0, norm = 0;
  for (std::size_t t = 0; t < output.size(); ++t) {
    error += (double(output[t]) - reference[t]) * (double(output[t]) - reference[t]);
    norm += double(reference[t]) * reference[t];
  }
  return std::sqrt(error / norm);
}

}  // namespace

int main(int argc, char** argv) {
  SyntheticAttentionOptions shape;
  shape.tokens = 2048;
  Index k = 64;
  int threads = 0;
  for (int a = 1; a + 1 < argc; a += 2) {
    if (!std::strcmp(argv[a], "--tokens"))
      shape.tokens = std::atol(argv[a + 1]);
    else if (!std::strcmp(argv[a], "--k"))
      k = std::atol(argv[a + 1]);
    else if (!std::strcmp(argv[a], "--threads"))
      threads = std::atoi(argv[a + 1]);
    else {
      std::fprintf(stderr, "usage: %s [--tokens N] [--k K] [--threads T]\n", argv[0]);
      return 2;
    }
  }
  SyntheticAttentionOptions calibration_shape = shape;
  calibration_shape.seed = 2;
  const SyntheticAttention<float> calibration(calibration_shape), layer(shape);
  const OpenMPExecutor executor{threads};

  std::printf("One synthetic layer: %ld tokens, %ld query heads, %ld KV heads, head_dim %ld, float; k = %ld.\n",
              long(shape.tokens), long(shape.q_heads), long(shape.kv_heads), long(shape.head_dim), long(k));
  std::printf("Thresholds: per-head mean of the (k+1)-th largest value, from a second layer of the same kind.\n\n");
  const auto raw = calibrate(calibration, ThresholdSpace::raw_score, k);
  const auto over_norm = calibrate(calibration, ThresholdSpace::score_over_query_norm, k);
  const auto minus_max = calibrate(calibration, ThresholdSpace::score_minus_max, k);
  const auto probability = calibrate(calibration, ThresholdSpace::probability, k);

  auto top_theta = [&](const LayerThresholds& table, Compensation compensation) {
    return [&table, compensation, &executor](auto q, auto keys, auto values, auto out,
                                             const SparseAttentionOptions& common, AttentionStats* stats) {
      TopThetaOptions options{common};
      options.compensation = compensation;
      top_theta_attention(q, keys, values, out, table, options, stats, executor);
    };
  };
  const Compensation plain{}, calibrated_vmc{DenominatorCompensation::calibrated, 1.0, true},
      exp_vmc{DenominatorCompensation::exp_threshold, 1.0, true}, vmc{DenominatorCompensation::none, 1.0, true};
  const std::vector<Method> methods = {
      {"dense",
       [&](auto q, auto keys, auto values, auto out, const SparseAttentionOptions& common, AttentionStats* stats) {
         dense_attention(q, keys, values, out, common.attention, stats, executor);
       }},
      {"top-k",
       [&](auto q, auto keys, auto values, auto out, const SparseAttentionOptions& common, AttentionStats* stats) {
         top_k_attention(q, keys, values, out, TopKOptions{common, k}, stats, executor);
       }},
      {"top-θ raw score", top_theta(raw, plain)},
      {"top-θ raw score, exp-thr. SDC + VMC", top_theta(raw, exp_vmc)},
      {"top-θ score/|q|, calibrated SDC + VMC", top_theta(over_norm, calibrated_vmc)},
      {"top-θ score-max (2 pass), calib. SDC+VMC", top_theta(minus_max, calibrated_vmc)},
      {"top-θ probability (2 pass) + VMC", top_theta(probability, vmc)},
  };

  const Index n = shape.tokens, row_values = shape.q_heads * shape.head_dim;
  const Index kv_values = shape.kv_heads * shape.head_dim;
  std::vector<float> dense_prefill, dense_decode;
  std::printf("%-42s %10s %11s %9s %9s | %11s %9s\n", "kernel", "prefill ms", "err vs dense", "kept", "V read",
              "decode err", "V read");
  for (const Method& method : methods) {
    std::vector<float> prefill(static_cast<std::size_t>(n * row_values)), decode(static_cast<std::size_t>(row_values));
    AttentionStats prefill_stats, decode_stats;
    SparseAttentionOptions common;
    const auto start = std::chrono::steady_clock::now();
    method.attend(layer.queries(), layer.keys(), layer.values(),
                  TensorView<float>(prefill.data(), n, shape.q_heads, shape.head_dim), common, &prefill_stats);
    const double milliseconds =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();

    // Decode: the last token attends to a KV cache holding all n tokens.
    KvCache<float> cache(shape.kv_heads, shape.head_dim, n);
    cache.append(TensorView<const float>(layer.k.data(), n - 1, shape.kv_heads, shape.head_dim),
                 TensorView<const float>(layer.v.data(), n - 1, shape.kv_heads, shape.head_dim));
    cache.append(TensorView<const float>(layer.k.data() + (n - 1) * kv_values, 1, shape.kv_heads, shape.head_dim),
                 TensorView<const float>(layer.v.data() + (n - 1) * kv_values, 1, shape.kv_heads, shape.head_dim));
    common.attention.past = n - 1;
    common.value_prefix_sum = cache.value_sum_before(n - 1);
    method.attend(TensorView<const float>(layer.q.data() + (n - 1) * row_values, 1, shape.q_heads, shape.head_dim),
                  cache.keys(), cache.values(), TensorView<float>(decode.data(), 1, shape.q_heads, shape.head_dim),
                  common, &decode_stats);

    if (dense_prefill.empty()) {
      dense_prefill = prefill;
      dense_decode = decode;
    }
    std::printf("%-42s %10.1f %11.4f %8.2f%% %8.2f%% | %11.4f %8.2f%%\n", method.name.c_str(), milliseconds,
                relative_error(prefill, dense_prefill), 100 * prefill_stats.kept_fraction(),
                100 * prefill_stats.v_rows_kept_fraction(), relative_error(decode, dense_decode),
                100 * decode_stats.v_rows_kept_fraction());
  }
  std::printf(
      "\nerr: ||o - o_dense|| / ||o_dense|| over all rows and heads. kept: attention elements kept / visible.\n"
      "V read: distinct V rows some query of a KV head's group kept / V rows visible (prefill: over all rows).\n");
  return 0;
}
