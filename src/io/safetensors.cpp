#include "io/safetensors.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <utility>

#include "io/atomic_file.h"
#include "util/error.h"

// Tensor bytes are little-endian on disk and are copied to / from native values with memcpy.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

namespace mta::io {
namespace {

using json = nlohmann::json;

// Same cap as the reference implementation: a header this big is an attack or a corrupt file.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// A valid header nests 3 levels ({name: {shape: [..]}}); refusing deeper input early keeps a
// "[[[[..." header from building a huge tree before being rejected anyway.
constexpr int kMaxJsonDepth = 8;

const DType kAllDTypes[] = {DType::F32, DType::F64, DType::BF16, DType::F16, DType::I32, DType::I64, DType::U8};

// Names come from the file and may hold newlines or be huge; keep error messages to one short line.
std::string printable(const std::string& s) {
  std::string out;
  for (char c : s.substr(0, 200)) out += (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) ? '?' : c;
  return s.size() > 200 ? out + "..." : out;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Element count of `shape`, refusing negative dimensions and products that overflow int64 (zero
// dimensions are skipped in the overflow test so that the answer does not depend on their position).
uint64_t checked_numel(const std::vector<int64_t>& shape, const std::string& where) {
  uint64_t prod_nonzero = 1;
  bool any_zero = false;
  for (int64_t d : shape) {
    if (d < 0) throw InputError(where + ": negative dimension in shape " + shape_text(shape));
    if (d == 0) {
      any_zero = true;
      continue;
    }
    if (__builtin_mul_overflow(prod_nonzero, static_cast<uint64_t>(d), &prod_nonzero) ||
        prod_nonzero > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw InputError(where + ": element count of shape " + shape_text(shape) + " overflows");
  }
  return any_zero ? 0 : prod_nonzero;
}

// A JSON value that is an integer in [0, INT64_MAX]; nlohmann stores non-negative literals as unsigned.
bool get_nonneg_int(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return *out <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(v.get<int64_t>());
    return true;
  }
  return false;
}

Tensor parse_entry(const json& e, const std::string& where, const uint8_t* data, uint64_t data_size,
                   std::pair<uint64_t, uint64_t>* range) {
  if (!e.is_object()) throw InputError(where + ": entry must be a JSON object, got " + e.type_name());
  for (auto it = e.begin(); it != e.end(); ++it)
    if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets")
      throw InputError(where + ": unknown key '" + printable(it.key()) + "' (allowed: dtype, shape, data_offsets)");
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!e.contains(key)) throw InputError(where + ": missing key '" + key + "'");

  Tensor t;
  const json& dt = e["dtype"];
  if (!dt.is_string()) throw InputError(where + ": dtype must be a string");
  const std::string dname = dt.get<std::string>();
  const DType* found = std::find_if(std::begin(kAllDTypes), std::end(kAllDTypes),
                                    [&](DType d) { return dtype_name(d) == dname; });
  if (found == std::end(kAllDTypes))
    throw InputError(where + ": unknown dtype '" + printable(dname) + "' (supported: F32, F64, BF16, F16, I32, I64, U8)");
  t.dtype = *found;

  const json& sh = e["shape"];
  if (!sh.is_array()) throw InputError(where + ": shape must be an array of non-negative integers");
  for (const json& d : sh) {
    uint64_t v;
    if (!get_nonneg_int(d, &v))
      throw InputError(where + ": shape must be an array of non-negative integers, got " + printable(sh.dump()));
    t.shape.push_back(static_cast<int64_t>(v));
  }
  const uint64_t numel = checked_numel(t.shape, where);

  const json& off = e["data_offsets"];
  uint64_t begin = 0, end = 0;
  if (!off.is_array() || off.size() != 2 || !get_nonneg_int(off[0], &begin) || !get_nonneg_int(off[1], &end))
    throw InputError(where + ": data_offsets must be two non-negative integers [begin, end], got " +
                     printable(off.dump()));
  const std::string off_text = "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "]";
  if (begin > end) throw InputError(where + ": " + off_text + " has begin > end");
  if (end > data_size)
    throw InputError(where + ": " + off_text + " run past the end of the " + std::to_string(data_size) +
                     "-byte data section");
  uint64_t need = 0;
  const bool too_big = __builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(t.dtype)), &need);
  if (too_big || need != end - begin)
    throw InputError(where + ": " + off_text + " hold " + std::to_string(end - begin) + " bytes but " + dname + " " +
                     t.shape_str() + " needs " + (too_big ? "more than 2^64" : std::to_string(need)));
  t.bytes.assign(data + begin, data + end);
  *range = {begin, end};
  return t;
}

