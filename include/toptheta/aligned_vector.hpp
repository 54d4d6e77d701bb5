// Storage for Q, K, V and outputs whose data start on a cache line.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace toptheta {

/// Bytes `AlignedVector` aligns its data to: one cache line, a multiple of every vector width.
inline constexpr std::size_t cache_line_bytes = 64;

/// A `std::allocator` whose blocks start on a `cache_line_bytes` boundary.
template <class T>
struct CacheLineAllocator {
  using value_type = T;

  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}

  T* allocate(std::size_t count) {
    return static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t(cache_line_bytes)));
  }
  void deallocate(T* data, std::size_t) noexcept { ::operator delete(data, std::align_val_t(cache_line_bytes)); }

  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const noexcept {
    return true;
  }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const noexcept {
    return false;
  }
};

/// A `std::vector` whose data start on a cache line, so that `[tokens, heads, head_dim]` rows of a multiple of
/// 64 bytes never straddle two lines: each vector load or store of a row touches one line. (A plain
/// `std::vector` of more than 128 KiB from glibc starts 16 bytes into a page, so every 64-byte load of such a
/// row touches two.)
template <class T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace toptheta
