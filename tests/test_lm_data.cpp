// The language-modelling data pipeline on a small generated corpus: tokenizer training and round
// trip, shard format and refusals, the LM task's batches (determinism, resume, epochs) and its
// perplexity (a uniform model has perplexity = vocabulary size). No network: the text is generated.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <unistd.h>

#include "data/encode_corpus.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "model/trainable.h"
#include "tasks/lm_task.h"
#include "util/error.h"
#include "util/hash.h"

namespace fs = std::filesystem;
using mta::InputError;
using mta::data::Shard;
using mta::data::ShardExpect;
using mta::data::Tokenizer;

namespace {

constexpr int kVocab = 320;  // the smallest that fits 256 byte pieces, the specials and some merges
constexpr int kSeq = 16;

void write_text(const fs::path& p, const std::string& s) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << s;
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Sentences of random words; each group has its own words, so groups differ in perplexity.
std::string generated_document(unsigned seed, const std::vector<std::string>& words, int lines) {
  std::mt19937 rng(seed);
  std::string s;
  for (int l = 0; l < lines; ++l) {
    const int n = 3 + static_cast<int>(rng() % 10);
    for (int i = 0; i < n; ++i) s += (i ? " " : "") + words[rng() % words.size()];
    s += l % 5 == 4 ? ".\n\n" : ".\n";
  }
  return s;
}

// One corpus and tokenizer for the whole suite (training takes a fraction of a second, but once is
// enough).
class LmData : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = new fs::path(fs::temp_directory_path() / ("mta-lm-test-" + std::to_string(::getpid())));
    fs::remove_all(*root_);
    const std::vector<std::string> a = {"the", "cat", "sat", "on", "a", "mat", "and", "looked", "at", "birds"};
    const std::vector<std::string> b = {"ships", "sail", "over", "grey", "seas", "while", "gulls", "cry", "42", "1999"};
    for (int d = 0; d < 4; ++d) {
      write_text(*root_ / "corpus/train/alpha" / ("doc" + std::to_string(d) + ".txt"), generated_document(d, a, 60));
      write_text(*root_ / "corpus/train/beta" / ("doc" + std::to_string(d) + ".txt"), generated_document(10 + d, b, 60));
    }
    // One line of 20,000 bytes (as a State of the Union address is): the trainer gets it in pieces
    // instead of skipping it, so its only word becomes a piece (TokenizerLearnsFromLongLines).
    std::string long_line;
    while (long_line.size() < 20000) long_line += "zyxw ";
    write_text(*root_ / "corpus/train/beta/long.txt", long_line + "\n");
    write_text(*root_ / "corpus/valid/alpha/v0.txt", generated_document(100, a, 30));
    write_text(*root_ / "corpus/valid/beta/v0.txt", generated_document(101, b, 20));
    write_text(*root_ / "corpus/valid/beta/v1.txt", generated_document(102, b, 3));
    model_ = new std::string(train(kVocab));
    write_text(tok_path(), *model_);
    const Tokenizer tok(tok_path());
    mta::data::write_shard(shard_path("train"), encode(tok, "train"));
    mta::data::write_shard(shard_path("valid"), encode(tok, "valid"));
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
    delete model_;
  }

  static std::string train(int vocab, const std::string& input = "corpus/train") {
    mta::data::TokenizerTrainOptions o;
    o.input_dir = (*root_ / input).string();
    o.vocab_size = vocab;
    return mta::data::train_tokenizer(o);
  }
  static Shard encode(const Tokenizer& tok, const std::string& split) {
    return mta::data::encode_documents(tok, mta::data::list_text_documents((*root_ / "corpus" / split).string()));
  }
  static std::string tok_path() { return (*root_ / "tok.model").string(); }
  static std::string shard_path(const std::string& split) { return (*root_ / (split + ".bin")).string(); }
  static ShardExpect expect() {
    const Tokenizer tok(tok_path());
    return {tok.vocab_size(), tok.checksum(), tok_path()};
  }
  static mta::LmTaskConfig task_config() {
    return {tok_path(), {shard_path("train")}, {shard_path("valid")}, kSeq};
  }

  static fs::path* root_;
  static std::string* model_;
};
fs::path* LmData::root_ = nullptr;
std::string* LmData::model_ = nullptr;

