#include "model.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <sched.h>
#include <sys/stat.h>

#include "common.h"
#include "safetensors.h"
#include "sha256.h"

namespace llmpress {

std::set<std::string> HostCpuFlags() {
  // /proc/cpuinfo: "flags : ..." on x86, "Features : ..." on Arm (the spelling the manifest's features use).
  std::set<std::string> out;
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    key.erase(key.find_last_not_of(" \t") + 1);
    if (key != "flags" && key != "Features") continue;
    std::istringstream words(line.substr(colon + 1));
    std::string w;
    while (words >> w) out.insert(w);
    break;
  }
  return out;
}

int ConfigureThreads(int threads) {
  std::vector<std::string> cpus;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int i = 0; i < CPU_SETSIZE; ++i) {
      if (CPU_ISSET(i, &set)) cpus.push_back(std::to_string(i));
    }
  }
  if (cpus.empty()) cpus.push_back("0");
  int n = threads;
  if (n <= 0) {
    const char* env = std::getenv("TVM_NUM_THREADS");
    n = env != nullptr && std::atoi(env) > 0 ? std::atoi(env) : static_cast<int>(cpus.size());
  }
  // kSpecifyThreadShareAllCore (-3): every worker may run on every listed CPU; the list bounds the pool size.
  std::vector<ffi::String> listed;
  for (size_t i = 0; i < std::max(cpus.size(), static_cast<size_t>(n)); ++i) listed.push_back(cpus[i % cpus.size()]);
  auto config = ffi::Function::GetGlobal("runtime.config_threadpool");
  if (!config.has_value()) throw RunnerError("the TVM runtime has no runtime.config_threadpool");
  (*config)(-3, n, ffi::Array<ffi::String>(listed.begin(), listed.end()));
  return n;
}

namespace ffi = tvm::ffi;

