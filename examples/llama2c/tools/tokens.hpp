// Token sequences as text: one sequence per line, token ids separated by white space.
#pragma once

#include "llama2c/engine/model.hpp"

#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama2c {

/// A token file that cannot be read; what() reads "llama2c: <file>:<line>: <problem>" (line 0: the whole file).
class token_file_error : public std::runtime_error {
 public:
  token_file_error(const std::string& file, Index line, const std::string& problem)
      : std::runtime_error("llama2c: " + file + ":" + std::to_string(line) + ": " + problem),
        file_(file),
        line_(line) {}
  const std::string& file() const { return file_; }
  Index line() const { return line_; }

 private:
  std::string file_;
  Index line_;
};

/// The integer `word` spells in full (decimal, optional sign), or nothing.
inline std::optional<long long> parse_integer(const std::string& word) {
  std::size_t used = 0;
  try {
    const long long value = std::stoll(word, &used);
    if (used == word.size()) return value;
  } catch (const std::exception&) {
  }
  return std::nullopt;
}

/// Reads the sequences of `path`: one per non-blank line, ids in [0, `vocab_size`) ([0, INT_MAX) when
/// `vocab_size` is 0). Throws `token_file_error` naming the file and line for a missing file, a word that is
/// not an integer, an id out of range, or a file without any sequence.
inline std::vector<std::vector<int>> read_token_file(const std::string& path, Index vocab_size = 0) {
  std::ifstream in(path);
  if (!in) throw token_file_error(path, 0, "cannot open the file (missing or unreadable)");
  std::vector<std::vector<int>> sequences;
  std::string line;
  for (Index number = 1; std::getline(in, line); ++number) {
    std::istringstream words(line);
    std::vector<int> tokens;
    for (std::string word; words >> word;) {
      const std::optional<long long> id = parse_integer(word);
      if (!id) throw token_file_error(path, number, "expected a token id, got \"" + word + "\"");
      const long long end = vocab_size > 0 ? vocab_size : std::numeric_limits<int>::max();
      if (*id < 0 || *id >= end)
        throw token_file_error(path, number, "token id " + word + " outside [0, " + std::to_string(end) + ")");
      tokens.push_back(int(*id));
    }
    if (!tokens.empty()) sequences.push_back(std::move(tokens));
  }
  if (in.bad()) throw token_file_error(path, 0, "read failed");
  if (sequences.empty()) throw token_file_error(path, 0, "no token sequence in the file");
  return sequences;
}

}  // namespace llama2c
