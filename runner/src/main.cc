// llmpress-runner: run an llmpress TVM artifact with nothing but the TVM runtime (no Python).
//
//   llmpress-runner ARTIFACT_DIR [--prompt TEXT | --prompt-ids 1,2,3] [--max-new-tokens N] [--print-ids]
//                   [--no-verify] [--threads N]
//   llmpress-runner --tokenizer TOK.bin (--encode TEXT [--normalize] | --decode 1,2,3)
//
// The second form only tokenizes (a llama2.c-format file): --encode prints the ids of TEXT (no BOS), --decode
// prints the text of the ids (as the first form decodes: BOS/EOS skipped, the text starts as if after BOS id 1).
//
// Greedy decoding from BOS (when the model has one) + the encoded prompt (or exactly the given ids): one prefill
// call, then one decode call per new token, stopping at EOS or BOS (as llama2.c does), after N new tokens, or when
// the KV cache is full.
// Prints the decoded text (everything after the leading BOS) to stdout, or with --print-ids the ids (prompt and
// new, space-separated, one line). Timings go to stderr. Exit status 1 with "llmpress-runner: error: ..." on failure.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "model.h"

namespace {

constexpr const char* kUsage =
    "usage: llmpress-runner ARTIFACT_DIR [--prompt TEXT | --prompt-ids 1,2,3] [--max-new-tokens N] "
    "[--print-ids] [--no-verify] [--threads N]\n"
    "       llmpress-runner --tokenizer TOK.bin (--encode TEXT [--normalize] | --decode 1,2,3)\n";

std::string DecodeText(const llmpress::Tokenizer& tok, const std::vector<int64_t>& ids, int64_t bos,
                       const std::vector<int64_t>& skip) {
  // As llmpress.tokenizer decodes: BOS and every EOS are skipped, the text starts as if after BOS.
  std::string text;
  int64_t prev = bos;
  for (int64_t id : ids) {
    if (std::find(skip.begin(), skip.end(), id) == skip.end()) text += tok.Piece(prev, id, bos);
    prev = id;
  }
  return text;
}

std::vector<int64_t> ParseIds(const std::string& s) {
  std::vector<int64_t> ids;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size()) throw llmpress::RunnerError("--prompt-ids: '" + item + "' is not an integer");
    ids.push_back(v);
  }
  if (ids.empty()) throw llmpress::RunnerError("--prompt-ids: no ids given");
  return ids;
}

