// The library's exceptions: every bad input throws `invalid_argument` (a threshold file `threshold_file_error`).
#pragma once

#include <stdexcept>
#include <string>

namespace toptheta {

/// Thrown for every invalid argument; what() reads "toptheta: <argument>: expected <what>, got <value>".
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Thrown for a threshold file that cannot be read or is invalid; what() reads
/// "toptheta: <file>: <location>: <problem>", the location being a line ("line 12") or a JSON field
/// ("/layers/3/theta/1/7"). A subclass of `invalid_argument`, so one handler catches every bad input.
class threshold_file_error : public invalid_argument {
 public:
  threshold_file_error(const std::string& file, const std::string& location, const std::string& problem)
      : invalid_argument("toptheta: " + file + (location.empty() ? "" : ": " + location) + ": " + problem),
        file_(file),
        location_(location) {}

  const std::string& file() const { return file_; }
  const std::string& location() const { return location_; }

 private:
  std::string file_, location_;
};

}  // namespace toptheta
