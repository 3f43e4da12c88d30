#pragma once
// Reader and writer of the safetensors format (no library for it exists here):
//   [u64 little-endian header length N][N bytes of JSON header][raw little-endian tensor bytes]
// Header: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//          "__metadata__": {"key": "string value", ...}} with offsets relative to the byte buffer.
//
// The reader trusts nothing: header length, JSON, dtypes, shapes, offsets (inside the file, matching
// dtype x numel, not overlapping) are all checked, and any violation is an InputError naming the file
// and the problem. Writing goes to a temporary file in the same folder, then rename: a reader never
// sees a half-written file.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace mta::io {

enum class DType { F32, F64, BF16, F16, I32, I64, U8 };

std::string dtype_name(DType d);  // "F32", ...
size_t dtype_size(DType d);

struct Tensor {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // little-endian, numel() * dtype_size(dtype) bytes

  int64_t numel() const;
  std::string shape_str() const;  // "[2, 3, 4]"
};

struct SafeTensors {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;

  bool has(const std::string& name) const { return tensors.count(name) != 0; }
  const Tensor& at(const std::string& name) const;  // InputError naming the missing tensor
};

// Parse an in-memory file; `what` names it in error messages.
SafeTensors parse_safetensors(const uint8_t* data, size_t size, const std::string& what);
SafeTensors read_safetensors(const std::string& path);
// Atomic write (temporary file + fsync + rename). Throws std::runtime_error on I/O failure.
void write_safetensors(const std::string& path, const SafeTensors& st);
std::vector<uint8_t> serialize_safetensors(const SafeTensors& st);

Tensor make_tensor(const std::vector<int64_t>& shape, const float* data);
Tensor make_tensor(const std::vector<int64_t>& shape, const double* data);
Tensor make_tensor_i64(const std::vector<int64_t>& shape, const int64_t* data);

// Conversions from any floating dtype (F32, F64, BF16, F16); an integer dtype is an InputError.
std::vector<float> to_f32(const Tensor& t, const std::string& name);
std::vector<double> to_f64(const Tensor& t, const std::string& name);
std::vector<int64_t> to_i64(const Tensor& t, const std::string& name);  // from I32/I64/U8

}  // namespace mta::io
