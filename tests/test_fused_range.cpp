// fused_fp16_range_problem (attention/fused_range.h): which inputs `mta attn --device cuda` keeps away
// from the fused kq_pre kernel's fp16 operands. The logit bound per head is max |q_i| * max |k_j| /
// sqrt(D); the kq_pre weights of each head must have their largest magnitude in [2^-14, 60000] (or be
// all zero). Specs without kq_pre never have a problem.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "attention/fused_range.h"

namespace {

struct Inputs {
  mta::AttentionSpec spec;
  mta::AttnDims dims;
  std::vector<float> q, k, w;
};

Inputs make_inputs(unsigned seed) {
  Inputs in;
  in.spec.heads = 3, in.spec.head_dim = 16;
  in.spec.kq_pre = mta::KqConv{2, 3, mta::PadKey::Both};
  in.dims = mta::AttnDims{2, 3, 9, 16};
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  const size_t n = static_cast<size_t>(2) * 3 * 9 * 16;
  for (size_t i = 0; i < n; ++i) in.q.push_back(nd(rng)), in.k.push_back(nd(rng));
  for (int i = 0; i < 3 * 2 * 3; ++i) in.w.push_back(0.3f * nd(rng));
  return in;
}

std::string problem(const Inputs& in) {
  return mta::fused_fp16_range_problem(in.spec, in.dims, in.q.data(), in.k.data(), in.w.data());
}

TEST(FusedRange, OrdinaryInputsPass) { EXPECT_EQ(problem(make_inputs(1)), ""); }

// A single row of q in one (batch, head) scaled so that the bound crosses the limit: the bound is
// exactly |q_row| * max |k_j| / sqrt(D), so a factor just below and just above the critical one
// brackets it, and the message names that batch and head.
TEST(FusedRange, LogitBoundIsPerHeadAndTight) {
  Inputs in = make_inputs(2);
  const int T = in.dims.T, D = in.dims.D, b = 1, h = 2, row = 4;
  const size_t off = (static_cast<size_t>(b) * in.dims.H + h) * T * D;
  auto norm = [&](const std::vector<float>& x, size_t base, int t) {
    double s = 0;
    for (int c = 0; c < D; ++c) s += double(x[base + size_t(t) * D + c]) * x[base + size_t(t) * D + c];
    return std::sqrt(s);
  };
  double kmax = 0;
  for (int t = 0; t < T; ++t) kmax = std::max(kmax, norm(in.k, off, t));
  const double critical = mta::kFusedMaxLogit * std::sqrt(double(D)) / (kmax * norm(in.q, off, row));
  for (const auto& [factor, bad] : {std::pair{critical * 0.999, false}, std::pair{critical * 1.001, true}}) {
    Inputs s = in;
    for (int c = 0; c < D; ++c) s.q[off + size_t(row) * D + c] *= static_cast<float>(factor);
    const std::string p = problem(s);
    EXPECT_EQ(!p.empty(), bad) << "factor " << factor / critical << " of the critical one: '" << p << "'";
    if (bad) EXPECT_NE(p.find("batch 1, head 2"), std::string::npos) << p;
  }
}

// The weights: a head whose largest weight is below 2^-14 or above the limit is refused; all-zero
// weights, and tiny weights beside a normal one in the same head, are accepted.
TEST(FusedRange, KqPreWeights) {
  Inputs in = make_inputs(3);
  auto with_head1 = [&](std::vector<float> vals) {
    Inputs s = in;
    for (int i = 0; i < 6; ++i) s.w[6 + i] = vals[i];
    return problem(s);
  };
  EXPECT_NE(with_head1({1e-5f, -2e-5f, 0.f, 3e-6f, 0.f, 0.f}).find("head 1"), std::string::npos);
  EXPECT_NE(with_head1({7e4f, 0.f, 0.f, 0.f, 0.f, 0.f}).find("head 1"), std::string::npos);
  EXPECT_EQ(with_head1({0.f, 0.f, 0.f, 0.f, 0.f, 0.f}), "");
  EXPECT_EQ(with_head1({1e-7f, 0.5f, 0.f, 0.f, 0.f, 0.f}), "");
  EXPECT_EQ(with_head1({std::ldexp(1.f, -14), 0.f, 0.f, 0.f, 0.f, 0.f}), "");
}

// Head mixing alone (bf16 hi + lo terms, no fp16 operand): no check, whatever the logits.
TEST(FusedRange, NoKqPreNoProblem) {
  Inputs in = make_inputs(4);
  in.spec.kq_pre.reset();
  in.spec.head_post = mta::HeadMix{3};
  for (auto& x : in.q) x *= 1e4f;
  EXPECT_EQ(mta::fused_fp16_range_problem(in.spec, in.dims, in.q.data(), in.k.data(), nullptr), "");
}

}  // namespace
