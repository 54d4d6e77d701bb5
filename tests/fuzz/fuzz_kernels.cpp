// libFuzzer target: the attention kernels on shapes, options and values decoded from the input bytes. The first
// bytes choose the kernel (dense, top-k, Top-θ in each space with one or two passes, cap_k, compensations), the
// stored type, the shape (query and key rows, heads, GQA group, head_dim, causal placement), the layout and
// whether `out` overlaps an input; every further 4 bytes are the bits of one float of q, k and v in turn (NaN and
// infinities included), repeated to fill them. The only exception allowed out is toptheta::invalid_argument;
// anything else, a read outside a buffer, a leak or undefined behaviour is a finding.
#include <toptheta/toptheta.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
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
  const Index q_heads = kv_heads * group, head_dim = 1 + Index(bytes.pick(40));
  const Index query_rows = Index(bytes.pick(80)), extra_keys = Index(bytes.pick(2) ? bytes.pick(250) : bytes.pick(8));
  const bool causal = bytes.pick(4) != 0, head_major = bytes.pick(4) == 0;
  const unsigned out_placement = bytes.pick(16);  // 0: over v, 1: over q, 2: rows overlap, else apart
  const Index key_rows = query_rows + extra_keys;
  const float theta = bytes.pick(4) == 0 ? bytes.next_float() : float(bytes.pick(64)) / 64.0f - 0.25f;
  const Index k = 1 + Index(bytes.pick(24));

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
  if (kernel == 0) {
    toptheta::dense_attention(q_view, k_view, v_view, out_view, attention, &stats, executor);
    return;
  }
  toptheta::SparseAttentionOptions sparse;
  sparse.attention = attention;
  sparse.compensation.v_mean = (kernel & 1) != 0;
  if (kernel == 1) {
    toptheta::TopKOptions options;
    static_cast<toptheta::SparseAttentionOptions&>(options) = sparse;
    options.k = k;
    toptheta::top_k_attention(q_view, k_view, v_view, out_view, options, &stats, executor);
    return;
  }
  const toptheta::ThresholdSpace spaces[] = {
      toptheta::ThresholdSpace::raw_score, toptheta::ThresholdSpace::probability,
      toptheta::ThresholdSpace::score_minus_max, toptheta::ThresholdSpace::score_over_query_norm};
  toptheta::TopThetaOptions options;
  static_cast<toptheta::SparseAttentionOptions&>(options) = sparse;
  options.cap_k = kernel >= 8;
  options.passes = kernel % 3 == 0 ? toptheta::Passes::two : toptheta::Passes::automatic;
  const auto table = toptheta::LayerThresholds::uniform(k, spaces[kernel % 4],
                                                        std::vector<double>(std::size_t(q_heads), double(theta)));
  toptheta::top_theta_attention(q_view, k_view, v_view, out_view, table, options, &stats, executor);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes bytes(data, size);
  try {
    switch (bytes.pick(3)) {
      case 0: run<float>(bytes); break;
      case 1: run<double>(bytes); break;
      default: run<Eigen::bfloat16>(bytes); break;
    }
  } catch (const toptheta::invalid_argument&) {
  }
  return 0;
}
