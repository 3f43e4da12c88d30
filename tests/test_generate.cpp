// Incremental decoding (DecoderT, MtaIncremental), sampling and generation, and the blocks task's
// text interface. The cached path is checked against the full forward pass (ModelT::forward) at every
// step, for every attention kind and every MTA option that changes what the cache must hold.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "model/decode_cpu.h"
#include "model/generate.h"
#include "model/model.h"
#include "tasks/blocks_task.h"
#include "tasks/task.h"
#include "util/error.h"

using mta::GenerateOptions;
using mta::ModelConfig;
using mta::ModelT;
using mta::StopReason;
using nlohmann::json;

namespace {

constexpr int kVocab = 13, kMaxSeq = 22;

json tiny_config(const json& attention) {
  // init_std 0.3: attention far from uniform, so a wrong row of the cache shows in the logits.
  return json{{"vocab_size", kVocab}, {"dim", 16},         {"n_layers", 3},        {"n_heads", 4},
              {"max_seq_len", kMaxSeq}, {"ffn_multiple_of", 8}, {"rope_theta", 100.0}, {"init_std", 0.3},
              {"attention", attention}};
}

// Every attention kind, and MTA with each option that changes what a new row reads.
std::vector<json> attention_cases() {
  const char* mta[] = {
      R"({"kq_pre": {"q": 2, "k": 3, "pad_key": "both"}})",
      R"({"kq_pre": {"q": 3, "k": 4, "pad_key": "left"}})",
      R"({"kq_pre": {"q": 4, "k": 3, "pad_key": "right"}})",
      R"({"kq_pre": {"q": 1, "k": 5, "pad_key": "both"}})",
      R"({"kq_post": {"q": 3, "k": 5, "pad_key": "both"}})",
      R"({"kq_post": {"q": 2, "k": 2, "pad_key": "right"}, "kq_pre": {"q": 2, "k": 2, "pad_key": "left"}})",
      R"({"head_pre": {"group": 2}})",
      R"({"head_pre": {"group": 4}, "head_post": {"group": 4}})",
      R"({"head_post": {"group": 2}})",
      R"({"norm": true, "gate": true, "depth_scale": true})",
      R"({"kq_pre": {"q": 3, "k": 3}, "kq_layers": [0, 2]})",
      R"({"kq_pre": {"q": 3, "k": 5}, "head_pre": {"group": 4}, "kq_post": {"q": 3, "k": 5},
          "head_post": {"group": 2}, "norm": true, "gate": true, "depth_scale": true, "kq_layers": [1]})",
  };
  std::vector<json> cases = {{{"type", "standard"}}, {{"type", "diff"}}};
  for (const char* m : mta) {
    json j = json::parse(m);
    j["type"] = "mta";
    cases.push_back(j);
  }
  return cases;
}

// Random weights, with the parameters init() leaves special (identity kernels, unit norms, zero
// gates) moved off their initial values so that every option does something.
template <typename T>
void randomize(ModelT<T>& m, uint64_t seed) {
  m.init(seed);
  std::mt19937_64 rng(seed + 100);
  std::normal_distribution<double> nd(0, 0.3);
  for (const auto& v : m.layout().views())
    if (!v.decay)
      for (size_t i = 0; i < v.size; ++i) m.params()[v.offset + i] += static_cast<T>(nd(rng));
}

std::vector<int32_t> random_ids(int n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> ids(n);
  for (auto& id : ids) id = static_cast<int32_t>(rng() % kVocab);
  return ids;
}

template <typename T>
double max_abs_diff(const std::vector<T>& a, const std::vector<T>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
  return m;
}