int Run(int argc, char** argv) {
  std::string dir, prompt, tok_path, encode_text;
  bool have_prompt = false, have_ids = false, print_ids = false, verify = true, normalize = false;
  bool have_encode = false, have_decode = false;
  std::vector<int64_t> decode_ids;
  std::vector<int64_t> prompt_ids;
  int64_t max_new = 256;
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char* flag) -> std::string {
      if (i + 1 >= argc) throw llmpress::RunnerError(std::string(flag) + " needs a value\n" + kUsage);
      return argv[++i];
    };
    if (a == "--prompt") {
      prompt = value("--prompt");
      have_prompt = true;
    } else if (a == "--prompt-ids") {
      prompt_ids = ParseIds(value("--prompt-ids"));
      have_ids = true;
    } else if (a == "--max-new-tokens") {
      std::string v = value("--max-new-tokens");
      char* end = nullptr;
      max_new = std::strtoll(v.c_str(), &end, 10);
      if (*end != '\0' || max_new < 0) throw llmpress::RunnerError("--max-new-tokens: '" + v + "' is not a count");
    } else if (a == "--threads") {
      std::string v = value("--threads");
      char* end = nullptr;
      long n = std::strtol(v.c_str(), &end, 10);
      if (*end != '\0' || n < 1) throw llmpress::RunnerError("--threads: '" + v + "' is not a positive count");
      threads = static_cast<int>(n);
    } else if (a == "--print-ids") {
      print_ids = true;
    } else if (a == "--tokenizer") {
      tok_path = value("--tokenizer");
    } else if (a == "--encode") {
      encode_text = value("--encode");
      have_encode = true;
    } else if (a == "--decode") {
      decode_ids = ParseIds(value("--decode"));
      have_decode = true;
    } else if (a == "--normalize") {
      normalize = true;
    } else if (a == "--no-verify") {
      verify = false;
    } else if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (!a.empty() && a[0] == '-') {
      throw llmpress::RunnerError("unknown option " + a + "\n" + kUsage);
    } else if (dir.empty()) {
      dir = a;
    } else {
      throw llmpress::RunnerError("unexpected argument " + a + "\n" + kUsage);
    }
  }
  if (!tok_path.empty()) {
    if (!dir.empty() || have_encode == have_decode) {
      throw llmpress::RunnerError(std::string("--tokenizer takes --encode or --decode and no artifact\n") + kUsage);
    }
    llmpress::Tokenizer tok = llmpress::Tokenizer::Load(tok_path);
    if (have_encode) {
      std::vector<int64_t> ids = tok.Encode(encode_text, normalize);
      for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
      std::cout << "\n";
    } else {
      std::cout << DecodeText(tok, decode_ids, 1, {1, 2});
    }
    return 0;
  }
  if (dir.empty()) throw llmpress::RunnerError(std::string("no artifact folder given\n") + kUsage);
  if (have_prompt && have_ids) throw llmpress::RunnerError("give --prompt or --prompt-ids, not both");

  int used_threads = llmpress::ConfigureThreads(threads);
  auto t0 = std::chrono::steady_clock::now();
  llmpress::EdgeModel model(dir, verify);
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const llmpress::LMInfo& lm = model.lm();
  const llmpress::Tokenizer* tok = model.tokenizer();

  std::vector<int64_t> ids = prompt_ids;
  if (!have_ids) {
    ids.clear();
    if (lm.bos_id >= 0) ids.push_back(lm.bos_id);  // a model without BOS (Qwen: bos_token_id null) starts at the prompt
    if (have_prompt && !prompt.empty()) {
      if (tok == nullptr) throw llmpress::RunnerError(dir + ": the artifact has no llama2.c tokenizer; use --prompt-ids");
      for (int64_t id : tok->Encode(prompt, model.normalize_prompt())) ids.push_back(id);
    }
    if (ids.empty()) {
      throw llmpress::RunnerError("this model has no BOS token (lm.bos_id < 0): give --prompt or --prompt-ids");
    }
  }
  for (int64_t id : ids) {
    if (id < 0 || id >= lm.vocab_size) {
      throw llmpress::RunnerError("prompt id " + std::to_string(id) + " is outside the vocabulary of " +
                                  std::to_string(lm.vocab_size));
    }
  }
  llmpress::GenerateStats st;
  std::vector<int64_t> out = llmpress::Greedy(model, ids, max_new, lm.StopIds(), &st);

  if (print_ids) {
    for (size_t i = 0; i < out.size(); ++i) std::cout << (i ? " " : "") << out[i];
    std::cout << "\n";
  } else {
    if (tok == nullptr) throw llmpress::RunnerError(dir + ": the artifact has no llama2.c tokenizer; use --print-ids");
    std::cout << DecodeText(*tok, out, lm.bos_id, lm.StopIds()) << "\n";
  }
  std::cout.flush();
  int64_t decoded = st.new_tokens > 0 ? st.new_tokens - 1 : 0;
  std::fprintf(stderr,
               "llmpress-runner: %s%s%s, %d threads: load %.3f s, prefill %lld tokens %.3f s, decode %lld tokens "
               "%.3f s (%.1f tok/s)\n",
               llmpress::HostArch(), model.variant().empty() ? "" : " ", model.variant().c_str(), used_threads,
               load_s, static_cast<long long>(st.prompt_tokens), st.prefill_s,
               static_cast<long long>(decoded), st.decode_s, st.decode_s > 0 ? decoded / st.decode_s : 0.0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llmpress-runner: error: %s\n", e.what());
    return 1;
  }
}
