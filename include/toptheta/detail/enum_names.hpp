// Names of the library's enumerations: one table per enumeration gives both its `to_string` and its parser.
#pragma once

#include <toptheta/detail/require.hpp>

#include <cstddef>
#include <string>

namespace toptheta::detail {

/// One enumerator and the name `to_string` prints for it.
template <class Enum>
struct EnumName {
  Enum value;
  const char* name;
};

/// The name of `value` in `names` ("unknown" for a value the table does not list).
template <class Enum, std::size_t N>
const char* name_of(Enum value, const EnumName<Enum> (&names)[N]) {
  for (const EnumName<Enum>& entry : names)
    if (entry.value == value) return entry.name;
  return "unknown";
}

/// The enumerator `names` calls `text`.
/// \throws invalid_argument naming `argument`, listing the names, for any other text.
template <class Enum, std::size_t N>
Enum value_named(const std::string& text, const EnumName<Enum> (&names)[N], const std::string& argument) {
  for (const EnumName<Enum>& entry : names)
    if (text == entry.name) return entry.value;
  std::string expected = "one of";
  for (std::size_t i = 0; i < N; ++i) expected += std::string(i == 0 ? " " : ", ") + names[i].name;
  fail(argument, expected, text);
}

}  // namespace toptheta::detail
