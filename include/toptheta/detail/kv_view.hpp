// What the kernels need of a K or V view, contiguous (`TensorView`) or paged (`PagedTensorView`).
#pragma once

#include <toptheta/detail/convert.hpp>
#include <toptheta/paged_view.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/views.hpp>

#include <Eigen/Core>

#include <type_traits>

namespace toptheta::detail {

template <class View>
struct KvViewTraits {
  static constexpr bool is_view = false;
};
template <class Scalar>
struct KvViewTraits<TensorView<Scalar>> {
  static constexpr bool is_view = true, paged = false;
  using ReadOnly = TensorView<const std::remove_const_t<Scalar>>;
};
template <class Scalar>
struct KvViewTraits<PagedTensorView<Scalar>> {
  static constexpr bool is_view = true, paged = true;
  using ReadOnly = PagedTensorView<const std::remove_const_t<Scalar>>;
};

/// The read-only form of a K or V view.
template <class View>
using read_only_view_t = typename KvViewTraits<View>::ReadOnly;

/// The read-only view the kernels take for K viewed as `KView` and V as `VView`: both contiguous or both paged,
/// of the stored type `Scalar` of q and out, or of int8 blocks (`BlockQ8`, an int8 cache) with q and out of
/// any type.
template <class Scalar, class KView, class VView>
struct KvViewOf {
  static_assert(KvViewTraits<KView>::is_view && KvViewTraits<VView>::is_view,
                "k and v must be TensorView or PagedTensorView");
  using type = read_only_view_t<KView>;
  static_assert(std::is_same_v<type, read_only_view_t<VView>>,
                "k and v must be views of the same kind (both contiguous or both paged) and type");
  static_assert(std::is_same_v<typename type::value_type, Scalar> || is_block_type_v<typename type::value_type>,
                "k and v must hold the type of q and out, or int8 blocks (BlockQ8)");
};
template <class Scalar, class KView, class VView>
using kv_view_t = typename KvViewOf<Scalar, KView, VView>::type;

/// Whether `View` is a paged view.
template <class View>
constexpr bool is_paged_view_v = KvViewTraits<View>::paged;

/// Rows `[first, first + count)` of head `head` of `view` as a `count x head_dim` row-major matrix of `Acc`: the
/// view's own memory when it is contiguous and stored as `Acc`, else a copy in `buffer` (gathered page by page,
/// converted or dequantized).
template <class Acc, class View, class Buffer>
auto rows_as_accumulator(const View& view, Index head, Index first, Index count, Buffer& buffer) {
  if constexpr (!is_paged_view_v<View> && !is_block_type_v<typename View::value_type>) {
    return as_accumulator<Acc>(view.head(head).middleRows(first, count), buffer);
  } else {
    buffer.resize(count, view.head_dim());
    for (Index t = 0; t < count; ++t)
      convert(view.row(first + t, head), view.head_dim(), buffer.data() + t * view.head_dim());
    return Eigen::Ref<const Buffer>(buffer);
  }
}

}  // namespace toptheta::detail
