// kernel-harness: call functions of a compiled TVM TIR library on tensors read from files (the aarch64 kernel
// tests run it under qemu-aarch64; see tests/backends/test_arm64_kernels.py).
//
//   kernel-harness LIB.so SCRIPT
//
// SCRIPT holds one call per block of lines:
//
//   call FUNC
//   in  DTYPE D0,D1,... PATH      raw little-endian contents of an input tensor (exactly its size)
//   out DTYPE D0,D1,... PATH      written after the call
//   end
//
// Every tensor is 64-byte aligned (what TVM kernels assume) and zero-filled before inputs are read. Arguments are
// passed in the order listed. Exit status 0 when every call ran; 1 with a message naming the call otherwise.
// Only the TVM runtime (libtvm_runtime.so, libtvm_ffi.so) is needed: no Python, no compiler.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t size = ffi::GetDataSize(*t);
    size_t rounded = ((size + 63) / 64) * 64;
    t->data = std::aligned_alloc(64, rounded ? rounded : 64);
    if (t->data == nullptr) throw std::runtime_error("out of memory");
    std::memset(t->data, 0, rounded ? rounded : 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

struct Arg {
  bool output;
  std::string path;
  ffi::Tensor tensor;
};

std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream ss(text);
  std::string dim;
  while (std::getline(ss, dim, ',')) shape.push_back(std::stoll(dim));
  return shape;
}

void ReadInto(const ffi::Tensor& t, const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw std::runtime_error(path + ": cannot open");
  size_t want = ffi::GetDataSize(t);
  if (static_cast<size_t>(f.tellg()) != want) {
    throw std::runtime_error(path + ": " + std::to_string(static_cast<long long>(f.tellg())) + " bytes for a " +
                             std::to_string(want) + "-byte tensor");
  }
  f.seekg(0);
  f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(want));
}

void Write(const ffi::Tensor& t, const std::string& path) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(ffi::GetDataSize(t)));
  if (!f) throw std::runtime_error(path + ": cannot write");
}

void Call(ffi::Module& lib, const std::string& name, std::vector<Arg>& args) {
  ffi::Optional<ffi::Function> f = lib->GetFunction(name, false);
  if (!f.has_value()) throw std::runtime_error("no function " + name + " in the library");
  std::vector<ffi::AnyView> views;
  for (Arg& a : args) views.emplace_back(a.tensor);
  ffi::Any rv;
  (*f).CallPacked(views.data(), static_cast<int32_t>(views.size()), &rv);
  for (Arg& a : args) {
    if (a.output) Write(a.tensor, a.path);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: kernel-harness LIB.so SCRIPT\n";
    return 2;
  }
  std::string current;
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    std::ifstream script(argv[2]);
    if (!script) throw std::runtime_error(std::string(argv[2]) + ": cannot open");
    std::vector<Arg> args;
    std::string line;
    int calls = 0;
    while (std::getline(script, line)) {
      std::stringstream ss(line);
      std::string word;
      if (!(ss >> word)) continue;
      if (word == "call") {
        ss >> current;
        args.clear();
      } else if (word == "in" || word == "out") {
        std::string dtype, shape, path;
        ss >> dtype >> shape >> path;
        Arg a{word == "out", path,
              ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(ParseShape(shape)),
                                       ffi::StringToDLDataType(dtype), DLDevice{kDLCPU, 0})};
        if (!a.output) ReadInto(a.tensor, path);
        args.push_back(std::move(a));
      } else if (word == "end") {
        Call(lib, current, args);
        ++calls;
      } else {
        throw std::runtime_error("script line not understood: " + line);
      }
    }
    std::cerr << "kernel-harness: " << calls << " calls\n";
  } catch (const std::exception& e) {
    std::cerr << "kernel-harness: " << (current.empty() ? "" : current + ": ") << e.what() << "\n";
    return 1;
  }
  return 0;
}