namespace {

constexpr int kDeviceCPU = 1;        // DLPack kDLCPU
constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR

std::string NormArch(const std::string& a) {
  if (a == "arm64" || a == "aarch64") return "aarch64";
  if (a == "x86-64" || a == "x86_64" || a == "amd64") return "x86_64";
  return a;
}

bool IsFile(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

void VerifyFiles(const std::string& dir, const JsonObject& manifest, bool hashes) {
  if (!manifest.Has("files")) return;
  JsonObject files = manifest.Obj("files");
  for (const std::string& rel : files.Keys()) {
    std::string path = dir + "/" + rel;
    if (!IsFile(path)) throw RunnerError(path + ": missing from the artifact");
    // files: {name: {"sha256": ..., "bytes": ...}} (llmpress.artifact) or {name: sha256}.
    std::string want_sha;
    int64_t want_bytes = -1;
    if (auto rec = [&]() -> std::optional<JsonObject> {
          try { return files.Obj(rel); } catch (const RunnerError&) { return std::nullopt; }
        }()) {
      if (rec->Has("bytes")) want_bytes = rec->Int("bytes");
      if (rec->Has("sha256")) want_sha = rec->Str("sha256");
    } else {
      want_sha = files.Str(rel);
    }
    std::string bytes = ReadFile(path);
    if (want_bytes >= 0 && static_cast<int64_t>(bytes.size()) != want_bytes) {
      throw RunnerError(path + ": truncated or altered (" + std::to_string(bytes.size()) +
                        " bytes, manifest records " + std::to_string(want_bytes) + ")");
    }
    if (hashes && !want_sha.empty() && Sha256Hex(bytes) != want_sha) {
      throw RunnerError(path + ": damaged (sha256 differs from the manifest)");
    }
  }
}

ffi::Tensor FromIds(const std::vector<int64_t>& ids) {
  ffi::Tensor t = EmptyCPU({1, static_cast<int64_t>(ids.size())}, DLDataType{kDLInt, 64, 1});
  std::memcpy(t.data_ptr(), ids.data(), ids.size() * sizeof(int64_t));
  return t;
}

}  // namespace

const char* HostArch() {
#if defined(__aarch64__)
  return "aarch64";
#elif defined(__x86_64__)
  return "x86_64";
#else
  return "unknown";
#endif
}

std::vector<int64_t> LMInfo::StopIds() const {
  std::vector<int64_t> ids = eos_ids.empty() ? std::vector<int64_t>{eos_id} : eos_ids;
  ids.push_back(bos_id);
  std::vector<int64_t> out;
  for (int64_t id : ids) {
    if (id >= 0 && std::find(out.begin(), out.end(), id) == out.end()) out.push_back(id);
  }
  return out;
}

EdgeModel::EdgeModel(const std::string& dir, bool verify_hashes) : dir_(dir) {
  std::string mpath = dir + "/manifest.json";
  if (!IsFile(mpath)) throw RunnerError(mpath + ": missing; " + dir + " is not an llmpress artifact");
  JsonObject manifest = JsonObject::Parse(ReadFile(mpath), mpath);
  if (manifest.IsNull("lm")) throw RunnerError(mpath + ": lm: this artifact is not a causal LM with a KV cache");
  JsonObject lm = manifest.Obj("lm");
  lm_.n_layers = lm.Int("n_layers");
  lm_.n_kv_heads = lm.Int("n_kv_heads");
  lm_.head_dim = lm.Int("head_dim");
  lm_.cache_len = lm.Int("cache_len");
  lm_.vocab_size = lm.Int("vocab_size");
  if (lm.Has("bos_id")) lm_.bos_id = lm.Int("bos_id");
  if (lm.Has("eos_id")) lm_.eos_id = lm.Int("eos_id");
  if (lm.Has("eos_ids") && !lm.IsNull("eos_ids")) lm_.eos_ids = lm.IntList("eos_ids");
  DLDataType cache_dtype{kDLFloat, 32, 1};
  if (lm.Has("cache_dtype")) cache_dtype = ParseDType(lm.Str("cache_dtype"), lm.where() + ": cache_dtype");
  if (lm.Has("caches") && !lm.IsNull("caches")) {
    for (const JsonObject& c : lm.ObjList("caches")) {
      lm_.caches.push_back({c.Str("name"), c.IntList("shape"), ParseDType(c.Str("dtype"), c.where() + ": dtype")});
    }
  }
  if (lm_.caches.empty()) {
    for (int64_t i = 0; i < lm_.n_layers; ++i) {
      for (const char* kv : {"k_", "v_"}) {
        lm_.caches.push_back({kv + std::to_string(i), {lm_.n_kv_heads, lm_.cache_len, lm_.head_dim}, cache_dtype});
      }
    }
  }

  if (manifest.IsNull("payload")) throw RunnerError(mpath + ": payload: missing (not a TVM artifact?)");
  JsonObject payload = manifest.Obj("payload");
  std::string arch;
  if (payload.Has("arch")) {
    arch = payload.Str("arch");
  } else if (manifest.Has("target") && manifest.Obj("target").Has("arch")) {
    arch = manifest.Obj("target").Str("arch");
  }
  if (!arch.empty() && NormArch(arch) != HostArch()) {
    throw RunnerError(mpath + ": the artifact is built for " + arch + ", this runner runs on " + HostArch() +
                      " (use the " + NormArch(arch) + " runner, e.g. under qemu-" + NormArch(arch) + ")");
  }
  VerifyFiles(dir, manifest, verify_hashes);

  // Weights, in VM parameter order.
  std::string wpath = dir + "/" + payload.Str("weights");
  std::map<std::string, ffi::Tensor> by_name = LoadSafetensors(wpath);
  if (payload.Has("sparse_weights") && !payload.IsNull("sparse_weights")) {
    ExpandSparseWeights(&by_name, payload.Obj("sparse_weights"));  // stored compressed: back to the dense tensors
  }
  for (const std::string& name : payload.StrList("params")) {
    auto it = by_name.find(name);
    if (it == by_name.end()) throw RunnerError(wpath + ": no tensor '" + name + "' (listed in payload.params)");
    weights_.push_back(it->second);
  }

  // The VM: load the exported library, create the VM from its executable, initialise it for the CPU. An artifact
  // may carry more capable builds of the same program (payload.variants, e.g. AVX-512 VNNI): run the last one
  // whose CPU features this machine has.
  std::string lpath = dir + "/" + payload.Str("lib");
  if (payload.Has("variants") && !payload.IsNull("variants")) {
    std::set<std::string> flags = HostCpuFlags();
    for (const JsonObject& v : payload.ObjList("variants")) {
      std::vector<std::string> need = v.Obj("target").StrList("features");
      bool ok = !flags.empty();
      for (const std::string& f : need) ok = ok && flags.count(f) > 0;
      if (ok) {
        lpath = dir + "/" + v.Str("lib");
        variant_ = v.Str("name");
      }
    }
  }
  if (!IsFile(lpath)) throw RunnerError(lpath + ": missing from the artifact");
  lib_ = ffi::Module::LoadFromFile(lpath);
  auto load_exec = (*lib_)->GetFunction("vm_load_executable", true);
  if (!load_exec.has_value()) throw RunnerError(lpath + ": not a Relax VM executable (no vm_load_executable)");
  vm_ = (*load_exec)().cast<ffi::Module>();
  auto init = (*vm_)->GetFunction("vm_initialization", false);
  if (!init.has_value()) throw RunnerError(lpath + ": the VM has no vm_initialization");
  (*init)(kDeviceCPU, 0, kPooledAllocator);
  std::vector<std::string> fns = {"prefill", "decode"};
  if (payload.Has("functions")) fns = payload.StrList("functions");
  auto get = [&](const std::string& name) {
    auto f = (*vm_)->GetFunction(name, false);
    if (!f.has_value()) throw RunnerError(lpath + ": the VM has no function '" + name + "'");
    return *f;
  };
  // Weight-only work lifted out of the functions at build time (e.g. transposed linear weights): run it once.
  if (auto transform = (*vm_)->GetFunction("transform_params", false)) {
    ffi::Any out = (*transform)(ffi::Array<ffi::Tensor>(weights_.begin(), weights_.end()));
    auto arr = out.as<ffi::Array<ffi::Any>>();
    if (!arr.has_value()) throw RunnerError(lpath + ": transform_params returned " + std::string(out.GetTypeKey()));
    weights_.clear();
    for (const ffi::Any& t : *arr) weights_.push_back(t.cast<ffi::Tensor>());
  }
  // Generation reads the last position's logits only: prefill_last (when built) computes just those.
  bool has_last = std::find(fns.begin(), fns.end(), "prefill_last") != fns.end();
  prefill_ = get(has_last ? "prefill_last" : std::find(fns.begin(), fns.end(), "prefill") != fns.end() ? "prefill"
                                                                                                       : fns.at(0));
  decode_ = std::find(fns.begin(), fns.end(), "decode") != fns.end() ? get("decode") : prefill_;

  // Tokenizer (optional): a llama2.c-format file, named by "edge_tokenizer" or by "tokenizer" when it is one.
  std::string tok;
  if (manifest.Has("edge_tokenizer") && !manifest.IsNull("edge_tokenizer")) {
    tok = manifest.Str("edge_tokenizer");
  } else if (manifest.Has("tokenizer") && !manifest.IsNull("tokenizer")) {
    std::string t = manifest.Str("tokenizer");
    if (t.size() > 4 && t.substr(t.size() - 4) == ".bin") tok = t;
  }
  if (!tok.empty()) tokenizer_ = Tokenizer::Load(dir + "/" + tok);
  if (manifest.Has("edge_tokenizer_normalize") && !manifest.IsNull("edge_tokenizer_normalize")) {
    auto v = manifest.Bool("edge_tokenizer_normalize");
    normalize_prompt_ = v;
  }
  Reset();
}

void EdgeModel::Reset() {
  caches_.clear();
  for (const CacheSpec& c : lm_.caches) {  // zero-filled (EmptyCPU), as every runner's empty cache is
    std::vector<int64_t> shape{1};
    shape.insert(shape.end(), c.shape.begin(), c.shape.end());
    caches_.push_back(EmptyCPU(shape, c.dtype));
  }
}

std::vector<float> EdgeModel::Step(const std::vector<int64_t>& tokens, int64_t start_pos) {
  if (tokens.empty()) throw RunnerError("Step() needs at least one token");
  if (start_pos + static_cast<int64_t>(tokens.size()) > lm_.cache_len) {
    throw RunnerError("positions up to " + std::to_string(start_pos + tokens.size()) + " do not fit the " +
                      std::to_string(lm_.cache_len) + "-position KV cache");
  }
  ffi::Tensor ids = FromIds(tokens);
  ffi::Tensor pos = EmptyCPU({1}, DLDataType{kDLInt, 64, 1});
  static_cast<int64_t*>(pos.data_ptr())[0] = start_pos;
  std::vector<ffi::AnyView> args;
  args.reserve(2 + caches_.size() + weights_.size());
  args.emplace_back(ids);
  args.emplace_back(pos);
  for (const auto& c : caches_) args.emplace_back(c);
  for (const auto& w : weights_) args.emplace_back(w);
  const ffi::Function& fn = (tokens.size() == 1 && start_pos > 0) ? decode_ : prefill_;
  ffi::Any rv;
  fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &rv);
  auto outs = rv.as<ffi::Array<ffi::Any>>();
  if (!outs.has_value() || outs->size() != 1 + caches_.size()) {
    throw RunnerError(dir_ + ": the VM returned " + std::string(rv.GetTypeKey()) + "; expected a tuple of logits and " +
                      std::to_string(caches_.size()) + " caches");
  }
  ffi::Tensor logits = (*outs)[0].cast<ffi::Tensor>();
  for (size_t i = 0; i < caches_.size(); ++i) caches_[i] = (*outs)[i + 1].cast<ffi::Tensor>();
  DLDataType dt = logits.dtype();
  if (dt.code != kDLFloat || dt.bits != 32 || logits.ndim() != 3 || logits.device().device_type != kDLCPU) {
    throw RunnerError(dir_ + ": logits must be float32[1, T, V] on the CPU");
  }
  int64_t t = logits.shape()[1], v = logits.shape()[2];
  const float* last = static_cast<const float*>(logits.data_ptr()) + (t - 1) * v;
  return std::vector<float>(last, last + v);
}

