// Products of a few accumulator rows with stored K or V rows that widen the stored values in registers, so a
// bfloat16 or half cache is read at its own size: the streaming (decode) path of the tiled kernel.
#pragma once

#include <toptheta/detail/convert.hpp>
#include <toptheta/q8_block.hpp>
#include <toptheta/scalar_traits.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace toptheta::detail {

template <class Acc>
using Packet = typename Eigen::internal::packet_traits<Acc>::type;

template <class Acc>
constexpr Index packet_size = Eigen::internal::unpacket_traits<Packet<Acc>>::size;

/// `Packet<float>` of the `packet_size<float>` signed bytes at `bytes`, converted exactly.
inline Packet<float> widened_bytes(const std::int8_t* bytes) {
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (packet_size<float> == 16)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))));
#elif defined(EIGEN_VECTORIZE_AVX2)
  if constexpr (packet_size<float> == 8)
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes))));
#endif
  alignas(64) float widened[packet_size<float>];
  for (Index t = 0; t < packet_size<float>; ++t) widened[t] = float(bytes[t]);
  return Eigen::internal::pload<Packet<float>>(widened);
}

/// Whether `Stored` is int8 blocks that hold whole packets of `Acc` = float: read by `widened_bytes` times the
/// block's scale, which is what `dequantize_q8` computes, bit for bit.
template <class Acc, class Stored>
constexpr bool widens_blocks =
    std::is_same_v<Acc, float>&& is_q8_block_v<Stored>&& values_per_element_v<Stored> % packet_size<float> == 0;

/// `Packet<Acc>` of values `[d, d + packet_size)` of the row at `row` (`d` a multiple of the packet size).
/// bfloat16 is the upper half of a float, so widening it is a zero-extension and a shift; half uses F16C; int8
/// blocks are sign-extended, converted and multiplied by the block's scale. Each ISA case is selected by the
/// packet Eigen vectorises with; other combinations convert through a small buffer.
template <class Acc, class Stored>
Packet<Acc> load_widened(const Stored* row, Index d) {
  namespace ei = Eigen::internal;
  using P = Packet<Acc>;
  [[maybe_unused]] const Stored* source = row + d;  // scalar types
  if constexpr (std::is_same_v<Stored, Acc>) {
    return ei::ploadu<P>(source);
  } else if constexpr (widens_blocks<Acc, Stored>) {
    const Stored& block = row[d / values_per_element_v<Stored>];
    return ei::pmul(widened_bytes(block.values + d % values_per_element_v<Stored>), ei::pset1<P>(scale_of(block)));
  }
#if defined(EIGEN_VECTORIZE_AVX512)
  else if constexpr (std::is_same_v<Acc, float> && packet_size<Acc> == 16 && std::is_same_v<Stored, Eigen::bfloat16>) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  } else if constexpr (std::is_same_v<Acc, float> && packet_size<Acc> == 16 && std::is_same_v<Stored, Eigen::half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(source)));
  }
#elif defined(EIGEN_VECTORIZE_AVX2)
  else if constexpr (std::is_same_v<Acc, float> && packet_size<Acc> == 8 && std::is_same_v<Stored, Eigen::bfloat16>) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
#elif defined(EIGEN_VECTORIZE_SSE2)
  else if constexpr (std::is_same_v<Acc, float> && packet_size<Acc> == 4 && std::is_same_v<Stored, Eigen::bfloat16>) {
    const __m128i bits = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(source));
    return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), bits));
  }
#endif
#if defined(EIGEN_VECTORIZE_AVX) && defined(__F16C__) && !defined(EIGEN_VECTORIZE_AVX512)
  else if constexpr (std::is_same_v<Acc, float> && packet_size<Acc> == 8 && std::is_same_v<Stored, Eigen::half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(source)));
  }
#endif
  else {
    alignas(64) Acc widened[packet_size<Acc>];
    for (Index t = 0; t < packet_size<Acc>; ++t) widened[t] = value_at<Acc>(row, d + t);
    return ei::pload<P>(widened);
  }
}

/// Packets of `Acc` a block of `Stored` fills exactly (2 for q8_0 blocks and float packets of 16), or 1: the
/// products below widen this many packets at a time, so that a block's scale is read once.
template <class Acc, class Stored>
constexpr int packets_per_block = widens_blocks<Acc, Stored> ? int(values_per_element_v<Stored> / packet_size<Acc>) : 1;

