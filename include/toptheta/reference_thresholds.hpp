// Import of the Top-θ reference implementation's calibration text files into a `ThresholdTable`.
#pragma once

#include <toptheta/detail/file_text.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/errors.hpp>
#include <toptheta/length_buckets.hpp>
#include <toptheta/threshold_space.hpp>
#include <toptheta/threshold_table.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace toptheta {

/// One line of a reference file: `L{layer}_H{head}:{seqlen} {value} {num_samples}[ {k}]`.
struct ReferenceEntry {
  Index layer = 0, head = 0, length = 0;
  double value = 0;           ///< θ (thresholds file) or the mean denominator term (denominator-term file)
  std::uint64_t samples = 0;  ///< calibration rows behind the value
  Index k = 0;                ///< thresholds file only
  std::size_t line = 0;       ///< 1-based line number, for messages
};

/// What the reference files do not record, and the shape they must have.
struct ReferenceImport {
  /// The model: the files must hold exactly `shape.layers` layers of `shape.q_heads` heads.
  ModelShape shape;
  /// The files do not say: pre-softmax placement is `raw_score`, post-softmax `probability`.
  ThresholdSpace space = ThresholdSpace::raw_score;
  /// The σ_add the thresholds were calibrated with, if known (the files do not record it).
  std::optional<double> sigma_add;
};

namespace detail {

/// Largest layer or head index a reference file may name: far above any model, and it bounds what a corrupted
/// file can make the importer allocate.
constexpr Index max_reference_index = Index(1) << 20;

/// Parses one reference file. `with_k`: thresholds (`{theta} {num_samples} {k}`), else denominator terms
/// (`{sdc} {num_samples}`). Blank lines are skipped; fields are separated by spaces or tabs; `\r\n` is accepted.
inline std::vector<ReferenceEntry> parse_reference_file(std::string_view text, const std::string& file, bool with_k) {
  const char* format = with_k ? "`L{layer}_H{head}:{seqlen} {theta} {num_samples} {k}`"
                              : "`L{layer}_H{head}:{seqlen} {sdc} {num_samples}`";
  std::vector<ReferenceEntry> entries;
  std::size_t line_number = 0, start = 0;
  while (start < text.size()) {
    std::size_t end = text.find('\n', start);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(start, end - start);
    start = end + 1;
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    const std::string where = "line " + std::to_string(line_number);
    if (line.find_first_not_of(" \t") == std::string_view::npos) continue;

    const char* p = line.data();
    const char* const last = line.data() + line.size();
    auto fail = [&](const std::string& problem) -> void {
      throw threshold_file_error(file, where,
                                 problem + " (lines read " + format + "), got " + excerpt(std::string(line)));
    };
    auto literal = [&](char c, const char* what) {
      if (p == last || *p != c) fail(std::string("expected ") + what);
      ++p;
    };
    auto integer = [&](const char* what, long long lowest, long long highest) {
      long long value = 0;
      const auto [next, error] = std::from_chars(p, last, value);
      if (error != std::errc() || next == p) fail(std::string("expected ") + what + " as a decimal integer");
      if (value < lowest || value > highest)
        fail(std::string(what) + " " + std::to_string(value) + " outside [" + std::to_string(lowest) + ", " +
             std::to_string(highest) + "]");
      p = next;
      return value;
    };
    auto separator = [&](const char* before) {
      if (p == last || (*p != ' ' && *p != '\t')) fail(std::string("expected a space before ") + before);
      while (p != last && (*p == ' ' || *p == '\t')) ++p;
    };

    ReferenceEntry entry;
    entry.line = line_number;
    while (p != last && (*p == ' ' || *p == '\t')) ++p;
    literal('L', "'L' at the start of the key");
    entry.layer = Index(integer("the layer", 0, max_reference_index));
    literal('_', "'_H' after the layer");
    literal('H', "'_H' after the layer");
    entry.head = Index(integer("the head", 0, max_reference_index));
    literal(':', "':' after the head");
    entry.length = Index(integer("the sequence length", 1, LengthBuckets::max_length));
    separator(with_k ? "the threshold" : "the denominator term");
    {
      const auto [next, error] = std::from_chars(p, last, entry.value);
      if (error == std::errc::result_out_of_range) fail("value out of the range of double");
      if (error != std::errc() || next == p)
        fail(with_k ? "expected the threshold as a number" : "expected the denominator term as a number");
      p = next;
      if (!std::isfinite(entry.value))
        fail(with_k ? "the threshold is not finite" : "the denominator term is not finite");
      if (!with_k && entry.value < 0) fail("the denominator term is negative");
    }
    separator("the sample count");
    entry.samples = std::uint64_t(integer("the sample count", 1, std::numeric_limits<long long>::max()));
    if (with_k) {
      separator("k");
      entry.k = Index(integer("k", 1, LengthBuckets::max_length));
    }
    while (p != last && (*p == ' ' || *p == '\t')) ++p;
    if (p != last) fail("unexpected text after the last field");
    entries.push_back(entry);
  }
  return entries;
}

}  // namespace detail

