// decode/<kernel>/kv:<n>/<kv_type>: one new token (all 32 query heads) attends to a KV cache of n tokens.
// Memory-bound: dense reads all of K and V; top_theta all of K and only the kept V rows.
// decode_paged/<kernel>/kv:<n>/<kv_type>: the same step with K and V in pages of a pool (a paged KV cache).
#include "kernels.hpp"
#include "layers.hpp"
#include "suite.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

namespace toptheta::bench {
namespace {

constexpr Index context_lengths[] = {1024, 4096, 16384, 65536};
constexpr Index quick_context_length = 16384;
/// Context lengths of the paged cases (issue 13).
constexpr Index paged_context_lengths[] = {16384, 65536};
/// Bytes of KV cache a decode case cycles through: like the probe, twice the 480 MiB L3 this VM reports.
constexpr double rotation_bytes = double(Index(1) << 30);

/// Copies of one layer's K and V, used call after call in turn as a model's layers would be, so that every
/// call streams its KV cache from memory as a real decode step does (a single 4-512 MiB cache would partly
/// stay in the 480 MiB L3 between calls, and the time would no longer be the memory-bound one design.md §3
/// describes).
template <class Scalar>
class KvRotation {
 public:
  explicit KvRotation(const Layer<Scalar>& layer)
      : tokens_(layer.tokens),
        copy_size_(layer.k.size()),
        copies_(std::max<Index>(
            1, Index(std::ceil(rotation_bytes / (2.0 * double(copy_size_) * sizeof(Scalar)))))),
        data_(2 * std::size_t(copies_) * copy_size_) {
    for (Index c = 0; c < copies_; ++c) {
      std::copy(layer.k.begin(), layer.k.end(),
                data_.begin() + std::ptrdiff_t(2 * std::size_t(c) * copy_size_));
      std::copy(layer.v.begin(), layer.v.end(),
                data_.begin() + std::ptrdiff_t((2 * std::size_t(c) + 1) * copy_size_));
    }
  }

  Index tokens() const { return tokens_; }
  Index copies() const { return copies_; }
  TensorView<const Scalar> keys(Index copy) const { return view(2 * std::size_t(copy)); }
  TensorView<const Scalar> values(Index copy) const { return view(2 * std::size_t(copy) + 1); }

 private:
  TensorView<const Scalar> view(std::size_t slot) const {
    return {data_.data() + slot * copy_size_, tokens_, LayerShape::kv_heads, LayerShape::head_dim};
  }

