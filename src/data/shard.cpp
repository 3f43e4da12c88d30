#include "data/shard.h"

#include <cstring>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "io/atomic_file.h"
#include "util/error.h"
#include "util/hash.h"

namespace mta::data {
namespace {

constexpr char kMagic[8] = {'M', 'T', 'A', 'T', 'O', 'K', 'S', '\0'};
constexpr uint32_t kVersion = 1;
constexpr size_t kPrefix = 16;  // magic, version, header length

int dtype_bytes(int vocab_size) { return vocab_size <= 65536 ? 2 : 4; }
const char* dtype_name(int bytes) { return bytes == 2 ? "uint16" : "uint32"; }

uint32_t get_u32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16 |
         static_cast<uint32_t>(p[3]) << 24;
}

void put_u32(std::vector<uint8_t>& out, uint32_t x) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(x >> (8 * i)));
}

uint64_t parse_hex64(const nlohmann::json& v, bool* ok) {
  *ok = v.is_string() && v.get<std::string>().size() == 16;
  if (!*ok) return 0;
  uint64_t x = 0;
  for (char c : v.get<std::string>()) {
    int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (d < 0) return *ok = false, 0;
    x = x << 4 | static_cast<uint64_t>(d);
  }
  return x;
}

// The structural invariants both the writer and the reader hold a shard to; "" when they hold.
std::string check_docs(const Shard& s) {
  uint64_t next = 0;
  for (size_t i = 0; i < s.docs.size(); ++i) {
    const ShardDoc& d = s.docs[i];
    const std::string where = "document " + std::to_string(i) + " (" + d.name + ")";
    if (d.first != next) return where + " starts at token " + std::to_string(d.first) + ", expected " + std::to_string(next);
    if (d.count == 0 || d.count > s.tokens.size() - next) return where + " has a bad token count " + std::to_string(d.count);
    if (d.group < 0 || d.group >= static_cast<int>(s.groups.size())) return where + " has a bad group index";
    next += d.count;
  }
  if (next != s.tokens.size())
    return "the documents cover " + std::to_string(next) + " of " + std::to_string(s.tokens.size()) + " tokens";
  return "";
}

}  // namespace

