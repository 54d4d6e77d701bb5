// Argument checks that throw with a message naming the argument and what was expected.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace toptheta {

/// Thrown for every invalid argument; what() reads "toptheta: <argument>: expected <what>, got <value>".
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

template <class Got>
[[noreturn]] void fail(const std::string& argument, const std::string& expected, const Got& got) {
  std::ostringstream message;
  message << "toptheta: " << argument << ": expected " << expected << ", got " << got;
  throw invalid_argument(message.str());
}

/// Throws `invalid_argument` naming `argument` unless `condition` holds.
template <class Got>
void require(bool condition, const std::string& argument, const std::string& expected, const Got& got) {
  if (!condition) fail(argument, expected, got);
}

}  // namespace detail
}  // namespace toptheta
