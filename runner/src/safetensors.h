// A reader for the safetensors format: 8-byte little-endian header length N, N bytes of JSON header
// ({name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}), then the raw
// little-endian tensor bytes; data_offsets are relative to the first byte after the header.
#pragma once

#include <tvm/ffi/container/tensor.h>

#include <map>
#include <string>
#include <vector>

namespace llmpress {

// A CPU allocator for tvm::ffi::Tensor: 64-byte aligned, the alignment TVM's generated kernels assume.
struct AlignedCPUAlloc {
  void AllocData(DLTensor* t);
  void FreeData(DLTensor* t);
};

// A zero-filled CPU tensor.
tvm::ffi::Tensor EmptyCPU(const std::vector<int64_t>& shape, DLDataType dtype);

// DLPack dtype of a safetensors / manifest dtype name ("F32", "float32", "I8", "int8", ...).
DLDataType ParseDType(const std::string& name, const std::string& where);

// Every tensor of the file, copied into aligned CPU tensors.
std::map<std::string, tvm::ffi::Tensor> LoadSafetensors(const std::string& path);

class JsonObject;

// Replace every tensor stored compressed (manifest payload.sparse_weights, llmpress/backends/tvm/sparse_storage.py)
// by its dense form: tensor `name` is read back from `name#values` and `name#mask` (format "bitmask": element i of
// `elem_bits` bits is the next value when mask bit i is set, else `fill`; little-endian bit order). Exact.
void ExpandSparseWeights(std::map<std::string, tvm::ffi::Tensor>* tensors, const JsonObject& records);

}  // namespace llmpress
