#pragma once
// The paper's toy task (Section 4.1, Table 1): find the block that holds all query letters.
//
// A sequence is blocks of N distinct random lowercase letters joined by '.', then '#', then L distinct
// query letters taken from one target block (in random order). Exactly one block contains all query
// letters, all blocks are distinct. The label is the whole target block ("all"), or its first or last
// letter. Examples are a pure function of (seed, stream, index), so train and test streams are
// separate and a data position is just an index.
#include <cstdint>
#include <string>
#include <vector>

namespace mta::tasks {

enum class BlocksVariant { All, First, Last };
enum class Stream : uint32_t { Train = 0, Test = 1 };

// Token ids. The vocabulary is shared by every toy model.
constexpr int32_t kPad = 0, kBos = 1, kDot = 2, kHash = 3, kFirstLetter = 4;  // 'a' = 4 ... 'z' = 29
constexpr int kBlocksVocab = 30;

struct BlocksTaskConfig {
  int n = 5;                          // letters per block
  int l = 2;                          // query letters
  BlocksVariant variant = BlocksVariant::All;
  int length = 319;                   // characters of input + label (the released generator's 319)
  int blocks = 0;                     // 0: as many as fit in `length`
};

struct BlocksExample {
  std::vector<int32_t> tokens;  // BOS, PAD..., input characters, label characters: 1 + length tokens
  int label_begin = 0;          // index in tokens of the first label token
  int label_len = 0;
  std::string text;             // input + label as characters (PAD shown as '_'), for display
};

class BlocksTask {
 public:
  explicit BlocksTask(const BlocksTaskConfig& cfg);  // throws InputError naming the bad field
  const BlocksTaskConfig& config() const { return cfg_; }
  int num_blocks() const { return blocks_; }
  int label_len() const;
  int seq_tokens() const { return 1 + cfg_.length; }  // tokens per example
  BlocksExample example(uint64_t seed, Stream stream, uint64_t index) const;

 private:
  BlocksTaskConfig cfg_;
  int blocks_ = 0;
};

std::string variant_name(BlocksVariant v);
BlocksVariant parse_variant(const std::string& s);  // "all" | "first" | "last", InputError otherwise
char token_char(int32_t t);                          // '_' PAD, '^' BOS, '.', '#', 'a'..'z'; '?' otherwise
int32_t char_token(char c);                          // the inverse of token_char; -1 for any other character

}  // namespace mta::tasks
