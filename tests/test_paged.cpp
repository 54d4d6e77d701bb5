// Paged K and V (`PagedTensorView`): every kernel reads a sequence's cache through its block table exactly as it
// reads a contiguous copy, bit for bit: pages out of order, the last page not filled to the end, page sizes from
// 1 to larger than a tile, decode (split keys), speculative steps, chunked and whole prefill, batches.
#include "kernel_kinds.hpp"
#include "test_support.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

using namespace toptheta;
using namespace toptheta_test;

namespace {

/// Where row (t, h) of a sequence starts in a pool of `[page_size, heads, dim]` (token-major) or
/// `[heads, page_size, dim]` (head-major) pages; written out here, not taken from the view under test.
Index slot_of(const std::vector<std::int32_t>& block_table, Index page_size, Index t, Index h, Index heads, Index dim,
              PageLayout layout = PageLayout::token_major) {
  const Index page = block_table[std::size_t(t / page_size)], slot = t % page_size;
  return layout == PageLayout::token_major ? ((page * page_size + slot) * heads + h) * dim
                                           : ((page * heads + h) * page_size + slot) * dim;
}

/// K and V of a `Problem` copied into a pool of pages, in an order that is not the sequence's: the block table
/// takes every other page of the pool backwards. Slots no token fills (the pool's spare pages, the end of the
/// last page) hold NaN, so a read outside the sequence shows in the output.
template <class Scalar>
struct PagedCopy {
  Index page_size, pool_pages;
  PageLayout layout;
  std::vector<std::int32_t> block_table;
  AlignedVector<Scalar> keys, values;

  PagedCopy(const Problem<Scalar>& problem, Index page_size_, PageLayout layout_)
      : page_size(page_size_), pool_pages(2 * ((problem.key_rows + page_size_ - 1) / page_size_) + 1), layout(layout_) {
    const Index used = (problem.key_rows + page_size - 1) / page_size, row = problem.kv_heads * problem.head_dim;
    for (Index b = 0; b < used; ++b) block_table.push_back(std::int32_t(pool_pages - 1 - 2 * b));
    keys.assign(std::size_t(pool_pages * page_size * row), Scalar(std::numeric_limits<float>::quiet_NaN()));
    values = keys;
    const auto k = problem.keys(), v = problem.values();
    for (Index t = 0; t < problem.key_rows; ++t)
      for (Index h = 0; h < problem.kv_heads; ++h) {
        const Index slot = slot_of(block_table, page_size, t, h, problem.kv_heads, problem.head_dim, layout);
        std::copy_n(k.row(t, h), problem.head_dim, keys.data() + slot);
        std::copy_n(v.row(t, h), problem.head_dim, values.data() + slot);
      }
  }

  PagedTensorView<Scalar> key_view(const Problem<Scalar>& p) {
    return {keys.data(), pool_pages, page_size, block_table.data(), p.key_rows, p.kv_heads, p.head_dim, layout};
  }
  PagedTensorView<Scalar> value_view(const Problem<Scalar>& p) {
    return {values.data(), pool_pages, page_size, block_table.data(), p.key_rows, p.kv_heads, p.head_dim, layout};
  }
};

/// Runs `kind` on the contiguous and on the paged K and V of `problem` and checks that outputs and statistics
/// are equal, bit for bit.
template <class Scalar>
void check_paged_equals_contiguous(Kind kind, Index query_rows, Index key_rows, Index page_size, Index dim, int threads,
                                   PageLayout layout) {
  INFO(name(kind) << ", " << type_name<Scalar>() << ", " << query_rows << " query rows of " << key_rows
                  << " keys, page size " << page_size << (layout == PageLayout::head_major ? ", head-major" : "")
                  << ", head_dim " << dim << ", " << threads << " threads");
  Problem<Scalar> contiguous(query_rows, key_rows, 8, 2, dim, unsigned(key_rows + dim), 2.0);
  Problem<Scalar> paged = contiguous;
  PagedCopy<Scalar> pages(paged, page_size, layout);
  AttentionStats contiguous_stats, paged_stats;
  const Index past = key_rows - query_rows;
  attend(kind, contiguous, contiguous.keys(), contiguous.values(), contiguous.output(), past, threads,
         &contiguous_stats);
  const PagedTensorView<const Scalar> k = pages.key_view(paged), v = pages.value_view(paged);
  attend(kind, paged, k, v, paged.output(), past, threads, &paged_stats);
  CHECK(paged.out == contiguous.out);
  CHECK(same_stats(paged_stats, contiguous_stats));
  CHECK(paged_stats.non_finite_rows == 0);  // no NaN slot of the pool was read
}

}  // namespace

