// CPU reference tests that need no PyTorch: identity initialisation equals standard attention,
// float64 finite differences for every gradient, and thread-count independence. The comparison with
// an independent PyTorch implementation lives in tests/oracle/check_attn.py.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "attention/mta_cpu.h"
#include "attn_test_util.h"
#include "util/error.h"

using mta::AttentionSpec;
using mta::AttnDims;
using mta::testing::AttnCase;
using mta::testing::random_case;
using mta::testing::rel_err;
using nlohmann::json;

namespace {

AttentionSpec spec(const std::string& s) { return mta::spec_from_json(json::parse(s)); }

// Standard causal softmax attention, written as plainly as possible.
std::vector<double> standard_attention(const AttnDims& d, const std::vector<double>& q, const std::vector<double>& k,
                                       const std::vector<double>& v) {
  std::vector<double> out(q.size(), 0.0);
  const double s = 1.0 / std::sqrt(static_cast<double>(d.D));
  for (int bh = 0; bh < d.B * d.H; ++bh) {
    const size_t base = static_cast<size_t>(bh) * d.T * d.D;
    for (int i = 0; i < d.T; ++i) {
      std::vector<double> logit(i + 1);
      double m = -1e300;
      for (int j = 0; j <= i; ++j) {
        double dot = 0;
        for (int e = 0; e < d.D; ++e) dot += q[base + i * d.D + e] * k[base + j * d.D + e];
        logit[j] = s * dot;
        m = std::max(m, logit[j]);
      }
      double sum = 0;
      for (auto& x : logit) sum += (x = std::exp(x - m));
      for (int j = 0; j <= i; ++j)
        for (int e = 0; e < d.D; ++e) out[base + i * d.D + e] += logit[j] / sum * v[base + j * d.D + e];
    }
  }
  return out;
}

template <typename T>
std::vector<T> forward(const AttnCase<T>& c) {
  std::vector<T> out(c.v.size());
  mta::cpu::mta_forward<T>(c.spec, c.dims, c.q.data(), c.k.data(), c.v.data(), c.param_ptrs(), out.data(), c.opt);
  return out;
}

// sum(out * dout), the scalar whose gradient mta_backward computes.
double objective(const AttnCase<double>& c) {
  auto out = forward(c);
  double s = 0;
  for (size_t i = 0; i < out.size(); ++i) s += out[i] * c.dout[i];
  return s;
}

struct Grads {
  std::vector<double> dq, dk, dv;
  std::map<std::string, std::vector<double>> params;
};

Grads backward(const AttnCase<double>& c) {
  Grads g;
  g.dq.assign(c.q.size(), 0), g.dk.assign(c.q.size(), 0), g.dv.assign(c.v.size(), 0);
  for (const auto& [name, val] : c.params) g.params[name].assign(val.size(), 0.0);
  const auto pg = mta::attn_pointers<mta::AttnParamGrads<double>>([&](const char* n) -> double* {
    auto it = g.params.find(n);
    return it == g.params.end() ? nullptr : it->second.data();
  });
  mta::cpu::mta_backward<double>(c.spec, c.dims, c.q.data(), c.k.data(), c.v.data(), c.param_ptrs(), c.dout.data(),
                                 g.dq.data(), g.dk.data(), g.dv.data(), pg, c.opt);
  return g;
}

// Central differences of the objective along every coordinate of x (a member of c).
std::vector<double> numeric_grad(AttnCase<double>& c, std::vector<double>& x) {
  const double h = 1e-6;
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = objective(c);
    x[i] = x0 - h;
    const double fm = objective(c);
    x[i] = x0;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

void check_gradients(const std::string& spec_json, int B, int T, unsigned seed, int Dv = 0, float dropout = 0) {
  SCOPED_TRACE(spec_json);
  AttnCase<double> c = random_case<double>(spec(spec_json), B, T, seed, false, Dv);
  c.opt.dropout = dropout;
  c.opt.dropout_seed = seed * 77 + 1;
  Grads g = backward(c);
  EXPECT_LT(rel_err(g.dq, numeric_grad(c, c.q)), 1e-7) << "grad_q";
  EXPECT_LT(rel_err(g.dk, numeric_grad(c, c.k)), 1e-7) << "grad_k";
  EXPECT_LT(rel_err(g.dv, numeric_grad(c, c.v)), 1e-7) << "grad_v";
  for (auto& [name, val] : c.params) EXPECT_LT(rel_err(g.params[name], numeric_grad(c, val)), 1e-7) << "grad_" << name;
}

}  // namespace

TEST(MtaCpu, IdentityInitEqualsStandardAttention) {
  const char* specs[] = {
      R"({"heads": 4, "head_dim": 8, "kq_pre": {"q": 2, "k": 9, "pad_key": "both"}})",
      R"({"heads": 4, "head_dim": 8, "kq_pre": {"q": 6, "k": 11}, "head_pre": {"group": 4},
          "kq_post": {"q": 6, "k": 11}, "head_post": {"group": 4}})",
      R"({"heads": 6, "head_dim": 5, "kq_pre": {"q": 3, "k": 4, "pad_key": "left"}, "head_pre": {"group": 2},
          "kq_post": {"q": 1, "k": 3, "pad_key": "right"}, "head_post": {"group": 3}})",
      R"({"heads": 2, "head_dim": 4})",
  };
  for (const char* s : specs) {
    for (int T : {1, 3, 17}) {
      SCOPED_TRACE(std::string(s) + " T=" + std::to_string(T));
      AttnCase<double> c = random_case<double>(spec(s), 2, T, 7, /*identity=*/true);
      EXPECT_LT(rel_err(forward(c), standard_attention(c.dims, c.q, c.k, c.v)), 1e-13);
    }
  }
}

