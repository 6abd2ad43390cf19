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

namespace {

const ffi::Tensor& Take(const std::map<std::string, ffi::Tensor>& tensors, const JsonObject& rec,
                        const std::string& key) {
  auto it = tensors.find(rec.Str(key));
  if (it == tensors.end()) throw RunnerError(rec.where() + ": no tensor '" + rec.Str(key) + "' in the weights");
  return it->second;
}

}  // namespace

void ExpandSparseWeights(std::map<std::string, ffi::Tensor>* tensors, const JsonObject& records) {
  for (const std::string& name : records.Keys()) {
    JsonObject rec = records.Obj(name);
    if (rec.Str("format") != "bitmask") {
      throw RunnerError(rec.where() + ": unknown sparse weight format '" + rec.Str("format") + "'");
    }
    const int64_t bits = rec.Int("elem_bits");
    const uint64_t fill = static_cast<uint64_t>(rec.Int("fill"));
    ffi::Tensor out = EmptyCPU(rec.IntList("shape"), ParseDType(rec.Str("dtype"), rec.where() + ": dtype"));
    const size_t nbytes = ffi::GetDataSize(out);
    if ((bits != 2 && bits != 4 && bits % 8 != 0) || bits <= 0 || bits > 64 || (nbytes * 8) % bits != 0) {
      throw RunnerError(rec.where() + ": elem_bits " + std::to_string(bits) + " does not fit the tensor");
    }
    const ffi::Tensor& values = Take(*tensors, rec, "values");
    const ffi::Tensor& mask = Take(*tensors, rec, "mask");
    const auto* val = static_cast<const uint8_t*>(values.data_ptr());
    const auto* bit = static_cast<const uint8_t*>(mask.data_ptr());
    const size_t val_bits = ffi::GetDataSize(values) * 8;
    const size_t n = nbytes * 8 / bits;
    if (ffi::GetDataSize(mask) * 8 < n) throw RunnerError(rec.where() + ": mask shorter than the tensor");
    auto* dst = static_cast<uint8_t*>(out.data_ptr());  // zero-filled
    size_t k = 0;  // values used so far
    for (size_t i = 0; i < n; ++i) {
      const bool set = (bit[i >> 3] >> (i & 7)) & 1;
      if (set && (k + 1) * bits > val_bits) throw RunnerError(rec.where() + ": fewer values than mask bits");
      if (bits >= 8) {
        const size_t eb = bits / 8;
        if (set) {
          std::memcpy(dst + i * eb, val + k * eb, eb);
        } else {
          for (size_t b = 0; b < eb; ++b) dst[i * eb + b] = static_cast<uint8_t>(fill >> (8 * b));
        }
      } else {
        const size_t src = k * bits;
        const uint64_t e = set ? (val[src >> 3] >> (src & 7)) & ((1u << bits) - 1) : fill;
        dst[(i * bits) >> 3] |= static_cast<uint8_t>(e << ((i * bits) & 7));
      }
      k += set;
    }
    if (static_cast<int64_t>(k) != rec.Int("nonfill")) {
      throw RunnerError(rec.where() + ": " + std::to_string(k) + " mask bits set, the record says " +
                        std::to_string(rec.Int("nonfill")));
    }
    std::string vname = rec.Str("values"), mname = rec.Str("mask");
    tensors->erase(vname);
    tensors->erase(mname);
    (*tensors)[name] = out;
  }
}

}  // namespace llmpress