/// `out[p]` = packet `p` of values `[d, d + Packets * packet_size)` of the row at `row`, as `load_widened` gives
/// them. For blocks that hold whole packets and `Packets` a multiple or a divisor of `packets_per_block`, the
/// values must be whole blocks or lie in one block (`d` a multiple of `Packets * packet_size`): each block's
/// scale is converted once for its packets.
template <class Acc, int Packets, class Stored>
void widen_packets(const Stored* row, Index d, Packet<Acc> (&out)[Packets]) {
  constexpr int per_block = packets_per_block<Acc, Stored>;
  if constexpr (per_block > 1 && (Packets % per_block == 0 || per_block % Packets == 0)) {
    namespace ei = Eigen::internal;
    using P = Packet<Acc>;
    constexpr Index size = packet_size<Acc>, values_per_block = values_per_element_v<Stored>;
    constexpr int in_block = std::min(Packets, per_block);
    for (int b = 0; b < Packets / in_block; ++b) {
      const Stored& block = row[d / values_per_block + b];
      const P scale = ei::pset1<P>(scale_of(block));
      for (int p = 0; p < in_block; ++p)
        out[b * in_block + p] = ei::pmul(widened_bytes(block.values + d % values_per_block + p * size), scale);
    }
  } else {
    for (int p = 0; p < Packets; ++p) out[p] = load_widened<Acc>(row, d + p * packet_size<Acc>);
  }
}

/// Asks for the cache line at `address` to be brought into L2 (not L1: rows asked for a sweep step ahead
/// would push the current ones out of it), to be read or (`ToWrite`) written.
template <bool ToWrite = false>
void ask_for_line(const void* address) {
#if defined(__GNUC__)
  __builtin_prefetch(address, ToWrite ? 1 : 0, 2);
#else
  (void)address;
#endif
}

/// Asks for the cache lines of the `bytes` bytes from `address` on.
template <bool ToWrite = false>
void ask_for_bytes(const void* address, Index bytes) {
  for (Index offset = 0; offset < bytes; offset += 64)
    ask_for_line<ToWrite>(static_cast<const char*>(address) + offset);
}

/// Asks for `Lines` cache lines from `address` on.
template <int Lines>
void ask_for_lines(const void* address) {
  for (int line = 0; line < Lines; ++line) ask_for_line(static_cast<const char*>(address) + 64 * line);
}

/// Asks for the `bytes` bytes of each of `count` rows `stride` values apart.
template <class Stored>
void prefetch_rows(const Stored* rows, Index stride, Index count, Index bytes) {
  for (Index j = 0; j < count; ++j) ask_for_bytes(rows + j * stride, bytes);
}

/// The rows a stream will read next, at the stride of the rows it reads now: the products below ask for next
/// row j while they work on current row j, so that the loads overlap the arithmetic instead of stalling in
/// one burst. `count` rows exist (none when 0).
template <class Stored>
struct NextRows {
  const Stored* rows = nullptr;
  Index count = 0;
  /// The same rows from row `first` of the current stream on.
  NextRows from(Index first, Index stride) const {
    return count > first ? NextRows{rows + first * stride, count - first} : NextRows{};
  }
};

/// `f(std::integral_constant<int, n>)` for the runtime `n` in [1, Max].
template <int Max, class F>
void with_constant(Index n, F&& f) {
  if constexpr (Max >= 1) {
    if (n == Max) return f(std::integral_constant<int, Max>{});
    with_constant<Max - 1>(n, std::forward<F>(f));
  }
}

/// Rows of a score or weight block: `Rows` query rows at a common stride.
template <class Acc>
struct RowBlock {
  Acc* data;
  Index stride;
  Acc* row(Index r) const { return data + r * stride; }
};

/// At most this many query rows share one pass over a key or value row, so their accumulators stay in
/// registers.
constexpr int rows_per_pass = 4;

/// Key rows dotted at once by `dot_rows_pass`: 4 (16 accumulators with `rows_per_pass` query rows) where
/// they fit beside the key packets: with AVX-512's 32 vector registers, or when the keys need no widening
/// (the multiply-adds read their packets from memory); else 2, so that the 8 sums, the widened key packets
/// and their scales fit AVX2's 16 registers.
template <class Acc, class Stored>
constexpr int keys_per_pass = packet_size<Acc> * sizeof(Acc) >= 64 || std::is_same_v<Stored, Acc> ? 4 : 2;

