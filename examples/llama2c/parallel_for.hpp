// Work items spread over threads, for the example's studies (calibration shards, configurations, candidate splits).
#pragma once

#include <toptheta/scalar_traits.hpp>

#include <atomic>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace llama2c {

using toptheta::Index;

/// Runs `work(i)` for i in [0, count) on `threads` threads (at least one), each item on one thread; the first
/// exception is rethrown after every thread ended. Results that depend only on `i` are deterministic.
inline void parallel_for(Index count, int threads, const std::function<void(Index)>& work) {
  std::atomic<Index> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  const auto worker = [&] {
    for (Index i = next++; i < count; i = next++) {
      try {
        work(i);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(failure_mutex);
        if (!failure) failure = std::current_exception();
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& thread : pool) thread.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace llama2c
