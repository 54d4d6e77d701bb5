// Pluggable parallelism: kernels hand independent work items to an executor.
#pragma once

#include <toptheta/scalar_traits.hpp>

#include <exception>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace toptheta {

/// Runs `work(item)` for every item in `[0, items)` on the calling thread, in order.
struct SerialExecutor {
  template <class Work>
  void parallel_for(Index items, Work&& work) const {
    for (Index item = 0; item < items; ++item) work(item);
  }
};

/// Runs work items on OpenMP threads (`threads = 0`: OpenMP's default count). Without OpenMP it runs serially.
///
/// Items write disjoint outputs, so results do not depend on the thread count. The first exception an item
/// throws is rethrown on the calling thread after all items ended.
struct OpenMPExecutor {
  int threads = 0;

  template <class Work>
  void parallel_for(Index items, Work&& work) const {
#ifdef _OPENMP
    std::exception_ptr failure;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads > 0 ? threads : omp_get_max_threads())
    for (Index item = 0; item < items; ++item) {
      try {
        work(item);
      } catch (...) {
#pragma omp critical(toptheta_executor_failure)
        if (!failure) failure = std::current_exception();
      }
    }
    if (failure) std::rethrow_exception(failure);
#else
    SerialExecutor{}.parallel_for(items, work);
#endif
  }
};

/// The executor kernels use unless the caller passes one.
using DefaultExecutor = OpenMPExecutor;

}  // namespace toptheta
