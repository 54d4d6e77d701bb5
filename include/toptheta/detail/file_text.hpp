// Reading a threshold file's text, and quoting it in messages.
#pragma once

#include <toptheta/errors.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace toptheta::detail {

/// The whole content of `path`; throws `threshold_file_error` when it cannot be opened or read.
inline std::string read_file(const std::string& path) {
  std::error_code error;
  if (std::filesystem::is_directory(path, error)) throw threshold_file_error(path, "", "is a directory, not a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw threshold_file_error(path, "", "cannot open the file for reading");
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) throw threshold_file_error(path, "", "read error");
  return content.str();
}

/// At most `limit` characters of `text` for a message, control characters shown as '?'.
inline std::string excerpt(const std::string& text, std::size_t limit = 60) {
  std::string shown = text.substr(0, limit);
  for (char& c : shown)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  return "\"" + shown + (text.size() > limit ? "...\"" : "\"");
}

}  // namespace toptheta::detail
