// prefill/<kernel>/n:<n>: causal prefill of n tokens in f32, and prefill/<kernel>/n:2048/threads:<t> for the
// scaling with threads. Compute-bound: QKᵀ is dense; exp, the softmax sum and PV run on survivors only.
#include "kernels.hpp"
#include "layers.hpp"
#include "suite.hpp"

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace toptheta::bench {
namespace {

constexpr Index prompt_lengths[] = {512, 2048, 8192};
constexpr Index quick_prompt_length = 2048;
const char* const prefill_kernels[] = {
    "dense", "top_k", "top_theta", "top_theta_raw", "top_theta_qnorm", "top_theta_minus_max", "top_theta_2pass"};
const char* const scaling_kernels[] = {"dense", "top_theta"};

/// Causal prefill of the whole measured layer at `tokens` (f32).
AttentionCall<float> prefill_call(Index tokens, AlignedVector<float>& out) {
  const Layer<float>& layer = measured_layer<float>(tokens);
  out.assign(layer.q.size(), 0.0f);
  AttentionCall<float> call{layer.queries(), layer.keys(), layer.values(),
                            TensorView<float>(out.data(), tokens, LayerShape::q_heads, LayerShape::head_dim),
                            AttentionOptions{}};
  call.attention.causal = true;
  call.attention.past = 0;
  return call;
}

const AlignedVector<float>& dense_prefill_output(Index tokens) {
  static std::map<Index, AlignedVector<float>> cache;
  auto found = cache.find(tokens);
  if (found == cache.end()) {
    AlignedVector<float> out;
    kernel<float>("dense").attend(prefill_call(tokens, out), nullptr, OpenMPExecutor{settings().threads}, nullptr);
    found = cache.emplace(tokens, std::move(out)).first;
  }
  return found->second;
}

/// Dense causal FLOPs, the same for every kernel: QKᵀ and PV each 2 d Σ_i L_i per query head, L_i = i + 1.
double causal_flops(Index tokens) {
  return 4.0 * double(LayerShape::head_dim) * double(tokens) * double(tokens + 1) / 2 * double(LayerShape::q_heads);
}

/// Registers `name`, running `entry` on `threads` threads.
void register_prefill_case(const std::string& name, const Kernel<float>& entry, Index tokens, int threads) {
  auto summary = std::make_shared<std::optional<CallSummary>>();  // set by the case's first run
  register_case(name, tokens == quick_prompt_length, [&entry, tokens, threads, summary](benchmark::State& state) {
    const OpenMPExecutor executor{threads};
    const LayerThresholds* thresholds = thresholds_for(entry, Phase::prefill, tokens);
    AlignedVector<float> out;
    const AttentionCall<float> call = prefill_call(tokens, out);
    if (!*summary) *summary = summarize_call(entry, call, thresholds, executor, dense_prefill_output(tokens));
    const double seconds = timed_loop(state, [&] { entry.attend(call, thresholds, executor, nullptr); });
    report_call_counters(state, **summary, seconds, threads);
    report_flop_counters(state, causal_flops(tokens), seconds);
  });
}

}  // namespace

void register_prefill_benchmarks() {
  const int threads = settings().threads;
  for (Index tokens : prompt_lengths)
    for (const char* name : prefill_kernels)
      register_prefill_case("prefill/" + std::string(name) + "/n:" + std::to_string(tokens), kernel<float>(name),
                            tokens, threads);
  // 1 vs 2 threads (and vs the suite's count when it is neither), measured in the same run.
  const std::set<int> thread_counts = {1, 2, threads};
  for (const char* name : scaling_kernels)
    for (int count : thread_counts)
      register_prefill_case("prefill/" + std::string(name) + "/n:" + std::to_string(quick_prompt_length) +
                                "/threads:" + std::to_string(count),
                            kernel<float>(name), quick_prompt_length, count);
}

}  // namespace toptheta::bench
