// Threshold files: the reference implementation's text files, and the versioned JSON format with an exact round
// trip; every malformed file gets a threshold_file_error naming the file, the line or field, and the problem.
#include "test_support.hpp"

#include <toptheta/calibrator.hpp>
#include <toptheta/reference_thresholds.hpp>

#if __has_include(<nlohmann/json.hpp>)
#include <toptheta/threshold_io.hpp>
#define TOPTHETA_TEST_JSON 1
#endif

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

using namespace toptheta;
using namespace toptheta_test;
namespace {

namespace fs = std::filesystem;

/// A fresh directory under the system's temporary directory, removed with everything in it at scope exit.
struct TemporaryDirectory {
  fs::path path;

  TemporaryDirectory() {
    std::random_device entropy;
    path = fs::temp_directory_path() / ("toptheta-test-" + std::to_string(entropy()) + std::to_string(entropy()));
    fs::create_directories(path);
  }
  ~TemporaryDirectory() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  fs::path write(const std::string& name, const std::string& content) const {
    const fs::path file = path / name;
    std::ofstream(file, std::ios::binary) << content;
    return file;
  }
};

/// Two layers of two heads, as the reference code writes them (layer by layer, head by head, lengths sorted).
const char* const reference_thresholds_text =
    "L0_H0:5 0.5 10 4\n"
    "L0_H0:9 1.25 7 4\n"
    "L0_H1:5 -0.5 10 4\n"
    "L0_H1:9 1e-05 7 4\n"
    "L1_H0:17 3.0 2 16\n"
    "L1_H1:17 2.5 2 16\n";
const char* const reference_terms_text =
    "L0_H0:5 0.25 10\n"
    "L0_H0:9 0.125 7\n"
    "L0_H1:5 0.0 10\n"
    "L0_H1:9 2.0 7\n"
    "L1_H0:17 1.5 2\n"
    "L1_H1:17 0.75 2\n";

ReferenceImport two_by_two() {
  ReferenceImport import;
  import.shape = {2, 2, 1, 64};
  return import;
}

/// Imports `text` as a thresholds file named `name` and returns the error message ("" if it imported).
std::string import_error(const std::string& text, ReferenceImport import = two_by_two(),
                         const std::string& terms = "") {
  TemporaryDirectory directory;
  const fs::path file = directory.write("th.txt", text);
  const fs::path terms_file = terms.empty() ? fs::path() : directory.write("sdc.txt", terms);
  try {
    import_reference_thresholds(import, file, terms_file);
  } catch (const threshold_file_error& error) {
    return error.what();
  }
  return "";
}

bool bitwise_equal(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

bool bitwise_equal(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (Index i = 0; i < a.size(); ++i)
    if (!bitwise_equal(a.data()[i], b.data()[i])) return false;
  return true;
}

}  // namespace

TEST_CASE("the reference text files import into a table with their thresholds, terms, k and sample counts",
          "[threshold_io][reference]") {
  TemporaryDirectory directory;
  const fs::path thresholds = directory.write("th.txt", reference_thresholds_text);
  const fs::path terms = directory.write("sdc.txt", reference_terms_text);
  ReferenceImport import = two_by_two();
  import.space = ThresholdSpace::probability;
  import.sigma_add = 0.5;
  const ThresholdTable table = import_reference_thresholds(import, thresholds, terms);
  CHECK(table.shape() == import.shape);
  CHECK(table.space() == ThresholdSpace::probability);
  CHECK(table.method() == CalibrationMethod::mean_of_thresholds);
  CHECK(table.sigma_add() == 0.5);
  CHECK(table.buckets() == LengthBuckets::exact_up_to(17));
  CHECK(table.k(0) == 4);
  CHECK(table.k(1) == 16);
  CHECK(table.layer(0).lengths() == std::vector<Index>{5, 9});
  CHECK(table.layer(1).lengths() == std::vector<Index>{17});
  CHECK(table.lookup(0, 0, 5).theta == 0.5);
  CHECK(table.lookup(0, 0, 9).theta == 1.25);
  CHECK(table.lookup(0, 1, 9).theta == 1e-05);
  CHECK(table.lookup(0, 1, 5).denominator_term == 0.0);
  CHECK(table.lookup(0, 1, 9).denominator_term == 2.0);
  CHECK(table.lookup(1, 1, 17).theta == 2.5);
  CHECK(table.lookup(1, 0, 17).denominator_term == 1.5);
  CHECK(table.lookup(0, 0, 7).theta == Approx(0.875).epsilon(1e-15));  // interpolated
  CHECK_FALSE(table.lookup(0, 0, 7).extrapolated);
  CHECK(table.lookup(0, 0, 4).extrapolated);
  CHECK(table.lookup(0, 0, 10).extrapolated);
  CHECK(table.samples(0)(0, 1) == 7);
  CHECK(table.samples(1)(1, 0) == 2);

  // Without the denominator-term file, and with the layers and heads in any order, CRLF and extra blanks.
  const fs::path shuffled =
      directory.write("shuffled.txt",
                      "\r\nL1_H1:17   2.5\t2 16\r\n  L0_H1:9 1e-05 7 4  \nL0_H0:9 1.25 7 4\nL0_H1:5 -0.5 10 4\n\n"
                      "L1_H0:17 3.0 2 16\nL0_H0:5 0.5 10 4");
  const ThresholdTable same = import_reference_thresholds(two_by_two(), shuffled);
  CHECK_FALSE(same.layer(0).has_denominator_terms());
  CHECK(same.layer(0).theta() == table.layer(0).theta());
  CHECK(same.layer(1).theta() == table.layer(1).theta());
  CHECK_FALSE(same.sigma_add().has_value());
}

TEST_CASE("a missing, truncated or malformed reference file is rejected naming the file, the line and the problem",
          "[threshold_io][reference][bad_input]") {
  SECTION("missing or not a file") {
    TemporaryDirectory directory;
    const std::string missing = (directory.path / "absent.txt").string();
    CHECK_THROWS_WITH(import_reference_thresholds(two_by_two(), missing), mentions(missing) && mentions("cannot open"));
    CHECK_THROWS_WITH(import_reference_thresholds(two_by_two(), directory.path),
                      mentions(directory.path.string()) && mentions("directory"));
    const fs::path thresholds = directory.write("th.txt", reference_thresholds_text);
    CHECK_THROWS_WITH(import_reference_thresholds(two_by_two(), thresholds, directory.path / "sdc.txt"),
                      mentions("sdc.txt") && mentions("cannot open"));
  }
  struct Case {
    const char* what;
    std::string text;
    std::string line, problem;
  };
  const std::string good = reference_thresholds_text;
  const Case cases[] = {
      {"bad key syntax", "L0-H0:5 0.5 10 4\n", "line 1", "expected '_H' after the layer"},
      {"no 'L'", good + "X1_H0:3 1 1 1\n", "line 7", "expected 'L'"},
      {"no ':'", "L0_H0 5 0.5 10 4\n", "line 1", "expected ':' after the head"},
      {"truncated line", good + "L1_H0:1", "line 7", "expected a space before the threshold"},
      {"missing k", "L0_H0:5 0.5 10\n", "line 1", "expected a space before k"},
      {"NaN threshold", "L0_H0:5 nan 10 4\n", "line 1", "threshold is not finite"},
      {"infinite threshold", "L0_H0:5 -inf 10 4\n", "line 1", "threshold is not finite"},
      {"huge threshold", "L0_H0:5 1e999 10 4\n", "line 1", "out of the range of double"},
      {"text threshold", "L0_H0:5 abc 10 4\n", "line 1", "expected the threshold as a number"},
      {"trailing text", "L0_H0:5 0.5 10 4 extra\n", "line 1", "unexpected text after the last field"},
      {"zero length", "L0_H0:0 0.5 10 4\n", "line 1", "sequence length 0 outside [1, "},
      {"zero samples", "L0_H0:5 0.5 0 4\n", "line 1", "sample count 0 outside"},
      {"zero k", "L0_H0:5 0.5 10 0\n", "line 1", "k 0 outside"},
      {"negative layer", "L-1_H0:5 0.5 10 4\n", "line 1", "the layer -1 outside"},
      {"overflowing integer", "L0_H0:99999999999999999999 0.5 10 4\n", "line 1", "sequence length"},
      {"duplicate key", good + "L0_H1:9 2.0 7 4\n", "line 7", "duplicate key L0_H1:9 (first at line 4)"},
      {"k differs in a layer", "L0_H0:5 0.5 10 4\nL0_H1:5 0.5 10 5\nL1_H0:5 1 1 4\nL1_H1:5 1 1 4\n", "line 2",
       "k 5 differs from k 4 of layer 0"},
      {"head outside the model", good + "L0_H2:5 0.5 10 4\n", "line 7", "head 2 outside the model's 2 query heads"},
      {"layer outside the model", good + "L2_H0:5 0.5 10 4\n", "line 7", "layer 2 outside the model's 2 layers"},
      {"a head without a length", "L0_H0:5 0.5 10 4\nL0_H0:9 1 1 4\nL0_H1:9 1 1 4\nL1_H0:5 1 1 4\nL1_H1:5 1 1 4\n", "",
       "no threshold for L0_H1:5"},
      {"a missing layer", "L0_H0:5 0.5 10 4\nL0_H1:5 1 1 4\n", "", "no thresholds for layer 1"},
      {"empty file", "", "", "no thresholds for layer 0"},
  };
  for (const Case& c : cases) {
    const std::string message = import_error(c.text);
    INFO(c.what << ": " << message);
    CHECK_THAT(message, mentions("th.txt") && mentions(c.line) && mentions(c.problem));
  }
  // Denominator terms that do not match the thresholds.
  const std::string terms = reference_terms_text;
  CHECK_THAT(import_error(good, two_by_two(), "L0_H0:5 0.25 10\n"),
             mentions("sdc.txt") && mentions("no denominator term for L0_H1:5"));
  CHECK_THAT(import_error(good, two_by_two(), terms + "L0_H0:7 1 1\n"),
             mentions("sdc.txt: line 7") && mentions("L0_H0:7, which the thresholds file"));
  CHECK_THAT(import_error(good, two_by_two(), terms + "L1_H1:99 1 1\n"),
             mentions("sdc.txt: line 7") && mentions("L1_H1:99, which the thresholds file"));
  CHECK_THAT(import_error(good, two_by_two(), "L0_H0:5 -0.25 10\n"),
             mentions("sdc.txt: line 1") && mentions("denominator term is negative"));
  CHECK_THAT(import_error(good, two_by_two(), "L0_H0:5 0.25 10 4\n"),
             mentions("sdc.txt: line 1") && mentions("unexpected text after the last field"));
  // A file for a model with more heads than expected.
  ReferenceImport three_heads = two_by_two();
  three_heads.shape.q_heads = 3;
  three_heads.shape.kv_heads = 3;
  CHECK_THAT(import_error(good, three_heads), mentions("no threshold for L0_H2:5"));
  // Every exception is a toptheta::invalid_argument.
  TemporaryDirectory directory;
  CHECK_THROWS_AS(import_reference_thresholds(two_by_two(), directory.write("bad.txt", "garbage")),
                  toptheta::invalid_argument);
}

#ifdef TOPTHETA_TEST_JSON

namespace {

/// A calibrated two-layer table with denominator terms, a keep-all layer and a head filled from its neighbours.
ThresholdTable calibrated_table(CalibrationMethod method) {
  CalibratorOptions options;
  options.shape = {3, 2, 1, 32};
  options.space = ThresholdSpace::score_over_query_norm;
  options.k = {4, 6, 1000};
  options.buckets = {16, 4};
  Calibrator calibrator(options);
  std::mt19937 rng(3);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (int r = 0; r < 300; ++r) {
    const Index length = 5 + r % 90;
    Eigen::VectorXd row(length);
    for (Index j = 0; j < length; ++j) row(j) = 2 * normal(rng);
    calibrator.observe_row(r % 2, (r / 2) % 2, row, 1.5 + normal(rng) * 0.1);
  }
  TableOptions table_options;
  table_options.method = method;
  table_options.sigma_add = method == CalibrationMethod::mean_of_thresholds ? 0.25 : 0.0;
  table_options.missing = MissingCalibration::keep_all;
  return calibrator.table(table_options);
}

void check_identical(const ThresholdTable& a, const ThresholdTable& b) {
  CHECK(a.shape() == b.shape());
  CHECK(a.space() == b.space());
  CHECK(a.buckets() == b.buckets());
  CHECK(a.method() == b.method());
  CHECK(a.sigma_add().has_value() == b.sigma_add().has_value());
  if (a.sigma_add() && b.sigma_add()) CHECK(bitwise_equal(*a.sigma_add(), *b.sigma_add()));
  REQUIRE(a.layers() == b.layers());
  for (Index l = 0; l < a.layers(); ++l) {
    INFO("layer " << l);
    CHECK(a.k(l) == b.k(l));
    CHECK(a.layer(l).length_independent() == b.layer(l).length_independent());
    CHECK(a.layer(l).lengths() == b.layer(l).lengths());
    CHECK(a.layer(l).calibrated_range() == b.layer(l).calibrated_range());
    CHECK(bitwise_equal(a.layer(l).theta(), b.layer(l).theta()));
    CHECK(bitwise_equal(a.layer(l).denominator_terms(), b.layer(l).denominator_terms()));
    CHECK(a.samples(l) == b.samples(l));
  }
}

/// `thresholds_from_json(text)`'s error message ("" if it read).
std::string json_error(const std::string& text) {
  try {
    thresholds_from_json(text, "table.json");
  } catch (const threshold_file_error& error) {
    return error.what();
  }
  return "";
}

/// `text` parsed, changed by `change`, and written compactly.
std::string modified(const std::string& text, const std::function<void(nlohmann::json&)>& change) {
  nlohmann::json document = nlohmann::json::parse(text);
  change(document);
  return document.dump();
}

/// `text` with the first occurrence of `from` replaced by `to`.
std::string replaced(std::string text, const std::string& from, const std::string& to) {
  const auto at = text.find(from);
  REQUIRE(at != std::string::npos);
  return text.replace(at, from.size(), to);
}

}  // namespace

TEST_CASE("a threshold table survives a JSON round trip bit for bit", "[threshold_io][json]") {
  for (const auto method : {CalibrationMethod::mean_of_thresholds, CalibrationMethod::count_matched}) {
    const ThresholdTable table = calibrated_table(method);
    INFO(to_string(method));
    REQUIRE(table.layer(2).length_independent());  // k = 1000: no row longer, kept whole
    const std::string text = thresholds_to_json(table);
    check_identical(thresholds_from_json(text), table);
    CHECK(thresholds_to_json(thresholds_from_json(text)) == text);
  }
  // Doubles of every kind: random bit patterns, subnormals, extremes, negative zero.
  std::mt19937_64 rng(17);
  Eigen::MatrixXd theta(3, 40), terms(3, 40);
  for (Index i = 0; i < theta.size(); ++i) {
    double value;
    do {
      const std::uint64_t bits = rng();
      std::memcpy(&value, &bits, sizeof value);
    } while (!std::isfinite(value));
    theta.data()[i] = value;
    terms.data()[i] = std::abs(value);
  }
  const double special[] = {-0.0,
                            0.0,
                            5e-324,
                            2.2250738585072009e-308,
                            std::numeric_limits<double>::max(),
                            std::numeric_limits<double>::lowest(),
                            0.1,
                            1.0 / 3,
                            -1e-300,
                            123456789.125};
  for (std::size_t i = 0; i < std::size(special); ++i) {
    theta(0, Index(i)) = special[i];
    terms(1, Index(i)) = std::abs(special[i]);
  }
  std::vector<Index> lengths;
  for (Index c = 0; c < 40; ++c) lengths.push_back(c + 1);
  SampleCounts samples = SampleCounts::Constant(3, 40, std::numeric_limits<std::uint64_t>::max());
  samples(2, 5) = 0;
  const ThresholdTable table({1, 3, 3, 8}, ThresholdSpace::raw_score, LengthBuckets{64, 16},
                             CalibrationMethod::mean_of_thresholds, -0.0,
                             {LayerThresholds(7, ThresholdSpace::raw_score, lengths, theta, terms)}, {samples});
  check_identical(thresholds_from_json(thresholds_to_json(table)), table);

  TemporaryDirectory directory;
  const fs::path file = directory.path / "thresholds.json";
  save_thresholds(table, file);
  check_identical(load_thresholds(file), table);
  CHECK_THROWS_WITH(save_thresholds(table, directory.path / "absent" / "t.json"), mentions("cannot open"));
}

TEST_CASE(
    "a missing, truncated or malformed JSON threshold file is rejected naming the file, the line or field, "
    "and the problem",
    "[threshold_io][json][bad_input]") {
  const std::string good = thresholds_to_json(calibrated_table(CalibrationMethod::count_matched));
  REQUIRE(json_error(good).empty());
  struct Case {
    const char* what;
    std::string text;
    std::string location, problem;
  };
  const Case cases[] = {
      {"truncated", good.substr(0, good.size() / 2), "line ", "malformed JSON"},
      {"empty", "", "line 1, column 1", "malformed JSON"},
      {"not JSON", "L0_H0:5 0.5 10 4", "line 1", "malformed JSON"},
      {"NaN literal", replaced(good, "\"sigma_add\": null", "\"sigma_add\": NaN"), "line 7", "malformed JSON"},
      {"overflowing number", replaced(good, "\"sigma_add\": null", "\"sigma_add\": 1e400"), "/sigma_add",
       "outside the double range"},
      {"overflowing threshold", replaced(good, "\"theta\": [\n      [", "\"theta\": [\n      [1e309,"),
       "/layers/0/theta/0/0", "outside the double range"},
      {"wrong format", replaced(good, "toptheta-thresholds", "other"), "/format", "expected \"toptheta-thresholds\""},
      {"wrong version", replaced(good, "\"version\": 1", "\"version\": 2"), "/version", "unsupported version 2"},
      {"version as text", replaced(good, "\"version\": 1", "\"version\": \"1\""), "/version", "expected an integer"},
      {"missing field", replaced(good, "\"space\"", "\"spaces\""), "/spaces", "unknown field"},
      {"unknown space", replaced(good, "score_over_query_norm", "scores"), "/space", "one of raw_score"},
      {"unknown method", replaced(good, "count_matched", "median"), "/method", "one of mean_of_thresholds"},
      {"wrong head count", replaced(good, "\"q_heads\":2", "\"q_heads\":3"), "/layers/0/theta",
       "expected 3 elements (one per query head"},
      {"kv heads do not divide", replaced(good, "\"kv_heads\":1", "\"kv_heads\":3"), "/model/kv_heads",
       "divisor of q_heads"},
      {"wrong layer count", replaced(good, "\"layers\":3", "\"layers\":4"), "/layers", "expected 4 elements"},
      {"null theta", modified(good, [](auto& j) { j["layers"][1]["theta"][0][2] = nullptr; }), "/layers/1/theta/0/2",
       "expected a finite number, got null"},
      {"theta as text", modified(good, [](auto& j) { j["layers"][0]["theta"][1][0] = "x"; }), "/layers/0/theta/1/0",
       "expected a finite number, got a string"},
      {"short theta row", modified(good, [](auto& j) { j["layers"][0]["theta"][1].erase(0); }), "/layers/0/theta/1",
       "(one per length)"},
      {"missing samples", modified(good, [](auto& j) { j["layers"][0].erase("samples"); }), "/layers/0",
       "missing field \"samples\""},
      {"negative k", replaced(good, "\"k\": 4", "\"k\": -4"), "/layers/0/k", "expected an integer in [1, "},
      {"duplicate key", replaced(good, "\"k\": 4,", "\"k\": 4, \"k\": 5,"), "/layers/0/k", "duplicate key \"k\""},
      {"duplicate top-level key", replaced(good, "\"version\": 1,", "\"version\": 1, \"version\": 1,"), "/version",
       "duplicate key"},
      {"negative sample count", modified(good, [](auto& j) { j["layers"][0]["samples"][0][0] = -1; }),
       "/layers/0/samples/0/0", "expected a count"},
      {"length not an integer", replaced(good, "\"lengths\": [5,", "\"lengths\": [5.5,"), "/layers/0/lengths/0",
       "expected an integer"},
      {"sigma_add with count_matched", replaced(good, "\"sigma_add\": null", "\"sigma_add\": 1.0"), "/",
       "sigma_add: expected none for count_matched"},
      {"trailing garbage", good + "x", "line ", "malformed JSON"},
  };
  for (const Case& c : cases) {
    const std::string message = json_error(c.text);
    INFO(c.what << ": " << message);
    CHECK_THAT(message, mentions("table.json") && mentions(c.location) && mentions(c.problem));
  }
  // Semantic errors found by the table: lengths that are not representatives, out of order, bad terms.
  const ThresholdTable small(
      {1, 1, 1, 8}, ThresholdSpace::raw_score, LengthBuckets{4, 2}, CalibrationMethod::mean_of_thresholds, 0.0,
      {LayerThresholds(2, ThresholdSpace::raw_score, {3, 5}, Eigen::MatrixXd::Ones(1, 2), Eigen::MatrixXd::Zero(1, 2))},
      {SampleCounts::Ones(1, 2)});
  const std::string text = thresholds_to_json(small);
  CHECK_THAT(json_error(replaced(text, "[3,5]", "[3,7]")),
             mentions("table.json: /:") && mentions("layers[0].lengths[1]") && mentions("representative"));
  CHECK_THAT(json_error(replaced(text, "[3,5]", "[5,3]")), mentions("/layers/0") && mentions("increasing order"));
  CHECK_THAT(json_error(replaced(text, "[0.0,0.0]", "[0.0,-1.0]")),
             mentions("/layers/0/denominator_terms/0/1") && mentions(">= 0"));
  CHECK_THAT(json_error(replaced(text, "\"length_independent\": false", "\"length_independent\": 0")),
             mentions("/layers/0/length_independent") && mentions("true or false"));

  TemporaryDirectory directory;
  const std::string missing = (directory.path / "absent.json").string();
  CHECK_THROWS_WITH(load_thresholds(missing), mentions(missing) && mentions("cannot open"));
  CHECK_THROWS_AS(load_thresholds(directory.write("bad.json", "{")), toptheta::invalid_argument);
}

#endif  // TOPTHETA_TEST_JSON