std::vector<int64_t> Greedy(EdgeModel& model, const std::vector<int64_t>& prompt, int64_t max_new_tokens,
                            const std::vector<int64_t>& stop_ids, GenerateStats* stats) {
  using clock = std::chrono::steady_clock;
  if (prompt.empty()) throw RunnerError("greedy generation needs at least one prompt token (BOS)");
  std::vector<int64_t> ids = prompt;
  int64_t budget = std::min<int64_t>(max_new_tokens, model.lm().cache_len - static_cast<int64_t>(prompt.size()));
  if (budget < 0) {
    throw RunnerError("prompt of " + std::to_string(prompt.size()) + " tokens does not fit the " +
                      std::to_string(model.lm().cache_len) + "-position KV cache");
  }
  model.Reset();
  std::vector<int64_t> x = prompt;
  int64_t pos = 0;
  GenerateStats st;
  st.prompt_tokens = static_cast<int64_t>(prompt.size());
  for (int64_t step = 0; step < budget; ++step) {
    auto t0 = clock::now();
    std::vector<float> logits = model.Step(x, pos);
    double dt = std::chrono::duration<double>(clock::now() - t0).count();
    (step == 0 ? st.prefill_s : st.decode_s) += dt;
    pos += static_cast<int64_t>(x.size());
    int64_t next = std::max_element(logits.begin(), logits.end()) - logits.begin();  // first maximum
    ids.push_back(next);
    ++st.new_tokens;
    if (std::find(stop_ids.begin(), stop_ids.end(), next) != stop_ids.end()) break;
    x = {next};
  }
  if (stats) *stats = st;
  return ids;
}

}  // namespace llmpress