std::vector<uint8_t> serialize_shard(const Shard& s) {
  if (s.vocab_size < 1) throw std::invalid_argument("shard: vocab_size must be positive");
  for (int32_t t : s.tokens)
    if (t < 0 || t >= s.vocab_size) throw std::invalid_argument("shard: token id " + std::to_string(t) + " outside the vocabulary");
  if (const std::string bad = check_docs(s); !bad.empty()) throw std::invalid_argument("shard: " + bad);

  const int bytes = dtype_bytes(s.vocab_size);
  std::vector<uint8_t> data;
  data.reserve(s.tokens.size() * bytes);
  for (int32_t t : s.tokens)
    for (int i = 0; i < bytes; ++i) data.push_back(static_cast<uint8_t>(static_cast<uint32_t>(t) >> (8 * i)));

  nlohmann::json docs = nlohmann::json::array();
  for (const ShardDoc& d : s.docs) docs.push_back({d.first, d.count, d.group, d.name});
  const nlohmann::json header = {
      {"vocab_size", s.vocab_size},
      {"token_count", s.tokens.size()},
      {"dtype", dtype_name(bytes)},
      {"tokenizer_fnv1a64", hex64(s.tokenizer_checksum)},
      {"tokens_fnv1a64", hex64(fnv1a64(data.data(), data.size()))},
      {"groups", s.groups},
      {"docs", docs},
  };
  const std::string text = header.dump();
  std::vector<uint8_t> out(kMagic, kMagic + 8);
  put_u32(out, kVersion);
  put_u32(out, static_cast<uint32_t>(text.size()));
  out.insert(out.end(), text.begin(), text.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

void write_shard(const std::string& path, const Shard& shard) {
  const std::vector<uint8_t> bytes = serialize_shard(shard);
  io::write_file_atomic(path, bytes.data(), bytes.size());
}

Shard parse_shard(const uint8_t* p, size_t size, const std::string& what, const ShardExpect& expect) {
  auto fail = [&](const std::string& msg) { return InputError(what + ": " + msg); };
  if (size < 8 || std::memcmp(p, kMagic, 8) != 0)
    throw fail(size < 8 ? "not a token shard (" + std::to_string(size) + " bytes, too short for the magic)"
                        : "not a token shard (bad magic; expected \"MTATOKS\", written by mta tokenize)");
  if (size < kPrefix) throw fail("truncated (" + std::to_string(size) + " bytes)");
  const uint32_t version = get_u32(p + 8);
  if (version != kVersion)
    throw fail("shard format version " + std::to_string(version) + " is not supported (this mta reads version " +
               std::to_string(kVersion) + ")");
  const uint64_t hlen = get_u32(p + 12);
  if (hlen > size - kPrefix)
    throw fail("truncated (the header alone needs " + std::to_string(kPrefix + hlen) + " bytes, the file has " +
               std::to_string(size) + ")");
  nlohmann::json h;
  try {
    h = nlohmann::json::parse(p + kPrefix, p + kPrefix + hlen);
  } catch (const std::exception&) {
    throw fail("corrupt header (not valid JSON)");
  }
  auto need = [&](const char* key, bool ok) {
    if (!h.is_object() || !h.contains(key) || !ok) throw fail(std::string("corrupt header (field \"") + key + "\")");
  };
  need("vocab_size", h.is_object() && h.contains("vocab_size") && h["vocab_size"].is_number_integer() &&
                         h["vocab_size"].get<long long>() >= 1 && h["vocab_size"].get<long long>() <= (1LL << 31) - 1);
  need("token_count", h.contains("token_count") && h["token_count"].is_number_unsigned());
  need("dtype", h.contains("dtype") && h["dtype"].is_string());
  need("groups", h.contains("groups") && h["groups"].is_array());
  need("docs", h.contains("docs") && h["docs"].is_array());
  bool ok_tok = false, ok_data = false;
  const uint64_t tok_sum = h.contains("tokenizer_fnv1a64") ? parse_hex64(h["tokenizer_fnv1a64"], &ok_tok) : 0;
  const uint64_t data_sum = h.contains("tokens_fnv1a64") ? parse_hex64(h["tokens_fnv1a64"], &ok_data) : 0;
  need("tokenizer_fnv1a64", ok_tok);
  need("tokens_fnv1a64", ok_data);

  Shard s;
  s.vocab_size = h["vocab_size"].get<int>();
  s.tokenizer_checksum = tok_sum;
  const int bytes = dtype_bytes(s.vocab_size);
  need("dtype", h["dtype"].get<std::string>() == dtype_name(bytes));
  const uint64_t count = h["token_count"].get<uint64_t>();
  const uint64_t avail = size - kPrefix - hlen;
  if (count > avail / bytes || avail != count * bytes)
    throw fail(std::string(count > avail / bytes ? "truncated" : "trailing bytes") + ": the header says " +
               std::to_string(count) + " tokens of " + dtype_name(bytes) + " (" +
               std::to_string(kPrefix + hlen + count * bytes) + " bytes), the file has " + std::to_string(size) +
               " bytes (re-run mta tokenize)");

  // What the run expects, before the (slower) content checks.
  if (expect.vocab_size > 0 && s.vocab_size != expect.vocab_size)
    throw fail("vocabulary size " + std::to_string(s.vocab_size) + " does not match " + std::to_string(expect.vocab_size) +
               " of the tokenizer " + expect.tokenizer + " (encoded with another tokenizer?)");
  if (expect.tokenizer_checksum != 0 && s.tokenizer_checksum != expect.tokenizer_checksum)
    throw fail("encoded by a tokenizer with checksum " + hex64(s.tokenizer_checksum) + ", but " + expect.tokenizer +
               " has checksum " + hex64(expect.tokenizer_checksum) + " (re-run mta tokenize with this tokenizer)");

  const uint8_t* data = p + kPrefix + hlen;
  if (fnv1a64(data, count * bytes) != data_sum) throw fail("token data corrupted (checksum mismatch)");
  s.tokens.resize(count);
  for (uint64_t i = 0; i < count; ++i) {
    uint32_t t = 0;
    for (int b = 0; b < bytes; ++b) t |= static_cast<uint32_t>(data[i * bytes + b]) << (8 * b);
    if (t >= static_cast<uint32_t>(s.vocab_size))
      throw fail("token id " + std::to_string(t) + " at position " + std::to_string(i) + " is outside the vocabulary [0, " +
                 std::to_string(s.vocab_size) + ")");
    s.tokens[i] = static_cast<int32_t>(t);
  }
  for (const auto& g : h["groups"]) {
    if (!g.is_string()) throw fail("corrupt header (field \"groups\")");
    s.groups.push_back(g.get<std::string>());
  }
  for (const auto& d : h["docs"]) {
    if (!d.is_array() || d.size() != 4 || !d[0].is_number_unsigned() || !d[1].is_number_unsigned() ||
        !d[2].is_number_integer() || !d[3].is_string())
      throw fail("corrupt header (field \"docs\": each entry is [first, count, group, name])");
    s.docs.push_back({d[0].get<uint64_t>(), d[1].get<uint64_t>(), d[2].get<int>(), d[3].get<std::string>()});
  }
  if (const std::string bad = check_docs(s); !bad.empty()) throw fail("corrupt document table: " + bad);
  return s;
}

Shard read_shard(const std::string& path, const ShardExpect& expect) {
  const std::string bytes = io::read_file(path, "token shard");
  return parse_shard(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), path, expect);
}

}  // namespace mta::data
