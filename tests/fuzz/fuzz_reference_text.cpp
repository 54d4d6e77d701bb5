// libFuzzer target: the reference implementation's text files on arbitrary bytes. The input is a thresholds file,
// optionally followed by a NUL byte and a denominator-term file; both are parsed and built into a table, once
// for the shape the files name and once for a fixed 2-layer, 2-head model. The only exception allowed out is
// toptheta::invalid_argument (threshold_file_error).
#include <toptheta/reference_thresholds.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::size_t split = input.find('\0');
  const std::string_view thresholds_text = input.substr(0, split);
  const std::string_view terms_text = split == std::string_view::npos ? std::string_view() : input.substr(split + 1);
  try {
    const auto thresholds = toptheta::parse_reference_thresholds(thresholds_text, "<fuzz: thresholds>");
    std::vector<toptheta::ReferenceEntry> terms;
    if (split != std::string_view::npos)
      terms = toptheta::parse_reference_denominator_terms(terms_text, "<fuzz: terms>");
    toptheta::ReferenceImport import;
    import.shape = {2, 2, 1, 8};
    for (const auto& entry : thresholds) {
      import.shape.layers = std::max(import.shape.layers, entry.layer + 1);
      import.shape.q_heads = std::max(import.shape.q_heads, entry.head + 1);
    }
    import.shape.kv_heads = import.shape.q_heads;
    const char* terms_name = split == std::string_view::npos ? "" : "<fuzz: terms>";
    try {
      (void)toptheta::reference_table(thresholds, terms, import, "<fuzz: thresholds>", terms_name);
    } catch (const toptheta::invalid_argument&) {
    }
    import.shape = {2, 2, 1, 8};
    const toptheta::ThresholdTable table =
        toptheta::reference_table(thresholds, terms, import, "<fuzz: thresholds>", terms_name);
    for (toptheta::Index l = 0; l < table.layers(); ++l)
      for (toptheta::Index h = 0; h < table.shape().q_heads; ++h) (void)table.lookup(l, h, 1000);
  } catch (const toptheta::invalid_argument&) {
  }
  return 0;
}
