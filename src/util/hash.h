#pragma once
// Small non-cryptographic hashes, written here (no hashing library is a dependency).
//
// fnv1a64: the 64-bit FNV-1a hash (Fowler, Noll, Vo). It identifies a tokenizer model file and checks
// the token data of shards: it detects accidental change and mismatch, not tampering.
// splitmix64: the finalizer of Steele, Lea and Flood's SplitMix64, a bijective 64-bit mixer used to
// derive independent seeds.
#include <cstddef>
#include <cstdint>
#include <string>

namespace mta {

constexpr uint64_t kFnv1a64Init = 0xcbf29ce484222325ULL;

inline uint64_t fnv1a64(const void* data, size_t n, uint64_t h = kFnv1a64Init) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// 16 lowercase hex digits, the form hashes take in headers and messages.
inline std::string hex64(uint64_t x) {
  static const char* digits = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i, x >>= 4) s[static_cast<size_t>(i)] = digits[x & 15];
  return s;
}

}  // namespace mta