/// Parses the text of a reference thresholds file (`L{layer}_H{head}:{seqlen} {theta} {num_samples} {k}` per
/// line, as the reference code's `th.txt`). Throws `threshold_file_error` naming `file` and the line.
inline std::vector<ReferenceEntry> parse_reference_thresholds(std::string_view text, const std::string& file) {
  return detail::parse_reference_file(text, file, true);
}

/// Parses the text of a reference denominator-term file (`L{layer}_H{head}:{seqlen} {sdc} {num_samples}` per
/// line, as the reference code's `sdc.txt`). Throws `threshold_file_error` naming `file` and the line.
inline std::vector<ReferenceEntry> parse_reference_denominator_terms(std::string_view text, const std::string& file) {
  return detail::parse_reference_file(text, file, false);
}

/// Builds a table from parsed reference entries. Each layer must hold every head of `import.shape` at the same
/// sequence lengths, with one `k`; the denominator terms, if any, must cover exactly the same (layer, head,
/// length) keys. Lengths are kept exactly (bucket scheme `LengthBuckets::exact_up_to(longest length)`); sample
/// counts are those of the thresholds file; the method is `mean_of_thresholds`.
inline ThresholdTable reference_table(const std::vector<ReferenceEntry>& thresholds,
                                      const std::vector<ReferenceEntry>& denominator_terms,
                                      const ReferenceImport& import, const std::string& thresholds_file,
                                      const std::string& terms_file = "") {
  import.shape.validate("import.shape");
  const ModelShape& shape = import.shape;
  const bool with_terms = !denominator_terms.empty() || !terms_file.empty();
  auto fail = [](const std::string& file, const ReferenceEntry* entry, const std::string& problem) {
    throw threshold_file_error(file, entry ? "line " + std::to_string(entry->line) : "", problem);
  };
  auto key = [](const ReferenceEntry& e) {
    return "L" + std::to_string(e.layer) + "_H" + std::to_string(e.head) + ":" + std::to_string(e.length);
  };
  auto sorted = [&](const std::vector<ReferenceEntry>& entries, const std::string& file) {
    std::vector<const ReferenceEntry*> order;
    for (const auto& entry : entries) {
      if (entry.layer >= shape.layers)
        fail(file, &entry,
             "layer " + std::to_string(entry.layer) + " outside the model's " + std::to_string(shape.layers) +
                 " layers");
      if (entry.head >= shape.q_heads)
        fail(file, &entry,
             "head " + std::to_string(entry.head) + " outside the model's " + std::to_string(shape.q_heads) +
                 " query heads");
      order.push_back(&entry);
    }
    std::sort(order.begin(), order.end(), [](const ReferenceEntry* a, const ReferenceEntry* b) {
      if (a->layer != b->layer) return a->layer < b->layer;
      if (a->length != b->length) return a->length < b->length;
      if (a->head != b->head) return a->head < b->head;
      return a->line < b->line;
    });
    for (std::size_t i = 1; i < order.size(); ++i)
      if (order[i]->layer == order[i - 1]->layer && order[i]->length == order[i - 1]->length &&
          order[i]->head == order[i - 1]->head)
        fail(file, order[i],
             "duplicate key " + key(*order[i]) + " (first at line " + std::to_string(order[i - 1]->line) + ")");
    return order;
  };
  const auto theta_entries = sorted(thresholds, thresholds_file);
  const auto term_entries = sorted(denominator_terms, terms_file);

  // Per layer: the entries [begin, end) in theta_entries, which must form a full heads x lengths grid.
  std::vector<LayerThresholds> layers;
  std::vector<SampleCounts> samples;
  Index longest = 1;
  std::size_t begin = 0;
  for (Index l = 0; l < shape.layers; ++l) {
    std::size_t end = begin;
    while (end < theta_entries.size() && theta_entries[end]->layer == l) ++end;
    if (end == begin)
      fail(thresholds_file, nullptr,
           "no thresholds for layer " + std::to_string(l) + " (the model has " + std::to_string(shape.layers) +
               " layers)");
    const Index k = theta_entries[begin]->k;
    std::vector<Index> lengths;
    for (std::size_t i = begin; i < end; ++i) {
      const ReferenceEntry& entry = *theta_entries[i];
      if (entry.k != k)
        fail(thresholds_file, &entry,
             "k " + std::to_string(entry.k) + " differs from k " + std::to_string(k) + " of layer " +
                 std::to_string(l) + " at line " + std::to_string(theta_entries[begin]->line));
      if (lengths.empty() || lengths.back() != entry.length) lengths.push_back(entry.length);
    }
    // Sorted by (length, head) and free of duplicates: a full grid lists heads 0..H-1 for every length.
    for (std::size_t c = 0; c < lengths.size(); ++c)
      for (Index h = 0; h < shape.q_heads; ++h) {
        const std::size_t i = begin + c * std::size_t(shape.q_heads) + std::size_t(h);
        if (i >= end || theta_entries[i]->length != lengths[c] || theta_entries[i]->head != h)
          fail(thresholds_file, nullptr,
               "no threshold for L" + std::to_string(l) + "_H" + std::to_string(h) + ":" + std::to_string(lengths[c]) +
                   " (every head of a layer needs the same sequence lengths)");
      }
    const Index columns = Index(lengths.size());
    Eigen::MatrixXd theta(shape.q_heads, columns);
    SampleCounts counts(shape.q_heads, columns);
    for (Index c = 0; c < columns; ++c)
      for (Index h = 0; h < shape.q_heads; ++h) {
        const ReferenceEntry& entry = *theta_entries[begin + std::size_t(c * shape.q_heads + h)];
        theta(h, c) = entry.value;
        counts(h, c) = entry.samples;
      }
    longest = std::max(longest, lengths.back());
    layers.emplace_back(k, import.space, std::move(lengths), std::move(theta));
    samples.push_back(std::move(counts));
    begin = end;
  }

  if (with_terms) {
    // The same keys as the thresholds, in the same order once sorted.
    for (std::size_t i = 0; i < theta_entries.size(); ++i) {
      const ReferenceEntry& expected = *theta_entries[i];
      if (i >= term_entries.size() || term_entries[i]->layer != expected.layer ||
          term_entries[i]->length != expected.length || term_entries[i]->head != expected.head) {
        const bool extra = i < term_entries.size() &&
                           std::make_tuple(term_entries[i]->layer, term_entries[i]->length, term_entries[i]->head) <
                               std::make_tuple(expected.layer, expected.length, expected.head);
        if (extra)
          fail(terms_file, term_entries[i],
               "denominator term for " + key(*term_entries[i]) + ", which the thresholds file " + thresholds_file +
                   " lacks");
        fail(terms_file, nullptr,
             "no denominator term for " + key(expected) + " (thresholds file " + thresholds_file + " line " +
                 std::to_string(expected.line) + ")");
      }
    }
    if (term_entries.size() > theta_entries.size())
      fail(terms_file, term_entries[theta_entries.size()],
           "denominator term for " + key(*term_entries[theta_entries.size()]) + ", which the thresholds file " +
               thresholds_file + " lacks");
    std::size_t i = 0;
    for (Index l = 0; l < shape.layers; ++l) {
      const LayerThresholds& layer = layers[std::size_t(l)];
      Eigen::MatrixXd terms(layer.heads(), Index(layer.lengths().size()));
      for (Index c = 0; c < terms.cols(); ++c)
        for (Index h = 0; h < terms.rows(); ++h) terms(h, c) = term_entries[i++]->value;
      layers[std::size_t(l)] = LayerThresholds(layer.k(), layer.space(), layer.lengths(), layer.theta(), terms);
    }
  }
  try {
    return ThresholdTable(shape, import.space, LengthBuckets::exact_up_to(longest),
                          CalibrationMethod::mean_of_thresholds, import.sigma_add, std::move(layers),
                          std::move(samples));
  } catch (const threshold_file_error&) {
    throw;
  } catch (const invalid_argument& error) {
    throw threshold_file_error(thresholds_file, "", error.what());
  }
}

/// Reads the reference implementation's thresholds file (and, if `denominator_terms_file` is not empty, its
/// denominator-term file) into a table; see `reference_table`. Throws `threshold_file_error` naming the file, the
/// line and the problem for a missing, malformed or wrong-shape file.
inline ThresholdTable import_reference_thresholds(const ReferenceImport& import,
                                                  const std::filesystem::path& thresholds_file,
                                                  const std::filesystem::path& denominator_terms_file = {}) {
  const std::string thresholds_name = thresholds_file.string(), terms_name = denominator_terms_file.string();
  const auto thresholds = parse_reference_thresholds(detail::read_file(thresholds_name), thresholds_name);
  std::vector<ReferenceEntry> terms;
  if (!terms_name.empty()) terms = parse_reference_denominator_terms(detail::read_file(terms_name), terms_name);
  return reference_table(thresholds, terms, import, thresholds_name, terms_name);
}

}  // namespace toptheta
