// int8 K and V in blocks (`BlockQ8<N>`; q8_0 is N = 32): the quantization of one block worked by hand, the caches
// that quantize on append, and every kernel reading blocks (contiguous or paged, decode to prefill, in a batch)
// exactly as it reads float K and V holding the dequantized values `float(scale) * value`, bit for bit.
#include "kernel_kinds.hpp"
#include "test_support.hpp"

#include <cmath>
#include <cstring>
#include <limits>

using namespace toptheta;
using namespace toptheta_test;

namespace {

/// Value `i` of a block as the layout defines it, written out here.
template <class Block>
float dequantized(const Block& block, Index i) {
  return float(block.scale) * float(block.values[i]);
}

/// K and V of a float problem quantized to blocks (`[tokens, kv_heads, head_dim / N]`), and a float problem
/// with the same queries whose K and V hold the dequantized values.
template <class Block = BlockQ8_0>
struct QuantizedProblem {
  static constexpr Index N = Block::values_per_block;
  Problem<float> dequantized_problem;
  std::vector<Block> keys, values;

  explicit QuantizedProblem(const Problem<float>& problem) : dequantized_problem(problem) {
    const Index blocks = Index(problem.k.size()) / N;
    keys.resize(std::size_t(blocks));
    values.resize(std::size_t(blocks));
    quantize_q8(problem.k.data(), blocks * N, keys.data());
    quantize_q8(problem.v.data(), blocks * N, values.data());
    for (Index i = 0; i < blocks * N; ++i) {
      dequantized_problem.k[std::size_t(i)] = dequantized(keys[std::size_t(i / N)], i % N);
      dequantized_problem.v[std::size_t(i)] = dequantized(values[std::size_t(i / N)], i % N);
    }
  }
  TensorView<const Block> key_view() const {
    const Problem<float>& p = dequantized_problem;
    return {keys.data(), p.key_rows, p.kv_heads, p.head_dim};
  }
  TensorView<const Block> value_view() const {
    const Problem<float>& p = dequantized_problem;
    return {values.data(), p.key_rows, p.kv_heads, p.head_dim};
  }
};

/// The blocks of `rows` (`[tokens, heads, head_dim / N]`) copied into pages of `page_size` tokens, token-major
/// or head-major, in a pool whose block table takes every other page backwards; unused slots hold NaN scales.
template <class Block>
struct PagedBlocks {
  Index page_size, pool_pages;
  PageLayout layout;
  std::vector<std::int32_t> block_table;
  std::vector<Block> pages;