/// `scores(r, t) = Σ lanes of sums[t][r]` for `Rows` rows and `Keys` keys. With AVX-512 floats the 16 sums
/// are reduced together by a transposing tree (15 adds instead of 16 separate horizontal sums).
template <int Rows, int Keys, class Acc, int PassKeys>
void store_dots(const Packet<Acc> (&sums)[PassKeys][rows_per_pass], RowBlock<Acc> scores) {
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<Acc, float> && packet_size<Acc> == 16 && PassKeys == 4) {
    // Each level adds lanes of pairs of vectors picked by two-source permutes (GCC 12 warns about the
    // undefined pass-through operands of the shuffles and unpacks): sum a = 4 t + r ends in lane 4 r + t.
    __m512 level[16];
    for (int a = 0; a < 16; ++a) level[a] = (a / 4 < Keys && a % 4 < Rows) ? sums[a / 4][a % 4] : _mm512_setzero_ps();
    const auto pair_sums = [&](int pairs, __m512i first, __m512i second) {
      for (int a = 0; a < pairs; ++a)
        level[a] = _mm512_add_ps(_mm512_permutex2var_ps(level[2 * a], first, level[2 * a + 1]),
                                 _mm512_permutex2var_ps(level[2 * a], second, level[2 * a + 1]));
    };
    // 256-bit halves; then 128-bit quarters (quarter i of level[m] holds sum 4 m + i); then float pairs; floats.
    pair_sums(8, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
              _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
    pair_sums(4, _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
              _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31));
    pair_sums(2, _mm512_setr_epi32(0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29),
              _mm512_setr_epi32(2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31));
    pair_sums(1, _mm512_setr_epi32(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
              _mm512_setr_epi32(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31));
    alignas(64) float dots[16];
    _mm512_store_ps(dots, level[0]);
    for (int r = 0; r < Rows; ++r) std::memcpy(scores.row(r), dots + 4 * r, Keys * sizeof(float));
    return;
  }
#endif
  for (int r = 0; r < Rows; ++r)
    for (int t = 0; t < Keys; ++t) scores.row(r)[t] = Eigen::internal::predux(sums[t][r]);
}

/// `scores(r, t) = <queries_r, keys_t>` for `Rows` query rows and `Keys` key rows: each key row is widened
/// once for all rows, and the Rows x Keys sums stay in registers. Asks for `next_count` rows of `next_keys`
/// meanwhile.
template <int Rows, int Keys, class Acc, class Stored>
void dot_rows_pass(RowBlock<const Acc> queries, const Stored* keys, Index key_stride, Index dim, RowBlock<Acc> scores,
                   const Stored* next_keys, Index next_count) {
  namespace ei = Eigen::internal;
  using P = Packet<Acc>;
  constexpr Index size = packet_size<Acc>;
  const Index row_bytes = stored_bytes<Stored>(dim);
  const Index vector_dim = dim - dim % size;
  P sums[keys_per_pass<Acc, Stored>][rows_per_pass];
  for (int t = 0; t < Keys; ++t)
    for (int r = 0; r < Rows; ++r) sums[t][r] = ei::pset1<P>(Acc(0));
  // Outside the loop below, whose sums GCC spills when it holds a branch.
  for (Index t = 0; t < next_count; ++t)
    for (Index b = 0; b < row_bytes; b += 64)
      ask_for_line(reinterpret_cast<const char*>(next_keys + t * key_stride) + b);
  // Packets a step widens per key row: a block's (its scale read once), or one; blocks hold whole packets only
  // when head_dim is a multiple of the block, so no packet is left after the steps.
  constexpr int step = packets_per_block<Acc, Stored>;
  constexpr Index values_per_block = values_per_element_v<Stored>;
  for (Index d = 0; d < vector_dim; d += step * size) {
    // A block's scale is converted once per key row, and its packets widened one at a time: only Keys of them
    // are live beside the sums.
    [[maybe_unused]] P scale[Keys];
    if constexpr (step > 1)
      for (int t = 0; t < Keys; ++t) scale[t] = ei::pset1<P>(scale_of(keys[t * key_stride + d / values_per_block]));
    for (int s = 0; s < step; ++s) {
      P key[Keys];
      for (int t = 0; t < Keys; ++t) {
        if constexpr (step > 1)
          key[t] = ei::pmul(widened_bytes(keys[t * key_stride + d / values_per_block].values + s * size), scale[t]);
        else
          key[t] = load_widened<Acc>(keys + t * key_stride, d);
      }
      for (int r = 0; r < Rows; ++r) {
        const P query = ei::ploadu<P>(queries.row(r) + d + s * size);
        for (int t = 0; t < Keys; ++t) sums[t][r] = ei::pmadd(query, key[t], sums[t][r]);
      }
    }
  }
  store_dots<Rows, Keys>(sums, scores);
  for (int r = 0; r < Rows; ++r)
    for (int t = 0; t < Keys; ++t)
      for (Index d = vector_dim; d < dim; ++d)
        scores.row(r)[t] += queries.row(r)[d] * value_at<Acc>(keys + t * key_stride, d);
}

