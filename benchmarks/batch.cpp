// decode_batch/<kernel>/b:16/kv:4096: one decode step of 16 sequences in one batched call (attention_batch.hpp),
// f32. Sequence i has L_i = 1024 + 6144 i / 15 cached tokens (1024 .. 7168, mean 4096; 65536 in all), its own
// keys and values (consecutive token ranges of the measured 65536-token layer) and its own query row (the last
// of its range). Beside each batched case: `/threads:1` (the batched call on one thread) and `/separate` (the
// 16 sequences as 16 calls, one after the other, on the suite's threads). Kernels: dense and top_theta (the
// recommended configuration, thresholds of the prefill calibration, which covers these lengths).
#include "kernels.hpp"
#include "layers.hpp"
#include "suite.hpp"

#include <toptheta/aligned_vector.hpp>
#include <toptheta/attention_batch.hpp>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace toptheta::bench {
namespace {

constexpr Index batch_size = 16, mean_length = 4096, layer_tokens = batch_size * mean_length;

/// The batch's sequences over the measured layer, with their V prefix sums and outputs.
class DecodeBatch {
 public:
  DecodeBatch() : layer_(measured_layer<float>(layer_tokens)) {
    constexpr Index row_size = LayerShape::kv_heads * LayerShape::head_dim;
    constexpr Index query_size = LayerShape::q_heads * LayerShape::head_dim;
    Index start = 0;
    for (Index i = 0; i < batch_size; ++i) {
      const Index length = 1024 + 6144 * i / (batch_size - 1);
      std::vector<double> sum(std::size_t(row_size), 0.0);
      for (Index j = start; j + 1 < start + length; ++j)
        for (Index t = 0; t < row_size; ++t) sum[std::size_t(t)] += double(layer_.v[std::size_t(j * row_size + t)]);
      sequences_.push_back({start, length, std::move(sum), AlignedVector<float>(std::size_t(query_size), 0.0f)});
      start += length;
    }
  }

  /// The views of every sequence, writing into its own output (or `outputs`, when given).
  std::vector<SequenceViews<float>> views(std::vector<AttentionStats>* stats = nullptr) {
    if (stats) stats->assign(sequences_.size(), AttentionStats{});
    std::vector<SequenceViews<float>> result;
    constexpr Index dim = LayerShape::head_dim;
    for (std::size_t i = 0; i < sequences_.size(); ++i) {
      Sequence& s = sequences_[i];
      const Index last = s.start + s.length - 1;
      result.push_back(
          {TensorView<const float>(layer_.q.data() + last * LayerShape::q_heads * dim, 1, LayerShape::q_heads, dim),
           TensorView<const float>(layer_.k.data() + s.start * LayerShape::kv_heads * dim, s.length,
                                   LayerShape::kv_heads, dim),
           TensorView<const float>(layer_.v.data() + s.start * LayerShape::kv_heads * dim, s.length,
                                   LayerShape::kv_heads, dim),
           TensorView<float>(s.out.data(), 1, LayerShape::q_heads, dim), s.length - 1, s.sum.data(),
           stats ? &(*stats)[i] : nullptr});
    }
    return result;
  }

  /// All outputs, sequence after sequence.
  AlignedVector<float> outputs() const {
    AlignedVector<float> all;
    for (const Sequence& s : sequences_) all.insert(all.end(), s.out.begin(), s.out.end());
    return all;
  }

 private:
  struct Sequence {
    Index start, length;
    std::vector<double> sum;
    AlignedVector<float> out;
  };
  const Layer<float>& layer_;
  std::vector<Sequence> sequences_;
};

DecodeBatch& decode_batch() {
  static DecodeBatch batch;
  return batch;
}

/// Attends every sequence: in one batched call, or (`separate`) in one call per sequence.
void attend(const std::string& kernel, const std::vector<SequenceViews<float>>& views, bool separate,
            const OpenMPExecutor& executor) {
  const LayerThresholds* thresholds =
      kernel == "dense" ? nullptr : &calibrated_thresholds(Phase::prefill, 8192).in(ThresholdSpace::probability);
  TopThetaOptions options;
  options.passes = Passes::one;
  options.compensation.v_mean = true;
  if (!separate) {
    if (thresholds)
      top_theta_attention(views, *thresholds, options, executor);
    else
      dense_attention(views, AttentionOptions{}, executor);
    return;
  }
  for (const SequenceViews<float>& s : views) {
    AttentionOptions attention;
    attention.past = s.past;
    if (thresholds) {
      options.attention = attention;
      options.value_prefix_sum = s.value_prefix_sum;
      top_theta_attention(s.q, s.k, s.v, s.out, *thresholds, options, nullptr, executor);
    } else {
      dense_attention(s.q, s.k, s.v, s.out, attention, nullptr, executor);
    }
  }
}

void register_batch_case(const std::string& kernel, const std::string& variant, int threads) {
  const std::string name =
      "decode_batch/" + kernel + "/b:" + std::to_string(batch_size) + "/kv:" + std::to_string(mean_length) + variant;
  auto summary = std::make_shared<std::optional<CallSummary>>();
  register_case(name, false, [kernel, variant, threads, summary](benchmark::State& state) {
    DecodeBatch& batch = decode_batch();
    const OpenMPExecutor executor{threads};
    if (!*summary) {
      static const AlignedVector<float> dense = [&] {
        attend("dense", batch.views(), false, executor);
        return batch.outputs();
      }();
      std::vector<AttentionStats> stats;
      attend(kernel, batch.views(&stats), false, executor);
      CallSummary call;
      for (const AttentionStats& s : stats) call.stats.merge(s);
      call.bytes_per_k_or_v_row = double(LayerShape::head_dim) * sizeof(float);
      const AlignedVector<float> out = batch.outputs();
      call.error_vs_dense = relative_error(out.data(), dense.data(), dense.size());
      *summary = call;
    }
    const auto views = batch.views();
    const double seconds = timed_loop(state, [&] { attend(kernel, views, variant == "/separate", executor); });
    report_call_counters(state, **summary, seconds, threads);
  });
}

}  // namespace

void register_batch_benchmarks() {
  for (const char* kernel : {"dense", "top_theta"}) {
    register_batch_case(kernel, "", settings().threads);
    register_batch_case(kernel, "/threads:1", 1);
    register_batch_case(kernel, "/separate", settings().threads);
  }
}

}  // namespace toptheta::bench
