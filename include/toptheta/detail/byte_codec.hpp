// Little-endian byte writing and bounds-checked reading for the library's binary encodings (partial attention,
// calibrator state): fixed-width integers, IEEE-754 bits of floats (NaN payloads kept), counts of 32 bits.
#pragma once

#include <toptheta/detail/require.hpp>
#include <toptheta/scalar_traits.hpp>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace toptheta::detail {

class ByteWriter {
 public:
  void unsigned_integer(std::uint64_t value, int bytes) {
    for (int b = 0; b < bytes; ++b) bytes_.push_back(std::uint8_t(value >> (8 * b)));
  }
  /// A count of 32 bits; throws naming `argument` for one outside [0, 2^32).
  void count(Index value, const char* argument) {
    require(value >= 0 && std::uint64_t(value) <= std::numeric_limits<std::uint32_t>::max(), argument,
            "a count in [0, 2^32)", value);
    unsigned_integer(std::uint64_t(value), 4);
  }
  void integer(std::int64_t value) { unsigned_integer(std::uint64_t(value), 8); }
  template <class Real>
  void real(Real value) {
    using Bits = std::conditional_t<sizeof(Real) == 4, std::uint32_t, std::uint64_t>;
    Bits bits;
    std::memcpy(&bits, &value, sizeof bits);
    unsigned_integer(bits, int(sizeof bits));
  }
  template <class Vector>
  void reals(const Vector& values) {
    for (Index d = 0; d < Index(values.size()); ++d) real(values[d]);
  }
  void magic(const char (&text)[5]) {
    for (int c = 0; c < 4; ++c) unsigned_integer(std::uint8_t(text[c]), 1);
  }
  std::vector<std::uint8_t> take() { return std::move(bytes_); }

 private:
  std::vector<std::uint8_t> bytes_;
};

/// Reads what `ByteWriter` wrote; every read past the end, and `finish` before it, throws `invalid_argument`
/// naming `bytes`.
class ByteReader {
 public:
  ByteReader(const std::uint8_t* bytes, std::size_t size) : bytes_(bytes), size_(size) {
    require(bytes != nullptr || size == 0, "bytes", "a non-null pointer", "nullptr");
  }

  /// Requires the 4-byte `text` next, naming `what` the encoding is.
  void magic(const char (&text)[5], const std::string& what) {
    need(4);
    require(std::memcmp(bytes_ + offset_, text, 4) == 0, "bytes", what + " (magic \"" + std::string(text, 4) + "\")",
            "other bytes");
    offset_ += 4;
  }
  std::uint64_t unsigned_integer(int bytes) {
    need(std::size_t(bytes));
    std::uint64_t value = 0;
    for (int b = 0; b < bytes; ++b) value |= std::uint64_t(bytes_[offset_ + std::size_t(b)]) << (8 * b);
    offset_ += std::size_t(bytes);
    return value;
  }
  Index count() { return Index(unsigned_integer(4)); }
  std::int64_t integer() { return std::int64_t(unsigned_integer(8)); }
  /// A byte with no bits outside `known`.
  std::uint8_t flags(std::uint8_t known, const char* what) {
    const auto value = std::uint8_t(unsigned_integer(1));
    require((value & ~known) == 0, "bytes", std::string(what) + " without unknown bits", int(value));
    return value;
  }
  template <class Real>
  Real real() {
    using Bits = std::conditional_t<sizeof(Real) == 4, std::uint32_t, std::uint64_t>;
    const auto bits = Bits(unsigned_integer(int(sizeof(Bits))));
    Real value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }
  template <class Vector>
  void reals(Vector& values, Index size) {
    using Real = std::decay_t<decltype(values[0])>;
    need_rows(std::uint64_t(size), sizeof(Real));
    values.resize(size);
    for (Index d = 0; d < size; ++d) values[d] = real<Real>();
  }
  /// Requires `rows` rows of at least `bytes_per_row` bytes each to remain (before anything is allocated).
  void need_rows(std::uint64_t rows, std::size_t bytes_per_row) {
    require(rows <= (size_ - offset_) / bytes_per_row, "bytes",
            std::to_string(rows) + " rows of at least " + std::to_string(bytes_per_row) + " bytes after offset " +
                std::to_string(offset_),
            std::to_string(size_ - offset_) + " bytes");
  }
  void need(std::size_t bytes) {
    require(size_ - offset_ >= bytes, "bytes",
            std::to_string(bytes) + " more bytes at offset " + std::to_string(offset_), "the end");
  }
  void finish() { require(offset_ == size_, "bytes", "the end at offset " + std::to_string(offset_), size_); }

 private:
  const std::uint8_t* bytes_;
  std::size_t size_, offset_ = 0;
};

}  // namespace toptheta::detail
