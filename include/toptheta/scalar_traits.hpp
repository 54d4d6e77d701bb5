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

}  // namespace toptheta