  PagedBlocks(const std::vector<Block>& rows, Index tokens, Index heads, Index head_dim, Index page_size_,
              PageLayout layout_)
      : page_size(page_size_), pool_pages(2 * ((tokens + page_size_ - 1) / page_size_) + 1), layout(layout_) {
    const Index row_blocks = head_dim / Block::values_per_block, used = (tokens + page_size - 1) / page_size;
    for (Index b = 0; b < used; ++b) block_table.push_back(std::int32_t(pool_pages - 1 - 2 * b));
    Block poison{};
    poison.scale = Eigen::half(std::numeric_limits<float>::quiet_NaN());
    pages.assign(std::size_t(pool_pages * page_size * heads * row_blocks), poison);
    for (Index t = 0; t < tokens; ++t)
      for (Index h = 0; h < heads; ++h) {
        const Index page = block_table[std::size_t(t / page_size)], slot = t % page_size;
        const Index at = layout == PageLayout::token_major ? ((page * page_size + slot) * heads + h) * row_blocks
                                                           : ((page * heads + h) * page_size + slot) * row_blocks;
        std::copy_n(rows.data() + (t * heads + h) * row_blocks, row_blocks, pages.data() + at);
      }
  }
  PagedTensorView<const Block> view(Index tokens, Index heads, Index head_dim) const {
    return {pages.data(), pool_pages, page_size, block_table.data(), tokens, heads, head_dim, layout};
  }
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

/// Runs `kind` on float K and V holding the dequantized values and on the blocks (contiguous, and paged when
/// `page_size > 0`), and checks that outputs and statistics are equal, bit for bit.
template <class Block = BlockQ8_0>
void check_blocks_equal_dequantized(Kind kind, Index query_rows, Index key_rows, Index q_heads, Index kv_heads,
                                    Index dim, int threads, Index page_size, PageLayout layout) {
  INFO(name(kind) << ", " << query_rows << " query rows of " << key_rows << " keys, " << q_heads << " / " << kv_heads
                  << " heads, head_dim " << dim << ", " << threads << " threads, page size " << page_size
                  << (layout == PageLayout::head_major ? " head-major" : "") << ", blocks of "
                  << Block::values_per_block);
  const QuantizedProblem<Block> quantized(
      Problem<float>(query_rows, key_rows, q_heads, kv_heads, dim, unsigned(key_rows * 7 + dim), 2.0));
  Problem<float> reference = quantized.dequantized_problem, blocks = reference;
  AttentionStats reference_stats, block_stats;
  const Index past = key_rows - query_rows;
  attend(kind, reference, reference.keys(), reference.values(), reference.output(), past, threads, &reference_stats);
  if (page_size == 0) {
    attend(kind, blocks, quantized.key_view(), quantized.value_view(), blocks.output(), past, threads, &block_stats);
  } else {
    const PagedBlocks<Block> k(quantized.keys, key_rows, kv_heads, dim, page_size, layout);
    const PagedBlocks<Block> v(quantized.values, key_rows, kv_heads, dim, page_size, layout);
    attend(kind, blocks, k.view(key_rows, kv_heads, dim), v.view(key_rows, kv_heads, dim), blocks.output(), past,
           threads, &block_stats);
  }
  CHECK(same_bits(blocks.out, reference.out));
  CHECK(same_stats(block_stats, reference_stats));
  CHECK(block_stats.non_finite_rows == 0);
}

}  // namespace

TEST_CASE("a q8_0 block worked by hand: scale, values, and a block of zeros", "[q8]") {
  // x_i = (4 i - 127) / 8: max |x| = 127 / 8, so d = 1/8 (a half) and every value is exact.
  float x[64];
  for (int i = 0; i < 32; ++i) x[i] = float(4 * i - 127) / 8.0f;
  for (int i = 32; i < 64; ++i) x[i] = 0.0f;
  BlockQ8_0 blocks[2];
  quantize_q8(x, 64, blocks);
  CHECK(float(blocks[0].scale) == 0.125f);
  for (int i = 0; i < 32; ++i) {
    CHECK(int(blocks[0].values[i]) == 4 * i - 127);
    CHECK(dequantized(blocks[0], i) == x[i]);
  }
  CHECK(float(blocks[1].scale) == 0.0f);
  for (int i = 0; i < 32; ++i) CHECK(int(blocks[1].values[i]) == 0);
  std::vector<double> out(64);
  dequantize_q8(blocks, 64, out.data());
  for (int i = 0; i < 64; ++i) CHECK(out[std::size_t(i)] == double(x[i]));
}

TEST_CASE("q8_0 rounds the scale up to a half and each value to within half a step", "[q8]") {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const float spread : {1e-6f, 0.3f, 1.0f, 40.0f, 60000.0f}) {
    float x[32];
    float largest = 0;
    for (float& value : x) {
      value = spread * normal(rng);
      largest = std::max(largest, std::abs(value));
    }
    BlockQ8_0 block;
    quantize_q8(x, 32, &block);
    const float d = float(block.scale);
    INFO("spread " << spread << ", d " << d);
    CHECK(double(d) * 127.0 >= double(largest));  // every |x_i| / d <= 127: no value clipped
    const auto bits = Eigen::numext::bit_cast<std::uint16_t>(block.scale);
    const auto below = Eigen::numext::bit_cast<Eigen::half>(std::uint16_t(bits - 1));
    CHECK(double(float(below)) * 127.0 < double(largest));  // and d is the smallest half that is so
    for (int i = 0; i < 32; ++i) {
      CHECK(std::abs(block.values[i]) <= 127);
      CHECK(std::abs(dequantized(block, i) - x[i]) <= 0.5f * d * (1 + 1e-6f));
    }
  }
}