// The message of the InputError that f throws ("" if none).
template <typename F>
std::string input_error(F f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST_F(LmData, TokenizerRoundTripIsExact) {
  const Tokenizer tok(tok_path());
  EXPECT_EQ(tok.vocab_size(), kVocab);
  EXPECT_EQ(tok.checksum(), mta::fnv1a64(model_->data(), model_->size()));
  const std::vector<std::string> texts = {
      "the cat sat on a mat.",
      "",
      "\n",
      "ships sail\n\nover grey seas\n",
      "  leading and trailing spaces  ",
      "tabs\tand  double  spaces",
      "unseen letters: Zürich, naïve café, Ελληνικά, 日本語, emoji \xF0\x9F\x98\x80",
      "digits 1234567890 and symbols {}[]<>|~^",
  };
  for (const std::string& t : texts) {
    const std::vector<int32_t> ids = tok.encode(t);
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < kVocab) << id;
    EXPECT_EQ(tok.decode(ids), t);
  }
  EXPECT_TRUE(tok.encode("").empty());
  const std::vector<int32_t> nl = tok.encode("\n");
  ASSERT_EQ(nl.size(), 1u);
  EXPECT_EQ(nl[0], tok.newline_id());
  // Merges were learnt: common words take fewer tokens than characters.
  EXPECT_LT(tok.encode("the cat sat on a mat").size(), 12u);
  EXPECT_EQ(tok.decode({tok.bos_id()}), "");
}

TEST_F(LmData, TokenizerLearnsFromLongLines) {
  const Tokenizer tok(tok_path());
  EXPECT_EQ(tok.encode("zyxw").size(), 1u);
  EXPECT_EQ(tok.decode(tok.encode("zyxw zyxw")), "zyxw zyxw");
}

TEST_F(LmData, TokenizerTrainingIsDeterministic) {
  EXPECT_EQ(train(kVocab), *model_);
  EXPECT_NE(train(kVocab + 10), *model_);
}

TEST_F(LmData, TokenizerRefusals) {
  EXPECT_NE(input_error([] { Tokenizer t((*root_ / "missing.model").string()); }).find("missing.model"), std::string::npos);
  write_text(*root_ / "garbage.model", "not a model");
  EXPECT_NE(input_error([] { Tokenizer t((*root_ / "garbage.model").string()); }).find("garbage.model"), std::string::npos);
  const Tokenizer tok(tok_path());
  EXPECT_NE(input_error([&] { tok.decode({kVocab}); }).find("outside the vocabulary"), std::string::npos);
  EXPECT_NE(input_error([&] { tok.decode({-1}); }).find("outside the vocabulary"), std::string::npos);
  EXPECT_NE(input_error([] { train(100000); }).find("Vocabulary size too high"), std::string::npos);
  EXPECT_NE(input_error([] { train(kVocab, "no-such-folder"); }).find("no-such-folder"), std::string::npos);
}

TEST_F(LmData, ShardRoundTrip) {
  const Tokenizer tok(tok_path());
  const Shard written = encode(tok, "valid");
  const Shard read = mta::data::read_shard(shard_path("valid"), expect());
  EXPECT_EQ(read.tokens, written.tokens);
  EXPECT_EQ(read.vocab_size, kVocab);
  EXPECT_EQ(read.tokenizer_checksum, tok.checksum());
  EXPECT_EQ(read.groups, (std::vector<std::string>{"alpha", "beta"}));
  ASSERT_EQ(read.docs.size(), 3u);
  EXPECT_EQ(read.docs[2].name, "beta/v1");
  EXPECT_EQ(read.docs[2].group, 1);
  for (const auto& d : read.docs) EXPECT_EQ(read.tokens[d.first], tok.bos_id());
  // Each document decodes back to its file.
  const auto& d0 = read.docs[0];
  std::vector<int32_t> ids(read.tokens.begin() + static_cast<long>(d0.first) + 1,
                           read.tokens.begin() + static_cast<long>(d0.first + d0.count));
  EXPECT_EQ(tok.decode(ids), read_bytes(*root_ / "corpus/valid/alpha/v0.txt"));
  // uint16 ids: two bytes a token after the header.
  const std::string bytes = read_bytes(shard_path("valid"));
  uint32_t hlen = 0;
  std::memcpy(&hlen, bytes.data() + 12, 4);
  EXPECT_EQ(bytes.size(), 16 + hlen + 2 * read.tokens.size());

  // A vocabulary above 65536 ids is stored as uint32.
  Shard big;
  big.vocab_size = 70000;
  big.groups = {"g"};
  big.tokens = {1, 69999, 65536, 3};
  big.docs = {{0, 4, 0, "g/x"}};
  const std::string path = (*root_ / "big.bin").string();
  mta::data::write_shard(path, big);
  EXPECT_EQ(mta::data::read_shard(path, {}).tokens, big.tokens);
}

