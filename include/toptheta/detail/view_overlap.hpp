// Whether two strided views share memory, and whether a view's own rows do: what an attention call checks
// before it writes its output.
#pragma once

#include <toptheta/paged_view.hpp>
#include <toptheta/scalar_traits.hpp>
#include <toptheta/views.hpp>

#include <cstdint>

namespace toptheta::detail {

/// Bytes of a view's memory: its first element, the distance between tokens, and the footprint of one token's
/// rows (or of one row when the view is head-major).
struct ViewBytes {
  std::uintptr_t first = 0, end = 0;   ///< [first, end) holds every element (empty when first == end)
  std::uintptr_t token_stride = 0;     ///< bytes from token t to t + 1
  std::uintptr_t token_footprint = 0;  ///< bytes from a token's first element past its last one

  template <class Scalar>
  static ViewBytes of(const TensorView<Scalar>& view) {
    ViewBytes bytes;
    if (view.tokens() == 0) return bytes;
    const auto size = std::uintptr_t(sizeof(Scalar));
    bytes.first = reinterpret_cast<std::uintptr_t>(view.data());
    bytes.token_stride = std::uintptr_t(view.token_stride()) * size;
    bytes.token_footprint =
        std::uintptr_t((view.heads() - 1) * view.head_stride() + elements_of<Scalar>(view.head_dim())) * size;
    bytes.end = bytes.first + std::uintptr_t(view.tokens() - 1) * bytes.token_stride + bytes.token_footprint;
    return bytes;
  }
};

/// A paged view's bytes: its whole pool, as one extent (any of its pages may hold its rows).
template <class Scalar>
ViewBytes pool_bytes(const PagedTensorView<Scalar>& view) {
  ViewBytes bytes;
  if (view.tokens() == 0 || view.pool_pages() == 0) return bytes;
  bytes.first = reinterpret_cast<std::uintptr_t>(view.pages());
  bytes.end = bytes.first + std::uintptr_t(view.pool_pages() * view.page_values()) * sizeof(Scalar);
  return bytes;
}

/// Whether `a` may share a byte with the pool of the paged view `b`: whenever their extents meet.
template <class A, class B>
bool may_overlap(const TensorView<A>& a, const PagedTensorView<B>& b) {
  const ViewBytes x = ViewBytes::of(a), y = pool_bytes(b);
  return !(x.first == x.end || y.first == y.end || x.end <= y.first || y.end <= x.first);
}

/// False only when `a` and `b` certainly share no byte: their extents are disjoint, or both repeat with the same
/// token stride and their per-token footprints never meet (views of distinct heads of one fused QKV buffer).
template <class A, class B>
bool may_overlap(const TensorView<A>& a, const TensorView<B>& b) {
  const ViewBytes x = ViewBytes::of(a), y = ViewBytes::of(b);
  if (x.first == x.end || y.first == y.end || x.end <= y.first || y.end <= x.first) return false;
  const std::uintptr_t period = x.token_stride;
  if (period == 0 || period != y.token_stride || x.token_footprint > period || y.token_footprint > period) return true;
  // Within one period x covers [0, x.footprint) and y covers [offset, offset + y.footprint), modulo the period.
  const std::uintptr_t y_offset =
      y.first >= x.first ? (y.first - x.first) % period : (period - (x.first - y.first) % period) % period;
  return y_offset < x.token_footprint || y_offset + y.token_footprint > period;
}

/// True when two different (token, head) rows of `view` share an element: rows must lie token-major
/// (`head_stride >= head_dim`, `token_stride >=` a token's footprint) or head-major.
template <class Scalar>
bool rows_overlap(const TensorView<Scalar>& view) {
  const Index tokens = view.tokens(), heads = view.heads(), dim = elements_of<Scalar>(view.head_dim());
  const Index token_stride = view.token_stride(), head_stride = view.head_stride();
  const bool token_major =
      (heads == 1 || head_stride >= dim) && (tokens <= 1 || token_stride >= (heads - 1) * head_stride + dim);
  const bool head_major =
      (tokens <= 1 || token_stride >= dim) && (heads == 1 || head_stride >= (tokens - 1) * token_stride + dim);
  return !token_major && !head_major;
}

}  // namespace toptheta::detail
