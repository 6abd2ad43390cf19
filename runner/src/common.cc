#include "common.h"

#include <fstream>
#include <sstream>

namespace llmpress {

namespace ffi = tvm::ffi;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw RunnerError(path + ": cannot open");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw RunnerError(path + ": read failed");
  return ss.str();
}

JsonObject JsonObject::Parse(const std::string& text, const std::string& where) {
  ffi::String err;
  ffi::json::Value v = ffi::json::Parse(ffi::String(text), &err);
  if (!err.empty()) throw RunnerError(where + ": not valid JSON (" + std::string(err) + ")");
  auto obj = v.as<ffi::json::Object>();
  if (!obj.has_value()) throw RunnerError(where + ": expected a JSON object at the top level");
  return JsonObject(*obj, where);
}

bool JsonObject::Has(const std::string& key) const { return obj_.count(ffi::String(key)) != 0; }

bool JsonObject::IsNull(const std::string& key) const { return !Has(key) || Get(key) == nullptr; }

ffi::Any JsonObject::Get(const std::string& key) const {
  auto it = obj_.find(ffi::String(key));
  if (it == obj_.end()) throw RunnerError(Path(key) + ": missing");
  return (*it).second;
}

int64_t JsonObject::Int(const std::string& key) const {
  ffi::Any v = Get(key);
  if (auto i = v.as<int64_t>()) return *i;
  throw RunnerError(Path(key) + ": expected an integer, got " + std::string(v.GetTypeKey()));
}

bool JsonObject::Bool(const std::string& key) const {
  ffi::Any v = Get(key);
  if (v.type_index() == ffi::TypeIndex::kTVMFFIBool) return v.cast<bool>();
  throw RunnerError(Path(key) + ": expected true or false, got " + std::string(v.GetTypeKey()));
}

std::string JsonObject::Str(const std::string& key) const {
  ffi::Any v = Get(key);
  if (auto s = v.as<ffi::String>()) return std::string(*s);
  throw RunnerError(Path(key) + ": expected a string, got " + std::string(v.GetTypeKey()));
}

JsonObject JsonObject::Obj(const std::string& key) const {
  ffi::Any v = Get(key);
  if (auto o = v.as<ffi::json::Object>()) return JsonObject(*o, where_ + ": " + key);
  throw RunnerError(Path(key) + ": expected an object, got " + std::string(v.GetTypeKey()));
}

std::vector<std::string> JsonObject::StrList(const std::string& key) const {
  ffi::Any v = Get(key);
  auto arr = v.as<ffi::json::Array>();
  if (!arr.has_value()) throw RunnerError(Path(key) + ": expected a list of strings");
  std::vector<std::string> out;
  for (const ffi::Any& e : *arr) {
    auto s = e.as<ffi::String>();
    if (!s.has_value()) throw RunnerError(Path(key) + ": expected a list of strings");
    out.emplace_back(*s);
  }
  return out;
}

std::vector<int64_t> JsonObject::IntList(const std::string& key) const {
  ffi::Any v = Get(key);
  auto arr = v.as<ffi::json::Array>();
  if (!arr.has_value()) throw RunnerError(Path(key) + ": expected a list of integers");
  std::vector<int64_t> out;
  for (const ffi::Any& e : *arr) {
    auto i = e.as<int64_t>();
    if (!i.has_value()) throw RunnerError(Path(key) + ": expected a list of integers");
    out.push_back(*i);
  }
  return out;
}

std::vector<JsonObject> JsonObject::ObjList(const std::string& key) const {
  ffi::Any v = Get(key);
  auto arr = v.as<ffi::json::Array>();
  if (!arr.has_value()) throw RunnerError(Path(key) + ": expected a list of objects");
  std::vector<JsonObject> out;
  for (const ffi::Any& e : *arr) {
    auto o = e.as<ffi::json::Object>();
    std::string where = where_ + ": " + key + "[" + std::to_string(out.size()) + "]";
    if (!o.has_value()) throw RunnerError(where + ": expected an object");
    out.emplace_back(*o, where);
  }
  return out;
}

std::vector<std::string> JsonObject::Keys() const {
  std::vector<std::string> out;
  for (const auto& kv : obj_) {
    if (auto s = kv.first.as<ffi::String>()) out.emplace_back(*s);
  }
  return out;
}

}  // namespace llmpress
