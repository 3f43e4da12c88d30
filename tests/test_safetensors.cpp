#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "util/error.h"

namespace fs = std::filesystem;
using namespace mta::io;

namespace {

// A fresh, empty folder under the system temp dir, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("mta_safetensors_" + std::to_string(::getpid()) + "_" + std::to_string(counter++) + "_" +
            std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path)) names.push_back(e.path().filename().string());
    return names;
  }
};

// A file from a raw header string and data bytes, with the right length prefix.
std::vector<uint8_t> build_file(const std::string& header, const std::vector<uint8_t>& data) {
  std::vector<uint8_t> out;
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(n >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

// The InputError message of parsing `file`, or "" if it parsed.
std::string parse_error(const std::vector<uint8_t>& file) {
  try {
    parse_safetensors(file.data(), file.size(), "x.safetensors");
  } catch (const mta::InputError& e) {
    return e.what();
  }
  return "";
}

Tensor raw_tensor(DType dtype, std::vector<int64_t> shape, const std::vector<uint16_t>& halves) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  for (uint16_t h : halves) {
    t.bytes.push_back(static_cast<uint8_t>(h & 0xff));
    t.bytes.push_back(static_cast<uint8_t>(h >> 8));
  }
  return t;
}

SafeTensors sample() {
  const float f[6] = {1.5f, -2.0f, 3.25f, 0.0f, 1e-30f, -7.0f};
  const double d[4] = {3.141592653589793, -1e300, 5e-324, 42.0};
  const int64_t i[3] = {-1, std::numeric_limits<int64_t>::max(), 7};
  const float s = 9.5f;
  SafeTensors st;
  st.tensors["w.f32"] = make_tensor({2, 3}, f);
  st.tensors["b.f64"] = make_tensor({4}, d);
  st.tensors["idx"] = make_tensor_i64({3}, i);
  st.tensors["scalar"] = make_tensor({}, &s);
  st.tensors["empty"] = make_tensor({0, 5}, static_cast<const float*>(nullptr));
  st.metadata["format"] = "pt";
  st.metadata["note"] = "tab\there \"quoted\" \xc3\xa9";
  return st;
}

}  // namespace

TEST(Safetensors, RoundTripWithMetadata) {
  TempDir dir;
  const std::string path = (dir.path / "model.safetensors").string();
  const SafeTensors st = sample();
  write_safetensors(path, st);
  const SafeTensors back = read_safetensors(path);

  EXPECT_EQ(back.metadata, st.metadata);
  ASSERT_EQ(back.tensors.size(), st.tensors.size());
  for (const auto& [name, t] : st.tensors) {
    ASSERT_TRUE(back.has(name)) << name;
    const Tensor& b = back.at(name);
    EXPECT_EQ(b.dtype, t.dtype) << name;
    EXPECT_EQ(b.shape, t.shape) << name;
    EXPECT_EQ(b.bytes, t.bytes) << name;
  }
  EXPECT_EQ(back.at("scalar").numel(), 1);
  EXPECT_EQ(back.at("empty").numel(), 0);
  EXPECT_EQ(back.at("w.f32").shape_str(), "[2, 3]");
  EXPECT_EQ(to_f32(back.at("w.f32"), "w"), (std::vector<float>{1.5f, -2.0f, 3.25f, 0.0f, 1e-30f, -7.0f}));
  EXPECT_EQ(to_f64(back.at("b.f64"), "b"), (std::vector<double>{3.141592653589793, -1e300, 5e-324, 42.0}));
  EXPECT_EQ(to_i64(back.at("idx"), "idx"), (std::vector<int64_t>{-1, std::numeric_limits<int64_t>::max(), 7}));
  EXPECT_EQ(to_f64(back.at("scalar"), "s"), std::vector<double>{9.5});

  // Writing over an existing file replaces it.
  SafeTensors small;
  small.tensors["only"] = make_tensor_i64({1}, std::vector<int64_t>{5}.data());
  write_safetensors(path, small);
  const SafeTensors again = read_safetensors(path);
  EXPECT_EQ(again.tensors.size(), 1u);
  EXPECT_TRUE(again.metadata.empty());
  EXPECT_EQ(to_i64(again.at("only"), "only"), std::vector<int64_t>{5});
}

TEST(Safetensors, Float16Decoding) {
  // 1.0, -2.5, 65504 (max), 2^-24 (smallest subnormal), 1023 * 2^-24 (largest subnormal), 2^-14 (smallest
  // normal), inf, -inf, -0, NaN.
  const Tensor t = raw_tensor(DType::F16, {10},
                              {0x3C00, 0xC100, 0x7BFF, 0x0001, 0x03FF, 0x0400, 0x7C00, 0xFC00, 0x8000, 0x7E00});
  const std::vector<double> v = to_f64(t, "h");
  ASSERT_EQ(v.size(), 10u);
  EXPECT_EQ(v[0], 1.0);
  EXPECT_EQ(v[1], -2.5);
  EXPECT_EQ(v[2], 65504.0);
  EXPECT_EQ(v[3], std::ldexp(1.0, -24));
  EXPECT_EQ(v[4], 1023 * std::ldexp(1.0, -24));
  EXPECT_EQ(v[5], std::ldexp(1.0, -14));
  EXPECT_EQ(v[6], std::numeric_limits<double>::infinity());
  EXPECT_EQ(v[7], -std::numeric_limits<double>::infinity());
  EXPECT_EQ(v[8], 0.0);
  EXPECT_TRUE(std::signbit(v[8]));
  EXPECT_TRUE(std::isnan(v[9]));
  const std::vector<float> f = to_f32(t, "h");
  EXPECT_EQ(f[2], 65504.0f);
  EXPECT_EQ(f[3], std::ldexp(1.0f, -24));
  EXPECT_TRUE(std::isinf(f[6]) && f[6] > 0);
}

