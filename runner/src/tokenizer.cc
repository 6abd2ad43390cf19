#include "tokenizer.h"

#include <cstring>

#include "common.h"

namespace llmpress {

Tokenizer Tokenizer::Load(const std::string& path) {
  std::string bytes = ReadFile(path);
  Tokenizer tok;
  tok.path_ = path;
  size_t pos = 0;
  auto read = [&](void* dst, size_t n, const char* what) {
    if (pos + n > bytes.size()) {
      throw RunnerError(path + ": truncated llama2.c tokenizer (reading " + what + " of token " +
                        std::to_string(tok.pieces_.size()) + ")");
    }
    std::memcpy(dst, bytes.data() + pos, n);
    pos += n;
  };
  int32_t max_len = 0;
  read(&max_len, 4, "max_token_length");
  if (max_len <= 0) throw RunnerError(path + ": not a llama2.c tokenizer (max_token_length " +
                                      std::to_string(max_len) + ")");
  while (pos < bytes.size()) {
    float score = 0;
    int32_t len = 0;
    read(&score, 4, "the score");
    read(&len, 4, "the length");
    if (len < 0 || len > max_len) throw RunnerError(path + ": token " + std::to_string(tok.pieces_.size()) +
                                                    " has length " + std::to_string(len));
    std::string piece(static_cast<size_t>(len), '\0');
    if (len) read(&piece[0], static_cast<size_t>(len), "the bytes");
    tok.index_.emplace(piece, static_cast<int64_t>(tok.pieces_.size()));  // first id wins on duplicates
    tok.pieces_.push_back(std::move(piece));
    tok.scores_.push_back(score);
  }
  if (tok.pieces_.empty()) throw RunnerError(path + ": tokenizer holds no tokens");
  return tok;
}

int64_t Tokenizer::Lookup(const std::string& piece) const {
  auto it = index_.find(piece);
  return it == index_.end() ? -1 : it->second;
}

std::vector<int64_t> Tokenizer::Encode(const std::string& raw, bool normalize) const {
  std::string text;
  if (normalize) {
    for (char c : raw) {
      if (c == ' ' && (text.empty() || text.back() == ' ')) continue;
      text.push_back(c);
    }
    if (!text.empty() && text.back() == ' ') text.pop_back();
  } else {
    text = raw;
  }
  std::vector<int64_t> ids;
  if (text.empty()) return ids;
  int64_t space = Lookup(" ");
  if (space < 0) throw RunnerError(path_ + ": no ' ' piece for the dummy prefix");
  ids.push_back(space);
  std::string cp;
  for (size_t i = 0; i < text.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(text[i]);
    if ((c & 0xC0) != 0x80) cp.clear();
    cp.push_back(static_cast<char>(c));
    bool next_is_cont = i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80;
    if (next_is_cont && cp.size() < 4) continue;
    int64_t id = Lookup(cp);
    if (id >= 0) {
      ids.push_back(id);
    } else {
      for (unsigned char b : cp) ids.push_back(static_cast<int64_t>(b) + 3);  // byte fallback: <0x00> is id 3
    }
    cp.clear();
  }
  while (true) {
    float best = -1e10f;
    int64_t best_id = -1;
    size_t best_idx = 0;
    for (size_t i = 0; i + 1 < ids.size(); ++i) {
      int64_t id = Lookup(pieces_[ids[i]] + pieces_[ids[i + 1]]);
      if (id >= 0 && scores_[id] > best) {
        best = scores_[id];
        best_id = id;
        best_idx = i;
      }
    }
    if (best_id < 0) break;
    ids[best_idx] = best_id;
    ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_idx) + 1);
  }
  return ids;
}

std::string Tokenizer::Piece(int64_t prev, int64_t id, int64_t bos_id) const {
  if (id < 0 || static_cast<size_t>(id) >= pieces_.size()) {
    throw RunnerError(path_ + ": token id " + std::to_string(id) + " is outside the vocabulary of " +
                      std::to_string(pieces_.size()));
  }
  std::string piece = pieces_[id];
  if (prev == bos_id && !piece.empty() && piece[0] == ' ') piece.erase(0, 1);
  unsigned int byte = 0;
  char tail = 0;
  if (piece.size() == 6 && std::sscanf(piece.c_str(), "<0x%02X%c", &byte, &tail) == 2 && tail == '>') {
    return std::string(1, static_cast<char>(byte));
  }
  return piece;
}

}  // namespace llmpress
