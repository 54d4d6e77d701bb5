// The README's usage example: Top-θ attention over an engine's own [tokens, heads, head_dim] buffers.
#include <toptheta/toptheta.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  using namespace toptheta;
  const Index tokens = 512, q_heads = 8, kv_heads = 2, head_dim = 64;
  std::vector<float> q(tokens * q_heads * head_dim), k(tokens * kv_heads * head_dim), v(k.size()), out(q.size());
  for (std::size_t t = 0; t < q.size(); ++t) q[t] = float(int(t * 37 % 101) - 50) / 50;  // any engine data
  for (std::size_t t = 0; t < k.size(); ++t) k[t] = float(int(t * 53 % 97) - 48) / 48;
  for (std::size_t t = 0; t < v.size(); ++t) v[t] = float(int(t * 71 % 89) - 44) / 44;

  // One threshold per query head (a calibrated table also varies them with the row length L).
  const auto thresholds =
      LayerThresholds::uniform(/*k=*/32, ThresholdSpace::probability, std::vector<double>(q_heads, 0.002));

  TopThetaOptions options;
  options.attention.causal = true;  // prefill of a new sequence: query row i sees keys j <= i
  options.compensation.v_mean = true;
  AttentionStats stats;
  top_theta_attention(TensorView<const float>(q.data(), tokens, q_heads, head_dim),
                      TensorView<const float>(k.data(), tokens, kv_heads, head_dim),
                      TensorView<const float>(v.data(), tokens, kv_heads, head_dim),
                      TensorView<float>(out.data(), tokens, q_heads, head_dim), thresholds, options, &stats);
  std::printf("kept %.1f%% of attention elements; V rows kept per KV head: %.1f%%\n", 100 * stats.kept_fraction(),
              100 * stats.v_rows_kept_fraction());

  // A decode step of a batch in one call: each sequence with its own cache, length and new query rows (here
  // the first 100, 300 and 512 tokens as three sequences' caches, each attending its last token).
  std::vector<float> decode_out(3 * q_heads * head_dim);
  std::vector<SequenceViews<float>> batch;
  for (const Index length : {100, 300, 512}) {
    const Index last = length - 1;
    batch.push_back({TensorView<const float>(q.data() + last * q_heads * head_dim, 1, q_heads, head_dim),
                     TensorView<const float>(k.data(), length, kv_heads, head_dim),
                     TensorView<const float>(v.data(), length, kv_heads, head_dim),
                     TensorView<float>(decode_out.data() + batch.size() * q_heads * head_dim, 1, q_heads, head_dim),
                     /*past=*/last});
  }
  options.attention = AttentionOptions{};  // causal; each sequence's past is in its SequenceViews
  top_theta_attention(batch, thresholds, options);
  std::printf("decoded a batch of %zu sequences in one call\n", batch.size());

  // The same batch from a paged KV cache: one pool of 16-token pages shared by the sequences, one
  // PagedKvCache (block table and running V sum) per sequence, of `Stored` values: float (the contiguous batch's
  // bits), or int8 q8_0 blocks (BlockQ8_0: 32 values and one half scale, quantized as the cache appends).
  const auto paged_decode = [&](auto stored) {
    using Stored = decltype(stored);
    PagePool<Stored> pool(/*pages=*/64, /*page_size=*/16, kv_heads, head_dim);
    std::vector<PagedKvCache<Stored>> caches;
    caches.reserve(3);
    std::vector<float> paged_out(decode_out.size());
    std::vector<SequenceViews<float, PagedTensorView<const Stored>>> paged_batch;
    for (const Index length : {100, 300, 512}) {
      PagedKvCache<Stored>& cache = caches.emplace_back(pool);
      cache.append(TensorView<const float>(k.data(), length - 1, kv_heads, head_dim),
                   TensorView<const float>(v.data(), length - 1, kv_heads, head_dim));  // the prompt
      const Index past = cache.length();
      cache.append(TensorView<const float>(k.data() + past * kv_heads * head_dim, 1, kv_heads, head_dim),
                   TensorView<const float>(v.data() + past * kv_heads * head_dim, 1, kv_heads, head_dim));  // new token
      paged_batch.push_back(
          {TensorView<const float>(q.data() + past * q_heads * head_dim, 1, q_heads, head_dim), cache.keys(),
           cache.values(),
           TensorView<float>(paged_out.data() + paged_batch.size() * q_heads * head_dim, 1, q_heads, head_dim), past,
           cache.value_sum_before(past)});
    }
    top_theta_attention(paged_batch, thresholds, options);
    return paged_out;
  };
  const std::vector<float> paged_out = paged_decode(float());
  std::printf("paged batch %s the contiguous one\n", paged_out == decode_out ? "equals" : "DIFFERS FROM");
  const std::vector<float> int8_out = paged_decode(BlockQ8_0());
  float largest = 0, difference = 0;
  for (std::size_t t = 0; t < decode_out.size(); ++t) {
    largest = std::max(largest, std::abs(decode_out[t]));
    difference = std::max(difference, std::abs(int8_out[t] - decode_out[t]));
  }
  std::printf("int8 paged batch: largest difference from the float one %.4f of its largest output\n",
              difference / largest);
  return paged_out == decode_out && difference <= 0.02f * largest ? 0 : 1;
}