TEST_CASE("every kernel reads a paged cache as it reads a contiguous one, bit for bit", "[paged]") {
  const Kind kind = GENERATE(from_range(std::begin(every_kind), std::end(every_kind)));
  const Index page_size = GENERATE(1, 4, 16, 512);
  const PageLayout layout = GENERATE(PageLayout::token_major, PageLayout::head_major);
  // Decode of a long cache (split keys), a speculative step, a chunked prefill, a whole prefill of several
  // query blocks (GEMM blocks, packed K tiles); none a multiple of the page size or the tiles.
  const auto [query_rows, key_rows] = GENERATE(table<Index, Index>({{1, 1000}, {3, 90}, {37, 300}, {150, 150}}));
  check_paged_equals_contiguous<float>(kind, query_rows, key_rows, page_size, 72, 2, layout);
}

TEST_CASE("a paged bfloat16 cache gives the contiguous cache's bits, for any thread count", "[paged]") {
  const Kind kind = GENERATE(Kind::dense, Kind::probability);
  const int threads = GENERATE(1, 3);
  const auto [query_rows, key_rows] = GENERATE(table<Index, Index>({{1, 700}, {150, 150}}));
  check_paged_equals_contiguous<Eigen::bfloat16>(kind, query_rows, key_rows, 16, 64, threads, PageLayout::head_major);
}

TEST_CASE("a batch of sequences in one page pool gives each its contiguous call's bits", "[paged][batch]") {
  // Sequences of 40, 700 (split keys), 90 (3 new tokens) and 200 keys (70 new), one pool, interleaved pages.
  const Index q_heads = 8, kv_heads = 2, dim = 32, page_size = 16;
  const std::pair<Index, Index> shapes[] = {{1, 40}, {1, 700}, {3, 90}, {70, 200}};
  std::vector<Problem<float>> contiguous, paged;
  for (const auto& [query_rows, key_rows] : shapes) {
    contiguous.emplace_back(query_rows, key_rows, q_heads, kv_heads, dim, unsigned(key_rows), 2.0);
    paged.push_back(contiguous.back());
  }
  // One pool; sequence s takes the pages s, s + 4, s + 8, ... (interleaved with the others').
  const Index pool_pages = 4 * (700 / page_size + 1);
  AlignedVector<float> keys(std::size_t(pool_pages * page_size * kv_heads * dim),
                            std::numeric_limits<float>::quiet_NaN());
  AlignedVector<float> values = keys;
  std::vector<std::vector<std::int32_t>> tables(4);
  std::vector<SequenceViews<float, PagedTensorView<const float>>> batch;
  for (std::size_t s = 0; s < 4; ++s) {
    const Problem<float>& p = paged[s];
    for (Index b = 0; b < (p.key_rows + page_size - 1) / page_size; ++b) tables[s].push_back(std::int32_t(s + 4 * b));
    for (Index t = 0; t < p.key_rows; ++t)
      for (Index h = 0; h < kv_heads; ++h) {
        std::copy_n(p.keys().row(t, h), dim, keys.data() + slot_of(tables[s], page_size, t, h, kv_heads, dim));
        std::copy_n(p.values().row(t, h), dim, values.data() + slot_of(tables[s], page_size, t, h, kv_heads, dim));
      }
  }
  std::vector<AttentionStats> stats(4), alone_stats(4);
  for (std::size_t s = 0; s < 4; ++s) {
    const Problem<float>& p = paged[s];
    batch.push_back(
        {p.queries(),
         PagedTensorView<const float>(keys.data(), pool_pages, page_size, tables[s].data(), p.key_rows, kv_heads, dim),
         PagedTensorView<const float>(values.data(), pool_pages, page_size, tables[s].data(), p.key_rows, kv_heads,
                                      dim),
         paged[s].output(), p.key_rows - p.query_rows, nullptr, &stats[s]});
  }
  const auto table = LayerThresholds::uniform(8, ThresholdSpace::probability, std::vector<double>(q_heads, 0.02));
  TopThetaOptions options;
  options.compensation.v_mean = true;
  top_theta_attention(batch, table, options, OpenMPExecutor{2});
  for (std::size_t s = 0; s < 4; ++s) {
    INFO("sequence " << s);
    Problem<float>& p = contiguous[s];
    TopThetaOptions alone = options;
    alone.attention.past = p.key_rows - p.query_rows;
    top_theta_attention(p.queries(), p.keys(), p.values(), p.output(), table, alone, &alone_stats[s],
                        OpenMPExecutor{1});
    CHECK(paged[s].out == p.out);
    CHECK(same_stats(stats[s], alone_stats[s]));
  }
}

