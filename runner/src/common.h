// Shared helpers of the llmpress edge runner: the error type and a few JSON accessors over tvm::ffi::json.
//
// The manifest and the safetensors header are parsed with tvm::ffi::json::Parse, which ships in libtvm_ffi.so,
// so the runner carries no JSON parser of its own.
#pragma once

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/string.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace llmpress {

// Every failure the runner reports: the message says what is wrong and in which file.
class RunnerError : public std::runtime_error {
 public:
  explicit RunnerError(const std::string& msg) : std::runtime_error(msg) {}
};

// Read a whole file into a string (binary-safe). Throws RunnerError naming the file.
std::string ReadFile(const std::string& path);

// A parsed JSON object with typed, path-reporting accessors ("manifest.json: lm.n_layers: missing").
class JsonObject {
 public:
  JsonObject(tvm::ffi::json::Object obj, std::string where) : obj_(std::move(obj)), where_(std::move(where)) {}

  // Parse `text` (from `where`, used in messages) and require a top-level object.
  static JsonObject Parse(const std::string& text, const std::string& where);

  bool Has(const std::string& key) const;
  bool IsNull(const std::string& key) const;
  int64_t Int(const std::string& key) const;
  bool Bool(const std::string& key) const;
  std::string Str(const std::string& key) const;
  JsonObject Obj(const std::string& key) const;
  std::vector<std::string> StrList(const std::string& key) const;
  std::vector<int64_t> IntList(const std::string& key) const;
  // A list of objects; element i reports itself as "key[i]".
  std::vector<JsonObject> ObjList(const std::string& key) const;
  std::vector<std::string> Keys() const;
  const std::string& where() const { return where_; }

 private:
  tvm::ffi::Any Get(const std::string& key) const;
  std::string Path(const std::string& key) const { return where_ + ": " + key; }
  tvm::ffi::json::Object obj_;
  std::string where_;
};

}  // namespace llmpress
