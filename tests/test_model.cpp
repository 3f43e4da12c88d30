// Whole-model gradient checks in float64 (central finite differences) for each attention kind, and
// config refusals. The comparison with a PyTorch implementation lives in tests/oracle/check_model.py.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <random>

#include "model/model.h"
#include "util/error.h"

using mta::Batch;
using mta::ModelConfig;
using mta::ModelT;
using nlohmann::json;

namespace {

json tiny_config(const json& attention) {
  return json{{"vocab_size", 11}, {"dim", 8},          {"n_layers", 2},       {"n_heads", 2},
              {"max_seq_len", 9}, {"ffn_multiple_of", 4}, {"rope_theta", 100.0}, {"attention", attention}};
}

Batch random_batch(int B, int T, int V, unsigned seed) {
  std::mt19937 rng(seed);
  Batch b;
  b.B = B, b.T = T;
  for (int i = 0; i < B * T; ++i) {
    b.inputs.push_back(static_cast<int32_t>(rng() % V));
    b.targets.push_back(static_cast<int32_t>(rng() % V));
    b.weights.push_back(rng() % 3 == 0 ? 0.0f : 1.0f);
  }
  return b;
}

void check_model_gradients(const json& attention, float dropout) {
  SCOPED_TRACE(attention.dump());
  json cj = tiny_config(attention);
  cj["dropout"] = dropout;
  ModelConfig cfg = mta::model_config_from_json(cj);
  ModelT<double> m(cfg);
  m.init(3);
  // Move every parameter off its initial value so identity kernels and unit norms are not special.
  std::mt19937_64 rng(5);
  std::normal_distribution<double> nd(0, 0.1);
  for (auto& p : m.params()) p += nd(rng);
  Batch batch = random_batch(2, 7, cfg.vocab_size, 9);
  const bool train = dropout > 0;
  m.zero_grads();
  m.forward_backward(batch, 1.0, train, 77);
  const std::vector<double> analytic = m.grads();

  auto loss = [&]() {
    m.zero_grads();
    return m.forward_backward(batch, 0.0, train, 77).loss_sum;
  };
  // Every parameter view: a few coordinates each (all of the small ones).
  double worst = 0;
  std::string worst_name;
  for (const auto& v : m.layout().views()) {
    const size_t count = std::min<size_t>(v.size, 6);
    for (size_t c = 0; c < count; ++c) {
      const size_t i = v.offset + (c * 7919) % v.size;
      const double x0 = m.params()[i], h = 1e-5;
      m.params()[i] = x0 + h;
      const double fp = loss();
      m.params()[i] = x0 - h;
      const double fm = loss();
      m.params()[i] = x0;
      const double numeric = (fp - fm) / (2 * h);
      const double diff = std::abs(numeric - analytic[i]), mag = std::abs(numeric) + std::abs(analytic[i]);
      const double err = diff / std::max(1e-6, mag);
      if (err > worst) worst = err, worst_name = v.name;
      // Relative 1e-6, plus the finite difference's own rounding noise: the loss (~50) is summed in
      // an order that depends on the thread count, so fp - fm carries ~1e-14 of noise, i.e. ~1e-9
      // in `numeric`. Without the absolute term, coordinates with gradients ~1e-3 fail at some
      // thread counts (3) although the gradients agree across thread counts to 4e-16.
      EXPECT_LE(diff, 1e-6 * mag + 1e-8) << v.name << "[" << i - v.offset << "] numeric " << numeric << " analytic "
                                         << analytic[i];
    }
  }
  std::printf("  worst relative error %.2e (%s)\n", worst, worst_name.c_str());
}

}  // namespace

TEST(Model, GradientsStandard) { check_model_gradients({{"type", "standard"}}, 0.0f); }

TEST(Model, GradientsMta) {
  check_model_gradients(json::parse(R"({"type": "mta", "kq_pre": {"q": 2, "k": 3}, "head_pre": {"group": 2},
      "kq_post": {"q": 2, "k": 3, "pad_key": "left"}, "head_post": {"group": 2}, "norm": true, "gate": true,
      "depth_scale": true, "kq_layers": [1]})"),
                        0.0f);
}

TEST(Model, GradientsDiff) { check_model_gradients({{"type", "diff"}}, 0.0f); }

TEST(Model, GradientsWithDropout) {
  check_model_gradients(json::parse(R"({"type": "mta", "kq_pre": {"q": 2, "k": 3}, "head_post": {"group": 2}})"), 0.2f);
  check_model_gradients({{"type", "diff"}}, 0.2f);
}

TEST(Model, SameSeedSameLoss) {
  ModelConfig cfg = mta::model_config_from_json(tiny_config({{"type", "mta"}, {"kq_pre", {{"q", 2}, {"k", 3}}}}));
  Batch batch = random_batch(2, 9, cfg.vocab_size, 1);
  mta::Model a(cfg), b(cfg);
  a.init(42), b.init(42);
  EXPECT_EQ(a.params(), b.params());
  EXPECT_EQ(a.forward_backward(batch, 1.0f, true, 5).loss_sum, b.forward_backward(batch, 1.0f, true, 5).loss_sum);
  EXPECT_EQ(a.grads(), b.grads());
  mta::Model c(cfg);
  c.init(43);
  EXPECT_NE(a.params(), c.params());
}

