#pragma once

namespace toptheta::detail {

/// Blocks template argument deduction, so `Scalar` is deduced from one argument and the others convert.
template <class T>
struct identity {
  using type = T;
};
template <class T>
using identity_t = typename identity<T>::type;

}  // namespace toptheta::detail