// Writes `bytes` to a file and returns the message reading it gives ("" if it is accepted).
std::string refusal(const fs::path& dir, const std::string& name, const std::string& bytes, const ShardExpect& e) {
  const std::string path = (dir / name).string();
  write_text(path, bytes);
  const std::string msg = input_error([&] { mta::data::read_shard(path, e); });
  EXPECT_NE(msg.find(path), std::string::npos) << "the message must name the file: " << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
  return msg;
}

TEST_F(LmData, ShardRefusals) {
  const std::string good = read_bytes(shard_path("valid"));
  const ShardExpect e = expect();
  const fs::path& d = *root_;
  EXPECT_NE(refusal(d, "cut.bin", good.substr(0, good.size() - 1), e).find("truncated"), std::string::npos);
  EXPECT_NE(refusal(d, "cut-header.bin", good.substr(0, 40), e).find("truncated"), std::string::npos);
  EXPECT_NE(refusal(d, "tiny.bin", good.substr(0, 4), e).find("not a token shard"), std::string::npos);
  EXPECT_NE(refusal(d, "long.bin", good + "xx", e).find("trailing bytes"), std::string::npos);
  std::string magic = good;
  magic[0] = 'X';
  EXPECT_NE(refusal(d, "magic.bin", magic, e).find("bad magic"), std::string::npos);
  std::string version = good;
  version[8] = 2;
  EXPECT_NE(refusal(d, "version.bin", version, e).find("version 2 is not supported"), std::string::npos);
  std::string corrupt = good;
  corrupt[corrupt.size() - 2] ^= 0x01;
  EXPECT_NE(refusal(d, "corrupt.bin", corrupt, e).find("corrupted"), std::string::npos);
  std::string header = good;
  header[17] = '[';  // the JSON header's second byte
  EXPECT_NE(refusal(d, "header.bin", header, e).find("corrupt header"), std::string::npos);

  // Another tokenizer: a different vocabulary size, or the same size but other merges.
  ShardExpect other_vocab = e;
  other_vocab.vocab_size = kVocab + 10;
  EXPECT_NE(refusal(d, "vocab.bin", good, other_vocab).find("vocabulary size 320 does not match 330"), std::string::npos);
  const std::string other_model = train(kVocab, "corpus/train/alpha");
  const Tokenizer other(other_model, "other.model");
  ASSERT_NE(other.checksum(), e.tokenizer_checksum);
  EXPECT_NE(refusal(d, "checksum.bin", good, {kVocab, other.checksum(), "other.model"}).find("re-run mta tokenize"),
            std::string::npos);

  // A token id outside the vocabulary the header declares: write with vocabulary 900, then make the
  // header say 400 (same length; the token checksum covers only the tokens).
  Shard s;
  s.vocab_size = 900;
  s.groups = {"g"};
  s.tokens = {1, 500, 2};
  s.docs = {{0, 3, 0, "g/x"}};
  std::vector<uint8_t> raw = mta::data::serialize_shard(s);
  std::string patched(raw.begin(), raw.end());
  patched.replace(patched.find("\"vocab_size\":900"), 16, "\"vocab_size\":400");
  EXPECT_NE(refusal(d, "range.bin", patched, {}).find("token id 500 at position 1 is outside"), std::string::npos);

  // The writer refuses what the reader would (nothing invalid is written).
  s.docs = {{0, 2, 0, "g/x"}};
  EXPECT_THROW(mta::data::serialize_shard(s), std::invalid_argument);
}