TEST_CASE(
    "a paged view rejects a block table entry outside the pool, a page size that is not a power of two, and "
    "an output inside the pool",
    "[paged][bad_input]") {
  std::vector<float> pool(std::size_t(4 * 16 * 2 * 8), 0.0f);
  const std::vector<std::int32_t> table{3, 0, 4};
  REQUIRE_INVALID(PagedTensorView<float>(pool.data(), 4, 16, table.data(), 40, 2, 8), "block_table[2]",
                  "a page of the pool, in [0, 4)");
  const std::vector<std::int32_t> negative{-1};
  REQUIRE_INVALID(PagedTensorView<float>(pool.data(), 4, 16, negative.data(), 3, 2, 8), "block_table[0]",
                  "a page of the pool");
  REQUIRE_INVALID(PagedTensorView<float>(pool.data(), 4, 12, table.data(), 20, 2, 8), "page_size", "a power of two");
  // Only the entries the tokens need are read: 32 tokens use table[0] and table[1].
  const PagedTensorView<const float> k(pool.data(), 4, 16, table.data(), 32, 2, 8);
  std::vector<float> q(std::size_t(4 * 8), 0.0f);
  const TensorView<const float> queries(q.data(), 1, 4, 8);
  REQUIRE_INVALID(dense_attention(queries, k, k, TensorView<float>(pool.data() + 8, 1, 4, 8)), "out",
                  "memory apart from k");
  std::vector<float> out(q.size());
  AttentionOptions decode;
  decode.past = 31;
  REQUIRE_NOTHROW(dense_attention(queries, k, k, TensorView<float>(out.data(), 1, 4, 8), decode));
}