// (a) The cached logits after every token equal the last row of a full forward pass over the prefix:
// a prompt of 4 tokens fed at once, then one token at a time up to max_seq_len.
template <typename T>
void check_cache_equals_full(const json& attention, double tol) {
  SCOPED_TRACE(attention.dump());
  ModelT<T> m(mta::model_config_from_json(tiny_config(attention)));
  randomize(m, 11);
  const std::vector<int32_t> ids = random_ids(kMaxSeq, 5);
  mta::DecoderT<T> dec(m);
  double worst = 0, scale = 0;
  const int prompt = 4;
  std::vector<T> cached = dec.feed(std::vector<int32_t>(ids.begin(), ids.begin() + prompt));
  for (int t = prompt; t <= kMaxSeq; ++t) {
    const std::vector<T> full = mta::full_forward_logits(m, std::vector<int32_t>(ids.begin(), ids.begin() + t));
    const double diff = max_abs_diff(cached, full);
    worst = std::max(worst, diff);
    for (T x : full) scale = std::max(scale, std::abs(static_cast<double>(x)));
    EXPECT_LE(diff, tol) << "after " << t << " tokens";
    if (t < kMaxSeq) cached = dec.feed({ids[t]});
  }
  EXPECT_EQ(dec.length(), kMaxSeq);
  EXPECT_GT(scale, 0.5);  // the logits are not all near zero, so the comparison means something
  std::printf("  %-6s worst |cached - full| %.1e (logits up to %.2f)\n", sizeof(T) == 4 ? "float" : "double", worst,
              scale);
}

}  // namespace

// In float the two paths sum in different orders (the full forward's softmax and exp are vectorized,
// the cached row path is not), so they differ by rounding: ~1e-5 on logits of magnitude ~4, i.e. a
// few float ulps per layer. 5e-5 bounds that; exactness itself is the double test's job (1e-12).
TEST(Decode, CachedLogitsEqualFullForwardFloat) {
  for (const json& a : attention_cases()) check_cache_equals_full<float>(a, 5e-5);
}

TEST(Decode, CachedLogitsEqualFullForwardDouble) {
  for (const json& a : attention_cases()) check_cache_equals_full<double>(a, 1e-12);
}

TEST(Decode, PromptAtOnceEqualsTokenByToken) {
  for (const json& a : attention_cases()) {
    SCOPED_TRACE(a.dump());
    ModelT<double> m(mta::model_config_from_json(tiny_config(a)));
    randomize(m, 3);
    const std::vector<int32_t> ids = random_ids(15, 9);
    mta::DecoderT<double> whole(m), single(m);
    const std::vector<double> a1 = whole.feed(ids);
    std::vector<double> a2;
    for (int32_t id : ids) a2 = single.feed({id});
    EXPECT_LE(max_abs_diff(a1, a2), 1e-12);
    // Reset starts a new sequence.
    whole.reset();
    EXPECT_EQ(whole.length(), 0);
    EXPECT_LE(max_abs_diff(whole.feed(ids), a1), 0.0);
  }
}

TEST(Decode, Refusals) {
  ModelT<float> m(mta::model_config_from_json(tiny_config({{"type", "standard"}})));
  m.init(1);
  mta::Decoder dec(m);
  EXPECT_THROW(dec.feed({}), mta::InputError);
  EXPECT_THROW(dec.feed({kVocab}), mta::InputError);
  EXPECT_THROW(dec.feed({-1}), mta::InputError);
  dec.feed(random_ids(kMaxSeq, 1));
  EXPECT_THROW(dec.feed({0}), mta::InputError);  // longer than max_seq_len
}

// (b) Greedy generation gives the same tokens with and without the cache.
TEST(Generate, GreedySameTokensWithAndWithoutCache) {
  for (const json& a : attention_cases()) {
    SCOPED_TRACE(a.dump());
    ModelT<float> m(mta::model_config_from_json(tiny_config(a)));
    randomize(m, 21);
    GenerateOptions g;
    g.max_new = 14;
    const std::vector<int32_t> prompt = random_ids(5, 2);
    const auto cached = mta::generate(m, prompt, g);
    g.use_cache = false;
    const auto full = mta::generate(m, prompt, g);
    EXPECT_EQ(cached.tokens, full.tokens);
    EXPECT_EQ(cached.tokens.size(), 14u);
    EXPECT_EQ(cached.stop, StopReason::MaxNew);
    // Greedy: the first token is the argmax of the prompt's logits.
    const std::vector<float> l = mta::full_forward_logits(m, prompt);
    EXPECT_EQ(cached.tokens[0], std::max_element(l.begin(), l.end()) - l.begin());
  }
}

