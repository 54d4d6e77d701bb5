// Reading JSON with messages that name the field: a value with its JSON-pointer path, and a parser callback
// that rejects duplicate keys. Needs nlohmann/json (threshold_io.hpp, its only user, says so).
#pragma once

#include <toptheta/errors.hpp>
#include <toptheta/scalar_traits.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace toptheta::detail {

/// A JSON value and its JSON-pointer path, for messages that name the field.
struct JsonField {
  const nlohmann::json& value;
  std::string path;
  const std::string& file;

  [[noreturn]] void fail(const std::string& problem) const {
    throw threshold_file_error(file, path.empty() ? "/" : path, problem);
  }

  std::string kind() const {
    if (value.is_null()) return "null";
    if (value.is_boolean()) return "a boolean";
    if (value.is_number()) return "a number";
    if (value.is_string()) return "a string";
    if (value.is_array()) return "an array";
    return "an object";
  }

  /// Member `name` of this object (which must have no members but `allowed`).
  JsonField member(const char* name) const {
    if (!value.is_object()) fail("expected an object, got " + kind());
    const auto found = value.find(name);
    if (found == value.end())
      throw threshold_file_error(file, path.empty() ? "/" : path, std::string("missing field \"") + name + "\"");
    return {*found, path + "/" + name, file};
  }
  bool has(const char* name) const { return value.is_object() && value.contains(name); }
  void only(std::initializer_list<const char*> allowed) const {
    if (!value.is_object()) fail("expected an object, got " + kind());
    for (const auto& item : value.items()) {
      bool known = false;
      for (const char* name : allowed) known = known || item.key() == name;
      if (!known) throw threshold_file_error(file, path + "/" + item.key(), "unknown field");
    }
  }

  JsonField element(std::size_t index) const { return {value[index], path + "/" + std::to_string(index), file}; }
  std::size_t array_size(std::optional<std::size_t> expected = std::nullopt, const std::string& what = "") const {
    if (!value.is_array()) fail("expected an array, got " + kind());
    if (expected && value.size() != *expected)
      fail("expected " + std::to_string(*expected) + " elements" + (what.empty() ? "" : " (" + what + ")") + ", got " +
           std::to_string(value.size()));
    return value.size();
  }

  long long integer(long long lowest, long long highest) const {
    long long result = 0;
    if (value.is_number_unsigned()) {
      const auto u = value.get<std::uint64_t>();
      if (u > std::uint64_t(std::numeric_limits<long long>::max()))
        result = std::numeric_limits<long long>::max();
      else
        result = (long long)u;
    } else if (value.is_number_integer()) {
      result = value.get<long long>();
    } else {
      fail("expected an integer, got " + kind());
    }
    if (result < lowest || result > highest)
      fail("expected an integer in [" + std::to_string(lowest) + ", " + std::to_string(highest) + "], got " +
           value.dump());
    return result;
  }
  std::uint64_t count() const {
    if (!value.is_number_unsigned() && !(value.is_number_integer() && value.get<long long>() >= 0))
      fail("expected a count (an integer >= 0), got " + (value.is_number() ? value.dump() : kind()));
    return value.get<std::uint64_t>();
  }
  double number() const {
    if (!value.is_number()) fail("expected a finite number, got " + kind());
    const double result = value.get<double>();
    if (!std::isfinite(result)) fail("expected a finite number, got " + value.dump());
    return result;
  }
  std::string string() const {
    if (!value.is_string()) fail("expected a string, got " + kind());
    return value.get<std::string>();
  }
  bool boolean() const {
    if (!value.is_boolean()) fail("expected true or false, got " + kind());
    return value.get<bool>();
  }
};

/// Rejects duplicate keys while parsing (nlohmann keeps the last one silently), naming the object's path, and
/// knows the path of the value being parsed (copies share it: the parser keeps a copy of its callback).
class DuplicateKeyCheck {
 public:
  explicit DuplicateKeyCheck(const std::string& file) : file_(&file), scopes_(std::make_shared<std::vector<Scope>>()) {}

  /// The JSON pointer of the value the parser is at, e.g. `/layers/0/theta/1/3`.
  std::string path() const {
    std::string result;
    for (const Scope& scope : *scopes_) result += "/" + (scope.object ? scope.key : std::to_string(scope.index));
    return result;
  }

  bool operator()(int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using event_t = nlohmann::json::parse_event_t;
    switch (event) {
      case event_t::object_start:
        scopes_->push_back({true, {}, {}, 0});
        break;
      case event_t::array_start:
        scopes_->push_back({false, {}, {}, 0});
        break;
      case event_t::object_end:
      case event_t::array_end:
        if (!scopes_->empty()) scopes_->pop_back();
        element_done();
        break;
      case event_t::key: {
        Scope& scope = scopes_->back();
        scope.key = parsed.get<std::string>();
        if (!scope.keys.insert(scope.key).second)
          throw threshold_file_error(*file_, path(), "duplicate key \"" + scope.key + "\"");
        break;
      }
      case event_t::value:
        element_done();
        break;
    }
    return true;
  }

 private:
  struct Scope {
    bool object;
    std::set<std::string> keys;
    std::string key;
    std::size_t index;
  };

  void element_done() {
    if (!scopes_->empty() && !scopes_->back().object) ++scopes_->back().index;
  }

  const std::string* file_;
  std::shared_ptr<std::vector<Scope>> scopes_;
};

}  // namespace toptheta::detail
