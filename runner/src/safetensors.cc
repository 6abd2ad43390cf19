#include "safetensors.h"

#include <cstdlib>
#include <cstring>

#include "common.h"

namespace llmpress {

namespace ffi = tvm::ffi;

void AlignedCPUAlloc::AllocData(DLTensor* t) {
  size_t size = ffi::GetDataSize(*t);
  size_t rounded = ((size + 63) / 64) * 64;
  if (rounded == 0) rounded = 64;
  t->data = std::aligned_alloc(64, rounded);
  if (t->data == nullptr) throw RunnerError("out of memory allocating " + std::to_string(size) + " bytes");
  std::memset(t->data, 0, rounded);
}

void AlignedCPUAlloc::FreeData(DLTensor* t) { std::free(t->data); }

ffi::Tensor EmptyCPU(const std::vector<int64_t>& shape, DLDataType dtype) {
  ffi::Shape s(shape);
  return ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), s, dtype, DLDevice{kDLCPU, 0});
}

DLDataType ParseDType(const std::string& name, const std::string& where) {
  static const std::map<std::string, DLDataType> table = {
      {"F64", {kDLFloat, 64, 1}},  {"F32", {kDLFloat, 32, 1}},  {"F16", {kDLFloat, 16, 1}},
      {"BF16", {kDLBfloat, 16, 1}}, {"I64", {kDLInt, 64, 1}},   {"I32", {kDLInt, 32, 1}},
      {"I16", {kDLInt, 16, 1}},    {"I8", {kDLInt, 8, 1}},      {"U64", {kDLUInt, 64, 1}},
      {"U32", {kDLUInt, 32, 1}},   {"U16", {kDLUInt, 16, 1}},   {"U8", {kDLUInt, 8, 1}},
      {"BOOL", {kDLBool, 8, 1}},   {"float64", {kDLFloat, 64, 1}}, {"float32", {kDLFloat, 32, 1}},
      {"float16", {kDLFloat, 16, 1}}, {"bfloat16", {kDLBfloat, 16, 1}}, {"int64", {kDLInt, 64, 1}},
      {"int32", {kDLInt, 32, 1}},  {"int8", {kDLInt, 8, 1}},    {"uint8", {kDLUInt, 8, 1}},
  };
  auto it = table.find(name);
  if (it == table.end()) throw RunnerError(where + ": unsupported dtype '" + name + "'");
  return it->second;
}

std::map<std::string, ffi::Tensor> LoadSafetensors(const std::string& path) {
  std::string bytes = ReadFile(path);
  if (bytes.size() < 8) throw RunnerError(path + ": truncated safetensors file (" + std::to_string(bytes.size()) +
                                          " bytes, no header length)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  if (n > bytes.size() - 8) throw RunnerError(path + ": header length " + std::to_string(n) + " exceeds the file");
  JsonObject header = JsonObject::Parse(bytes.substr(8, n), path + " (safetensors header)");
  const char* data = bytes.data() + 8 + n;
  size_t data_size = bytes.size() - 8 - n;
  std::map<std::string, ffi::Tensor> out;
  for (const std::string& name : header.Keys()) {
    if (name == "__metadata__") continue;
    JsonObject rec = header.Obj(name);
    DLDataType dtype = ParseDType(rec.Str("dtype"), rec.where());
    std::vector<int64_t> shape = rec.IntList("shape");
    std::vector<int64_t> off = rec.IntList("data_offsets");
    if (off.size() != 2 || off[0] < 0 || off[1] < off[0] || static_cast<size_t>(off[1]) > data_size) {
      throw RunnerError(rec.where() + ": data_offsets out of range (file truncated?)");
    }
    ffi::Tensor t = EmptyCPU(shape, dtype);
    size_t want = ffi::GetDataSize(t);
    if (want != static_cast<size_t>(off[1] - off[0])) {
      throw RunnerError(rec.where() + ": " + std::to_string(off[1] - off[0]) + " bytes for a tensor of " +
                        std::to_string(want) + " bytes");
    }
    std::memcpy(t.data_ptr(), data + off[0], want);
    out.emplace(name, std::move(t));
  }
  return out;
}

}  // namespace llmpress
