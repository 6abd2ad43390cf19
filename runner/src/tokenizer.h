// The llama2.c tokenizer ("tok*.bin"): int32 max_token_length, then per token id a float32 score, an int32 byte
// length and the piece bytes (spaces already in place of sentencepiece's "\u2581"; byte pieces spelled "<0xAB>").
//
// Encoding follows llama2.c's run.c: a dummy-prefix space piece when the text is not empty, one piece per UTF-8
// code point (or its bytes as ids byte + 3 when the code point is not a piece), then repeatedly merge the adjacent
// pair whose concatenation is a piece with the highest score (first such pair on ties) until none is left.
// Decoding concatenates pieces; the piece right after BOS drops its leading space; "<0xAB>" becomes byte 0xAB.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace llmpress {

class Tokenizer {
 public:
  static Tokenizer Load(const std::string& path);

  // No BOS/EOS added. `normalize`: first collapse runs of spaces and strip leading/trailing spaces, as
  // sentencepiece's remove_extra_whitespaces does (manifest "edge_tokenizer_normalize").
  std::vector<int64_t> Encode(const std::string& text, bool normalize = false) const;
  // The text of `id` following `prev` (the piece right after `bos_id` loses its leading space).
  std::string Piece(int64_t prev, int64_t id, int64_t bos_id) const;
  size_t size() const { return pieces_.size(); }

 private:
  int64_t Lookup(const std::string& piece) const;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int64_t> index_;
  std::string path_;
};

}  // namespace llmpress
