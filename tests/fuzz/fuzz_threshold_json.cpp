// libFuzzer target: thresholds_from_json on arbitrary bytes. The only exception allowed out of the parser is
// toptheta::invalid_argument (threshold_file_error); a table that reads must write and read back identically.
#include <toptheta/threshold_io.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const toptheta::ThresholdTable table = toptheta::thresholds_from_json(text, "<fuzz>");
    const std::string written = toptheta::thresholds_to_json(table);
    if (toptheta::thresholds_to_json(toptheta::thresholds_from_json(written, "<fuzz: written>")) != written)
      __builtin_trap();
    for (toptheta::Index l = 0; l < table.layers(); ++l)
      for (toptheta::Index h = 0; h < table.shape().q_heads; ++h)
        for (toptheta::Index length : {toptheta::Index(1), toptheta::Index(100), toptheta::LengthBuckets::max_length})
          (void)table.lookup(l, h, length);
  } catch (const toptheta::invalid_argument&) {
  }
  return 0;
}
