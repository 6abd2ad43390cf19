// An llmpress artifact loaded into the TVM Relax VM.
//
// The artifact folder holds manifest.json, the exported VM library (payload.lib, e.g. model.so), the weights in
// safetensors (payload.weights) and, optionally, a llama2.c-format tokenizer. The VM functions follow the LM
// calling convention of llmpress.ir.capture_hf, with the weights appended as parameters in payload.params order:
//
//   prefill/decode(input_ids int64[1,T], start_pos int64[1], k_0, v_0, ..., k_{L-1}, v_{L-1}, *weights)
//       -> (logits float32[1,T,V], k_0', v_0', ...)
//
// Caches are [1, n_kv_heads, cache_len, head_dim]; prefill takes the prompt (dynamic T), decode takes T = 1.
// When the library has a `transform_params` function (relax LiftTransformParams: weight layout changes lifted
// out of the functions), it is called once on the weights (one array argument) and its outputs are what the
// functions take instead.
#pragma once

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "tokenizer.h"

namespace llmpress {

// One cache tensor of the calling convention: its name, shape without the batch dimension, and dtype.
struct CacheSpec {
  std::string name;
  std::vector<int64_t> shape;
  DLDataType dtype;
};

struct LMInfo {
  int64_t n_layers = 0, n_kv_heads = 0, head_dim = 0, cache_len = 0, vocab_size = 0;
  int64_t bos_id = 1, eos_id = 2;
  // Every end-of-sequence id (config.json + generation_config.json); empty means just eos_id.
  std::vector<int64_t> eos_ids;
  // Tokens that end greedy generation, as llmpress.ir.meta.LMInfo.stop_ids: every EOS id, then BOS; negative ids
  // (a model without BOS) are none.
  std::vector<int64_t> StopIds() const;
  // In call order: the manifest's lm.caches (e.g. int8 codes + float32 scales after kv_quant), or
  // k_0, v_0, k_1, ... of [n_kv_heads, cache_len, head_dim] lm.cache_dtype when it lists none.
  std::vector<CacheSpec> caches;
};

// The machine this runner was built for, spelled as the manifest spells it ("x86_64", "aarch64").
const char* HostArch();

// Size TVM's CPU thread pool before the first parallel job: `threads` > 0, else TVM_NUM_THREADS, else every CPU in
// this process's affinity mask (TVM's own default is half of the hardware threads on x86). Returns the count set.
int ConfigureThreads(int threads);

// The CPU feature flags of this machine (/proc/cpuinfo "flags" on x86, "Features" on Arm); empty if unreadable.
std::set<std::string> HostCpuFlags();

class EdgeModel {
 public:
  // Load and check the artifact in `dir` (manifest, file sizes and sha256, architecture, weights).
  explicit EdgeModel(const std::string& dir, bool verify_hashes = true);

  const LMInfo& lm() const { return lm_; }
  // The build that runs: "" for the base library, else the variant's name (e.g. "cpu+avx512vnni").
  const std::string& variant() const { return variant_; }
  const Tokenizer* tokenizer() const { return tokenizer_ ? &*tokenizer_ : nullptr; }
  bool normalize_prompt() const { return normalize_prompt_; }

  // Zero the KV caches.
  void Reset();
  // Run `tokens` at positions start_pos.. (prefill when T > 1 or start_pos == 0, else decode); returns the
  // logits of the last position and keeps the updated caches.
  std::vector<float> Step(const std::vector<int64_t>& tokens, int64_t start_pos);

 private:
  std::string dir_;
  LMInfo lm_;
  std::optional<Tokenizer> tokenizer_;
  bool normalize_prompt_ = false;
  std::string variant_;
  std::optional<tvm::ffi::Module> lib_, vm_;  // not default-constructible: set in the constructor
  tvm::ffi::Function prefill_, decode_;
  std::vector<tvm::ffi::Tensor> caches_, weights_;
};

// Greedy generation with the semantics of llmpress.eval.generate.greedy: returns prompt + new ids; at most
// min(max_new_tokens, cache_len - len(prompt)) new ids; stops after appending an id in `stop_ids`.
struct GenerateStats {
  int64_t prompt_tokens = 0, new_tokens = 0;
  double prefill_s = 0, decode_s = 0;
};
std::vector<int64_t> Greedy(EdgeModel& model, const std::vector<int64_t>& prompt, int64_t max_new_tokens,
                            const std::vector<int64_t>& stop_ids, GenerateStats* stats);

}  // namespace llmpress
