// Batched attention: one call attends many sequences (a serving engine's decode step for every user), each with
// its own length, placement and number of new query tokens.
#pragma once

#include <toptheta/detail/identity.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/detail/tiled_attention.hpp>
#include <toptheta/executor.hpp>
#include <toptheta/selection.hpp>
#include <toptheta/sparse_options.hpp>
#include <toptheta/stats.hpp>
#include <toptheta/threshold_table.hpp>
#include <toptheta/top_k_attention.hpp>
#include <toptheta/top_theta_attention.hpp>
#include <toptheta/views.hpp>

#include <string>
#include <type_traits>
#include <vector>

namespace toptheta {

/// One sequence of a batched attention call.
/// \tparam KvView `TensorView<const Scalar>` (contiguous K and V) or `PagedTensorView<const Scalar>`, or either
/// of `const BlockQ8<N>` (an int8 cache).
template <class Scalar, class KvView = TensorView<const Scalar>>
struct SequenceViews {
  /// `[n_q, q_heads, d]`: the sequence's new query rows, `n_q >= 0` (1 in decode, a few when speculating, 0 for
  /// a sequence with nothing to attend this step).
  TensorView<const Scalar> q;
  /// `[n_kv, kv_heads, d]`: every key and value the sequence has, its new tokens' included.
  KvView k, v;
  /// `[n_q, q_heads, d]`, sharing no memory with q, k, v or another sequence's output.
  TensorView<Scalar> out;
  /// Causal placement: tokens before q's first row (`n_kv - n_q` for a decode step). Ignored without a causal
  /// mask.
  Index past = 0;
  /// `Σ_{j<past} v_j`, `kv_heads x d` row-major (`KvCache::value_sum_before(past)`), for V-mean compensation;
  /// null: the V rows before `past` are read.
  const double* value_prefix_sum = nullptr;
  /// This sequence's statistics, when wanted.
  AttentionStats* stats = nullptr;
};

namespace detail {

/// The batch as the runner takes it; `options.past` and `value_prefix_sum` are per sequence, so the shared
/// options must leave them unset.
template <class Scalar, class KvView>
std::vector<SequenceCall<Scalar, KvView>> sequence_calls(const std::vector<SequenceViews<Scalar, KvView>>& sequences,
                                                         const AttentionOptions& options,
                                                         const double* shared_prefix_sum = nullptr) {
  require(options.past == 0, "options.past", "0 (set SequenceViews::past per sequence)", options.past);
  require(shared_prefix_sum == nullptr, "options.value_prefix_sum",
          "null (set SequenceViews::value_prefix_sum per sequence)", "a pointer");
  static_assert(std::is_same_v<kv_view_t<Scalar, KvView, KvView>, KvView>,
                "SequenceViews::k and v must be read-only TensorViews or PagedTensorViews of the type of q and out");
  std::vector<SequenceCall<Scalar, KvView>> calls;
  calls.reserve(sequences.size());
  for (const SequenceViews<Scalar, KvView>& sequence : sequences) {
    AttentionOptions placed = options;
    placed.past = sequence.past;
    calls.push_back(
        {sequence.q, sequence.k, sequence.v, sequence.out, placed, sequence.value_prefix_sum, sequence.stats});
  }
  return calls;
}

}  // namespace detail

/// Dense attention over a batch of sequences: `dense_attention` of each sequence, in one call whose work items
/// (per sequence: query blocks x KV heads, or key ranges of a long decode row) share the executor's threads.
/// Each sequence's output and statistics equal those of its own call, bit for bit, for any thread count.
/// \param options the mask and scale of every sequence; `past` is per sequence (`SequenceViews::past`).
/// Errors name the sequence: `sequences[3].k.tokens`.
template <class Tiles = DefaultTiles, class Scalar, class KvView, class Executor = DefaultExecutor>
void dense_attention(const std::vector<SequenceViews<Scalar, KvView>>& sequences, const AttentionOptions& options = {},
                     const Executor& executor = {}) {
  detail::run_tiled_attention_batch<Tiles, Scalar>(detail::sequence_calls(sequences, options), DenseSelection{},
                                                   executor, true);
}

/// Top-θ attention (`top_theta_attention`) over a batch of sequences sharing one layer's thresholds; as the
/// dense batch, each sequence's result is that of its own call. `options.attention.past` and
/// `options.value_prefix_sum` are per sequence.
template <class Tiles = DefaultTiles, class Scalar, class KvView, class Executor = DefaultExecutor>
void top_theta_attention(const std::vector<SequenceViews<Scalar, KvView>>& sequences, const LayerThresholds& thresholds,
                         const TopThetaOptions& options = {}, const Executor& executor = {}) {
  const auto calls = detail::sequence_calls(sequences, options.attention, options.value_prefix_sum);
  for (std::size_t s = 0; s < sequences.size(); ++s)
    detail::require(thresholds.heads() == sequences[s].q.heads(), "thresholds",
                    "one row per query head of sequences[" + std::to_string(s) + "] (" +
                        std::to_string(sequences[s].q.heads()) + ")",
                    thresholds.heads());
  const TopThetaSelection selection(thresholds, options.compensation, options.cap_k, options.passes);
  detail::run_tiled_attention_batch<Tiles, Scalar>(calls, selection, executor, true);
}

/// Top-k attention (`top_k_attention`) over a batch of sequences; as the dense batch.
template <class Tiles = DefaultTiles, class Scalar, class KvView, class Executor = DefaultExecutor>
void top_k_attention(const std::vector<SequenceViews<Scalar, KvView>>& sequences, const TopKOptions& options = {},
                     const Executor& executor = {}) {
  const auto calls = detail::sequence_calls(sequences, options.attention, options.value_prefix_sum);
  if (options.thresholds)
    for (std::size_t s = 0; s < sequences.size(); ++s)
      detail::require(options.thresholds->heads() == sequences[s].q.heads(), "options.thresholds",
                      "one row per query head of sequences[" + std::to_string(s) + "] (" +
                          std::to_string(sequences[s].q.heads()) + ")",
                      options.thresholds->heads());
  const TopKSelection selection(options.k, options.compensation, options.thresholds);
  detail::run_tiled_attention_batch<Tiles, Scalar>(calls, selection, executor, true);
}

}  // namespace toptheta
