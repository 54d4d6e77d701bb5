// Threshold files: a model's `ThresholdTable` as versioned, self-describing JSON, with an exact round trip.
// Needs nlohmann/json (Debian: nlohmann-json3-dev; CMake: nlohmann_json::nlohmann_json); the rest of the
// library does not. The reference implementation's text files are read by reference_thresholds.hpp.
#pragma once

#include <toptheta/detail/file_text.hpp>
#include <toptheta/detail/json_field.hpp>
#include <toptheta/detail/require.hpp>
#include <toptheta/errors.hpp>
#include <toptheta/length_buckets.hpp>
#include <toptheta/reference_thresholds.hpp>
#include <toptheta/threshold_space.hpp>
#include <toptheta/threshold_table.hpp>

#include <nlohmann/json.hpp>

#include <Eigen/Core>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace toptheta {

/// The `"format"` and `"version"` of the threshold files this library writes and reads.
inline constexpr const char* threshold_file_format = "toptheta-thresholds";
inline constexpr int threshold_file_version = 1;

namespace detail {

inline std::string json_row(const Eigen::MatrixXd& values, Index row) {
  nlohmann::json array = nlohmann::json::array();
  for (Index c = 0; c < values.cols(); ++c) array.push_back(values(row, c));
  return array.dump();
}

inline std::string json_row(const SampleCounts& values, Index row) {
  nlohmann::json array = nlohmann::json::array();
  for (Index c = 0; c < values.cols(); ++c) array.push_back(values(row, c));
  return array.dump();
}

}  // namespace detail

/// The table as JSON text (format `toptheta-thresholds`, version 1):
///
///     {"format": "toptheta-thresholds", "version": 1,
///      "model": {"layers", "q_heads", "kv_heads", "head_dim"},
///      "space": "raw_score" | "probability" | "score_minus_max" | "score_over_query_norm",
///      "method": "mean_of_thresholds" | "count_matched" | "mass_matched" | "budget_matched",
///      "sigma_add": number | null,
///      "length_buckets": {"exact_limit", "buckets_per_doubling"},
///      "layers": [{"k", "length_independent", "lengths": [L...],
///                  "theta": [[θ_h(L)...] per head], "denominator_terms": [[c_h(L)...] per head] | null,
///                  "samples": [[rows...] per head]}]}
///
/// Numbers are written in the shortest form that reads back to the same double, so a save/load round trip is
/// bit-exact; counts are exact integers.
inline std::string thresholds_to_json(const ThresholdTable& table) {
  using nlohmann::json;
  const ModelShape& shape = table.shape();
  std::string out = "{\n";
  out += "  \"format\": " + json(threshold_file_format).dump() + ",\n";
  out += "  \"version\": " + std::to_string(threshold_file_version) + ",\n";
  out += "  \"model\": " +
         json{{"layers", shape.layers},
              {"q_heads", shape.q_heads},
              {"kv_heads", shape.kv_heads},
              {"head_dim", shape.head_dim}}
             .dump() +
         ",\n";
  out += "  \"space\": " + json(to_string(table.space())).dump() + ",\n";
  out += "  \"method\": " + json(to_string(table.method())).dump() + ",\n";
  out += "  \"sigma_add\": " + (table.sigma_add() ? json(*table.sigma_add()).dump() : std::string("null")) + ",\n";
  out +=
      "  \"length_buckets\": " +
      json{{"exact_limit", table.buckets().exact_limit}, {"buckets_per_doubling", table.buckets().buckets_per_doubling}}
          .dump() +
      ",\n";
  out += "  \"layers\": [";
  for (Index l = 0; l < table.layers(); ++l) {
    const LayerThresholds& layer = table.layer(l);
    out += l == 0 ? "\n" : ",\n";
    out += "    {\"k\": " + std::to_string(layer.k()) +
           ", \"length_independent\": " + (layer.length_independent() ? "true" : "false") +
           ",\n     \"lengths\": " + json(layer.lengths()).dump() + ",\n     \"theta\": [";
    for (Index h = 0; h < layer.heads(); ++h)
      out += (h == 0 ? "\n      " : ",\n      ") + detail::json_row(layer.theta(), h);
    out += "],\n     \"denominator_terms\": ";
    if (layer.has_denominator_terms()) {
      out += "[";
      for (Index h = 0; h < layer.heads(); ++h)
        out += (h == 0 ? "\n      " : ",\n      ") + detail::json_row(layer.denominator_terms(), h);
      out += "]";
    } else {
      out += "null";
    }
    out += ",\n     \"samples\": [";
    for (Index h = 0; h < layer.heads(); ++h)
      out += (h == 0 ? "\n      " : ",\n      ") + detail::json_row(table.samples(l), h);
    out += "]}";
  }
  out += "\n  ]\n}\n";
  return out;
}

