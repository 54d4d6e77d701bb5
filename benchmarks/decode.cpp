// decode/<kernel>/kv:<n>/<kv_type>: one new token (all 32 query heads) attends to a KV cache of n tokens.
// Memory-bound: dense reads all of K and V; top_theta all of K and only the kept V rows.
// decode_paged/<kernel>/kv:<n>/<kv_type>: the same step with K and V in pages of a pool (a paged KV cache).
// <kv_type> q8: K and V in q8_0 blocks (an int8 KV cache; 34 bytes per 32 values), q and the output in f32.
#include "kernels.hpp"
#include "layers.hpp"
#include "suite.hpp"

#include <toptheta/detail/convert.hpp>
#include <toptheta/q8_block.hpp>

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

/// `f(k, v, elements)`: K and V of the measured layer at `tokens` as a cache of `Stored` holds them, `elements`
/// stored elements each (`[tokens, kv_heads, head_dim]` values): the layer's own rows, or its float rows
/// quantized to q8_0 blocks (`quantize_q8`, as `KvCache<BlockQ8_0>::append` stores them).
template <class Stored, class F>
void with_cached_kv(Index tokens, F&& f) {
  if constexpr (is_block_type_v<Stored>) {
    const Layer<float>& layer = measured_layer<float>(tokens);
    const Index values = Index(layer.k.size());
    AlignedVector<Stored> k(std::size_t(elements_of<Stored>(values))), v(k.size());
    quantize_q8(layer.k.data(), values, k.data());
    quantize_q8(layer.v.data(), values, v.data());
    f(k.data(), v.data(), Index(k.size()));
  } else {
    const Layer<Stored>& layer = measured_layer<Stored>(tokens);
    f(layer.k.data(), layer.v.data(), Index(layer.k.size()));
  }
}

/// Stored elements of one (token, KV head) row of the measured layer.
template <class Stored>
constexpr Index row_elements = elements_of<Stored>(LayerShape::head_dim);

/// Copies of one layer's K and V, used call after call in turn as a model's layers would be, so that every
/// call streams its KV cache from memory as a real decode step does (a single 4-512 MiB cache would partly
/// stay in the 480 MiB L3 between calls, and the time would no longer be the memory-bound one design.md §3
/// describes).
template <class Stored>
class KvRotation {
 public:
  explicit KvRotation(Index tokens) : tokens_(tokens) {
    with_cached_kv<Stored>(tokens, [&](const Stored* k, const Stored* v, Index elements) {
      copy_size_ = std::size_t(elements);
      copies_ = std::max<Index>(1, Index(std::ceil(rotation_bytes / (2.0 * double(copy_size_) * sizeof(Stored)))));
      data_.resize(2 * std::size_t(copies_) * copy_size_);
      for (Index c = 0; c < copies_; ++c) {
        std::copy_n(k, elements, data_.begin() + std::ptrdiff_t(2 * std::size_t(c) * copy_size_));
        std::copy_n(v, elements, data_.begin() + std::ptrdiff_t((2 * std::size_t(c) + 1) * copy_size_));
      }
    });
  }

  Index copies() const { return copies_; }
  TensorView<const Stored> keys(Index copy) const { return view(2 * std::size_t(copy)); }
  TensorView<const Stored> values(Index copy) const { return view(2 * std::size_t(copy) + 1); }

 private:
  TensorView<const Stored> view(std::size_t slot) const {
    return {data_.data() + slot * copy_size_, tokens_, LayerShape::kv_heads, LayerShape::head_dim};
  }

