#pragma once
// Token shards: the encoded corpus as one file per split, what the LM task trains and evaluates on.
//
// Layout (little-endian):
//   8 bytes   magic "MTATOKS\0"
//   u32       format version (1)
//   u32       header length H
//   H bytes   JSON header: {"vocab_size", "token_count", "dtype": "uint16" | "uint32",
//             "tokenizer_fnv1a64": 16 hex digits (Tokenizer::checksum of the model that encoded it),
//             "tokens_fnv1a64": 16 hex digits (of the token bytes that follow),
//             "groups": [names], "docs": [[first token, token count, group index, name], ...]}
//   token_count ids of dtype (uint16 when the vocabulary has at most 65536 ids: half the bytes)
// Each document starts with the tokenizer's BOS id; documents are contiguous, in order, and cover
// every token. Files are written atomically (temporary file, then rename).
//
// The reader checks everything and refuses, with one line naming the file and the problem, a bad
// magic or version, a truncated or over-long file, a vocabulary or tokenizer that is not the
// expected one, a token id outside the vocabulary, token bytes that do not match their checksum, and
// a document table that does not cover the tokens.
#include <cstdint>
#include <string>
#include <vector>

namespace mta::data {

struct ShardDoc {
  uint64_t first = 0, count = 0;  // token range [first, first + count)
  int group = 0;                  // index into Shard::groups
  std::string name;
};

struct Shard {
  int vocab_size = 0;
  uint64_t tokenizer_checksum = 0;
  std::vector<std::string> groups;
  std::vector<ShardDoc> docs;
  std::vector<int32_t> tokens;
};

// What the reader requires of a shard (the run's tokenizer); a field left at 0 is not checked.
struct ShardExpect {
  int vocab_size = 0;
  uint64_t tokenizer_checksum = 0;
  std::string tokenizer;  // names the tokenizer in messages
};

void write_shard(const std::string& path, const Shard& shard);
std::vector<uint8_t> serialize_shard(const Shard& shard);
Shard read_shard(const std::string& path, const ShardExpect& expect);
Shard parse_shard(const uint8_t* data, size_t size, const std::string& what, const ShardExpect& expect);

}  // namespace mta::data