  Index tokens_;
  std::size_t copy_size_;
  Index copies_;
  AlignedVector<Scalar> data_;
};

/// The one rotation kept, whatever its type and kind, and what it is.
struct RotationSlot {
  std::shared_ptr<const void> rotation;
  std::string key;
};
RotationSlot& rotation_slot() {
  static RotationSlot slot;
  return slot;
}

/// The `Rotation` (`KvRotation` or `PagedKvRotation`) of the measured layer at `tokens` in `Scalar`. One
/// rotation (1 GiB) is kept at a time, for all types and kinds: cases run context length by context length, so
/// the cases of one (n, type, kind) share it.
template <template <class> class Rotation, class Scalar>
const Rotation<Scalar>& rotation_of(Index tokens) {
  RotationSlot& slot = rotation_slot();
  const std::string key = std::string(typeid(Rotation<Scalar>).name()) + "/" + std::to_string(tokens);
  if (!slot.rotation || slot.key != key) {
    slot.rotation.reset();  // free the old copies before making the new ones
    slot.rotation = std::make_shared<const Rotation<Scalar>>(measured_layer<Scalar>(tokens));
    slot.key = key;
  }
  return *static_cast<const Rotation<Scalar>*>(slot.rotation.get());
}

/// Tokens per page of the paged cases (`decode_paged/...`), as engines commonly use.
constexpr Index paged_page_size = 16;

/// The rotation's copies in token-major pages (`paged_page_size` tokens each, `PagePool`'s default layout) of
/// one pool per copy, placed in a shuffled order that a block table undoes, as a paged KV cache shared by many
/// sequences holds one of them.
template <class Scalar>
class PagedKvRotation {
 public:
  explicit PagedKvRotation(const Layer<Scalar>& layer)
      : tokens_(layer.tokens),
        pages_((layer.tokens + paged_page_size - 1) / paged_page_size),
        pool_size_(std::size_t(pages_ * page_values)),
        copies_(std::max<Index>(1, Index(std::ceil(rotation_bytes / (2.0 * double(pool_size_) * sizeof(Scalar)))))),
        data_(2 * std::size_t(copies_) * pool_size_) {
    for (Index b = 0; b < pages_; ++b) block_table_.push_back(std::int32_t(b));
    std::shuffle(block_table_.begin(), block_table_.end(), std::mt19937(7));
    constexpr Index dim = LayerShape::head_dim;
    for (Index c = 0; c < copies_; ++c)
      for (Index t = 0; t < tokens_; ++t)
        for (Index h = 0; h < LayerShape::kv_heads; ++h) {
          const std::ptrdiff_t from = std::ptrdiff_t((t * LayerShape::kv_heads + h) * dim);
          const std::ptrdiff_t to = std::ptrdiff_t(block_table_[std::size_t(t / paged_page_size)] * page_values +
                                                   (t % paged_page_size * LayerShape::kv_heads + h) * dim);
          std::copy_n(layer.k.begin() + from, dim, data_.begin() + std::ptrdiff_t(pool(2 * c)) + to);
          std::copy_n(layer.v.begin() + from, dim, data_.begin() + std::ptrdiff_t(pool(2 * c + 1)) + to);
        }
  }

  Index copies() const { return copies_; }
  PagedTensorView<const Scalar> keys(Index copy) const { return view(2 * copy); }
  PagedTensorView<const Scalar> values(Index copy) const { return view(2 * copy + 1); }

 private:
  static constexpr Index row_values = LayerShape::kv_heads * LayerShape::head_dim;
  static constexpr Index page_values = paged_page_size * row_values;

  std::size_t pool(Index slot) const { return std::size_t(slot) * pool_size_; }
  PagedTensorView<const Scalar> view(Index slot) const {
    return {data_.data() + pool(slot), pages_, paged_page_size, block_table_.data(), tokens_, LayerShape::kv_heads,
            LayerShape::head_dim, PageLayout::token_major};
  }

