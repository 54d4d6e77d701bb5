// Argument checks that throw with a message naming the argument and what was expected.
#pragma once

#include <toptheta/errors.hpp>

#include <sstream>
#include <string>

namespace toptheta {
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