TEST_CASE("a paged KV cache holds what a contiguous one holds, and decode on it gives the same bits",
          "[paged][kv_cache]") {
  // A prompt of 37 tokens, then 30 decode steps of one token, into pages of 8 from a pool shared with a
  // sequence that comes and goes (its pages freed and reused).
  const Index kv_heads = 2, q_heads = 8, dim = 24, page_size = 8;
  PagePool<float> pool(16, page_size, kv_heads, dim);
  PagedKvCache<float> paged(pool), other(pool);
  KvCache<float> contiguous(kv_heads, dim, 100);
  Problem<float> tokens(0, 67, q_heads, kv_heads, dim, 5, 2.0);
  const auto table = LayerThresholds::uniform(8, ThresholdSpace::probability, std::vector<double>(q_heads, 0.02));
  TopThetaOptions options;
  options.compensation.v_mean = true;
  const auto append = [&](Index first, Index count) {
    const TensorView<const float> k(tokens.k.data() + first * kv_heads * dim, count, kv_heads, dim);
    const TensorView<const float> v(tokens.v.data() + first * kv_heads * dim, count, kv_heads, dim);
    paged.append(k, v);
    contiguous.append(k, v);
  };
  append(0, 37);
  REQUIRE(paged.block_table().size() == 5);
  for (Index step = 0; step < 30; ++step) {
    if (step == 10)
      other.append(TensorView<const float>(tokens.k.data(), 20, kv_heads, dim),
                   TensorView<const float>(tokens.v.data(), 20, kv_heads, dim));
    if (step == 20) other.clear();  // its 3 pages go back to the pool, and the next pages come from them
    append(37 + step, 1);
    const Index length = contiguous.length();
    INFO("step " << step << ", length " << length);
    REQUIRE(paged.length() == length);
    for (Index t = 0; t < length; ++t)
      for (Index h = 0; h < kv_heads; ++h)
        for (Index d = 0; d < dim; ++d) {
          REQUIRE(paged.keys().row(t, h)[d] == contiguous.keys().row(t, h)[d]);
          REQUIRE(paged.values().row(t, h)[d] == contiguous.values().row(t, h)[d]);
        }
    for (Index d = 0; d < kv_heads * dim; ++d)
      REQUIRE(paged.value_sum_before(length - 1)[d] == contiguous.value_sum_before(length - 1)[d]);
    Problem<float> query(1, length, q_heads, kv_heads, dim, unsigned(100 + step), 2.0);
    std::vector<float> from_pages(query.out.size()), from_buffer(query.out.size());
    options.attention.past = length - 1;
    options.value_prefix_sum = paged.value_sum_before(length - 1);
    top_theta_attention(query.queries(), paged.keys(), paged.values(),
                        TensorView<float>(from_pages.data(), 1, q_heads, dim), table, options);
    options.value_prefix_sum = contiguous.value_sum_before(length - 1);
    top_theta_attention(query.queries(), contiguous.keys(), contiguous.values(),
                        TensorView<float>(from_buffer.data(), 1, q_heads, dim), table, options);
    REQUIRE(from_pages == from_buffer);
  }
  CHECK(pool.free_pages() == 16 - 9);  // 67 tokens in pages of 8
  paged.clear();
  CHECK(pool.free_pages() == 16);
}

TEST_CASE("a paged KV cache rejects tokens its pool cannot hold, and a pool rejects pages it did not lend",
          "[paged][kv_cache][bad_input]") {
  const Index kv_heads = 2, dim = 4;
  PagePool<float> pool(3, 4, kv_heads, dim);
  PagedKvCache<float> cache(pool);
  std::vector<float> rows(std::size_t(13 * kv_heads * dim), 1.0f);
  const auto tokens = [&](Index count) { return TensorView<const float>(rows.data(), count, kv_heads, dim); };
  cache.append(tokens(5), tokens(5));  // two pages, 3 tokens of room left in the second
  REQUIRE_INVALID(cache.append(tokens(8), tokens(8)), "keys.tokens", "at most 7");
  CHECK(cache.length() == 5);  // unchanged, and so is the pool
  CHECK(pool.free_pages() == 1);
  rows[std::size_t(2 * kv_heads * dim + dim + 1)] = std::numeric_limits<float>::quiet_NaN();  // token 2, head 1
  REQUIRE_INVALID(cache.append(tokens(3), tokens(3)), "keys (token 7, KV head 1, element 1)", "finite values");
  CHECK(cache.length() == 5);
  REQUIRE_INVALID(pool.release(2), "page", "a page of the pool in use");
  REQUIRE_INVALID(pool.release(7), "page", "in [0, 3)");
  REQUIRE_INVALID(PagePool<float>(4, 6, kv_heads, dim), "page_size", "a power of two");
  pool.allocate();
  REQUIRE_INVALID(pool.allocate(), "pool", "a free page");
}