  Index tokens_;
  std::size_t copy_size_ = 0;
  Index copies_ = 0;
  AlignedVector<Stored> data_;
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

/// The `Rotation` (`KvRotation` or `PagedKvRotation`) of the measured layer at `tokens` stored as `Stored`, made
/// as `Rotation<Stored>(tokens, layout...)` (a paged rotation's page size). One rotation (1 GiB) is kept at a
/// time, for all types and kinds: cases run context length by context length, so the cases of one (n, type,
/// kind, page size) share it.
template <template <class> class Rotation, class Stored, class... Layout>
const Rotation<Stored>& rotation_of(Index tokens, Layout... layout) {
  RotationSlot& slot = rotation_slot();
  std::string key = std::string(typeid(Rotation<Stored>).name()) + "/" + std::to_string(tokens);
  ((key += "/" + std::to_string(layout)), ...);
  if (!slot.rotation || slot.key != key) {
    slot.rotation.reset();  // free the old copies before making the new ones
    slot.rotation = std::make_shared<const Rotation<Stored>>(tokens, layout...);
    slot.key = key;
  }
  return *static_cast<const Rotation<Stored>*>(slot.rotation.get());
}

/// Tokens per page of the paged cases (`decode_paged/...`), as engines commonly use.
constexpr Index paged_page_size = 16;
/// A larger page size the paged cases at the longest context also run with (`decode_paged/.../page:64`): how
/// much of the paged cost is the jump from page to page.
constexpr Index large_page_size = 64;

/// The rotation's copies in token-major pages (`page_size` tokens each, `PagePool`'s default layout) of one
/// pool per copy, placed in a shuffled order that a block table undoes, as a paged KV cache shared by many
/// sequences holds one of them.
template <class Stored>
class PagedKvRotation {
 public:
  PagedKvRotation(Index tokens, Index page_size)
      : tokens_(tokens),
        page_size_(page_size),
        pages_((tokens + page_size - 1) / page_size),
        pool_size_(std::size_t(pages_ * page_elements())),
        copies_(std::max<Index>(1, Index(std::ceil(rotation_bytes / (2.0 * double(pool_size_) * sizeof(Stored)))))),
        data_(2 * std::size_t(copies_) * pool_size_) {
    for (Index b = 0; b < pages_; ++b) block_table_.push_back(std::int32_t(b));
    std::shuffle(block_table_.begin(), block_table_.end(), std::mt19937(7));
    constexpr Index row = row_elements<Stored>;
    with_cached_kv<Stored>(tokens, [&](const Stored* k, const Stored* v, Index) {
      for (Index c = 0; c < copies_; ++c)
        for (Index t = 0; t < tokens_; ++t)
          for (Index h = 0; h < LayerShape::kv_heads; ++h) {
            const Index from = (t * LayerShape::kv_heads + h) * row;
            const std::ptrdiff_t to = std::ptrdiff_t(block_table_[std::size_t(t / page_size_)] * page_elements() +
                                                     (t % page_size_ * LayerShape::kv_heads + h) * row);
            std::copy_n(k + from, row, data_.begin() + std::ptrdiff_t(pool(2 * c)) + to);
            std::copy_n(v + from, row, data_.begin() + std::ptrdiff_t(pool(2 * c + 1)) + to);
          }
    });
  }

  Index copies() const { return copies_; }
  PagedTensorView<const Stored> keys(Index copy) const { return view(2 * copy); }
  PagedTensorView<const Stored> values(Index copy) const { return view(2 * copy + 1); }

 private:
  Index page_elements() const { return page_size_ * LayerShape::kv_heads * row_elements<Stored>; }
  std::size_t pool(Index slot) const { return std::size_t(slot) * pool_size_; }
  PagedTensorView<const Stored> view(Index slot) const {
    return {data_.data() + pool(slot),
            pages_,
            page_size_,
            block_table_.data(),
            tokens_,
            LayerShape::kv_heads,
            LayerShape::head_dim,
            PageLayout::token_major};
  }

