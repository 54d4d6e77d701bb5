// Conversion of stored values and rows to the accumulation type.
#pragma once

#include <toptheta/q8_block.hpp>
#include <toptheta/scalar_traits.hpp>

#include <Eigen/Core>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace toptheta::detail {

/// `destination[t] = Acc(value t)` for the first `count` values of the row at `source`. bfloat16 is the upper
/// half of a float, so its conversion is a shift the compiler vectorises; int8 blocks (`BlockQ8`) are dequantized
/// (`count` a multiple of the block); other types convert one value at a time.
template <class Stored, class Acc>
void convert(const Stored* source, Index count, Acc* destination) {
  if constexpr (is_q8_block_v<Stored>) {
    dequantize_q8(source, count, destination);
  } else if constexpr (std::is_same_v<Stored, Eigen::bfloat16> && std::is_same_v<Acc, float>) {
    static_assert(sizeof(Eigen::bfloat16) == sizeof(std::uint16_t), "bfloat16 is 16 bits");
    for (Index t = 0; t < count; ++t) {
      std::uint16_t bits;
      std::memcpy(&bits, source + t, sizeof bits);
      const std::uint32_t widened = std::uint32_t(bits) << 16;
      std::memcpy(destination + t, &widened, sizeof widened);
    }
  } else {
    for (Index t = 0; t < count; ++t) destination[t] = Acc(source[t]);
  }
}

/// Value `d` of the row at `row`, as `Acc`.
template <class Acc, class Stored>
Acc value_at(const Stored* row, Index d) {
  if constexpr (is_block_type_v<Stored>) {
    constexpr Index size = values_per_element_v<Stored>;
    return Acc(scale_of(row[d / size]) * float(row[d / size].values[d % size]));
  } else {
    return Acc(row[d]);
  }
}

/// `stored` rows as `Acc`: the map itself when the stored type is `Acc`, else a copy in `buffer`.
template <class Acc, class StoredRows, class Buffer>
auto as_accumulator(const StoredRows& stored, Buffer& buffer) {
  if constexpr (std::is_same_v<typename StoredRows::Scalar, Acc>) {
    return stored;
  } else {
    buffer.resize(stored.rows(), stored.cols());
    for (Index row = 0; row < stored.rows(); ++row)
      convert(stored.data() + row * stored.outerStride(), stored.cols(), buffer.data() + row * stored.cols());
    return Eigen::Ref<const Buffer>(buffer);
  }
}

}  // namespace toptheta::detail