TEST_CASE("q8_0 rejects values a block cannot hold, naming them", "[q8][bad_input]") {
  std::vector<float> x(64, 1.0f);
  std::vector<BlockQ8_0> blocks(2);
  x[37] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_INVALID(quantize_q8(x.data(), 64, blocks.data(), "keys"), "keys (element 37)", "a finite value");
  x[37] = std::numeric_limits<float>::infinity();
  REQUIRE_INVALID(quantize_q8(x.data(), 64, blocks.data()), "values (element 37)", "a finite value");
  x[37] = 1e7f;  // above 127 x 65504: the scale would be an infinite half
  REQUIRE_INVALID(quantize_q8(x.data(), 64, blocks.data()), "values (element 37)", "127 x 65504");
  REQUIRE_INVALID(quantize_q8(x.data(), 48, blocks.data()), "count", "a multiple >= 0 of the 32 values");
  x[37] = 1.0f;
  std::vector<BlockQ8<8>> small(8);
  REQUIRE_NOTHROW(quantize_q8(x.data(), 64, small.data()));
  REQUIRE_INVALID(quantize_q8(x.data(), 60, small.data()), "count", "a multiple >= 0 of the 8 values");
  REQUIRE_INVALID(dequantize_q8(small.data(), 60, x.data()), "count", "a multiple >= 0 of the 8 values");
  REQUIRE_INVALID(dequantize_q8(small.data(), -8, x.data()), "count", "a multiple >= 0 of the 8 values");
  // A double just above 127 x 65504 is rejected as the int8 caches reject it, though it rounds to it in float.
  const double above = q8_max_magnitude + 0.25;
  std::vector<double> doubles(8, 1.0);
  doubles[3] = above;
  REQUIRE_INVALID(quantize_q8(doubles.data(), 8, small.data()), "values (element 3)", "127 x 65504");
}

TEST_CASE("views, pools and caches of q8_0 blocks reject a head_dim that is not whole blocks", "[q8][bad_input]") {
  std::vector<BlockQ8_0> blocks(16);
  REQUIRE_INVALID(TensorView<const BlockQ8_0>(blocks.data(), 2, 2, 48), "head_dim", "a multiple of the 32 values");
  const std::vector<std::int32_t> table{0};
  REQUIRE_INVALID(PagedTensorView<const BlockQ8_0>(blocks.data(), 1, 4, table.data(), 2, 2, 40), "head_dim",
                  "a multiple of the 32 values");
  REQUIRE_INVALID(KvCache<BlockQ8_0>(2, 100, 8), "head_dim", "a multiple of the 32 values");
  REQUIRE_INVALID(PagePool<BlockQ8_0>(4, 16, 2, 16), "head_dim", "a multiple of the 32 values");
  // The default strides of a view count blocks: token t, head h starts at block (t * heads + h) * head_dim / 32.
  const TensorView<const BlockQ8_0> view(blocks.data(), 2, 2, 64);
  CHECK(view.token_stride() == 4);
  CHECK(view.head_stride() == 2);
  CHECK(view.row(1, 1) == blocks.data() + 6);
}

TEST_CASE(
    "a q8_0 cache quantizes on append, sums the dequantized V, and rejects what it cannot hold even "
    "without check_finite",
    "[q8][kv_cache][bad_input]") {
  const Index kv_heads = 2, dim = 64;
  Problem<float> tokens(0, 20, 4, kv_heads, dim, 11, 3.0);
  KvCache<BlockQ8_0> cache(kv_heads, dim, 64);
  PagePool<BlockQ8_0> pool(16, 4, kv_heads, dim, PageLayout::head_major);
  PagedKvCache<BlockQ8_0> paged(pool);
  cache.append(tokens.keys(), tokens.values());
  paged.append(tokens.keys(), tokens.values());
  REQUIRE(cache.length() == 20);
  std::vector<double> sum(std::size_t(kv_heads * dim), 0.0);
  for (Index t = 0; t < 20; ++t)
    for (Index h = 0; h < kv_heads; ++h) {
      BlockQ8_0 expected[2];
      quantize_q8(tokens.keys().row(t, h), dim, expected);
      for (Index b = 0; b < 2; ++b) {
        REQUIRE(std::memcmp(cache.keys().row(t, h) + b, expected + b, sizeof(BlockQ8_0)) == 0);
        REQUIRE(std::memcmp(paged.keys().row(t, h) + b, expected + b, sizeof(BlockQ8_0)) == 0);
      }
      for (Index d = 0; d < dim; ++d) {
        const float value = dequantized(cache.values().row(t, h)[d / 32], d % 32);
        REQUIRE(dequantized(paged.values().row(t, h)[d / 32], d % 32) == value);
        sum[std::size_t(h * dim + d)] += double(value);
      }
    }
  for (Index i = 0; i < kv_heads * dim; ++i) {
    CHECK(cache.value_sum_before(20)[i] == Approx(sum[std::size_t(i)]).epsilon(1e-12));
    CHECK(paged.value_sum_before(20)[i] == Approx(sum[std::size_t(i)]).epsilon(1e-12));
  }
  cache.check_finite(false);
  paged.check_finite(false);
  tokens.v[std::size_t(3 * kv_heads * dim + dim + 5)] = std::numeric_limits<float>::infinity();  // token 3, head 1
  REQUIRE_INVALID(cache.append(tokens.keys(), tokens.values()), "values (token 23, KV head 1, element 5)",
                  "an int8 cache");
  REQUIRE_INVALID(paged.append(tokens.keys(), tokens.values()), "values (token 23, KV head 1, element 5)",
                  "an int8 cache");
  CHECK(cache.length() == 20);
  CHECK(paged.length() == 20);
  CHECK(pool.free_pages() == 11);
}