TEST(Safetensors, BFloat16DecodingThroughFile) {
  // 1.0, -2.5, 65536, 2^-133 (float32 subnormal), inf, NaN; read back from a serialized file.
  SafeTensors st;
  st.tensors["b"] = raw_tensor(DType::BF16, {2, 3}, {0x3F80, 0xC020, 0x4780, 0x0001, 0x7F80, 0x7FC0});
  const std::vector<uint8_t> file = serialize_safetensors(st);
  const SafeTensors back = parse_safetensors(file.data(), file.size(), "b.safetensors");
  const std::vector<float> v = to_f32(back.at("b"), "b");
  ASSERT_EQ(v.size(), 6u);
  EXPECT_EQ(v[0], 1.0f);
  EXPECT_EQ(v[1], -2.5f);
  EXPECT_EQ(v[2], 65536.0f);
  EXPECT_EQ(v[3], std::ldexp(1.0f, -133));
  EXPECT_EQ(v[4], std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(v[5]));
  EXPECT_EQ(to_f64(back.at("b"), "b")[1], -2.5);
}

TEST(Safetensors, ConversionsCheckDtypeAndSize) {
  const SafeTensors st = sample();
  try {
    to_f32(st.at("idx"), "idx");
    FAIL() << "integer tensor accepted as float";
  } catch (const mta::InputError& e) {
    EXPECT_STREQ(e.what(), "idx: expected a floating-point tensor, got I64");
  }
  EXPECT_THROW(to_f64(st.at("idx"), "idx"), mta::InputError);
  EXPECT_THROW(to_i64(st.at("w.f32"), "w"), mta::InputError);

  Tensor i32;
  i32.dtype = DType::I32;
  i32.shape = {2};
  const int32_t iv[2] = {-3, 2000000000};
  i32.bytes.resize(8);
  std::memcpy(i32.bytes.data(), iv, 8);
  EXPECT_EQ(to_i64(i32, "i"), (std::vector<int64_t>{-3, 2000000000}));
  Tensor u8;
  u8.dtype = DType::U8;
  u8.shape = {3};
  u8.bytes = {0, 200, 255};
  EXPECT_EQ(to_i64(u8, "u"), (std::vector<int64_t>{0, 200, 255}));

  // A hand-built tensor whose bytes do not match its shape is refused, not read past the end.
  Tensor bad = st.at("w.f32");
  bad.bytes.resize(20);
  EXPECT_THROW(to_f32(bad, "bad"), mta::InputError);

  // serialize refuses tensors whose bytes or shape are inconsistent.
  SafeTensors broken;
  broken.tensors["bad"] = bad;
  EXPECT_THROW(serialize_safetensors(broken), mta::InputError);
  broken.tensors["bad"].shape = {-1};
  broken.tensors["bad"].bytes.clear();
  EXPECT_THROW(serialize_safetensors(broken), mta::InputError);

  try {
    st.at("nope");
    FAIL() << "missing tensor found";
  } catch (const mta::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("missing tensor 'nope'"), std::string::npos) << e.what();
  }
}

TEST(Safetensors, EveryTruncationIsRefused) {
  const std::vector<uint8_t> file = serialize_safetensors(sample());
  ASSERT_EQ(parse_error(file), "");
  for (size_t len = 0; len < file.size(); ++len) {
    std::vector<uint8_t> prefix(file.begin(), file.begin() + static_cast<std::ptrdiff_t>(len));
    // Copy into an exact-size heap buffer so a sanitizer would catch any read past the end.
    EXPECT_NE(parse_error(prefix), "") << "prefix of " << len << " bytes accepted";
  }
}

