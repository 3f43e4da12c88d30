#include "tasks/blocks_task.h"

#include <algorithm>
#include <array>
#include <random>
#include <unordered_set>

#include "util/error.h"

namespace mta::tasks {
namespace {

constexpr int kLetters = 26;
// Generous: 3,000 times the paper's 319 characters, small enough that a typo cannot ask for billions of
// blocks per example.
constexpr int kMaxLength = 1 << 20;

std::string str(long long x) { return std::to_string(x); }

// splitmix64 finalizer (Steele, Lea, Flood 2014): a bijective 64-bit mixer.
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// One 64-bit seed per (seed, stream, index); chaining the mixer keeps the three inputs from
// cancelling each other (seed s, index i and seed i, index s give different examples).
uint64_t example_seed(uint64_t seed, Stream stream, uint64_t index) {
  uint64_t h = splitmix64(seed ^ 0x6d74612d626c6b73ULL);  // "mta-blks"
  h = splitmix64(h ^ static_cast<uint64_t>(static_cast<uint32_t>(stream)));
  return splitmix64(h ^ index);
}

// Unbiased draw in [0, n), n >= 1, by rejection on the raw 64-bit output. std::mt19937_64's output
// sequence is fixed by the standard (unlike std::uniform_int_distribution's mapping), so examples are
// identical under every standard library.
uint64_t draw(std::mt19937_64& rng, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;  // 2^64 mod n: values below it would bias the modulo
  uint64_t x;
  do x = rng();
  while (x < threshold);
  return x % n;
}

// First k entries of v become a uniformly random ordered selection of k distinct elements
// (partial Fisher-Yates).
template <typename T>
void partial_shuffle(std::mt19937_64& rng, T& v, int k) {
  const int n = static_cast<int>(v.size());
  for (int i = 0; i < k; ++i) {
    const int j = i + static_cast<int>(draw(rng, static_cast<uint64_t>(n - i)));
    std::swap(v[i], v[j]);
  }
}

// N distinct random letters, in random order, as a string of 'a'..'z'.
std::string random_block(std::mt19937_64& rng, int n) {
  std::array<char, kLetters> letters;
  for (int i = 0; i < kLetters; ++i) letters[i] = static_cast<char>('a' + i);
  partial_shuffle(rng, letters, n);
  return std::string(letters.begin(), letters.begin() + n);
}

bool contains_all(const std::string& block, const std::string& query) {
  for (char q : query)
    if (block.find(q) == std::string::npos) return false;
  return true;
}

// min(a * b, cap) for non-negative a, b, cap.
uint64_t mul_sat(uint64_t a, uint64_t b, uint64_t cap) {
  if (a == 0 || b == 0) return 0;
  if (a > cap / b) return cap;
  return std::min(a * b, cap);
}

uint64_t binomial(int n, int k) {  // exact for n <= 26 (at most C(26, 13) = 10,400,600)
  if (k < 0 || k > n) return 0;
  uint64_t r = 1;
  for (int i = 1; i <= k; ++i) r = r * static_cast<uint64_t>(n - k + i) / static_cast<uint64_t>(i);
  return r;
}

int32_t letter_token(char c) { return kFirstLetter + (c - 'a'); }

}  // namespace

BlocksTask::BlocksTask(const BlocksTaskConfig& cfg) : cfg_(cfg) {
  if (cfg.n < 1 || cfg.n > kLetters)
    throw InputError("task.n: must be in [1, 26] (got " + str(cfg.n) + ")");
  if (cfg.n == kLetters)
    throw InputError(
        "task.n: must be at most 25 (got 26): a block of all 26 letters contains every query letter, so "
        "no block but the target could avoid them");
  if (cfg.l < 1 || cfg.l > cfg.n)
    throw InputError("task.l: must be in [1, task.n = " + str(cfg.n) + "] (got " + str(cfg.l) + ")");
  if (cfg.variant != BlocksVariant::All && cfg.variant != BlocksVariant::First &&
      cfg.variant != BlocksVariant::Last)
    throw InputError("task.variant: must be \"all\", \"first\" or \"last\" (got value " +
                     str(static_cast<int>(cfg.variant)) + ")");

  // Characters for k blocks: k blocks of N letters, k - 1 dots, '#', L query letters, the label.
  const long long tail = 1LL + cfg.l + label_len();
  auto chars_for = [&](long long k) { return (cfg.n + 1LL) * k - 1 + tail; };
  if (cfg.length < chars_for(2))
    throw InputError("task.length: must be at least " + str(chars_for(2)) + " to hold 2 blocks of " +
                     str(cfg.n) + " letters, '#', " + str(cfg.l) + " query letters and a " + str(label_len()) +
                     "-letter label (got " + str(cfg.length) + ")");
  if (cfg.length > kMaxLength)
    throw InputError("task.length: must be at most " + str(kMaxLength) + " (got " + str(cfg.length) + ")");
  if (cfg.blocks < 0 || cfg.blocks == 1)
    throw InputError("task.blocks: must be 0 (as many as fit in task.length) or at least 2 (got " +
                     str(cfg.blocks) + ")");
  if (cfg.blocks == 0) {
    blocks_ = static_cast<int>((cfg.length - tail + 1) / (cfg.n + 1LL));
  } else {
    if (chars_for(cfg.blocks) > cfg.length)
      throw InputError("task.blocks: " + str(cfg.blocks) + " blocks need " + str(chars_for(cfg.blocks)) +
                       " characters but task.length is " + str(cfg.length) + " (at most " +
                       str((cfg.length - tail + 1) / (cfg.n + 1LL)) + " blocks fit)");
    blocks_ = cfg.blocks;
  }

  // Every non-target block must be a distinct string of N distinct letters that does not contain all L
  // query letters: there are (C(26, N) - C(26 - L, N - L)) * N! of them (the same for any query set).
  const uint64_t need = static_cast<uint64_t>(blocks_) - 1;
  const uint64_t sets = binomial(kLetters, cfg.n) - binomial(kLetters - cfg.l, cfg.n - cfg.l);
  uint64_t avail = sets;
  for (int i = 2; i <= cfg.n; ++i) avail = mul_sat(avail, static_cast<uint64_t>(i), need + 1);
  if (avail < need)
    throw InputError("task.blocks: " + str(blocks_) + " blocks" +
                     (cfg.blocks == 0 ? " (as many as fit in task.length = " + str(cfg.length) + ")" : "") +
                     " cannot all be distinct: only " + str(static_cast<long long>(avail)) + " blocks of " +
                     str(cfg.n) + " letters avoid containing all " + str(cfg.l) +
                     " query letters, so at most " + str(static_cast<long long>(avail) + 1) +
                     " blocks are possible");
}

int BlocksTask::label_len() const { return cfg_.variant == BlocksVariant::All ? cfg_.n : 1; }

BlocksExample BlocksTask::example(uint64_t seed, Stream stream, uint64_t index) const {
  std::mt19937_64 rng(example_seed(seed, stream, index));
  const int n = cfg_.n, l = cfg_.l;

  const std::string target = random_block(rng, n);
  std::string query = target;
  partial_shuffle(rng, query, l);
  query.resize(static_cast<size_t>(l));
  const int target_pos = static_cast<int>(draw(rng, static_cast<uint64_t>(blocks_)));

  std::vector<std::string> blocks(static_cast<size_t>(blocks_));
  std::unordered_set<std::string> placed;
  placed.reserve(static_cast<size_t>(blocks_) * 2);
  placed.insert(target);
  for (int b = 0; b < blocks_; ++b) {
    if (b == target_pos) {
      blocks[b] = target;
      continue;
    }
    std::string s;
    do s = random_block(rng, n);
    while (contains_all(s, query) || placed.count(s));  // terminates: the constructor counted enough
    placed.insert(s);
    blocks[b] = std::move(s);
  }

  std::string label;
  switch (cfg_.variant) {
    case BlocksVariant::All: label = target; break;
    case BlocksVariant::First: label = target.substr(0, 1); break;
    case BlocksVariant::Last: label = target.substr(static_cast<size_t>(n - 1), 1); break;
  }

  std::string body;
  body.reserve(static_cast<size_t>(cfg_.length));
  for (int b = 0; b < blocks_; ++b) {
    if (b > 0) body += '.';
    body += blocks[b];
  }
  body += '#';
  body += query;
  body += label;
  const int pad = cfg_.length - static_cast<int>(body.size());  // >= 0: the constructor checked the fit

  BlocksExample ex;
  ex.label_len = static_cast<int>(label.size());
  ex.label_begin = 1 + cfg_.length - ex.label_len;
  ex.text = std::string(static_cast<size_t>(pad), token_char(kPad)) + body;
  ex.tokens.reserve(static_cast<size_t>(seq_tokens()));
  ex.tokens.push_back(kBos);
  ex.tokens.insert(ex.tokens.end(), static_cast<size_t>(pad), kPad);
  for (char c : body) ex.tokens.push_back(c == '.' ? kDot : c == '#' ? kHash : letter_token(c));
  return ex;
}

std::string variant_name(BlocksVariant v) {
  switch (v) {
    case BlocksVariant::All: return "all";
    case BlocksVariant::First: return "first";
    case BlocksVariant::Last: return "last";
  }
  return "unknown";
}

BlocksVariant parse_variant(const std::string& s) {
  if (s == "all") return BlocksVariant::All;
  if (s == "first") return BlocksVariant::First;
  if (s == "last") return BlocksVariant::Last;
  throw InputError("task.variant: must be \"all\", \"first\" or \"last\" (got \"" + s + "\")");
}

char token_char(int32_t t) {
  if (t == kPad) return '_';
  if (t == kBos) return '^';
  if (t == kDot) return '.';
  if (t == kHash) return '#';
  if (t >= kFirstLetter && t < kFirstLetter + kLetters) return static_cast<char>('a' + (t - kFirstLetter));
  return '?';
}

int32_t char_token(char c) {
  if (c == '_') return kPad;
  if (c == '^') return kBos;
  if (c == '.') return kDot;
  if (c == '#') return kHash;
  if (c >= 'a' && c <= 'z') return letter_token(c);
  return -1;
}

}  // namespace mta::tasks
