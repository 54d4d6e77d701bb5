// A llama2.c `tokenizer.bin`: token pieces and merge scores, decoding ids to text and greedy BPE encoding.
//
// File layout (little-endian): int32 `max_token_length`, then per token id: float32 `score`, int32 `length`,
// `length` bytes of the piece. The number of tokens is the model's vocab_size (not stored in the file).
#pragma once

#include "llama2c/engine/model.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace llama2c {

/// A tokenizer file that cannot be read; what() reads "llama2c: <file>: <problem>".
class tokenizer_error : public std::runtime_error {
 public:
  tokenizer_error(const std::string& file, const std::string& problem)
      : std::runtime_error("llama2c: " + file + ": " + problem) {}
};

/// The token ids llama2.c's vocabularies reserve.
inline constexpr int bos_token = 1;
inline constexpr int eos_token = 2;

/// Pieces and scores of a sentencepiece-style vocabulary as llama2.c stores them.
class Tokenizer {
 public:
  Tokenizer(std::vector<std::string> pieces, std::vector<float> scores, Index max_token_length)
      : pieces_(std::move(pieces)), scores_(std::move(scores)), max_token_length_(max_token_length) {
    for (std::size_t id = 0; id < pieces_.size(); ++id) ids_.emplace(pieces_[id], int(id));
  }

  Index size() const { return Index(pieces_.size()); }
  Index max_token_length() const { return max_token_length_; }
  const std::string& piece(int id) const { return pieces_.at(std::size_t(id)); }
  float score(int id) const { return scores_.at(std::size_t(id)); }

  /// The text of `token` following `previous`, as llama2.c prints it: the leading space of the first piece after
  /// BOS is dropped, and a byte piece `<0xXX>` is that raw byte.
  std::string decode(int previous, int token) const {
    std::string text = piece(token);
    if (previous == bos_token && !text.empty() && text.front() == ' ') text.erase(0, 1);
    unsigned byte = 0;
    char close = 0;
    if (text.size() == 6 && std::sscanf(text.c_str(), "<0x%02X%c", &byte, &close) == 2 && close == '>')
      return std::string(1, char(byte));
    return text;
  }

  /// Ids of `text` (with BOS first when `bos`), llama2.c's way: a dummy space prefix, one piece per UTF-8
  /// character (unknown characters as byte pieces, id = byte + 3), then repeatedly the adjacent pair whose
  /// concatenation is a piece with the highest score is merged, until no pair is a piece.
  std::vector<int> encode(const std::string& text, bool bos = true) const {
    std::vector<int> tokens;
    if (bos) tokens.push_back(bos_token);
    std::vector<int> pieces;
    if (!text.empty()) pieces.push_back(id_of(" "));
    for (std::size_t i = 0; i < text.size();) {
      std::size_t length = 1;  // a UTF-8 character: a lead byte and its continuation bytes (10xxxxxx)
      while (i + length < text.size() && (static_cast<unsigned char>(text[i + length]) & 0xC0) == 0x80 && length < 4)
        ++length;
      const std::string character = text.substr(i, length);
      if (const auto it = ids_.find(character); it != ids_.end()) {
        pieces.push_back(it->second);
      } else {
        for (char byte : character) pieces.push_back(int(static_cast<unsigned char>(byte)) + 3);
      }
      i += length;
    }
    while (true) {
      float best_score = -1e10f;
      int best_id = -1;
      std::size_t best_position = 0;
      for (std::size_t i = 0; i + 1 < pieces.size(); ++i) {
        const auto it = ids_.find(piece(pieces[i]) + piece(pieces[i + 1]));
        if (it != ids_.end() && score(it->second) > best_score) {
          best_score = score(it->second);
          best_id = it->second;
          best_position = i;
        }
      }
      if (best_id < 0) break;
      pieces[best_position] = best_id;
      pieces.erase(pieces.begin() + std::ptrdiff_t(best_position) + 1);
    }
    for (int id : pieces)
      if (id < 0 || id >= int(size()))
        throw std::invalid_argument("llama2c: encode: \"" + text + "\" needs a token (id " + std::to_string(id) +
                                    ") outside this vocabulary of " + std::to_string(size()));
    tokens.insert(tokens.end(), pieces.begin(), pieces.end());
    return tokens;
  }

 private:
  int id_of(const std::string& piece) const {
    const auto it = ids_.find(piece);
    return it == ids_.end() ? -1 : it->second;
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  Index max_token_length_;
  std::unordered_map<std::string, int> ids_;
};

/// Loads `vocab_size` tokens from a llama2.c tokenizer file (`vocab_size` 0: every token up to the end of the
/// file). Throws `tokenizer_error` naming the file and the token for a missing or short file, a negative or
/// too long piece length, or (with `vocab_size` given) bytes left over.
inline Tokenizer load_tokenizer(const std::string& path, Index vocab_size = 0) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw tokenizer_error(path, "cannot open the file (missing or unreadable)");
  std::int32_t max_token_length = 0;
  if (!in.read(reinterpret_cast<char*>(&max_token_length), sizeof max_token_length))
    throw tokenizer_error(path, "truncated: no max_token_length header");
  if (max_token_length < 1 || max_token_length > (1 << 20))
    throw tokenizer_error(path, "max_token_length = " + std::to_string(max_token_length) + ", expected 1 ... 1048576");
  std::vector<std::string> pieces;
  std::vector<float> scores;
  for (Index id = 0; vocab_size == 0 || id < vocab_size; ++id) {
    float score = 0;
    if (!in.read(reinterpret_cast<char*>(&score), sizeof score)) {
      if (vocab_size == 0 && in.gcount() == 0) break;
      throw tokenizer_error(
          path, "truncated at token " + std::to_string(id) + ": expected " + std::to_string(vocab_size) + " tokens");
    }
    std::int32_t length = -1;
    if (!in.read(reinterpret_cast<char*>(&length), sizeof length))
      throw tokenizer_error(path, "truncated in the length of token " + std::to_string(id));
    if (length < 0 || length > max_token_length)
      throw tokenizer_error(path, "token " + std::to_string(id) + ": length " + std::to_string(length) +
                                      ", expected 0 ... max_token_length = " + std::to_string(max_token_length));
    std::string piece(std::size_t(length), '\0');
    if (!in.read(piece.data(), length))
      throw tokenizer_error(path, "truncated in the piece of token " + std::to_string(id));
    pieces.push_back(std::move(piece));
    scores.push_back(score);
  }
  if (vocab_size > 0 && in.peek() != std::char_traits<char>::eof())
    throw tokenizer_error(
        path, "bytes left after " + std::to_string(vocab_size) + " tokens: the file belongs to a larger vocabulary");
  if (pieces.empty()) throw tokenizer_error(path, "no token in the file");
  return Tokenizer(std::move(pieces), std::move(scores), max_token_length);
}

}  // namespace llama2c
