// One pass over a row of scores that finds the elements above a threshold and the row's max together: the
// survivor search of one-pass Top-θ, where survivors are rare.
#pragma once

#include <toptheta/scalar_traits.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace toptheta::detail {

/// Extra entries `scan_above` may write past its last survivor: the buffers need `count + scan_slack`.
constexpr Index scan_slack = 16;

/// Writes the columns `first + c` with `scores[c] > threshold` (increasing) to `columns` and their scores to
/// `kept`, sets `max = max_c scores[c]` (count >= 1; NaN when a score is NaN), and returns the number of
/// survivors. With AVX-512 floats
/// each 16 scores are tested at once and the survivors compressed into place; elsewhere a branch-free scalar
/// loop.
template <class Acc>
Index scan_above(const Acc* scores, Index count, Acc threshold, std::int32_t* columns, Acc* kept, Acc& max,
                 Index first = 0) {
  Index survivors = 0, c = 0;
  Acc row_max = -std::numeric_limits<Acc>::infinity();
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<Acc, float>) {
    const __m512 limit = _mm512_set1_ps(threshold);
    __m512 maxes = _mm512_set1_ps(row_max);
    __mmask16 nan = 0;
    __m512i positions = _mm512_add_epi32(_mm512_set1_epi32(std::int32_t(first)),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    // Survivors are compressed in registers and stored as whole vectors (`scan_slack`), without a branch on
    // whether there are any: a compressing store to memory is slow on some cores, and the branch is
    // unpredictable at the densities Top-θ keeps.
    const auto test = [&](__mmask16 lanes, __m512 a) {
      maxes = _mm512_mask_max_ps(maxes, lanes, maxes, a);
      nan |= _mm512_mask_cmp_ps_mask(lanes, a, a, _CMP_UNORD_Q);
      const __mmask16 above = _mm512_mask_cmp_ps_mask(lanes, a, limit, _CMP_GT_OQ);
      _mm512_storeu_ps(kept + survivors, _mm512_maskz_compress_ps(above, a));
      _mm512_storeu_si512(columns + survivors, _mm512_maskz_compress_epi32(above, positions));
      survivors += __builtin_popcount(above);
      positions = _mm512_add_epi32(positions, _mm512_set1_epi32(16));
    };
    for (; c + 16 <= count; c += 16) test(__mmask16(0xffff), _mm512_loadu_ps(scores + c));
    if (c < count) {
      const __mmask16 tail = __mmask16((1u << (count - c)) - 1);
      test(tail, _mm512_maskz_loadu_ps(tail, scores + c));
    }
    max = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(maxes);
    return survivors;
  }
#endif
  bool nan = false;
  for (; c < count; ++c) {
    const Acc a = scores[c];
    row_max = std::max(row_max, a);
    nan = nan || a != a;
    columns[survivors] = std::int32_t(first + c);
    kept[survivors] = a;
    survivors += a > threshold;
  }
  max = nan ? std::numeric_limits<Acc>::quiet_NaN() : row_max;
  return survivors;
}

/// Copies the entries `t < count` with `scores[t] > floor`, in order, to `to_positions` and `to_scores` (which
/// may be the sources themselves: writes never pass reads; the destinations have room for `count`) and returns
/// how many. With AVX-512 floats 16
/// entries are tested at once and compressed into place; elsewhere a branch-free scalar loop.
template <class Acc>
Index copy_above(const std::int32_t* positions, const Acc* scores, Index count, Acc floor, std::int32_t* to_positions,
                 Acc* to_scores) {
  Index kept = 0, t = 0;
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<Acc, float>) {
    const __m512 limit = _mm512_set1_ps(floor);
    for (; t + 16 <= count; t += 16) {
      const __m512 a = _mm512_loadu_ps(scores + t);
      const __m512i j = _mm512_loadu_si512(positions + t);
      const __mmask16 above = _mm512_cmp_ps_mask(a, limit, _CMP_GT_OQ);
      // Compressed in registers and stored whole: kept <= t, so the store ends by t + 16 <= count (and in
      // place, overwrites only entries already loaded).
      _mm512_storeu_ps(to_scores + kept, _mm512_maskz_compress_ps(above, a));
      _mm512_storeu_si512(to_positions + kept, _mm512_maskz_compress_epi32(above, j));
      kept += __builtin_popcount(above);
    }
  }
#endif
  for (; t < count; ++t) {  // branch-free: every entry is written, the kept ones advance
    to_positions[kept] = positions[t];
    to_scores[kept] = scores[t];
    kept += scores[t] > floor;
  }
  return kept;
}