TEST(Safetensors, CorruptHeadersAreRefusedWithReason) {
  const std::vector<uint8_t> d24(24, 0);  // room for one F32 [2, 3]
  const std::string ok = R"({"q":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})";
  ASSERT_EQ(parse_error(build_file(ok, d24)), "");

  struct Case {
    std::string what, header, expect;
  };
  const std::vector<Case> cases = {
      {"bad JSON", R"({"q":{"dtype":"F32",)", "not valid JSON"},
      {"not an object", R"([1, 2])", "must be a JSON object"},
      {"entry not an object", R"({"q": 5})", "entry must be a JSON object"},
      {"unknown dtype", R"({"q":{"dtype":"F8","shape":[2,3],"data_offsets":[0,24]}})", "unknown dtype 'F8'"},
      {"negative shape", R"({"q":{"dtype":"F32","shape":[-2,3],"data_offsets":[0,24]}})", "non-negative integers"},
      {"float shape", R"({"q":{"dtype":"F32","shape":[2.0,3],"data_offsets":[0,24]}})", "non-negative integers"},
      {"offsets past end", R"({"q":{"dtype":"F32","shape":[2,3],"data_offsets":[8,32]}})", "past the end"},
      {"begin > end", R"({"q":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", "begin > end"},
      {"size mismatch", R"({"q":{"dtype":"F32","shape":[2,2],"data_offsets":[0,24]}})",
       "x.safetensors: tensor 'q': data_offsets [0, 24] hold 24 bytes but F32 [2, 2] needs 16"},
      {"overlap",
       R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
       "overlapping"},
      {"missing key", R"({"q":{"dtype":"F32","shape":[2,3]}})", "missing key 'data_offsets'"},
      {"extra key", R"({"q":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24],"x":1}})", "unknown key 'x'"},
      {"one offset", R"({"q":{"dtype":"F32","shape":[2,3],"data_offsets":[0]}})", "two non-negative integers"},
      {"numel overflow",
       R"({"q":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,24]}})", "overflows"},
      {"metadata not strings", R"({"__metadata__":{"k":1}})", "must be a string"},
      {"metadata not object", R"({"__metadata__":[]})", "__metadata__ must be an object"},
      {"deep nesting", std::string(100, '[') + std::string(100, ']'), "nests deeper"},
  };
  for (const Case& c : cases) {
    const std::string msg = parse_error(build_file(c.header, d24));
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.what << ": got '" << msg << "'";
    EXPECT_EQ(msg.rfind("x.safetensors: ", 0), 0u) << c.what << ": " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << c.what;
  }

  // Header length larger than the file, and larger than the 100 MB cap.
  std::vector<uint8_t> huge = build_file(ok, d24);
  huge[0] = 0x7f;  // 9999999 = 0x98967f
  huge[1] = 0x96;
  huge[2] = 0x98;
  EXPECT_NE(parse_error(huge).find("header length 9999999 exceeds file size"), std::string::npos) << parse_error(huge);
  std::vector<uint8_t> all_ones(16, 0xff);
  EXPECT_NE(parse_error(all_ones).find("header length 18446744073709551615 exceeds"), std::string::npos);
  EXPECT_NE(parse_error({1, 2, 3}).find("shorter than"), std::string::npos);

  try {
    read_safetensors("/nonexistent_dir_mta/x.safetensors");
    FAIL() << "missing file opened";
  } catch (const mta::InputError& e) {
    EXPECT_EQ(std::string(e.what()).rfind("/nonexistent_dir_mta/x.safetensors: cannot open", 0), 0u) << e.what();
  }
}

TEST(Safetensors, WriteIsAtomicAndLeavesNoTempFile) {
  TempDir dir;
  const std::string path = (dir.path / "out.safetensors").string();
  write_safetensors(path, sample());
  write_safetensors(path, sample());
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"out.safetensors"});

  // A failed write names the path, throws std::runtime_error and leaves nothing behind.
  const std::string bad = (dir.path / "no_such_dir" / "out.safetensors").string();
  try {
    write_safetensors(bad, sample());
    FAIL() << "write into a missing folder succeeded";
  } catch (const mta::InputError&) {
    FAIL() << "an I/O failure is not an InputError";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
  }
  // Renaming onto a directory fails after the temp file is written: it must be cleaned up.
  fs::create_directory(dir.path / "is_a_dir");
  fs::create_directory(dir.path / "is_a_dir" / "child");
  EXPECT_THROW(write_safetensors((dir.path / "is_a_dir").string(), sample()), std::runtime_error);
  std::vector<std::string> names = dir.entries();
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"is_a_dir", "out.safetensors"}));
}

TEST(Safetensors, DataSectionIsAlignedToEightBytes) {
  for (size_t name_len = 1; name_len <= 17; ++name_len) {
    SafeTensors st;
    const float v = 1.0f;
    st.tensors[std::string(name_len, 'n')] = make_tensor({1}, &v);
    if (name_len % 2) st.metadata["m"] = std::string(name_len, 'v');
    const std::vector<uint8_t> file = serialize_safetensors(st);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | file[i];
    EXPECT_EQ((8 + n) % 8, 0u) << "name length " << name_len;
    ASSERT_EQ(file.size(), 8 + n + 4);
    float back;
    std::memcpy(&back, file.data() + 8 + n, 4);
    EXPECT_EQ(back, 1.0f);
    // Header is sorted keys, compact JSON, then only spaces.
    const std::string header(file.begin() + 8, file.begin() + 8 + static_cast<std::ptrdiff_t>(n));
    const size_t close = header.find_last_of('}');
    EXPECT_EQ(header.find_first_not_of(' ', close + 1), std::string::npos);
    if (name_len % 2) {
      EXPECT_EQ(header.rfind("{\"__metadata__\"", 0), 0u) << header;
    }
  }
}
