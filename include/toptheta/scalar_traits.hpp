// The accumulation type of each stored scalar type.
#pragma once

#include <Eigen/Core>

#include <type_traits>

namespace toptheta {

using Index = Eigen::Index;

/// Type in which kernels accumulate scores, sums and outputs for a stored `Scalar`:
/// `double` for `double`, `float` for `float`, `Eigen::half` and `Eigen::bfloat16`.
template <class Scalar>
struct accumulator {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double> ||
                    std::is_same_v<Scalar, Eigen::half> || std::is_same_v<Scalar, Eigen::bfloat16>,
                "toptheta stores float, double, Eigen::half or Eigen::bfloat16");
  using type = std::conditional_t<std::is_same_v<Scalar, double>, double, float>;
};

template <class Scalar>
using accumulator_t = typename accumulator<std::remove_const_t<Scalar>>::type;

/// Values one stored element of a K or V row holds: 1 for a scalar type, `Stored::values_per_block` for a block
/// of quantized values (`BlockQ8<N>`: N). Views count `head_dim` in values and strides in stored elements.
template <class Stored, class = void>
struct values_per_element : std::integral_constant<Index, 1> {};
template <class Stored>
struct values_per_element<Stored, std::void_t<decltype(Stored::values_per_block)>>
    : std::integral_constant<Index, Stored::values_per_block> {};

template <class Stored>
constexpr Index values_per_element_v = values_per_element<std::remove_const_t<Stored>>::value;

/// Whether `Stored` is a block of quantized values rather than one value.
template <class Stored>
constexpr bool is_block_type_v = values_per_element_v<Stored> > 1;

/// Stored elements that hold `values` values of a row (whole blocks: `values` is a multiple of the block).
template <class Stored>
constexpr Index elements_of(Index values) {
  return values / values_per_element_v<Stored>;
}

/// Bytes of the stored elements that hold `values` values, a part of a block counted whole.
template <class Stored>
constexpr Index stored_bytes(Index values) {
  return (values + values_per_element_v<Stored> - 1) / values_per_element_v<Stored> * Index(sizeof(Stored));
}

}  // namespace toptheta
