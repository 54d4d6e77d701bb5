// Command-line options of the `llama2c` subcommands, on CLI11: declared per subcommand, parsed, typed, with
// `--help`.
#pragma once

#include <toptheta/scalar_traits.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama2c {

using toptheta::Index;

/// A command line that cannot be run: what() names the flag and what was expected (or the subcommand). Programs
/// exit with status 2 on it.
class usage_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// One option of a subcommand.
struct OptionSpec {
  std::string name;        ///< without the leading "--"
  std::string value_name;  ///< e.g. "FILE", "K"; empty for a flag, which takes no value
  std::string help;
  std::optional<std::string> default_value;  ///< used when the option is not given
  bool required = false;
};

/// The options of one subcommand: what it accepts, and, after `parse`, what was given.
///
/// CLI11 parses: every option is `--name value` (or `--name=value`) except flags, which are `--name` alone;
/// `--help` (or `-h`) anywhere asks for `help()`. The typed getters check the values and throw `usage_error`
/// naming the flag and the expected value.
class CommandLine {
 public:
  CommandLine(std::string program, std::string command, std::string summary, std::vector<OptionSpec> options)
      : program_(std::move(program)),
        command_(std::move(command)),
        options_(std::move(options)),
        app_(std::make_unique<CLI::App>(std::move(summary), program_ + " " + command_)) {
    for (const OptionSpec& spec : options_) {
      CLI::Option* option = spec.value_name.empty() ? app_->add_flag("--" + spec.name, spec.help)
                                                    : app_->add_option("--" + spec.name, spec.help);
      if (spec.value_name.empty()) {
        option->disable_flag_override();  // `--flag=value` is an error, not a way to turn it off
      } else {
        option->type_name(spec.value_name)->multi_option_policy(CLI::MultiOptionPolicy::Throw);
        if (spec.default_value) option->default_str(*spec.default_value);
      }
      if (spec.required) option->required();
    }
  }

  /// Parses `arguments` (those after the subcommand's name). Throws `usage_error` for an unknown option, a
  /// missing value, a value given to a flag, a repeated option, a stray word, or (unless `--help` was given) a
  /// missing required option: CLI11's message, with the subcommand and where its options are listed.
  void parse(const std::vector<std::string>& arguments) {
    std::vector<std::string> words = arguments;
    std::reverse(words.begin(), words.end());  // CLI11 takes the words last first
    try {
      app_->parse(words);
    } catch (const CLI::CallForHelp&) {
      help_requested_ = true;
    } catch (const CLI::ParseError& error) {
      throw usage_error(command_ + ": " + error.what() + " (see " + program_ + " " + command_ + " --help)");
    }
  }

  bool help_requested() const { return help_requested_; }

  /// CLI11's usage line, summary and one line per option with its default.
  std::string help() const { return app_->help(); }

  /// True when the option was given on the command line (defaults do not count).
  bool given(const std::string& name) const { return option(name).count() > 0; }

  /// A flag: true when given.
  bool flag(const std::string& name) const { return given(name); }

  /// The option's text: as given, else its default. Throws when neither exists.
  std::string text(const std::string& name) const {
    const OptionSpec& declared = spec(name);
    if (given(name)) return option(name).as<std::string>();
    if (declared.default_value) return *declared.default_value;
    throw usage_error("--" + name + ": required here, expected " + declared.value_name);
  }

  /// The option's text, which must name an existing file.
  std::string input_file(const std::string& name) const {
    const std::string path = text(name);
    std::error_code error;
    if (!std::filesystem::is_regular_file(path, error))
      throw usage_error("--" + name + ": expected an existing file, got \"" + path + "\"");
    return path;
  }

  /// An integer in [min, max].
  long long integer(const std::string& name, long long min = std::numeric_limits<long long>::min(),
                    long long max = std::numeric_limits<long long>::max()) const {
    return parse_integer(name, text(name), min, max);
  }

  /// A finite number in [min, max].
  double real(const std::string& name, double min = -std::numeric_limits<double>::max(),
              double max = std::numeric_limits<double>::max()) const {
    const std::string value = text(name);
    std::size_t used = 0;
    double number = std::numeric_limits<double>::quiet_NaN();
    try {
      number = std::stod(value, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != value.size() || !std::isfinite(number) || number < min || number > max)
      throw usage_error("--" + name + ": expected a number" + range_text(min, max, -limit<double>(), limit<double>()) +
                        ", got \"" + value + "\"");
    return number;
  }

  /// A comma-separated list of integers, each in [min, max], at least one.
  std::vector<Index> integer_list(const std::string& name, long long min = std::numeric_limits<long long>::min(),
                                  long long max = std::numeric_limits<long long>::max()) const {
    const std::string value = text(name);
    std::vector<Index> list;
    std::size_t start = 0;
    while (true) {
      const std::size_t comma = value.find(',', start);
      const std::string item = value.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      try {
        list.push_back(Index(parse_integer(name, item, min, max)));
      } catch (const usage_error&) {
        throw usage_error("--" + name + ": expected comma-separated integers" +
                          range_text(min, max, -limit<long long>(), limit<long long>()) + ", got \"" + value + "\"");
      }
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
    return list;
  }

  /// One of `choices`, returned as given.
  std::string choice(const std::string& name, const std::vector<std::string>& choices) const {
    const std::string value = text(name);
    std::string listed;
    for (const std::string& candidate : choices) {
      if (value == candidate) return value;
      listed += (listed.empty() ? "" : ", ") + candidate;
    }
    throw usage_error("--" + name + ": expected one of " + listed + ", got \"" + value + "\"");
  }

 private:
  const OptionSpec* find(const std::string& name) const {
    for (const OptionSpec& option : options_)
      if (option.name == name) return &option;
    return nullptr;
  }
  /// The declared option `name`; asking for an undeclared one is a programming error.
  const OptionSpec& spec(const std::string& name) const {
    if (const OptionSpec* option = find(name)) return *option;
    throw std::logic_error("llama2c: " + command_ + " declares no option --" + name);
  }
  const CLI::Option& option(const std::string& name) const { return *app_->get_option("--" + spec(name).name); }

  static long long parse_integer(const std::string& name, const std::string& value, long long min, long long max) {
    std::size_t used = 0;
    long long number = 0;
    try {
      number = std::stoll(value, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != value.size() || number < min || number > max)
      throw usage_error("--" + name + ": expected an integer" +
                        range_text(min, max, -limit<long long>(), limit<long long>()) + ", got \"" + value + "\"");
    return number;
  }

  template <class T>
  static T limit() {
    return std::numeric_limits<T>::max();
  }
  /// " in [min, max]", " >= min", " <= max" or "" for the bounds that are not the type's own.
  template <class T>
  static std::string range_text(T min, T max, T lowest, T highest) {
    const auto text = [](T x) {
      std::ostringstream out;
      out << x;
      return out.str();
    };
    if (min > lowest && max < highest) return " in [" + text(min) + ", " + text(max) + "]";
    if (min > lowest) return " >= " + text(min);
    if (max < highest) return " <= " + text(max);
    return "";
  }

  std::string program_, command_;
  std::vector<OptionSpec> options_;
  std::unique_ptr<CLI::App> app_;  // not movable itself
  bool help_requested_ = false;
};

}  // namespace llama2c