/// `max_c scores[c]` (count >= 1), NaN when a score is NaN: with AVX-512 (AVX) floats 64 (32) scores per step in
/// four independent maxima, so that a tile row costs a few cycles more than loading it; elsewhere Eigen's
/// `maxCoeff`.
template <class Acc>
Acc max_of(const Acc* scores, Index count) {
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<Acc, float>) {
    const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    // vmaxps drops a NaN operand unless it is the second one, so NaN lanes are noted apart.
    __m512 max0 = lowest, max1 = lowest, max2 = lowest, max3 = lowest;
    __mmask16 nan = 0;
    const auto note = [&](__m512& max, __m512 a) {
      max = _mm512_max_ps(max, a);
      nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    };
    Index c = 0;
    for (; c + 64 <= count; c += 64) {
      note(max0, _mm512_loadu_ps(scores + c));
      note(max1, _mm512_loadu_ps(scores + c + 16));
      note(max2, _mm512_loadu_ps(scores + c + 32));
      note(max3, _mm512_loadu_ps(scores + c + 48));
    }
    for (; c + 16 <= count; c += 16) note(max0, _mm512_loadu_ps(scores + c));
    if (c < count) {
      const __mmask16 tail = __mmask16((1u << (count - c)) - 1);
      note(max1, _mm512_mask_blend_ps(tail, lowest, _mm512_maskz_loadu_ps(tail, scores + c)));
    }
    if (nan) return std::numeric_limits<float>::quiet_NaN();
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(max0, max1), _mm512_max_ps(max2, max3)));
  }
#elif defined(EIGEN_VECTORIZE_AVX)
  if constexpr (std::is_same_v<Acc, float>) {
    // As above, 32 scores per step; the NaN lanes are or-ed, and the last scores taken one by one.
    const __m256 lowest = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 max0 = lowest, max1 = lowest, max2 = lowest, max3 = lowest, nan = _mm256_setzero_ps();
    const auto note = [&](__m256& max, __m256 a) {
      max = _mm256_max_ps(max, a);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    };
    Index c = 0;
    for (; c + 32 <= count; c += 32) {
      note(max0, _mm256_loadu_ps(scores + c));
      note(max1, _mm256_loadu_ps(scores + c + 8));
      note(max2, _mm256_loadu_ps(scores + c + 16));
      note(max3, _mm256_loadu_ps(scores + c + 24));
    }
    for (; c + 8 <= count; c += 8) note(max0, _mm256_loadu_ps(scores + c));
    const __m256 max = _mm256_max_ps(_mm256_max_ps(max0, max1), _mm256_max_ps(max2, max3));
    const __m128 half = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps(max, 1));
    const __m128 pair = _mm_max_ps(half, _mm_movehl_ps(half, half));
    float result = _mm_cvtss_f32(_mm_max_ss(pair, _mm_movehdup_ps(pair)));
    bool any_nan = _mm256_movemask_ps(nan) != 0;
    for (; c < count; ++c) {
      any_nan |= std::isnan(scores[c]);
      result = std::max(result, scores[c]);
    }
    return any_nan ? std::numeric_limits<float>::quiet_NaN() : result;
  }
#endif
  const auto values = Eigen::Map<const Eigen::Array<Acc, Eigen::Dynamic, 1>>(scores, count);
  return values.isNaN().any() ? std::numeric_limits<Acc>::quiet_NaN() : values.maxCoeff();
}

/// The largest `c < count` with `scores[c] == value` (one must exist): where a row's max lies, searched from
/// the end so that ties go to the larger position; 16 (8) scores at a time with AVX-512 (AVX) floats.
template <class Acc>
Index last_position_of(const Acc* scores, Index count, Acc value) {
  Index c = count;
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<Acc, float>) {
    const __m512 wanted = _mm512_set1_ps(value);
    for (; c >= 16; c -= 16)
      if (const __mmask16 equal = _mm512_cmp_ps_mask(_mm512_loadu_ps(scores + c - 16), wanted, _CMP_EQ_OQ))
        return c - 16 + (31 - __builtin_clz(unsigned(equal)));
  }
#elif defined(EIGEN_VECTORIZE_AVX)
  if constexpr (std::is_same_v<Acc, float>) {
    const __m256 wanted = _mm256_set1_ps(value);
    for (; c >= 8; c -= 8)
      if (const int equal = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(scores + c - 8), wanted, _CMP_EQ_OQ)))
        return c - 8 + (31 - __builtin_clz(unsigned(equal)));
  }
#endif
  while (scores[--c] != value) {
  }
  return c;
}

}  // namespace toptheta::detail