// Decode element i of a floating tensor whose size has been checked.
double float_at(const Tensor& t, size_t i) {
  const uint8_t* p = t.bytes.data() + i * dtype_size(t.dtype);
  switch (t.dtype) {
    case DType::F32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    case DType::F64: {
      double d;
      std::memcpy(&d, p, 8);
      return d;
    }
    case DType::BF16: {  // bfloat16 is the upper half of a float32
      const uint32_t bits = static_cast<uint32_t>(p[0] | (p[1] << 8)) << 16;
      return std::bit_cast<float>(bits);
    }
    case DType::F16: {  // IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits
      const uint16_t h = static_cast<uint16_t>(p[0] | (p[1] << 8));
      const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
      float mag;
      if (exp == 0) {
        mag = std::ldexp(static_cast<float>(mant), -24);  // zero or subnormal: mant * 2^-24, exact
      } else if (exp == 31) {
        // inf or NaN: widen to float32 bit-wise so the NaN payload survives.
        mag = std::bit_cast<float>(0x7f800000u | (mant << 13));
      } else {
        mag = std::bit_cast<float>(((exp + 127 - 15) << 23) | (mant << 13));
      }
      return sign ? -mag : mag;
    }
    default:
      return 0;  // unreachable: integer dtypes are refused by the callers
  }
}

void check_size(const Tensor& t, const std::string& name) {
  const uint64_t numel = checked_numel(t.shape, name);
  if (t.bytes.size() != numel * dtype_size(t.dtype))
    throw InputError(name + ": holds " + std::to_string(t.bytes.size()) + " bytes but " + dtype_name(t.dtype) + " " +
                     t.shape_str() + " needs " + std::to_string(numel * dtype_size(t.dtype)));
}

template <typename T>
std::vector<T> to_floating(const Tensor& t, const std::string& name) {
  if (t.dtype != DType::F32 && t.dtype != DType::F64 && t.dtype != DType::BF16 && t.dtype != DType::F16)
    throw InputError(name + ": expected a floating-point tensor, got " + dtype_name(t.dtype));
  check_size(t, name);
  std::vector<T> out(t.bytes.size() / dtype_size(t.dtype));
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<T>(float_at(t, i));
  return out;
}

template <typename T>
Tensor make_from(DType dtype, const std::vector<int64_t>& shape, const T* data) {
  Tensor t;
  t.dtype = dtype;
  t.shape = shape;
  t.bytes.resize(checked_numel(shape, "make_tensor") * sizeof(T));
  if (!t.bytes.empty()) std::memcpy(t.bytes.data(), data, t.bytes.size());
  return t;
}

}  // namespace

std::string dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
  }
  return "?";
}

size_t dtype_size(DType d) {
  switch (d) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::BF16: case DType::F16: return 2;
    case DType::U8: return 1;
  }
  return 0;
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string Tensor::shape_str() const { return shape_text(shape); }

const Tensor& SafeTensors::at(const std::string& name) const {
  auto it = tensors.find(name);
  if (it == tensors.end()) throw InputError("missing tensor '" + printable(name) + "'");
  return it->second;
}

SafeTensors parse_safetensors(const uint8_t* data, size_t size, const std::string& what) {
  if (size < 8) throw InputError(what + ": file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if (n > size - 8)
    throw InputError(what + ": header length " + std::to_string(n) + " exceeds file size " + std::to_string(size) +
                     " (at most " + std::to_string(size - 8) + " bytes available)");
  if (n > kMaxHeaderBytes)
    throw InputError(what + ": header length " + std::to_string(n) + " exceeds the limit of " +
                     std::to_string(kMaxHeaderBytes) + " bytes");

  const char* hb = reinterpret_cast<const char*>(data + 8);
  json header;
  try {
    header = json::parse(hb, hb + n, [&](int depth, json::parse_event_t ev, json&) {
      if ((ev == json::parse_event_t::object_start || ev == json::parse_event_t::array_start) && depth > kMaxJsonDepth)
        throw InputError(what + ": header JSON nests deeper than " + std::to_string(kMaxJsonDepth) + " levels");
      return true;
    });
  } catch (const json::parse_error& e) {
    // nlohmann's own message quotes the offending bytes (maybe newlines); the position is enough.
    throw InputError(what + ": header is not valid JSON (error at byte " + std::to_string(e.byte) + " of " +
                     std::to_string(n) + ")");
  }
  if (!header.is_object()) throw InputError(what + ": header must be a JSON object, got " + header.type_name());

  const uint8_t* body = data + 8 + n;
  const uint64_t body_size = size - 8 - n;
  SafeTensors st;
  std::vector<std::pair<std::pair<uint64_t, uint64_t>, std::string>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      const json& m = it.value();
      if (!m.is_object()) throw InputError(what + ": __metadata__ must be an object of strings");
      for (auto mi = m.begin(); mi != m.end(); ++mi) {
        if (!mi.value().is_string())
          throw InputError(what + ": __metadata__ value for '" + printable(mi.key()) + "' must be a string, got " +
                           mi.value().type_name());
        st.metadata[mi.key()] = mi.value().get<std::string>();
      }
      continue;
    }
    std::pair<uint64_t, uint64_t> range;
    st.tensors[it.key()] =
        parse_entry(it.value(), what + ": tensor '" + printable(it.key()) + "'", body, body_size, &range);
    if (range.first != range.second) ranges.push_back({range, it.key()});  // empty ranges overlap nothing
  }

  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first.first < ranges[i - 1].first.second)
      throw InputError(what + ": tensors '" + printable(ranges[i - 1].second) + "' and '" + printable(ranges[i].second) +
                       "' have overlapping data_offsets");
  return st;
}