TEST_CASE("every kernel reads q8_0 blocks as it reads float K and V holding their values, bit for bit", "[q8]") {
  const Kind kind = GENERATE(from_range(std::begin(every_kind), std::end(every_kind)));
  // Decode of a long cache (split keys), a speculative step, a chunked prefill, a whole prefill of several
  // query blocks (GEMM blocks, packed K tiles).
  const auto [query_rows, key_rows] = GENERATE(table<Index, Index>({{1, 1000}, {3, 90}, {37, 300}, {150, 150}}));
  check_blocks_equal_dequantized(kind, query_rows, key_rows, 8, 2, 96, 2, 0, PageLayout::token_major);
}

TEST_CASE("every kernel reads paged q8_0 blocks as it reads float K and V, bit for bit", "[q8][paged]") {
  const Kind kind = GENERATE(from_range(std::begin(every_kind), std::end(every_kind)));
  const Index page_size = GENERATE(1, 16, 512);
  const PageLayout layout = GENERATE(PageLayout::token_major, PageLayout::head_major);
  const auto [query_rows, key_rows] = GENERATE(table<Index, Index>({{1, 700}, {3, 90}, {150, 150}}));
  check_blocks_equal_dequantized(kind, query_rows, key_rows, 8, 2, 64, 2, page_size, layout);
}

TEST_CASE("q8_0 blocks across GQA ratios, head_dims and thread counts", "[q8]") {
  const auto [q_heads, kv_heads] = GENERATE(table<Index, Index>({{4, 4}, {8, 2}, {8, 1}}));
  const Index dim = GENERATE(32, 128);
  const int threads = GENERATE(1, 3);
  for (const Kind kind : {Kind::dense, Kind::probability})
    for (const auto& [query_rows, key_rows] : {std::pair<Index, Index>{1, 600}, {70, 200}})
      check_blocks_equal_dequantized(kind, query_rows, key_rows, q_heads, kv_heads, dim, threads, 16,
                                     PageLayout::token_major);
}

TEST_CASE("blocks of 8 and 64 values: one scale per (token, head) of head_dim 8, and a block of whole packets",
          "[q8]") {
  for (const Kind kind : {Kind::dense, Kind::probability, Kind::raw, Kind::top_k})
    for (const auto& [query_rows, key_rows] : {std::pair<Index, Index>{1, 600}, {3, 90}, {70, 200}}) {
      check_blocks_equal_dequantized<BlockQ8<8>>(kind, query_rows, key_rows, 8, 4, 8, 2, 0, PageLayout::token_major);
      check_blocks_equal_dequantized<BlockQ8<8>>(kind, query_rows, key_rows, 8, 2, 64, 2, 16, PageLayout::head_major);
      check_blocks_equal_dequantized<BlockQ8<64>>(kind, query_rows, key_rows, 8, 2, 128, 2, 16,
                                                  PageLayout::token_major);
    }
}

TEST_CASE("dense attention on q8_0 blocks matches the oracle on the dequantized values", "[q8][oracle]") {
  const QuantizedProblem<> quantized(Problem<float>(5, 300, 8, 2, 64, 17, 2.0));
  Problem<float> p = quantized.dequantized_problem;
  AttentionOptions options;
  options.past = 295;
  dense_attention(p.queries(), quantized.key_view(), quantized.value_view(), p.output(), options);
  const Eigen::MatrixXd expected = reference_attention(p.queries(), p.keys(), p.values(), options);
  CHECK(relative_error(p.output_matrix(), expected) < tolerance<float>());
}