/// Reads a table from JSON text written by `thresholds_to_json`. Throws `threshold_file_error` naming `file`
/// and the line (malformed JSON) or the field (a JSON pointer such as `/layers/2/theta/0/5`) and the problem:
/// wrong format or version, missing or unknown or duplicate fields, wrong types, non-finite numbers, a shape that
/// disagrees with `model`, lengths that are not bucket representatives.
inline ThresholdTable thresholds_from_json(std::string_view text, const std::string& file = "<json>") {
  using nlohmann::json;
  json document;
  const detail::DuplicateKeyCheck parsing(file);
  try {
    document = json::parse(text.begin(), text.end(), parsing);
  } catch (const json::parse_error& error) {
    // nlohmann's message reads "[json.exception.parse_error.101] parse error at line 3, column 5: ...".
    std::string message = error.what();
    const auto at = message.find("at line ");
    std::string location = "byte " + std::to_string(error.byte);
    if (at != std::string::npos) {
      const auto colon = message.find(':', at);
      location = message.substr(at + 3, colon == std::string::npos ? std::string::npos : colon - at - 3);
      message = colon == std::string::npos ? message : message.substr(colon + 2);
    }
    throw threshold_file_error(file, location, "malformed JSON: " + message);
  } catch (const json::out_of_range& error) {  // 406: a number beyond the double range, e.g. 1e309
    throw threshold_file_error(file, parsing.path(),
                               std::string("a number outside the double range (|x| <= 1.8e308): ") + error.what());
  } catch (const json::exception& error) {
    throw threshold_file_error(file, parsing.path(), std::string("malformed JSON: ") + error.what());
  }

  const detail::JsonField root{document, "", file};
  root.only({"format", "version", "model", "space", "method", "sigma_add", "length_buckets", "layers"});
  const std::string format = root.member("format").string();
  if (format != threshold_file_format)
    root.member("format").fail(std::string("expected \"") + threshold_file_format + "\", got \"" + format + "\"");
  const long long version =
      root.member("version").integer(std::numeric_limits<long long>::min(), std::numeric_limits<long long>::max());
  if (version != threshold_file_version)
    root.member("version").fail("unsupported version " + std::to_string(version) + " (this library reads " +
                                std::to_string(threshold_file_version) + ")");

  const detail::JsonField model = root.member("model");
  model.only({"layers", "q_heads", "kv_heads", "head_dim"});
  constexpr long long most = 1 << 20;
  ModelShape shape;
  shape.layers = Index(model.member("layers").integer(1, most));
  shape.q_heads = Index(model.member("q_heads").integer(1, most));
  shape.kv_heads = Index(model.member("kv_heads").integer(1, most));
  shape.head_dim = Index(model.member("head_dim").integer(1, most));
  if (shape.q_heads % shape.kv_heads != 0)
    model.member("kv_heads")
        .fail("expected a divisor of q_heads (" + std::to_string(shape.q_heads) + "), got " +
              std::to_string(shape.kv_heads));

  ThresholdSpace space{};
  CalibrationMethod method{};
  try {
    space = threshold_space_from_string(root.member("space").string());
  } catch (const threshold_file_error&) {
    throw;
  } catch (const invalid_argument& error) {
    root.member("space").fail(error.what());
  }
  try {
    method = calibration_method_from_string(root.member("method").string());
  } catch (const threshold_file_error&) {
    throw;
  } catch (const invalid_argument& error) {
    root.member("method").fail(error.what());
  }
  std::optional<double> sigma_add;
  if (!root.member("sigma_add").value.is_null()) sigma_add = root.member("sigma_add").number();

  const detail::JsonField bucket_field = root.member("length_buckets");
  bucket_field.only({"exact_limit", "buckets_per_doubling"});
  LengthBuckets buckets;
  buckets.exact_limit = Index(bucket_field.member("exact_limit").integer(1, LengthBuckets::max_length));
  buckets.buckets_per_doubling = Index(bucket_field.member("buckets_per_doubling").integer(1, 1 << 16));
  try {
    buckets.validate("length_buckets");
  } catch (const invalid_argument& error) {
    bucket_field.fail(error.what());
  }

  const detail::JsonField layer_array = root.member("layers");
  layer_array.array_size(std::size_t(shape.layers), "model.layers");
  std::vector<LayerThresholds> layers;
  std::vector<SampleCounts> samples;
  for (Index l = 0; l < shape.layers; ++l) {
    const detail::JsonField layer = layer_array.element(std::size_t(l));
    layer.only({"k", "length_independent", "lengths", "theta", "denominator_terms", "samples"});
    const Index k = Index(layer.member("k").integer(1, LengthBuckets::max_length));
    const bool length_independent = layer.member("length_independent").boolean();
    const detail::JsonField length_array = layer.member("lengths");
    const std::size_t columns = length_array.array_size();
    if (columns == 0) length_array.fail("expected at least one calibrated length, got none");
    if (length_independent && columns != 1)
      length_array.fail("expected one length for a length-independent layer, got " + std::to_string(columns));
    std::vector<Index> lengths;
    for (std::size_t c = 0; c < columns; ++c)
      lengths.push_back(Index(length_array.element(c).integer(1, LengthBuckets::max_length)));

    auto matrix = [&](const detail::JsonField& field, auto& into, auto read) {
      field.array_size(std::size_t(shape.q_heads), "one per query head, model.q_heads");
      into.resize(shape.q_heads, Index(columns));
      for (Index h = 0; h < shape.q_heads; ++h) {
        const detail::JsonField row = field.element(std::size_t(h));
        row.array_size(columns, "one per length");
        for (std::size_t c = 0; c < columns; ++c) into(h, Index(c)) = read(row.element(c));
      }
    };
    Eigen::MatrixXd theta, terms;
    SampleCounts counts;
    matrix(layer.member("theta"), theta, [](const detail::JsonField& f) { return f.number(); });
    const detail::JsonField term_field = layer.member("denominator_terms");
    if (!term_field.value.is_null()) {
      matrix(term_field, terms, [](const detail::JsonField& f) {
        const double term = f.number();
        if (term < 0) f.fail("expected a denominator term >= 0, got " + f.value.dump());
        return term;
      });
    }
    matrix(layer.member("samples"), counts, [](const detail::JsonField& f) { return f.count(); });
    try {
      if (length_independent) {
        std::vector<double> theta_per_head(theta.data(), theta.data() + theta.size());
        std::vector<double> terms_per_head(terms.data(), terms.data() + terms.size());
        layers.push_back(LayerThresholds::uniform(k, space, theta_per_head, terms_per_head));
      } else {
        layers.emplace_back(k, space, std::move(lengths), std::move(theta), std::move(terms));
      }
    } catch (const invalid_argument& error) {
      layer.fail(error.what());
    }
    samples.push_back(std::move(counts));
  }
  try {
    return ThresholdTable(shape, space, buckets, method, sigma_add, std::move(layers), std::move(samples));
  } catch (const invalid_argument& error) {
    root.fail(error.what());
  }
}

/// Writes `thresholds_to_json(table)` to `path`; throws `threshold_file_error` if the file cannot be written.
inline void save_thresholds(const ThresholdTable& table, const std::filesystem::path& path) {
  const std::string text = thresholds_to_json(table);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw threshold_file_error(path.string(), "", "cannot open the file for writing");
  out << text;
  out.close();
  if (!out) throw threshold_file_error(path.string(), "", "write error");
}

/// Reads a table written by `save_thresholds`; see `thresholds_from_json` for the errors.
inline ThresholdTable load_thresholds(const std::filesystem::path& path) {
  return thresholds_from_json(detail::read_file(path.string()), path.string());
}

}  // namespace toptheta
