// Blocks of signed 8-bit values that share one 16-bit float scale: the stored type of an int8 KV cache.
#pragma once

#include <toptheta/detail/require.hpp>
#include <toptheta/scalar_traits.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace toptheta {

/// `N` consecutive values of a K or V row, value `i` being `float(scale) * values[i]`: an IEEE half scale and
/// `N` signed 8-bit values, `2 + N` bytes with no padding. `BlockQ8_0` (N = 32) is llama.cpp's q8_0 layout, byte
/// for byte; N = head_dim gives one scale per (token, head). A row of `head_dim` values is `head_dim / N`
/// blocks. Views of K and V of blocks (`TensorView<const BlockQ8_0>`, `PagedTensorView<const BlockQ8_0>`) count
/// `head_dim` in values and strides in blocks; the kernels dequantize in registers as they stream a row, and
/// never widen whole rows to float in memory on the decode path.
/// \tparam N values per block, even (so that blocks need no padding).
template <Index N>
struct BlockQ8 {
  static_assert(N >= 2 && N % 2 == 0, "a block holds an even number of values");
  static constexpr Index values_per_block = N;
  Eigen::half scale;
  std::int8_t values[N];
};

/// The q8_0 block: 32 values, 34 bytes.
using BlockQ8_0 = BlockQ8<32>;
static_assert(sizeof(BlockQ8_0) == 34 && alignof(BlockQ8_0) == 2, "a q8_0 block is 34 bytes, 2-byte aligned");

/// `float(block.scale)`, exact: by F16C where the compiler targets it (Eigen 3.4's `half` uses it only under
/// clang, and converts in software under GCC, several times slower in the kernels' inner loops).
template <Index N>
float scale_of(const BlockQ8<N>& block) {
#if defined(__F16C__)
  return _cvtsh_ss(Eigen::numext::bit_cast<std::uint16_t>(block.scale));
#else
  return float(block.scale);
#endif
}

/// Whether `Stored` is a `BlockQ8<N>`.
template <class Stored>
struct is_q8_block : std::false_type {};
template <Index N>
struct is_q8_block<BlockQ8<N>> : std::true_type {};
template <class Stored>
constexpr bool is_q8_block_v = is_q8_block<std::remove_const_t<Stored>>::value;

/// The largest magnitude a block holds: 127 times the largest finite half.
constexpr double q8_max_magnitude = 127.0 * 65504.0;

namespace detail {

/// The smallest half at or above `x >= 0` (the scale is rounded up, so that every `|x_i| / d <= 127`).
inline Eigen::half half_at_or_above(float x) {
  const Eigen::half nearest(x);
  if (float(nearest) >= x) return nearest;
  const auto bits = Eigen::numext::bit_cast<std::uint16_t>(nearest);
  return Eigen::numext::bit_cast<Eigen::half>(std::uint16_t(bits + 1));  // the next larger positive half
}

}  // namespace detail

/// Quantizes `count` values (a multiple of N) into `count / N` blocks. Per block, the scale is
/// `d = max_i |x_i| / 127` rounded up to a half and `values[i] = round(x_i / d)` (to nearest even, in
/// [-127, 127]); a block of zeros has `d = 0`. The error of each value is at most `d / 2`.
/// \throws invalid_argument naming `count` unless it is a multiple of N (and >= 0), and naming `argument` and
/// the element for a value that is not finite or whose magnitude exceeds `q8_max_magnitude` (its block's scale
/// would not be a finite half), as the int8 caches check their input.
template <class Source, Index N>
void quantize_q8(const Source* source, Index count, BlockQ8<N>* blocks, const std::string& argument = "values") {
  detail::require(count >= 0 && count % N == 0, "count",
                  "a multiple >= 0 of the " + std::to_string(N) + " values of a block", count);
  for (Index b = 0; b < count / N; ++b) {
    const Source* x = source + b * N;
    float largest = 0;
    for (Index i = 0; i < N; ++i) {
      if (!(std::abs(double(x[i])) <= q8_max_magnitude))
        detail::fail(argument + " (element " + std::to_string(b * N + i) + ")",
                     "a finite value of magnitude at most 127 x 65504 (an int8 block's scale is a half)", double(x[i]));
      largest = std::max(largest, std::abs(float(x[i])));
    }
    BlockQ8<N>& block = blocks[b];
    block.scale = detail::half_at_or_above(largest / 127.0f);
    const float scale = scale_of(block);
    for (Index i = 0; i < N; ++i)
      block.values[i] = scale == 0.0f ? std::int8_t(0) : std::int8_t(std::nearbyint(float(x[i]) / scale));
  }
}

/// `destination[i] = float(scale) * values[i]` for the `count` values (a multiple of N) of `count / N` blocks:
/// the values the kernels compute with. \throws invalid_argument naming `count` unless it is a multiple of N
/// (and >= 0).
template <class Acc, Index N>
void dequantize_q8(const BlockQ8<N>* blocks, Index count, Acc* destination) {
  detail::require(count >= 0 && count % N == 0, "count",
                  "a multiple >= 0 of the " + std::to_string(N) + " values of a block", count);
  for (Index b = 0; b < count / N; ++b) {
    const float scale = scale_of(blocks[b]);
    for (Index i = 0; i < N; ++i) destination[b * N + i] = Acc(scale * float(blocks[b].values[i]));
  }
}

}  // namespace toptheta
