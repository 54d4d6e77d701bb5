// The kernel instantiations that the project's own programs (tests, examples, benchmarks, the Python module)
// share, compiled once by cmake/kernel_instances_*.cpp instead of again in every file that calls a kernel (the
// body of every public kernel is one `run_tiled_attention_batch<Tiles, Scalar, KvView, Selection, Executor>`,
// ~5-12 s of compile time each). The build force-includes this header into those programs (target
// `toptheta_shared_kernels`, cmake/TopthetaProjectOptions.cmake), so their sources read as a user writes them;
// an explicit instantiation declaration changes no code, only where it is compiled. Not part of the library.
#pragma once

#include <toptheta/detail/tiled_attention.hpp>
#include <toptheta/executor.hpp>
#include <toptheta/paged_view.hpp>
#include <toptheta/q8_block.hpp>
#include <toptheta/selection.hpp>
#include <toptheta/views.hpp>

#include <vector>

/// `keyword template` of the body of every kernel on `Scalar` queries and `KvView` K and V with the default
/// tiles and executor, for one selection rule; `keyword` is `extern` (a declaration) or empty (the definition).
#define TOPTHETA_KERNEL_INSTANCE(keyword, Scalar, KvView, Selection)                                                   \
  keyword template void toptheta::detail::run_tiled_attention_batch<toptheta::DefaultTiles, Scalar, KvView, Selection, \
                                                                    toptheta::DefaultExecutor>(                        \
      const std::vector<toptheta::detail::SequenceCall<Scalar, KvView>>&, const Selection&,                            \
      const toptheta::DefaultExecutor&, bool);

/// The three rules (dense, Top-θ, top-k) on one (Scalar, KvView).
#define TOPTHETA_KERNEL_INSTANCES(keyword, Scalar, KvView)                       \
  TOPTHETA_KERNEL_INSTANCE(keyword, Scalar, KvView, toptheta::DenseSelection)    \
  TOPTHETA_KERNEL_INSTANCE(keyword, Scalar, KvView, toptheta::TopThetaSelection) \
  TOPTHETA_KERNEL_INSTANCE(keyword, Scalar, KvView, toptheta::TopKSelection)

/// The (Scalar, KvView) pairs that several of the programs use, each group defined by one
/// cmake/kernel_instances_<group>.cpp (the groups compile in parallel).
#define TOPTHETA_KERNEL_INSTANCES_FLOAT(keyword)                                             \
  TOPTHETA_KERNEL_INSTANCES(keyword, float, toptheta::TensorView<const float>)               \
  TOPTHETA_KERNEL_INSTANCES(keyword, float, toptheta::TensorView<const toptheta::BlockQ8_0>) \
  TOPTHETA_KERNEL_INSTANCES(keyword, float, toptheta::TensorView<const toptheta::BlockQ8<8>>)
#define TOPTHETA_KERNEL_INSTANCES_WIDE_AND_BFLOAT16(keyword)                     \
  TOPTHETA_KERNEL_INSTANCES(keyword, double, toptheta::TensorView<const double>) \
  TOPTHETA_KERNEL_INSTANCES(keyword, Eigen::bfloat16, toptheta::TensorView<const Eigen::bfloat16>)
#define TOPTHETA_KERNEL_INSTANCES_PAGED(keyword)                                                  \
  TOPTHETA_KERNEL_INSTANCES(keyword, float, toptheta::PagedTensorView<const float>)               \
  TOPTHETA_KERNEL_INSTANCES(keyword, float, toptheta::PagedTensorView<const toptheta::BlockQ8_0>) \
  TOPTHETA_KERNEL_INSTANCES(keyword, Eigen::bfloat16, toptheta::PagedTensorView<const Eigen::bfloat16>)

TOPTHETA_KERNEL_INSTANCES_FLOAT(extern)
TOPTHETA_KERNEL_INSTANCES_WIDE_AND_BFLOAT16(extern)
TOPTHETA_KERNEL_INSTANCES_PAGED(extern)
