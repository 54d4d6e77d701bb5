// Identities: a non-deduced context for template arguments, and the identity map.
#pragma once

namespace toptheta::detail {

/// Blocks template argument deduction, so `Scalar` is deduced from one argument and the others convert.
template <class T>
struct identity {
  using type = T;
};
template <class T>
using identity_t = typename identity<T>::type;

/// The value itself: `ValueHistogram::add`'s default map from inputs to values.
struct Identity {
  template <class T>
  T operator()(T x) const {
    return x;
  }
};

}  // namespace toptheta::detail
