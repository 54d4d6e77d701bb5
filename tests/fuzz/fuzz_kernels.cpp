// libFuzzer target: the attention kernels on shapes, options and values decoded from the input bytes. The first
// bytes choose the kernel (dense, top-k, Top-θ in each space with one or two passes, cap_k, compensations), the
// stored type, the shape (query and key rows, heads, GQA group, head_dim, causal placement), the layout, whether
// `out` overlaps an input, and whether K and V are also copied into pages (sizes 1 to 32, either page layout,
// shuffled, spare or shared pages), whose call must give the contiguous call's bits, and (float) whether K and V
// are also read as int8 blocks, whose call must give the bits of float K and V holding their values; every
// further 4 bytes are the bits of one float of q, k and v in turn (NaN and infinities included), repeated to fill
// them. The only exception allowed out is toptheta::invalid_argument; anything else, a read outside a buffer, a
// leak, undefined behaviour or a paged or int8 result that differs is a finding.
#include <toptheta/toptheta.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

/// Reads the input front to back; past its end every read is 0.
class Bytes {
 public:
  Bytes(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  unsigned byte() { return at_ < size_ ? data_[at_++] : 0u; }
  /// A value in [0, count).
  unsigned pick(unsigned count) { return byte() % count; }
  float next_float() {
    std::uint32_t bits = 0;
    for (int b = 0; b < 4; ++b) bits |= std::uint32_t(byte()) << (8 * b);
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }
  std::size_t left() const { return size_ - at_; }

 private:
  const std::uint8_t* data_;
  std::size_t size_, at_ = 0;
};

using toptheta::Index;

template <class Scalar>
void run(Bytes& bytes) {
  const unsigned kernel = bytes.pick(10);
  const Index kv_heads = 1 + Index(bytes.pick(3)), group = 1 + Index(bytes.pick(4));
  // float only: K and V also as int8 blocks of 8 values, so head_dim a multiple of 8.
  const bool blocks = std::is_same_v<Scalar, float> && bytes.pick(3) == 0;
  const Index q_heads = kv_heads * group,
              head_dim = blocks ? 8 * (1 + Index(bytes.pick(5))) : 1 + Index(bytes.pick(40));
  const Index query_rows = Index(bytes.pick(80)), extra_keys = Index(bytes.pick(2) ? bytes.pick(250) : bytes.pick(8));
  const bool causal = bytes.pick(4) != 0, head_major = bytes.pick(4) == 0;
  const unsigned out_placement = bytes.pick(16);  // 0: over v, 1: over q, 2: rows overlap, else apart
  const Index key_rows = query_rows + extra_keys;
  const float theta = bytes.pick(4) == 0 ? bytes.next_float() : float(bytes.pick(64)) / 64.0f - 0.25f;
  const Index k = 1 + Index(bytes.pick(24));
  // K and V also in pages (sizes 1 to 32, either layout, shuffled, spare pages): the call must give the
  // contiguous call's bits.
  const bool paged = bytes.pick(3) == 0;
  const Index page_size = Index(1) << bytes.pick(6), spare_pages = Index(bytes.pick(3)), page_shift = bytes.pick(7);
  const auto layout = bytes.pick(2) ? toptheta::PageLayout::head_major : toptheta::PageLayout::token_major;

  std::vector<float> raw;
  while (bytes.left() >= 4 && raw.size() < 4096) raw.push_back(bytes.next_float());
  if (raw.empty()) raw.push_back(0.5f);
  std::size_t next = 0;
  const auto fill = [&](std::vector<Scalar>& data, Index count, Index extra) {
    data.resize(std::size_t(count + extra));
    for (auto& x : data) x = Scalar(raw[next++ % raw.size()]);
  };
  std::vector<Scalar> q, keys, values, out;
  fill(q, query_rows * q_heads * head_dim, 0);
  fill(keys, key_rows * kv_heads * head_dim, 0);
  fill(values, key_rows * kv_heads * head_dim, 0);
  out.assign(std::size_t(query_rows * q_heads * head_dim + head_dim), Scalar(0));
  const auto view = [&](auto* data, Index tokens, Index heads) {
    using View = toptheta::TensorView<std::remove_pointer_t<decltype(data)>>;
    return head_major ? View(data, tokens, heads, head_dim, head_dim, tokens * head_dim)
                      : View(data, tokens, heads, head_dim);
  };
  toptheta::TensorView<Scalar> out_view = view(out.data(), query_rows, q_heads);
  if (out_placement == 0 && values.size() >= out.size()) out_view = view(values.data(), query_rows, q_heads);
  if (out_placement == 1) out_view = view(q.data(), query_rows, q_heads);
  if (out_placement == 2 && query_rows > 1)
    out_view = toptheta::TensorView<Scalar>(out.data(), query_rows, q_heads, head_dim, head_dim / 2, head_dim);

  toptheta::AttentionOptions attention;
  attention.causal = causal;
  attention.past = causal ? extra_keys : 0;
  const auto q_view = view(static_cast<const Scalar*>(q.data()), query_rows, q_heads);
  const auto k_view = view(static_cast<const Scalar*>(keys.data()), key_rows, kv_heads);
  const auto v_view = view(static_cast<const Scalar*>(values.data()), key_rows, kv_heads);
  toptheta::AttentionStats stats;
  const toptheta::OpenMPExecutor executor{1 + int(bytes.pick(2))};
  toptheta::SparseAttentionOptions sparse;
  sparse.attention = attention;
  sparse.compensation.v_mean = (kernel & 1) != 0;
  sparse.compensation.v_mean_of_pruned = sparse.compensation.v_mean && k % 2 == 0;  // the mean of the pruned rows
  const toptheta::ThresholdSpace spaces[] = {toptheta::ThresholdSpace::raw_score, toptheta::ThresholdSpace::probability,
                                             toptheta::ThresholdSpace::score_minus_max,
                                             toptheta::ThresholdSpace::score_over_query_norm};
  const auto table = toptheta::LayerThresholds::uniform(k, spaces[kernel % 4],
                                                        std::vector<double>(std::size_t(q_heads), double(theta)));
  const auto attend = [&](const auto& k_rows, const auto& v_rows, const toptheta::TensorView<Scalar>& into) {
    if (kernel == 0) return toptheta::dense_attention(q_view, k_rows, v_rows, into, attention, &stats, executor);
    if (kernel == 1) {
      toptheta::TopKOptions options;
      static_cast<toptheta::SparseAttentionOptions&>(options) = sparse;
      options.k = k;
      return toptheta::top_k_attention(q_view, k_rows, v_rows, into, options, &stats, executor);
    }
    toptheta::TopThetaOptions options;
    static_cast<toptheta::SparseAttentionOptions&>(options) = sparse;
    options.cap_k = kernel >= 8;
    options.passes = kernel % 3 == 0 ? toptheta::Passes::two : toptheta::Passes::automatic;
    toptheta::top_theta_attention(q_view, k_rows, v_rows, into, table, options, &stats, executor);
  };
  attend(k_view, v_view, out_view);
  if constexpr (std::is_same_v<Scalar, float>)
    if (blocks && out_view.data() == out.data()) {
      // K and V as an engine's int8 blocks of 8 values (any half scale, NaN and infinities included, any bytes):
      // the call must give the bits of the same call on float K and V holding float(scale) * value.
      using Block = toptheta::BlockQ8<8>;
      const Index count = key_rows * kv_heads * head_dim;
      std::vector<Block> key_blocks(std::size_t(count / 8)), value_blocks(key_blocks.size());
      std::vector<float> dequantized_keys(static_cast<std::size_t>(count)), dequantized_values(dequantized_keys);
      const auto make = [&](std::vector<Block>& made, std::vector<float>& dequantized) {
        for (std::size_t b = 0; b < made.size(); ++b) {
          std::uint32_t bits;
          const float word = raw[next++ % raw.size()];
          std::memcpy(&bits, &word, sizeof bits);
          made[b].scale = Eigen::numext::bit_cast<Eigen::half>(std::uint16_t(bits));
          for (Index i = 0; i < 8; ++i) {
            made[b].values[i] = std::int8_t(std::uint8_t(bits >> (8 + 3 * i)));
            dequantized[b * 8 + std::size_t(i)] = float(made[b].scale) * float(made[b].values[i]);
          }
        }
      };
      make(key_blocks, dequantized_keys);
      make(value_blocks, dequantized_values);
      std::vector<float> float_out(out.size()), block_out(out.size());
      attend(toptheta::TensorView<const float>(dequantized_keys.data(), key_rows, kv_heads, head_dim),
             toptheta::TensorView<const float>(dequantized_values.data(), key_rows, kv_heads, head_dim),
             view(float_out.data(), query_rows, q_heads));
      attend(toptheta::TensorView<const Block>(key_blocks.data(), key_rows, kv_heads, head_dim),
             toptheta::TensorView<const Block>(value_blocks.data(), key_rows, kv_heads, head_dim),
             view(block_out.data(), query_rows, q_heads));
      if (std::memcmp(float_out.data(), block_out.data(), out.size() * sizeof(float)) != 0) __builtin_trap();
    }
  if (!paged || out_view.data() != out.data()) return;

  const Index used = (key_rows + page_size - 1) / page_size, pool_pages = used + spare_pages;
  std::vector<std::int32_t> block_table;
  for (Index b = 0; b < used; ++b) block_table.push_back(std::int32_t((b * 5 + page_shift) % pool_pages));
  const Index page_values = page_size * kv_heads * head_dim;
  std::vector<Scalar> key_pages(std::size_t(pool_pages * page_values)), value_pages(key_pages.size());
  const auto pages_view = [&](std::vector<Scalar>& pages) {
    return toptheta::PagedTensorView<Scalar>(pages.data(), pool_pages, page_size, block_table.data(), key_rows,
                                             kv_heads, head_dim, layout);
  };
  if (used > 0) {  // with repeated table entries (5 b + shift mod pages), later tokens overwrite earlier ones
    for (Index t = 0; t < key_rows; ++t)
      for (Index h = 0; h < kv_heads; ++h) {
        std::copy_n(k_view.row(t, h), head_dim, pages_view(key_pages).row(t, h));
        std::copy_n(v_view.row(t, h), head_dim, pages_view(value_pages).row(t, h));
      }
  }
  // The contiguous reference reads the pages' contents back, so that shared pages count the same in both.
  std::vector<Scalar> gathered_keys(keys.size()), gathered_values(values.size());
  const auto gathered = [&](std::vector<Scalar>& data) { return view(data.data(), key_rows, kv_heads); };
  for (Index t = 0; t < key_rows; ++t)
    for (Index h = 0; h < kv_heads; ++h) {
      std::copy_n(pages_view(key_pages).row(t, h), head_dim, gathered(gathered_keys).row(t, h));
      std::copy_n(pages_view(value_pages).row(t, h), head_dim, gathered(gathered_values).row(t, h));
    }
  std::vector<Scalar> contiguous_out(out.size()), paged_out(out.size());
  attend(toptheta::TensorView<const Scalar>(gathered(gathered_keys)),
         toptheta::TensorView<const Scalar>(gathered(gathered_values)),
         view(contiguous_out.data(), query_rows, q_heads));
  attend(toptheta::PagedTensorView<const Scalar>(pages_view(key_pages)),
         toptheta::PagedTensorView<const Scalar>(pages_view(value_pages)), view(paged_out.data(), query_rows, q_heads));
  if (std::memcmp(contiguous_out.data(), paged_out.data(), out.size() * sizeof(Scalar)) != 0) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes bytes(data, size);
  try {
    switch (bytes.pick(3)) {
      case 0:
        run<float>(bytes);
        break;
      case 1:
        run<double>(bytes);
        break;
      default:
        run<Eigen::bfloat16>(bytes);
        break;
    }
  } catch (const toptheta::invalid_argument&) {
  }
  return 0;
}