TEST(MtaCpu, IdentityInitWithEpilogueIsStandardAttentionThenNormScaleGate) {
  AttnCase<double> c = random_case<double>(
      spec(R"({"heads": 2, "head_dim": 6, "kq_pre": {"q": 2, "k": 3}, "norm": true, "depth_scale_layer": 2, "gate": true})"),
      1, 9, 3, true);
  c.params["gate_w"] = {0.3, -0.2, 0.5, 0.1, -0.4, 0.2};
  c.params["gate_b"] = {0.25};
  auto ref = standard_attention(c.dims, c.q, c.k, c.v);
  const double scale = 1.0 - (0.8 - 0.6 * std::exp(-0.6));
  for (size_t row = 0; row < ref.size() / 6; ++row) {
    double* o = &ref[row * 6];
    double ms = 0;
    for (int d = 0; d < 6; ++d) ms += o[d] * o[d] / 6;
    double z = 0.25;
    for (int d = 0; d < 6; ++d) o[d] = o[d] / std::sqrt(ms + 1e-5) * scale, z += o[d] * c.params["gate_w"][d];
    for (int d = 0; d < 6; ++d) o[d] /= 1 + std::exp(-z);
  }
  EXPECT_LT(rel_err(forward(c), ref), 1e-13);
}

TEST(MtaCpu, NonIdentityKernelsChangeTheOutput) {
  // Guards against a path that ignores its weights.
  auto s = spec(R"({"heads": 2, "head_dim": 4, "kq_pre": {"q": 2, "k": 3}, "kq_post": {"q": 2, "k": 3}})");
  AttnCase<double> c = random_case<double>(s, 1, 8, 5);
  EXPECT_GT(rel_err(forward(c), standard_attention(c.dims, c.q, c.k, c.v)), 1e-2);
}

TEST(MtaCpu, FiniteDifferencesStandard) { check_gradients(R"({"heads": 2, "head_dim": 3})", 2, 5, 1); }

// Standard specs take mta_cpu.cpp's row path up to T = 128 and the general path beyond; both are
// checked against finite differences (with dropout and wider values too), and against each other.
TEST(MtaCpu, FiniteDifferencesStandardBothPaths) {
  check_gradients(R"({"heads": 2, "head_dim": 5})", 2, 9, 21, /*Dv=*/10, /*dropout=*/0.3f);
  check_gradients(R"({"heads": 1, "head_dim": 9})", 1, 19, 22);
  check_gradients(R"({"heads": 1, "head_dim": 1})", 1, 129, 23, 0, 0.2f);  // T > 128: the general path
}

