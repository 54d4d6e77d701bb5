// The exception for a missing, unreadable or invalid threshold file.
#pragma once

#include <toptheta/detail/require.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace toptheta {

/// Thrown for a threshold file that cannot be read or is invalid; what() reads
/// "toptheta: <file>: <location>: <problem>", the location being a line ("line 12") or a JSON field
/// ("/layers/3/theta/1/7"). A subclass of `invalid_argument`, so one handler catches every bad input.
class threshold_file_error : public invalid_argument {
 public:
  threshold_file_error(const std::string& file, const std::string& location, const std::string& problem)
      : invalid_argument("toptheta: " + file + (location.empty() ? "" : ": " + location) + ": " + problem),
        file_(file), location_(location) {}

  const std::string& file() const { return file_; }
  const std::string& location() const { return location_; }

 private:
  std::string file_, location_;
};

namespace detail {

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

}  // namespace detail
}  // namespace toptheta