TEST(Model, IdentityMtaEqualsStandardAtInit) {
  // MTA with identity kernels and no norm/gate is standard attention: the same weights give the same loss.
  json mta_att = json::parse(R"({"type": "mta", "kq_pre": {"q": 2, "k": 5}, "head_pre": {"group": 2},
      "kq_post": {"q": 3, "k": 3}, "head_post": {"group": 2}})");
  ModelConfig cs = mta::model_config_from_json(tiny_config({{"type", "standard"}}));
  ModelConfig cm = mta::model_config_from_json(tiny_config(mta_att));
  mta::ModelT<double> s(cs), m(cm);
  s.init(1), m.init(1);
  for (const auto& v : s.layout().views())
    std::copy_n(s.params().data() + v.offset, v.size, m.param(v.name));
  Batch batch = random_batch(2, 9, cs.vocab_size, 2);
  EXPECT_NEAR(s.forward(batch).loss_sum, m.forward(batch).loss_sum, 1e-12);
}

TEST(Model, ConfigRefusals) {
  auto refusal = [](json j) {
    try {
      mta::model_config_from_json(j);
    } catch (const mta::InputError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  json base = tiny_config({{"type", "standard"}});
  json j = base;
  j["n_heads"] = 3;
  EXPECT_NE(refusal(j).find("model.n_heads: must divide dim"), std::string::npos);
  j = base;
  j["dimm"] = 3;
  EXPECT_NE(refusal(j).find("model.dimm: unknown field"), std::string::npos);
  j = tiny_config({{"type", "mta"}, {"kq_layers", {0, 5}}});
  EXPECT_NE(refusal(j).find("model.attention.kq_layers: layer 5 is out of range"), std::string::npos);
  j = tiny_config({{"type", "mta"}, {"head_pre", {{"group", 3}}}});
  EXPECT_NE(refusal(j).find("model.attention.head_pre.group"), std::string::npos);
  j = tiny_config({{"type", "flash"}});
  EXPECT_NE(refusal(j).find("model.attention.type"), std::string::npos);
  j = base;
  j["n_heads"] = 1;
  j["attention"] = {{"type", "diff"}};
  EXPECT_NE(refusal(j).find("even n_heads"), std::string::npos);
  j = base;
  j.erase("vocab_size");
  EXPECT_NE(refusal(j).find("model.vocab_size: missing"), std::string::npos);
}

TEST(Model, RefusesBadBatch) {
  ModelConfig cfg = mta::model_config_from_json(tiny_config({{"type", "standard"}}));
  mta::Model m(cfg);
  m.init(0);
  Batch b = random_batch(1, 5, cfg.vocab_size, 0);
  b.inputs[2] = 99;
  EXPECT_THROW(m.forward(b), mta::InputError);
  Batch longb = random_batch(1, 10, cfg.vocab_size, 0);
  EXPECT_THROW(m.forward(longb), mta::InputError);
}

// wq|wk|wv and w1|w3 are packed back to back (the GPU multiplies each block as one matrix), also
// when their sizes are not multiples of 16 floats; every other view stays 16-float aligned, and names,
// shapes and order are unchanged.
TEST(Model, PackedProjectionLayout) {
  json cj = tiny_config({{"type", "standard"}});
  cj["dim"] = 6, cj["n_heads"] = 3, cj["ffn_hidden"] = 7;  // 36 and 42 floats: not multiples of 16
  const ModelConfig cfg = mta::model_config_from_json(cj);
  mta::Model m(cfg);
  const mta::ParamLayout& lay = m.layout();
  for (int l = 0; l < cfg.n_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    const auto& wq = lay.view(p + "attention.wq.weight");
    const auto& wk = lay.view(p + "attention.wk.weight");
    const auto& wv = lay.view(p + "attention.wv.weight");
    const auto& w1 = lay.view(p + "feed_forward.w1.weight");
    const auto& w3 = lay.view(p + "feed_forward.w3.weight");
    EXPECT_EQ(wk.offset, wq.offset + 36);
    EXPECT_EQ(wv.offset, wk.offset + 36);
    EXPECT_EQ(w3.offset, w1.offset + 42);
    EXPECT_EQ(wk.shape, (std::vector<long long>{6, 6}));
    EXPECT_EQ(w3.shape, (std::vector<long long>{7, 6}));
  }
  std::vector<std::string> names;
  size_t end = 0;
  for (const auto& v : lay.views()) {
    names.push_back(v.name);
    EXPECT_GE(v.offset, end) << v.name;  // no overlap
    end = v.offset + v.size;
    const bool packed = v.name.find("wk.weight") != std::string::npos || v.name.find("wv.weight") != std::string::npos ||
                        v.name.find("w3.weight") != std::string::npos;
    if (!packed) EXPECT_EQ(v.offset % 16, 0u) << v.name;
  }
  EXPECT_LE(end, lay.total());
  EXPECT_EQ(lay.total() % 16, 0u);
  ASSERT_GE(names.size(), 10u);
  EXPECT_EQ(names[0], "tok_embeddings.weight");
  const std::vector<std::string> layer0 = {"attention_norm.weight", "attention.wq.weight", "attention.wk.weight",
                                           "attention.wv.weight",   "attention.wo.weight", "ffn_norm.weight",
                                           "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight"};
  for (size_t i = 0; i < layer0.size(); ++i) EXPECT_EQ(names[1 + i], "layers.0." + layer0[i]);
}

TEST(Model, LlamaHiddenRule) {
  EXPECT_EQ(mta::llama_ffn_hidden(256, 256), 768);
  EXPECT_EQ(mta::llama_ffn_hidden(4096, 256), 11008);
}
