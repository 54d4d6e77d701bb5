// The r-th largest value of an array, by quickselect with branch-free partitions.
#pragma once

#include <toptheta/scalar_traits.hpp>

#include <Eigen/Core>  // brings <immintrin.h> where the target has AVX-512

#include <algorithm>
#include <functional>
#include <type_traits>
#include <vector>

namespace toptheta::detail {

/// Copies the values of `values[0..count)` that are `>= floor` to `out` (in order) and returns how many there
/// are; `out` has room for `count`. Branch-free; with AVX-512 sixteen values per compress-store, else a
/// conditional cursor increment per value.
template <class T>
Index gather_at_least(const T* values, Index count, T floor, T* out) {
  Index gathered = 0, j = 0;
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    const __m512 bound = _mm512_set1_ps(floor);
    for (; j + 16 <= count; j += 16) {
      const __m512 x = _mm512_loadu_ps(values + j);
      const __mmask16 keep = _mm512_cmp_ps_mask(x, bound, _CMP_GE_OQ);
      _mm512_mask_compressstoreu_ps(out + gathered, keep, x);
      gathered += __builtin_popcount(keep);
    }
  }
#endif
  for (; j < count; ++j) {
    out[gathered] = values[j];
    gathered += values[j] >= floor;
  }
  return gathered;
}

/// The `rank`-th largest of `values[0..count)` (1 <= rank <= count; ties counted with multiplicity), leaving
/// `values` unchanged. Each pass splits the values around a median-of-three pivot into those above and those
/// below it without branches on the data (a conditional cursor increment), so its cost does not depend on
/// how predictable the comparisons are; small remainders go to `std::nth_element`. Expected O(count);
/// `buffer` is resized to 4 · count.
template <class T>
T rank_largest(const T* values, Index count, Index rank, std::vector<T>& buffer) {
  constexpr Index small = 48;
  constexpr int max_passes = 64;  // a safeguard against pathological pivots; then nth_element finishes
  const Index capacity = count;
  buffer.resize(std::size_t(4 * capacity));
  const T* in = values;
  for (int pass = 0;; ++pass) {
    // Pass p writes into half p % 2 of `buffer` ([above | below], 2 · capacity each); `in` is the other half.
    T* const out = buffer.data() + (pass % 2) * 2 * capacity;
    if (count <= small || pass == max_passes) {
      std::copy(in, in + count, out);
      std::nth_element(out, out + (rank - 1), out + count, std::greater<T>());
      return out[rank - 1];
    }
    T a = in[0], b = in[count / 2], c = in[count - 1];
    if (a > b) std::swap(a, b);
    const T pivot = std::max(a, std::min(b, c));  // the median of the three
    T* const above = out;
    T* const below = out + capacity;
    Index greater = 0, less = 0;
    for (Index j = 0; j < count; ++j) {
      const T x = in[j];
      above[greater] = x;
      greater += x > pivot;
      below[less] = x;
      less += x < pivot;
    }
    if (rank <= greater) {
      in = above;
      count = greater;
    } else if (rank > count - less) {
      rank -= count - less;
      in = below;
      count = less;
    } else {
      return pivot;
    }
  }
}

}  // namespace toptheta::detail