  Index tokens_, pages_;
  std::size_t pool_size_;
  Index copies_;
  AlignedVector<Scalar> data_;
  std::vector<std::int32_t> block_table_;
};

/// `Σ_{j<n-1} v_j` per KV head (`[kv_heads, head_dim]`) of the measured layer at `tokens` = n: what an engine's
/// KvCache holds for the decode step, so that V-mean compensation reads one V row per head.
template <class Scalar>
const std::vector<double>& decode_value_prefix_sum(Index tokens) {
  static std::map<Index, std::vector<double>> cache;
  std::vector<double>& sum = cache[tokens];
  if (sum.empty()) {
    constexpr Index row_size = LayerShape::kv_heads * LayerShape::head_dim;
    const Layer<Scalar>& layer = measured_layer<Scalar>(tokens);
    sum.assign(std::size_t(row_size), 0.0);
    for (Index j = 0; j + 1 < tokens; ++j)
      for (Index t = 0; t < row_size; ++t) sum[std::size_t(t)] += double(layer.v[std::size_t(j * row_size + t)]);
  }
  return sum;
}

/// The decode step of the measured layer at `tokens`: its last query row, at position n - 1, attends to keys
/// and values 0 .. n - 1.
template <class Scalar>
AttentionCall<Scalar> decode_call(Index tokens, AlignedVector<Scalar>& out) {
  const Layer<Scalar>& layer = measured_layer<Scalar>(tokens);
  constexpr Index row_size = LayerShape::q_heads * LayerShape::head_dim;
  out.assign(std::size_t(row_size), Scalar(0));
  AttentionCall<Scalar> call{TensorView<const Scalar>(layer.q.data() + (tokens - 1) * row_size, 1,
                                                      LayerShape::q_heads, LayerShape::head_dim),
                             layer.keys(), layer.values(),
                             TensorView<Scalar>(out.data(), 1, LayerShape::q_heads, LayerShape::head_dim),
                             AttentionOptions{}};
  call.attention.causal = true;
  call.attention.past = tokens - 1;
  call.value_prefix_sum = decode_value_prefix_sum<Scalar>(tokens).data();
  return call;
}

template <class Scalar>
const AlignedVector<Scalar>& dense_decode_output(Index tokens) {
  static std::map<Index, AlignedVector<Scalar>> cache;
  auto found = cache.find(tokens);
  if (found == cache.end()) {
    AlignedVector<Scalar> out;
    kernel<Scalar>("dense").attend(decode_call(tokens, out), nullptr, OpenMPExecutor{settings().threads},
                                   nullptr);
    found = cache.emplace(tokens, std::move(out)).first;
  }
  return found->second;
}

/// decode/<kernel>/kv:<n>/<type>, or with K and V in pages (`KvView` paged) decode_paged/...: the pages of a
/// shuffled pool of 16-token pages read through a block table, whose time over the contiguous case's is the cost
/// of paging.
template <class Scalar, class KvView>
void register_decode_case(const Kernel<Scalar, KvView>& entry, Index tokens) {
  constexpr bool paged = detail::is_paged_view_v<KvView>;
  const std::string name = std::string(paged ? "decode_paged/" : "decode/") + entry.name + "/kv:" +
                           std::to_string(tokens) + "/" + type_name<Scalar>();
  auto summary = std::make_shared<std::optional<CallSummary>>();  // set by the case's first run
  register_case(name, tokens == quick_context_length, [&entry, tokens, summary](benchmark::State& state) {
    const OpenMPExecutor executor{settings().threads};
    const LayerThresholds* thresholds = thresholds_for(entry, Phase::decode, tokens);
    AlignedVector<Scalar> out;
    const AttentionCall<Scalar> step = decode_call<Scalar>(tokens, out);
    const auto& rotation = [&]() -> const auto& {
      if constexpr (paged) return rotation_of<PagedKvRotation, Scalar>(tokens);
      else return rotation_of<KvRotation, Scalar>(tokens);
    }();
    AttentionCall<Scalar, KvView> call{step.q, rotation.keys(0), rotation.values(0), step.out, step.attention,
                                       step.value_prefix_sum};
    if (!*summary)
      *summary = summarize_call(entry, call, thresholds, executor, dense_decode_output<Scalar>(tokens));
    Index copy = 0;
    const double seconds = timed_loop(state, [&] {
      call.k = rotation.keys(copy);
      call.v = rotation.values(copy);
      entry.attend(call, thresholds, executor, nullptr);
      copy = (copy + 1) % rotation.copies();
    });
    report_call_counters(state, **summary, seconds, executor.threads);
  });
}

}  // namespace

void register_decode_benchmarks() {
  for (Index tokens : context_lengths) {
    for (const Kernel<float>& entry : kernels<float>()) register_decode_case(entry, tokens);
    for (const Kernel<Eigen::bfloat16>& entry : kernels<Eigen::bfloat16>())
      register_decode_case(entry, tokens);
  }
  for (Index tokens : paged_context_lengths) {
    for (const auto& entry : paged_kernels<float>()) register_decode_case(entry, tokens);
    for (const auto& entry : paged_kernels<Eigen::bfloat16>()) register_decode_case(entry, tokens);
  }
}

}  // namespace toptheta::bench