// A 1x1 identity key-query convolution computes standard attention through the general path: the
// row path's outputs and gradients must match it (head dims around the vector widths, Dv = 2D,
// dropout, the longest T of the row path).
TEST(MtaCpu, RowPathMatchesGeneralPath) {
  struct Case {
    int H, D, Dv, T;
    float dropout;
  };
  for (const Case& k : {Case{2, 19, 0, 37, 0.0f}, Case{3, 5, 10, 70, 0.2f}, Case{1, 32, 0, 128, 0.1f},
                        Case{2, 8, 0, 1, 0.0f}, Case{2, 17, 34, 16, 0.0f}}) {
    const std::string dims = "\"heads\": " + std::to_string(k.H) + ", \"head_dim\": " + std::to_string(k.D);
    SCOPED_TRACE(dims + " Dv=" + std::to_string(k.Dv) + " T=" + std::to_string(k.T));
    // Same seed: the same q, k, v and dout (parameters are drawn after them).
    AttnCase<double> row = random_case<double>(spec("{" + dims + "}"), 2, k.T, 31, true, k.Dv);
    AttnCase<double> gen =
        random_case<double>(spec("{" + dims + R"(, "kq_pre": {"q": 1, "k": 1}})"), 2, k.T, 31, true, k.Dv);
    row.opt.dropout = gen.opt.dropout = k.dropout;
    row.opt.dropout_seed = gen.opt.dropout_seed = 99;
    EXPECT_LT(rel_err(forward(row), forward(gen)), 1e-13);
    Grads gr = backward(row), gg = backward(gen);
    EXPECT_LT(rel_err(gr.dq, gg.dq), 1e-12);
    EXPECT_LT(rel_err(gr.dk, gg.dk), 1e-12);
    EXPECT_LT(rel_err(gr.dv, gg.dv), 1e-12);
    // float: the vector kernels' other instantiation.
    AttnCase<float> rowf = random_case<float>(row.spec, 2, k.T, 31, true, k.Dv);
    AttnCase<float> genf = random_case<float>(gen.spec, 2, k.T, 31, true, k.Dv);
    rowf.opt = row.opt, genf.opt = gen.opt;
    auto of = forward(rowf), og = forward(genf);
    EXPECT_LT(rel_err(std::vector<double>(of.begin(), of.end()), std::vector<double>(og.begin(), og.end())), 1e-5);
  }
}

TEST(MtaCpu, FiniteDifferencesKqPre) {
  check_gradients(R"({"heads": 2, "head_dim": 3, "kq_pre": {"q": 3, "k": 5, "pad_key": "both"}})", 1, 7, 2);
  check_gradients(R"({"heads": 1, "head_dim": 2, "kq_pre": {"q": 4, "k": 6, "pad_key": "left"}})", 1, 3, 3);
}

TEST(MtaCpu, FiniteDifferencesHeadMixing) {
  check_gradients(R"({"heads": 4, "head_dim": 2, "head_pre": {"group": 2}, "head_post": {"group": 4}})", 2, 4, 4);
}

TEST(MtaCpu, FiniteDifferencesKqPost) {
  check_gradients(R"({"heads": 2, "head_dim": 3, "kq_post": {"q": 2, "k": 4, "pad_key": "right"}})", 1, 6, 5);
}

TEST(MtaCpu, FiniteDifferencesEverything) {
  check_gradients(R"({"heads": 4, "head_dim": 3, "kq_pre": {"q": 2, "k": 3}, "head_pre": {"group": 4},
      "kq_post": {"q": 3, "k": 3, "pad_key": "left"}, "head_post": {"group": 2},
      "norm": true, "depth_scale_layer": 1, "gate": true})", 2, 6, 6);
}