TEST_F(LmData, TaskRefusesMismatchedShards) {
  mta::LmTaskConfig c = task_config();
  const std::string other_path = (*root_ / "other.model").string();
  write_text(other_path, train(kVocab, "corpus/train/alpha"));
  c.tokenizer = other_path;
  const std::string msg = input_error([&] { mta::LmTask t(c, 1); });
  EXPECT_NE(msg.find(shard_path("train")), std::string::npos) << msg;
  EXPECT_NE(msg.find("checksum"), std::string::npos) << msg;
  c = task_config();
  c.seq_len = 100000;
  EXPECT_NE(input_error([&] { mta::LmTask t(c, 1); }).find("task.train_shards"), std::string::npos);
  EXPECT_NE(input_error([] { mta::lm_task_config_from_json({{"name", "lm"}, {"tokenizer", "t"}, {"train_shards", 3},
                                                            {"valid_shards", "v"}, {"seq_len", 8}}); })
                .find("task.train_shards"),
            std::string::npos);
  EXPECT_NE(input_error([] { mta::lm_task_config_from_json({{"name", "lm"}, {"tokenizer", "t"}, {"train_shards", "a"},
                                                            {"valid_shards", "v"}, {"seq_len", 8}, {"seqlen", 8}}); })
                .find("task.seqlen: unknown field"),
            std::string::npos);
}

bool same_batch(const mta::Batch& a, const mta::Batch& b) {
  return a.B == b.B && a.T == b.T && a.inputs == b.inputs && a.targets == b.targets && a.weights == b.weights;
}

TEST_F(LmData, BatchesArePureFunctionsOfSeedAndPosition) {
  const mta::LmTask a(task_config(), 7), b(task_config(), 7), other_seed(task_config(), 8);
  const uint64_t W = a.windows_per_epoch();
  ASSERT_GE(W, 20u) << "the test corpus should give a few dozen windows";
  // A fresh task object (what a resumed run builds) gives the same batch at the same position, in
  // any order of requests (the cached epoch permutation must not leak state).
  for (uint64_t p : {uint64_t{0}, W - 2, 5 * W + 3, uint64_t{3}}) {
    EXPECT_TRUE(same_batch(a.train_batch(p, 4), b.train_batch(p, 4))) << p;
  }
  EXPECT_FALSE(same_batch(a.train_batch(0, 4), other_seed.train_batch(0, 4)));
  // Batch boundaries do not matter: [p, p + 4) is [p, p + 2) then [p + 2, p + 4).
  const mta::Batch whole = a.train_batch(W - 2, 4), lo = a.train_batch(W - 2, 2), hi = a.train_batch(W, 2);
  std::vector<int32_t> joined = lo.inputs;
  joined.insert(joined.end(), hi.inputs.begin(), hi.inputs.end());
  EXPECT_EQ(whole.inputs, joined);
  // Next-token targets at every position, all scored.
  const mta::Batch x = a.train_batch(11, 3);
  for (int e = 0; e < 3; ++e)
    for (int t = 0; t + 1 < kSeq; ++t) EXPECT_EQ(x.inputs[e * kSeq + t + 1], x.targets[e * kSeq + t]);
  for (float w : x.weights) EXPECT_EQ(w, 1.0f);
}

TEST_F(LmData, EachEpochVisitsEveryWindowOnce) {
  const mta::LmTask task(task_config(), 3);
  const uint64_t W = task.windows_per_epoch(), T = kSeq;
  EXPECT_EQ(W, (task.train_tokens() - T) / T);
  std::vector<uint64_t> orders[2];
  for (uint64_t epoch = 0; epoch < 2; ++epoch) {
    std::set<uint64_t> starts;
    const uint64_t offset = task.window_start(epoch * W) % T;
    for (uint64_t i = 0; i < W; ++i) {
      const uint64_t s = task.window_start(epoch * W + i);
      EXPECT_EQ(s % T, offset) << "one cut per epoch";
      EXPECT_LE(s + T + 1, task.train_tokens());
      starts.insert(s);
      orders[epoch].push_back(s / T);
    }
    EXPECT_EQ(starts.size(), W) << "no window twice in an epoch";
  }
  EXPECT_NE(orders[0], orders[1]) << "each epoch has its own order";
}