TEST_CASE("a batch of sequences in one q8_0 page pool gives each its own call's bits", "[q8][batch]") {
  // One pool of int8 pages, sequences of 40, 700 and 90 keys (1, 1 and 3 new tokens) and one with no new token.
  const Index q_heads = 8, kv_heads = 2, dim = 64, page_size = 16;
  PagePool<BlockQ8_0> pool(64, page_size, kv_heads, dim);
  const std::pair<Index, Index> shapes[] = {{1, 40}, {1, 700}, {3, 90}, {0, 10}};
  std::vector<PagedKvCache<BlockQ8_0>> caches;
  std::vector<Problem<float>> problems, alone;
  for (const auto& [query_rows, key_rows] : shapes) {
    problems.emplace_back(query_rows, key_rows, q_heads, kv_heads, dim, unsigned(key_rows + 1), 2.0);
    caches.emplace_back(pool);
  }
  for (Index t = 0; t < 700; ++t)  // token by token, so the sequences' pages interleave in the pool
    for (std::size_t s = 0; s < caches.size(); ++s)
      if (t < problems[s].key_rows)
        caches[s].append(TensorView<const float>(problems[s].k.data() + t * kv_heads * dim, 1, kv_heads, dim),
                         TensorView<const float>(problems[s].v.data() + t * kv_heads * dim, 1, kv_heads, dim));
  alone = problems;
  std::vector<SequenceViews<float, PagedTensorView<const BlockQ8_0>>> batch;
  std::vector<AttentionStats> stats(caches.size()), alone_stats(caches.size());
  for (std::size_t s = 0; s < caches.size(); ++s) {
    // The running V sum is kept before the latest append (one token) and at the end; else V is read.
    const Index past = problems[s].key_rows - problems[s].query_rows;
    const double* prefix_sum = problems[s].query_rows <= 1 ? caches[s].value_sum_before(past) : nullptr;
    batch.push_back({problems[s].queries(), caches[s].keys(), caches[s].values(), problems[s].output(), past,
                     prefix_sum, &stats[s]});
  }
  const auto table = LayerThresholds::uniform(8, ThresholdSpace::probability, std::vector<double>(q_heads, 0.02));
  TopThetaOptions options;
  options.compensation.v_mean = true;
  top_theta_attention(batch, table, options, OpenMPExecutor{2});
  for (std::size_t s = 0; s < caches.size(); ++s) {
    INFO("sequence " << s);
    TopThetaOptions own = options;
    own.attention.past = problems[s].key_rows - problems[s].query_rows;
    own.value_prefix_sum = batch[s].value_prefix_sum;
    top_theta_attention(alone[s].queries(), caches[s].keys(), caches[s].values(), alone[s].output(), table, own,
                        &alone_stats[s], OpenMPExecutor{1});
    CHECK(same_bits(problems[s].out, alone[s].out));
    CHECK(same_stats(stats[s], alone_stats[s]));
  }
}

TEST_CASE("a non-finite scale in an engine's blocks reads as its 32 values would in float", "[q8][non_finite]") {
  QuantizedProblem<> quantized(Problem<float>(1, 200, 8, 2, 64, 23, 2.0));
  const Index poisoned = (120 * 2 + 1) * 2;  // token 120, KV head 1, first block: V
  quantized.values[std::size_t(poisoned)].scale = Eigen::half(std::numeric_limits<float>::infinity());
  Problem<float> reference = quantized.dequantized_problem, blocks = reference;
  for (Index i = 0; i < 32; ++i)
    reference.v[std::size_t(poisoned * 32 + i)] = dequantized(quantized.values[std::size_t(poisoned)], i);
  for (const Kind kind : {Kind::dense, Kind::probability}) {
    INFO(name(kind));
    AttentionStats reference_stats, block_stats;
    attend(kind, reference, reference.keys(), reference.values(), reference.output(), 199, 2, &reference_stats);
    attend(kind, blocks, quantized.key_view(), quantized.value_view(), blocks.output(), 199, 2, &block_stats);
    CHECK(same_stats(block_stats, reference_stats));
    CHECK(block_stats.non_finite_rows == reference_stats.non_finite_rows);
    CHECK(same_bits(blocks.out, reference.out));
  }
}