/// `output_r += Σ_j weights(r, j) values_j` for `Rows` rows over `Packets` packets of the head dimension
/// starting at `offset`: the Rows x Packets outputs stay in registers while the value rows stream. Asks for
/// the same values of the first `next.count` next rows meanwhile.
template <int Rows, int Packets, class Acc, class Stored>
void add_weighted_rows_pass(RowBlock<const Acc> weights, const Stored* values, Index value_stride, Index count,
                            Index offset, RowBlock<Acc> output, NextRows<Stored> next) {
  namespace ei = Eigen::internal;
  using P = Packet<Acc>;
  constexpr Index size = packet_size<Acc>;
  P sum[Rows][Packets];
  for (int r = 0; r < Rows; ++r)
    for (int p = 0; p < Packets; ++p) sum[r][p] = ei::ploadu<P>(output.row(r) + offset + p * size);
  // The pass's values start in the element `elements_of(offset)` of a row; blocks need not start on a line.
  constexpr int pass_lines = int((stored_bytes<Stored>(Packets * size) + 63) / 64) + (is_block_type_v<Stored> ? 1 : 0);
  const Index pass_start = elements_of<Stored>(offset);
  for (Index j = 0; j < count; ++j) {
    const Stored* value = values + j * value_stride;
    // Unconditional (the current row when no next one is left): a branch here makes GCC spill the sums.
    ask_for_lines<pass_lines>((j < next.count ? next.rows + j * value_stride : value) + pass_start);
    P widened[Packets];
    widen_packets<Acc>(value, offset, widened);
    for (int r = 0; r < Rows; ++r) {
      const P weight = ei::pset1<P>(weights.row(r)[j]);
      for (int p = 0; p < Packets; ++p) sum[r][p] = ei::pmadd(weight, widened[p], sum[r][p]);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int p = 0; p < Packets; ++p) ei::pstoreu(output.row(r) + offset + p * size, sum[r][p]);
}

/// `scores(r, j) = <queries_r, keys_j>` for `rows` query rows and `count` key rows of `dim` stored values;
/// asks for the `next` rows meanwhile.
template <class Acc, class Stored>
void dot_rows(RowBlock<const Acc> queries, Index rows, const Stored* keys, Index key_stride, Index count, Index dim,
              RowBlock<Acc> scores, NextRows<Stored> next = {}) {
  for (Index first = 0; first < rows; first += rows_per_pass)
    with_constant<rows_per_pass>(std::min<Index>(rows_per_pass, rows - first), [&](auto pass_rows) {
      const RowBlock<const Acc> pass_queries{queries.row(first), queries.stride};
      constexpr int most_keys = keys_per_pass<Acc, Stored>;
      for (Index j = 0; j < count; j += most_keys)
        with_constant<most_keys>(std::min<Index>(most_keys, count - j), [&](auto pass_keys) {
          constexpr int Keys = decltype(pass_keys)::value;
          // The next rows are asked for once, by the first pass of query rows.
          const NextRows<Stored> ahead = first == 0 ? next.from(j, key_stride) : NextRows<Stored>{};
          const Index next_count = j + Keys < count ? std::min<Index>(Keys, ahead.count) : ahead.count;
          dot_rows_pass<decltype(pass_rows)::value, Keys>(pass_queries, keys + j * key_stride, key_stride, dim,
                                                          RowBlock<Acc>{scores.row(first) + j, scores.stride},
                                                          ahead.rows, next_count);
        });
    });
}

/// Packets of the head dimension one pass of `add_weighted_rows` keeps for each of `Rows` output rows: 16
/// accumulators in all, for whole blocks of a block type; for blocks without AVX-512, 8 in all (parts of a
/// block), so that they, the widened packets and a scale fit AVX2's 16 registers.
template <class Acc, class Stored, int Rows>
constexpr int value_packets_per_pass = packets_per_block<Acc, Stored> == 1 ? 16 / Rows
                                       : packet_size<Acc> * sizeof(Acc) >= 64
                                           ? std::max(packets_per_block<Acc, Stored>,
                                                      16 / Rows / packets_per_block<Acc, Stored> *
                                                          packets_per_block<Acc, Stored>)
                                           : std::min(packets_per_block<Acc, Stored>, 8 / Rows);

/// `output_r += Σ_j weights(r, j) values_j` for `rows` rows and `count` value rows of `dim` stored values;
/// asks for the `next` rows meanwhile. Value rows are taken in groups small enough to stay in L1 while each
/// group of output rows and packets passes; a pass covers whole blocks of a block type.
template <class Acc, class Stored>
void add_weighted_rows(RowBlock<const Acc> weights, Index rows, const Stored* values, Index value_stride, Index count,
                       Index dim, RowBlock<Acc> output, NextRows<Stored> next = {}) {
  constexpr Index size = packet_size<Acc>, keys_per_group = 32;
  const Index packets = dim / size;
  for (Index first_key = 0; first_key < count; first_key += keys_per_group) {
    const Index keys = std::min(keys_per_group, count - first_key);
    const Stored* group = values + first_key * value_stride;
    for (Index first = 0; first < rows; first += rows_per_pass)
      with_constant<rows_per_pass>(std::min<Index>(rows_per_pass, rows - first), [&](auto pass_rows) {
        constexpr int Rows = decltype(pass_rows)::value, Packets = value_packets_per_pass<Acc, Stored, Rows>;
        const RowBlock<const Acc> pass_weights{weights.row(first) + first_key, weights.stride};
        const RowBlock<Acc> pass_output{output.row(first), output.stride};
        // The next rows are asked for once, by the first pass of output rows (in the packets it reads).
        const NextRows<Stored> ahead = first == 0 ? next.from(first_key, value_stride) : NextRows<Stored>{};
        const NextRows<Stored> group_ahead{ahead.rows, std::min(keys, ahead.count)};
        Index packet = 0;
        for (; packet + Packets <= packets; packet += Packets)
          add_weighted_rows_pass<Rows, Packets>(pass_weights, group, value_stride, keys, packet * size, pass_output,
                                                group_ahead);
        for (; packet < packets; ++packet)
          add_weighted_rows_pass<Rows, 1>(pass_weights, group, value_stride, keys, packet * size, pass_output,
                                          group_ahead);
        for (Index r = 0; r < Rows; ++r)
          for (Index j = 0; j < keys; ++j)
            for (Index t = packets * size; t < dim; ++t)
              pass_output.row(r)[t] += pass_weights.row(r)[j] * value_at<Acc>(group + j * value_stride, t);
      });
  }
}

/// `output += Σ_t weights_t row_at(columns_t)` over `Packets` packets of the head dimension starting at
/// `offset`: the output's packets stay in registers while the picked value rows stream.
template <int Packets, class Acc, class RowAt>
void add_gathered_rows_pass(const Acc* weights, const std::int32_t* columns, Index count, const RowAt& row_at,
                            Index offset, Acc* output) {
  namespace ei = Eigen::internal;
  using P = Packet<Acc>;
  constexpr Index size = packet_size<Acc>;
  // The sums start at 0 and the output is added once at the end: loaded into the sums first, GCC copies
  // the output through the stack in halves and reloads it whole, a store-forwarding stall per call.
  P sum[Packets];
  for (int p = 0; p < Packets; ++p) sum[p] = ei::pset1<P>(Acc(0));
  for (Index t = 0; t < count; ++t) {
    const auto* value = row_at(columns[t]);
    const P weight = ei::pset1<P>(weights[t]);
    for (int p = 0; p < Packets; ++p) sum[p] = ei::pmadd(weight, load_widened<Acc>(value, offset + p * size), sum[p]);
  }
  for (int p = 0; p < Packets; ++p)
    ei::pstoreu(output + offset + p * size, ei::padd(ei::ploadu<P>(output + offset + p * size), sum[p]));
}

/// `output += Σ_t weights_t row_at(columns_t)` for `count` value rows of `dim` stored values, each found by
/// `row_at(column)` (a pointer to its stored values): one output row's sparse P V, its kept V rows gathered as
/// they stream.
template <class Acc, class RowAt>
void add_gathered_rows(const Acc* weights, const std::int32_t* columns, Index count, const RowAt& row_at, Index dim,
                       Acc* output) {
  constexpr Index size = packet_size<Acc>;
  const Index packets = dim / size;
  Index packet = 0;
  for (; packet + 8 <= packets; packet += 8)
    add_gathered_rows_pass<8>(weights, columns, count, row_at, packet * size, output);
  if (packet + 4 <= packets) {
    add_gathered_rows_pass<4>(weights, columns, count, row_at, packet * size, output);
    packet += 4;
  }
  if (packet + 2 <= packets) {
    add_gathered_rows_pass<2>(weights, columns, count, row_at, packet * size, output);
    packet += 2;
  }
  for (; packet < packets; ++packet) add_gathered_rows_pass<1>(weights, columns, count, row_at, packet * size, output);
  for (Index t = 0; t < count; ++t) {
    const auto* value = row_at(columns[t]);
    for (Index d = packets * size; d < dim; ++d) output[d] += weights[t] * value_at<Acc>(value, d);
  }
}

}  // namespace toptheta::detail