TEST(MtaCpu, FiniteDifferencesWiderValuesAndDropout) {
  // The model's DIFF attention uses value dim 2D; training uses attention dropout.
  check_gradients(R"({"heads": 2, "head_dim": 3})", 2, 6, 7, /*Dv=*/6);
  check_gradients(R"({"heads": 2, "head_dim": 3, "kq_pre": {"q": 2, "k": 3}, "head_post": {"group": 2}, "norm": true})",
                  2, 7, 8, 0, /*dropout=*/0.3f);
}

TEST(MtaCpu, DropoutDropsTheRightShareAndIsDeterministic) {
  AttnCase<double> c = random_case<double>(spec(R"({"heads": 2, "head_dim": 4})"), 2, 30, 9);
  auto plain = forward(c);
  c.opt.dropout = 0.5f;
  c.opt.dropout_seed = 123;
  auto d1 = forward(c), d2 = forward(c);
  EXPECT_EQ(d1, d2);
  EXPECT_GT(rel_err(d1, plain), 0.1);
  long long kept = 0, total = 0;
  for (int bh = 0; bh < 4; ++bh)
    for (int i = 0; i < 30; ++i)
      for (int j = 0; j <= i; ++j, ++total) kept += mta::dropout_keep(123, bh, 30, i, j, 0.5f);
  EXPECT_NEAR(static_cast<double>(kept) / total, 0.5, 0.05);
}

TEST(MtaCpu, SameResultForAnyThreadCount) {
  const AttentionSpec specs[] = {
      spec(R"({"heads": 4, "head_dim": 8, "kq_pre": {"q": 3, "k": 5}, "head_pre": {"group": 2},
          "kq_post": {"q": 2, "k": 3}, "head_post": {"group": 4}, "norm": true, "gate": true})"),
      spec(R"({"heads": 4, "head_dim": 8})"),  // the row path
  };
  for (const AttentionSpec& s : specs) {
    for (int B : {1, 3}) {
      AttnCase<double> c = random_case<double>(s, B, 21, 11);
      const int saved = omp_get_max_threads();
      omp_set_num_threads(1);
      auto out1 = forward(c);
      Grads g1 = backward(c);
      omp_set_num_threads(4);
      auto out4 = forward(c);
      Grads g4 = backward(c);
      omp_set_num_threads(saved);
      EXPECT_LT(rel_err(out4, out1), 1e-14);
      EXPECT_LT(rel_err(g4.dq, g1.dq), 1e-14);
      EXPECT_LT(rel_err(g4.dk, g1.dk), 1e-14);
      EXPECT_LT(rel_err(g4.dv, g1.dv), 1e-14);
      for (auto& [name, val] : g1.params) EXPECT_LT(rel_err(g4.params[name], val), 1e-13) << name;
    }
  }
}

TEST(MtaCpu, FloatMatchesDouble) {
  auto s = spec(R"({"heads": 2, "head_dim": 16, "kq_pre": {"q": 6, "k": 11}, "head_pre": {"group": 2},
      "kq_post": {"q": 6, "k": 11}, "head_post": {"group": 2}, "norm": true, "gate": true})");
  AttnCase<double> c = random_case<double>(s, 2, 40, 12);
  AttnCase<float> f;
  f.spec = c.spec, f.dims = c.dims;
  auto cast = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
  f.q = cast(c.q), f.k = cast(c.k), f.v = cast(c.v), f.dout = cast(c.dout);
  for (auto& [n, v] : c.params) f.params[n] = cast(v);
  auto of = forward(f);
  EXPECT_LT(rel_err(std::vector<double>(of.begin(), of.end()), forward(c)), 1e-5);
}

TEST(MtaCpu, RefusesShapeMismatch) {
  auto s = spec(R"({"heads": 2, "head_dim": 4})");
  std::vector<float> x(2 * 3 * 4, 1.0f), out(x.size());
  EXPECT_THROW(mta::cpu::mta_forward<float>(s, AttnDims{1, 3, 2, 4}, x.data(), x.data(), x.data(), {}, out.data()),
               mta::InputError);
}