// (c) Sampling is a function of the seed; with the cache or without, in double, the same tokens.
TEST(Generate, SamplingDeterministicInSeed) {
  for (const json& a : {json{{"type", "standard"}}, json{{"type", "diff"}},
                        json::parse(R"({"type": "mta", "kq_pre": {"q": 3, "k": 3}, "kq_post": {"q": 2, "k": 3},
                                        "head_pre": {"group": 2}, "norm": true, "gate": true})")}) {
    SCOPED_TRACE(a.dump());
    ModelT<double> m(mta::model_config_from_json(tiny_config(a)));
    randomize(m, 4);
    GenerateOptions g;
    g.max_new = 16;
    g.sampling.temperature = 1.5;
    g.sampling.top_k = 6;
    g.sampling.seed = 7;
    const std::vector<int32_t> prompt = random_ids(3, 8);
    const auto first = mta::generate(m, prompt, g);
    EXPECT_EQ(mta::generate(m, prompt, g).tokens, first.tokens);
    g.use_cache = false;
    EXPECT_EQ(mta::generate(m, prompt, g).tokens, first.tokens);
    g.use_cache = true;
    g.sampling.seed = 8;
    EXPECT_NE(mta::generate(m, prompt, g).tokens, first.tokens);
  }
}

TEST(Generate, StopsWhenTheContextIsFullAndAtEos) {
  ModelT<float> m(mta::model_config_from_json(tiny_config(json::parse(R"({"type": "mta", "kq_pre": {"q": 2, "k": 3}})"))));
  randomize(m, 2);
  GenerateOptions g;
  g.max_new = 10;
  for (bool cache : {true, false}) {
    g.use_cache = cache;
    // A sequence of max_seq_len tokens still predicts one more; after that nothing can be fed.
    const auto r = mta::generate(m, random_ids(kMaxSeq - 2, 3), g);
    EXPECT_EQ(r.tokens.size(), 3u);
    EXPECT_EQ(r.stop, StopReason::ContextFull);
  }
  g.use_cache = true;
  const auto free_run = mta::generate(m, random_ids(4, 3), g);
  g.eos = free_run.tokens[2];
  const auto r = mta::generate(m, random_ids(4, 3), g);
  const size_t first = std::find(free_run.tokens.begin(), free_run.tokens.end(), g.eos) - free_run.tokens.begin();
  EXPECT_EQ(r.tokens, std::vector<int32_t>(free_run.tokens.begin(), free_run.tokens.begin() + first + 1));
  EXPECT_EQ(r.stop, StopReason::Eos);
  g.max_new = 0;
  EXPECT_TRUE(mta::generate(m, random_ids(4, 3), g).tokens.empty());
}

TEST(Generate, Refusals) {
  ModelT<float> m(mta::model_config_from_json(tiny_config({{"type", "standard"}})));
  m.init(1);
  GenerateOptions g;
  EXPECT_THROW(mta::generate(m, {}, g), mta::InputError);
  EXPECT_THROW(mta::generate(m, random_ids(kMaxSeq + 1, 1), g), mta::InputError);
  EXPECT_THROW(mta::generate(m, {1, kVocab}, g), mta::InputError);
  g.max_new = -1;
  EXPECT_THROW(mta::generate(m, {1}, g), mta::InputError);
}