// A model whose logits are all equal predicts the uniform distribution: perplexity = vocabulary
// size. With tied embeddings, a zero embedding matrix makes every logit 0 (the final RMSNorm of a
// zero residual stream is zero, and the logits are that times the embeddings).
TEST_F(LmData, UniformModelHasPerplexityEqualToVocabularySize) {
  const mta::LmTask task(task_config(), 1);
  const mta::ModelConfig cfg = mta::model_config_from_json(
      {{"vocab_size", kVocab}, {"dim", 16}, {"n_layers", 2}, {"n_heads", 2}, {"max_seq_len", kSeq}, {"ffn_multiple_of", 16},
       {"attention", {{"type", "mta"}, {"kq_pre", {{"q", 2}, {"k", 3}}}}}});
  auto model = mta::make_trainable_model(cfg, "cpu");
  model->init(1);
  std::vector<float> params, m, v;
  model->get_state(&params, &m, &v);
  const auto& view = model->layout().view("tok_embeddings.weight");
  std::fill(params.begin() + static_cast<long>(view.offset), params.begin() + static_cast<long>(view.offset + view.size), 0.0f);
  model->set_state(params, nullptr, nullptr);

  const nlohmann::json e = task.evaluate(*model, 1 << 20, 3);
  EXPECT_NEAR(e["ppl"].get<double>(), kVocab, 1e-3 * kVocab);
  EXPECT_NEAR(e["ppl_mean_of_groups"].get<double>(), kVocab, 1e-3 * kVocab);
  EXPECT_NEAR(e["loss"].get<double>(), std::log(static_cast<double>(kVocab)), 1e-5);
  // Every validation token after its document's BOS is scored once.
  const Shard valid = mta::data::read_shard(shard_path("valid"), expect());
  long long scored = 0;
  for (const auto& d : valid.docs) scored += static_cast<long long>(d.count) - 1;
  EXPECT_EQ(e["tokens"].get<long long>(), scored);
  EXPECT_EQ(e["groups"]["alpha"]["tokens"].get<long long>() + e["groups"]["beta"]["tokens"].get<long long>(), scored);
  for (const char* g : {"alpha", "beta"}) EXPECT_NEAR(e["groups"][g]["ppl"].get<double>(), kVocab, 1e-3 * kVocab);
  EXPECT_EQ(e["windows"].get<size_t>(), task.validation_windows());
  // A subset of windows, evenly spaced.
  EXPECT_EQ(task.evaluate(*model, 3, 2)["windows"].get<int>(), 3);
}

// The initialised (non-uniform) model: the evaluation is a plain function of the weights, the
// same in any batch size, and the group losses combine into the overall one.
TEST_F(LmData, PerplexityIsIndependentOfBatching) {
  const mta::LmTask task(task_config(), 1);
  const mta::ModelConfig cfg = mta::model_config_from_json({{"vocab_size", kVocab}, {"dim", 16}, {"n_layers", 1},
                                                           {"n_heads", 2}, {"max_seq_len", kSeq}, {"ffn_multiple_of", 16},
                                                           {"attention", {{"type", "standard"}}}});
  auto model = mta::make_trainable_model(cfg, "cpu");
  model->init(5);
  const nlohmann::json a = task.evaluate(*model, 1 << 20, 1), b = task.evaluate(*model, 1 << 20, 64);
  EXPECT_NEAR(a["loss"].get<double>(), b["loss"].get<double>(), 1e-6);
  double sum = 0;
  for (const auto& [name, g] : a["groups"].items()) sum += g["loss"].get<double>() * g["tokens"].get<double>();
  EXPECT_NEAR(sum / a["tokens"].get<double>(), a["loss"].get<double>(), 1e-9);
  EXPECT_NEAR(a["ppl"].get<double>(), std::exp(a["loss"].get<double>()), 1e-9 * a["ppl"].get<double>());
}

TEST_F(LmData, TaskTextInterface) {
  auto task = mta::make_task({{"name", "lm"}, {"tokenizer", tok_path()}, {"train_shards", {shard_path("train")}},
                              {"valid_shards", shard_path("valid")}, {"seq_len", kSeq}},
                             1);
  EXPECT_EQ(task->name(), "lm");
  EXPECT_EQ(task->primary_metric(), "ppl");
  EXPECT_EQ(task->vocab_size(), kVocab);
  const std::string text = "the gulls cry over grey seas.\nA new line";
  EXPECT_EQ(task->decode(task->encode(text)), text);
  // Ids past the tokenizer's vocabulary (a larger model vocabulary) are shown, not refused.
  std::vector<int32_t> with_unknown = task->encode("sea");
  with_unknown.push_back(kVocab + 3);
  EXPECT_EQ(task->decode(with_unknown), "sea<unk:" + std::to_string(kVocab + 3) + ">");

  auto blocks = mta::make_task({{"name", "blocks"}, {"n", 3}, {"l", 2}, {"length", 30}}, 1);
  const std::vector<int32_t> ids = blocks->encode("^__abc.def#ab");
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(blocks->decode(ids), "^__abc.def#ab");
  EXPECT_NE(input_error([&] { blocks->encode("ABC"); }).find("'A'"), std::string::npos);
}

}  // namespace