SafeTensors read_safetensors(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw InputError(path + ": cannot open: " + std::strerror(errno));
  // Read in chunks rather than trusting a size from fseek/ftell (pipes, files that change size).
  std::vector<uint8_t> buf;
  uint8_t chunk[1 << 16];
  size_t got;
  while ((got = std::fread(chunk, 1, sizeof chunk, f)) > 0) buf.insert(buf.end(), chunk, chunk + got);
  const bool failed = std::ferror(f);
  const int err = errno;
  std::fclose(f);
  if (failed) throw InputError(path + ": cannot read: " + std::strerror(err));
  return parse_safetensors(buf.data(), buf.size(), path);
}

std::vector<uint8_t> serialize_safetensors(const SafeTensors& st) {
  json header = json::object();  // std::map-backed: keys come out sorted
  if (!st.metadata.empty()) header["__metadata__"] = st.metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : st.tensors) {  // map order = name order, matching the data layout below
    if (name == "__metadata__") throw InputError("serialize_safetensors: '__metadata__' is reserved, not a tensor name");
    check_size(t, "serialize_safetensors: tensor '" + printable(name) + "'");
    header[name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const json::type_error& e) {  // e.g. a name or metadata value that is not valid UTF-8
    throw InputError(std::string("serialize_safetensors: ") + e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // 8 + header length is then a multiple of 8

  std::vector<uint8_t> out;
  out.reserve(8 + text.size() + offset);
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i)));
  out.insert(out.end(), text.begin(), text.end());
  for (const auto& [name, t] : st.tensors) out.insert(out.end(), t.bytes.begin(), t.bytes.end());
  return out;
}

void write_safetensors(const std::string& path, const SafeTensors& st) {
  const std::vector<uint8_t> bytes = serialize_safetensors(st);
  write_file_atomic(path, bytes.data(), bytes.size());
}

Tensor make_tensor(const std::vector<int64_t>& shape, const float* data) { return make_from(DType::F32, shape, data); }
Tensor make_tensor(const std::vector<int64_t>& shape, const double* data) { return make_from(DType::F64, shape, data); }
Tensor make_tensor_i64(const std::vector<int64_t>& shape, const int64_t* data) {
  return make_from(DType::I64, shape, data);
}

std::vector<float> to_f32(const Tensor& t, const std::string& name) { return to_floating<float>(t, name); }
std::vector<double> to_f64(const Tensor& t, const std::string& name) { return to_floating<double>(t, name); }

std::vector<int64_t> to_i64(const Tensor& t, const std::string& name) {
  if (t.dtype != DType::I32 && t.dtype != DType::I64 && t.dtype != DType::U8)
    throw InputError(name + ": expected an integer tensor (I32, I64, U8), got " + dtype_name(t.dtype));
  check_size(t, name);
  const size_t es = dtype_size(t.dtype);
  std::vector<int64_t> out(t.bytes.size() / es);
  for (size_t i = 0; i < out.size(); ++i) {
    const uint8_t* p = t.bytes.data() + i * es;
    if (t.dtype == DType::U8) {
      out[i] = p[0];
    } else if (t.dtype == DType::I32) {
      int32_t v;
      std::memcpy(&v, p, 4);
      out[i] = v;
    } else {
      std::memcpy(&out[i], p, 8);
    }
  }
  return out;
}

}  // namespace mta::io