TEST(Sampler, GreedyTopKAndFrequencies) {
  mta::Sampler greedy({});
  EXPECT_EQ(greedy.next({0.5, 2.0, 2.0, -1.0}), 1);  // ties go to the lower id
  mta::Sampler top1({0.7, 1, 3});
  for (int i = 0; i < 50; ++i) EXPECT_EQ(top1.next({0.5, 2.0, 2.0, -1.0}), 1);
  mta::Sampler top2({5.0, 2, 3});
  for (int i = 0; i < 200; ++i) {
    const int t = top2.next({0.5, 2.0, 1.9, 1.95});
    EXPECT_TRUE(t == 1 || t == 3) << t;
  }
  // p = (1/4, 3/4) at temperature 1; 40000 draws: standard error 0.0022.
  mta::Sampler s({1.0, 0, 11});
  int ones = 0;
  const int draws = 40000;
  for (int i = 0; i < draws; ++i) ones += s.next({0.0, std::log(3.0)});
  EXPECT_NEAR(static_cast<double>(ones) / draws, 0.75, 0.01);
  // Temperature 2 flattens: p1 = sqrt(3) / (1 + sqrt(3)).
  mta::Sampler hot({2.0, 0, 12});
  ones = 0;
  for (int i = 0; i < draws; ++i) ones += hot.next({0.0, std::log(3.0)});
  EXPECT_NEAR(static_cast<double>(ones) / draws, std::sqrt(3.0) / (1 + std::sqrt(3.0)), 0.01);
}

TEST(Sampler, Refusals) {
  EXPECT_THROW(mta::Sampler({-0.5, 0, 1}), mta::InputError);
  EXPECT_THROW(mta::Sampler({std::nan(""), 0, 1}), mta::InputError);
  EXPECT_THROW(mta::Sampler({1.0, -2, 1}), mta::InputError);
  EXPECT_THROW(mta::Sampler({0.0, 5, 1}), mta::InputError);  // top-k with greedy decoding
}

TEST(BlocksText, EncodeLaysOutThePromptAsTrainingDoes) {
  const json cfg = {{"name", "blocks"}, {"n", 3}, {"l", 2}, {"variant", "all"}, {"length", 30}};
  const auto task = mta::make_task(cfg, 1);
  mta::tasks::BlocksTask blocks({3, 2, mta::tasks::BlocksVariant::All, 30, 0});
  for (uint64_t index : {0, 1, 2}) {
    // A held-out example's input (its text without padding and label) encodes to the example's
    // tokens before the label.
    const mta::tasks::BlocksExample ex = blocks.example(1, mta::tasks::Stream::Test, index);
    const size_t body = ex.text.find_first_not_of('_');
    const std::string input = ex.text.substr(body, ex.text.size() - body - ex.label_len);
    EXPECT_EQ(task->encode(input), std::vector<int32_t>(ex.tokens.begin(), ex.tokens.begin() + ex.label_begin));
    // decode writes BOS and padding as '^' and '_'; text starting with '^' is taken verbatim.
    const std::string shown = task->decode(task->encode(input));
    EXPECT_EQ(shown, "^" + ex.text.substr(0, ex.text.size() - ex.label_len));
    EXPECT_EQ(task->decode(task->encode(shown)), shown);
  }
  EXPECT_EQ(task->encode("^a.#"), (std::vector<int32_t>{mta::tasks::kBos, 4, mta::tasks::kDot, mta::tasks::kHash}));
  EXPECT_EQ(task->decode({4, 29, 99}), "az?");
}

TEST(BlocksText, RefusesCharactersOutsideTheAlphabet) {
  const auto task = mta::make_task({{"name", "blocks"}, {"n", 3}, {"l", 2}, {"length", 30}}, 1);
  auto message = [&](const std::string& text) {
    try {
      task->encode(text);
    } catch (const mta::InputError& e) {
      return std::string(e.what());
    }
    return std::string("(accepted)");
  };
  EXPECT_NE(message("abC.def#ab").find("character 'C' at position 2"), std::string::npos) << message("abC");
  EXPECT_NE(message("ab c").find("character ' '"), std::string::npos);
  EXPECT_NE(message("a\xc3\xa9").find("character '\xc3\xa9' at position 1"), std::string::npos);
  EXPECT_NE(message("a\n").find("byte 0x0a"), std::string::npos);
}
