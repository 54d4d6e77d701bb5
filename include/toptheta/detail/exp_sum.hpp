// Σ_j exp(a_j - m) over a row of scores: the running softmax sum that one-pass Top-θ in the probability and
// score_minus_max spaces adds for every key (design.md §6), vectorised for the common float case.
#pragma once

#include <toptheta/scalar_traits.hpp>

#include <Eigen/Core>

#include <type_traits>

namespace toptheta::detail {

/// `Σ_{c < count} exp(scores[c] - shift)` for `shift >= max_c scores[c]` (so every term is in (0, 1]).
///
/// With AVX-512 floats: `exp(x) = 2^n p(r)`, `n = round(x log2 e)`, `r = x - n ln 2` (ln 2 in two parts), `p`
/// the degree-6 Taylor polynomial of `exp` on |r| <= ln 2 / 2, and `2^n` applied by `vscalefps`; a sum is
/// within 3e-7 of the exact one (tests). Arguments below -87.3, where `exp` leaves the normal floats, count as
/// exp(-87.3) ≈ 1.2e-38, which no sum holding the term exp(0) = 1 can resolve. Elsewhere Eigen's `exp`.
template <class Acc>
Acc exp_sum(const Acc* scores, Index count, Acc shift) {
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<Acc, float>) {
    const __m512 lowest = _mm512_set1_ps(-87.3f), log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_high = _mm512_set1_ps(0.693145751953125f), ln2_low = _mm512_set1_ps(1.42860682030941723e-6f);
    const __m512 shifted = _mm512_set1_ps(shift);
    const auto exp_of = [&](__m512 a) {
      const __m512 x = _mm512_max_ps(_mm512_sub_ps(a, shifted), lowest);
      const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 r = _mm512_fnmadd_ps(n, ln2_low, _mm512_fnmadd_ps(n, ln2_high, x));
      __m512 p = _mm512_set1_ps(1.0f / 720);
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
      return _mm512_scalef_ps(p, n);
    };
    __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
    Index c = 0;
    for (; c + 32 <= count; c += 32) {
      sum0 = _mm512_add_ps(sum0, exp_of(_mm512_loadu_ps(scores + c)));
      sum1 = _mm512_add_ps(sum1, exp_of(_mm512_loadu_ps(scores + c + 16)));
    }
    for (; c + 16 <= count; c += 16) sum0 = _mm512_add_ps(sum0, exp_of(_mm512_loadu_ps(scores + c)));
    if (c < count) {
      const __mmask16 tail = __mmask16((1u << (count - c)) - 1);
      sum1 = _mm512_mask_add_ps(sum1, tail, sum1, exp_of(_mm512_maskz_loadu_ps(tail, scores + c)));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
  }
#endif
  return (Eigen::Map<const Eigen::Array<Acc, Eigen::Dynamic, 1>>(scores, count) - shift).exp().sum();
}

}  // namespace toptheta::detail
