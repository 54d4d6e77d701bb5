// libFuzzer target: the partial-attention decoders on arbitrary bytes. The first byte chooses row statistics or a
// partial output, of float or double; the rest is decoded. A decoded value must encode back to the same bytes,
// merge with itself, and (a partial output) finish into o_i. The only exception allowed out is
// toptheta::invalid_argument.
#include <toptheta/partial_attention.hpp>
#include <toptheta/partial_encoding.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace {

template <class Acc>
void check(const std::uint8_t* data, std::size_t size, bool statistics) {
  using namespace toptheta;
  if (statistics) {
    PartialStatistics<Acc> decoded = decode_partial_statistics<Acc>(data, size);
    if (encode_partial(decoded) != std::vector<std::uint8_t>(data, data + size)) std::abort();
    decoded.merge(decoded);
    return;
  }
  PartialOutput<Acc> decoded = decode_partial_output<Acc>(data, size);
  if (encode_partial(decoded) != std::vector<std::uint8_t>(data, data + size)) std::abort();
  decoded.merge(decoded);
  const Index values = decoded.query_rows * decoded.q_heads * decoded.head_dim;
  if (decoded.head_dim == 0 || values > (Index(1) << 16)) return;
  std::vector<Acc> out(static_cast<std::size_t>(values));
  finish_partial_attention(decoded, DenseSelection{},
                           TensorView<Acc>(out.data(), decoded.query_rows, decoded.q_heads, decoded.head_dim));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  try {
    const bool statistics = (data[0] & 1) != 0;
    if (data[0] & 2)
      check<double>(data + 1, size - 1, statistics);
    else
      check<float>(data + 1, size - 1, statistics);
  } catch (const toptheta::invalid_argument&) {
  }
  return 0;
}