TEST_CASE("an infinite V value takes the careful path on pages as on a contiguous copy, bit for bit",
          "[paged][non_finite]") {
  const Kind kind = GENERATE(Kind::dense, Kind::probability, Kind::raw);
  const PageLayout layout = GENERATE(PageLayout::token_major, PageLayout::head_major);
  const auto [query_rows, key_rows] = GENERATE(table<Index, Index>({{1, 700}, {150, 150}}));
  INFO(name(kind) << ", " << query_rows << " query rows of " << key_rows << " keys");
  Problem<float> contiguous(query_rows, key_rows, 8, 2, 32, 11, 2.0);
  std::fill_n(contiguous.v.data() + 40 * 2 * 32, 32, std::numeric_limits<float>::infinity());  // V row 40, head 0
  Problem<float> paged = contiguous;
  PagedCopy<float> pages(paged, 16, layout);
  attend(kind, contiguous, contiguous.keys(), contiguous.values(), contiguous.output(), key_rows - query_rows, 2,
         nullptr);
  const PagedTensorView<const float> k = pages.key_view(paged), v = pages.value_view(paged);
  attend(kind, paged, k, v, paged.output(), key_rows - query_rows, 2, nullptr);
  // Bit patterns: rows that weigh the infinite row are not finite in both.
  CHECK(std::memcmp(paged.out.data(), contiguous.out.data(), paged.out.size() * sizeof(float)) == 0);
  CHECK(std::any_of(paged.out.begin(), paged.out.end(), [](float x) { return std::isfinite(x); }));
}

TEST_CASE("a bfloat16 cache in token-major pages, and a view of no tokens", "[paged]") {
  check_paged_equals_contiguous<Eigen::bfloat16>(Kind::probability, 1, 700, 16, 64, 2, PageLayout::token_major);
  check_paged_equals_contiguous<Eigen::bfloat16>(Kind::top_k, 37, 300, 4, 64, 2, PageLayout::token_major);
  const PagedTensorView<const float> empty(nullptr, 0, 16, nullptr, 0, 2, 8);
  CHECK(empty.table_entries() == 0);
  std::vector<float> q(std::size_t(4 * 8)), out(q.size());
  AttentionOptions non_causal;
  non_causal.causal = false;
  REQUIRE_INVALID(dense_attention(TensorView<const float>(q.data(), 1, 4, 8), empty, empty,
                                  TensorView<float>(out.data(), 1, 4, 8), non_causal),
                  "k.tokens", "at least 1 key");
}

TEST_CASE("a paged KV cache moved away leaves an empty cache that works, and returns its pages when assigned to",
          "[paged][kv_cache]") {
  const Index kv_heads = 2, dim = 4;
  PagePool<float> pool(8, 4, kv_heads, dim);
  std::vector<float> rows(std::size_t(10 * kv_heads * dim));
  for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = float(i % 7);
  const auto tokens = [&](Index count) { return TensorView<const float>(rows.data(), count, kv_heads, dim); };
  PagedKvCache<float> first(pool);
  first.append(tokens(6), tokens(6));  // 2 pages
  PagedKvCache<float> second(std::move(first));
  CHECK(second.length() == 6);
  CHECK(first.length() == 0);
  CHECK(first.block_table().empty());
  first.append(tokens(3), tokens(3));  // the moved-from cache works: a page of its own, its own V sum
  CHECK(first.value_sum_before(3)[0] == double(rows[0] + rows[8] + rows[16]));
  CHECK(pool.free_pages() == 8 - 3);
  second = std::move(first);  // second's 2 pages go back; it takes first's page
  CHECK(second.length() == 3);
  CHECK(pool.free_pages() == 8 - 1);
  // Views of K and V given as braced lists are contiguous views.
  std::vector<float> q(std::size_t(4 * dim)), out(q.size());
  AttentionOptions decode;
  decode.past = 9;
  REQUIRE_NOTHROW(dense_attention(TensorView<const float>(q.data(), 1, 4, dim), {rows.data(), 10, kv_heads, dim},
                                  {rows.data(), 10, kv_heads, dim}, TensorView<float>(out.data(), 1, 4, dim), decode));
}
