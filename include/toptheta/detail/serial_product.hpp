// Tile-sized GEMMs kept on the calling thread.
#pragma once

#include <toptheta/scalar_traits.hpp>

#include <Eigen/Core>

#include <type_traits>

namespace toptheta::detail {

/// `destination (+)= lhs * rhs` by Eigen's GEMM kernel on the calling thread only.
///
/// Compiled with OpenMP and called outside a parallel region (a serial executor, one OpenMP thread, an
/// engine's own thread pool), Eigen splits every GEMM over OpenMP threads; for tile-sized products that costs
/// far more than it gains and oversubscribes the caller's threads. Work items are this library's unit of
/// parallelism, so tile products call Eigen's GEMM functor directly, without its parallel dispatch (this
/// mirrors `generic_product_impl<..., GemmProduct>::scaleAndAddTo` of Eigen 3.4). Operands must be plain
/// matrices, maps or blocks of them, possibly transposed.
template <bool Accumulate, class Destination, class Lhs, class Rhs>
void serial_product(Destination&& destination_expression, const Lhs& lhs, const Rhs& rhs) {
  namespace ei = Eigen::internal;
  using Dest = std::remove_reference_t<Destination>;
  using Scalar = typename Dest::Scalar;
  Dest& destination = destination_expression;
  if constexpr (!Accumulate) destination.setZero();
  if (lhs.rows() == 0 || lhs.cols() == 0 || rhs.cols() == 0) return;

  using LhsTraits = ei::blas_traits<Lhs>;
  using RhsTraits = ei::blas_traits<Rhs>;
  using ActualLhs = std::remove_cv_t<std::remove_reference_t<typename LhsTraits::DirectLinearAccessType>>;
  using ActualRhs = std::remove_cv_t<std::remove_reference_t<typename RhsTraits::DirectLinearAccessType>>;
  constexpr int order_of_lhs = (ActualLhs::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
  constexpr int order_of_rhs = (ActualRhs::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
  constexpr int order_of_destination = (Dest::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
  using Blocking = ei::gemm_blocking_space<order_of_destination, Scalar, Scalar, Dest::MaxRowsAtCompileTime,
                                           Dest::MaxColsAtCompileTime, Eigen::Dynamic>;
  using Kernel = ei::general_matrix_matrix_product<Index, Scalar, order_of_lhs, bool(LhsTraits::NeedToConjugate),
                                                   Scalar, order_of_rhs, bool(RhsTraits::NeedToConjugate),
                                                   order_of_destination, Dest::InnerStrideAtCompileTime>;
  using Gemm = ei::gemm_functor<Scalar, Index, Kernel, ActualLhs, ActualRhs, Dest, Blocking>;

  const ActualLhs& actual_lhs = LhsTraits::extract(lhs);
  const ActualRhs& actual_rhs = RhsTraits::extract(rhs);
  const Scalar alpha = LhsTraits::extractScalarFactor(lhs) * RhsTraits::extractScalarFactor(rhs);
  Blocking blocking(destination.rows(), destination.cols(), lhs.cols(), 1, true);
  Gemm(actual_lhs, actual_rhs, destination, alpha, blocking)(0, lhs.rows(), 0, rhs.cols(), nullptr);
}

}  // namespace toptheta::detail