  Index tokens_, page_size_, pages_;
  std::size_t pool_size_;
  Index copies_;
  AlignedVector<Stored> data_;
  std::vector<std::int32_t> block_table_;
};

/// `Σ_{j<n-1} v_j` per KV head (`[kv_heads, head_dim]`) of the measured layer at `tokens` = n, as stored in
/// `Stored` (dequantized for q8_0): what an engine's KV cache holds for the decode step, so that V-mean
/// compensation reads one V row per head.
template <class Stored>
const std::vector<double>& decode_value_prefix_sum(Index tokens) {
  static std::map<Index, std::vector<double>> cache;
  std::vector<double>& sum = cache[tokens];
  if (sum.empty()) {
    constexpr Index dim = LayerShape::head_dim, row_size = LayerShape::kv_heads * dim;
    sum.assign(std::size_t(row_size), 0.0);
    std::vector<double> row(static_cast<std::size_t>(dim));
    with_cached_kv<Stored>(tokens, [&](const Stored*, const Stored* v, Index) {
      for (Index j = 0; j + 1 < tokens; ++j)
        for (Index h = 0; h < LayerShape::kv_heads; ++h) {
          detail::convert(v + (j * LayerShape::kv_heads + h) * row_elements<Stored>, dim, row.data());
          for (Index d = 0; d < dim; ++d) sum[std::size_t(h * dim + d)] += row[std::size_t(d)];
        }
    });
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
  AttentionCall<Scalar> call{
      TensorView<const Scalar>(layer.q.data() + (tokens - 1) * row_size, 1, LayerShape::q_heads, LayerShape::head_dim),
      layer.keys(), layer.values(), TensorView<Scalar>(out.data(), 1, LayerShape::q_heads, LayerShape::head_dim),
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
    kernel<Scalar>("dense").attend(decode_call(tokens, out), nullptr, OpenMPExecutor{settings().threads}, nullptr);
    found = cache.emplace(tokens, std::move(out)).first;
  }
  return found->second;
}

/// decode/<kernel>/kv:<n>/<type>, or with K and V in pages (`KvView` paged) decode_paged/...: the pages of a
/// shuffled pool of 16-token pages read through a block table, whose time over the contiguous case's is the cost
/// of paging. With K and V of q8_0 blocks (type `q8`; q and the output f32) the error is against f32 dense, so
/// it holds the quantization's error and the sparsity's.
template <class Scalar, class KvView>
void register_decode_case(const Kernel<Scalar, KvView>& entry, Index tokens, Index page_size = paged_page_size) {
  using Stored = typename KvView::value_type;
  constexpr bool paged = detail::is_paged_view_v<KvView>;
  const std::string name = std::string(paged ? "decode_paged/" : "decode/") + entry.name +
                           "/kv:" + std::to_string(tokens) + "/" + type_name<Stored>() +
                           (page_size != paged_page_size ? "/page:" + std::to_string(page_size) : "");
  auto summary = std::make_shared<std::optional<CallSummary>>();  // set by the case's first run
  register_case(name, tokens == quick_context_length, [&entry, tokens, page_size, summary](benchmark::State& state) {
    const OpenMPExecutor executor{settings().threads};
    const LayerThresholds* thresholds = thresholds_for(entry, Phase::decode, tokens);
    AlignedVector<Scalar> out;
    const AttentionCall<Scalar> step = decode_call<Scalar>(tokens, out);
    const auto& rotation = [&]() -> const auto& {
      if constexpr (paged)
        return rotation_of<PagedKvRotation, Stored>(tokens, page_size);
      else
        return rotation_of<KvRotation, Stored>(tokens);
    }
    ();
    AttentionCall<Scalar, KvView> call{step.q,   rotation.keys(0), rotation.values(0),
                                       step.out, step.attention,   decode_value_prefix_sum<Stored>(tokens).data()};
    if (!*summary) *summary = summarize_call(entry, call, thresholds, executor, dense_decode_output<Scalar>(tokens));
    Index copy = 0;
    const double seconds = timed_loop(state, [&] {
      call.k = rotation.keys(copy);
      call.v = rotation.values(copy);
      entry.attend(call, thresholds, executor, nullptr);
      copy = (copy + 1) % rotation.copies();
    });
    report_call_counters(state, **summary, seconds, executor.threads);
    // Beside probe/row_products/<type>'s: what the products alone take per key and KV head.
    state.counters["ns/key-head"] = seconds * executor.threads / double(tokens * LayerShape::kv_heads) * 1e9;
  });
}

}  // namespace

void register_decode_benchmarks() {
  for (Index tokens : context_lengths) {
    for (const Kernel<float>& entry : kernels<float>()) register_decode_case(entry, tokens);
    for (const Kernel<Eigen::bfloat16>& entry : kernels<Eigen::bfloat16>()) register_decode_case(entry, tokens);
  }
  // The paged cases of one type at the longest context run at `large_page_size` too, after those at the common one.
  const auto register_paged_cases = [](const auto& entries, Index tokens) {
    for (const auto& entry : entries) register_decode_case(entry, tokens);
    if (tokens == std::end(paged_context_lengths)[-1])
      for (const auto& entry : entries) register_decode_case(entry, tokens, large_page_size);
  };
  for (Index tokens : paged_context_lengths) {
    register_paged_cases(cache_kernels<float, PagedTensorView<const float>>(), tokens);
    register_paged_cases(cache_kernels<Eigen::bfloat16, PagedTensorView<const Eigen::bfloat16>>(), tokens);
    for (const auto& entry : cache_kernels<float, TensorView<const BlockQ8_0>>()) register_decode_case(entry, tokens);
    register_paged_cases(cache_kernels<float, PagedTensorView<const BlockQ8_0>>(), tokens);
  }
}

}  // namespace toptheta::bench
