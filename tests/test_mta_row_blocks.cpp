// The row-block schedule of the materialized GPU op (attention/row_blocks.h, used by mta_cuda.cu),
// replayed on the CPU in float64 and compared with the reference op: for every block, the rows and
// key columns each stage computes, the rows of its input it may read (everything else reads as 0, as
// the GPU kernels stage it), the rows whose weight-gradient, dK and dV terms it owns. Every matrix is
// poisoned with NaN before each block, so a stage that reads a row the schedule has not computed
// shows up as NaN. The stage arithmetic is the semantics page's; what this checks is the schedule,
// on any machine, before (and besides) the GPU tests. The epilogue (norm, gate) is row-local and is
// left to the GPU tests.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention/mta_cpu.h"
#include "attention/row_blocks.h"
#include "attn_test_util.h"

using mta::testing::rel_err;

namespace {

using mta::AttentionSpec;
using mta::KqConv;
using mta::PadKey;
using mta::RowBlock;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Span {
  int ra, rb, cols;
};

// One batch element, all heads: matrices [H][T][T].
struct Replay {
  const AttentionSpec& s;
  int H, T, D;
  const double *q, *k, *v, *dout;
  mta::AttnParams<double> p;
  float dropout;
  unsigned long long seed;
  using Mat = std::vector<double>;

  double& at(Mat& m, int h, int i, int j) const { return m[(static_cast<size_t>(h) * T + i) * T + j]; }
  double get(const Mat& m, int h, int i, int j) const { return m[(static_cast<size_t>(h) * T + i) * T + j]; }
  Mat poisoned() const { return Mat(static_cast<size_t>(H) * T * T, kNaN); }

  // The convolution (or its adjoint) of `in` over the span; rows of `in` outside [in_lo, in_hi) read 0.
  void conv(const Mat& in, Mat& out, const double* W, const KqConv& kc, bool adjoint, Span sp, int in_lo,
            int in_hi) const {
    const int cq = kc.q, ck = kc.k, o = kc.key_offset();
    for (int h = 0; h < H; ++h)
      for (int i = sp.ra; i < sp.rb; ++i)
        for (int j = 0; j < sp.cols; ++j) {
          double acc = 0;
          if (j <= i)
            for (int a = 0; a < cq; ++a)
              for (int c = 0; c < ck; ++c) {
                const int ii = adjoint ? i + (cq - 1) - a : i - (cq - 1) + a;
                const int jj = adjoint ? j + o - c : j - o + c;
                if (ii < in_lo || ii >= in_hi || jj < 0 || jj > ii) continue;
                acc += W[(h * cq + a) * ck + c] * get(in, h, ii, jj);
              }
          at(out, h, i, j) = acc;
        }
  }
  void mix(const Mat& in, Mat& out, const double* M, int g, bool transpose, Span sp) const {
    for (int h = 0; h < H; ++h) {
      const int grp = h / g, xg = h % g;
      for (int i = sp.ra; i < sp.rb; ++i)
        for (int j = 0; j < sp.cols; ++j) {
          double acc = 0;
          if (j <= i)
            for (int y = 0; y < g; ++y)
              acc += (transpose ? M[(grp * g + y) * g + xg] : M[(grp * g + xg) * g + y]) * get(in, grp * g + y, i, j);
          at(out, h, i, j) = acc;
        }
    }
  }
  double keep(int h, int i, int j) const {
    if (dropout <= 0.f) return 1.0;
    return mta::dropout_keep(seed, h, T, i, j, dropout) ? 1.0 / (1.0 - static_cast<double>(dropout)) : 0.0;
  }

  // The forward stages of block b (Op::scores): S0 rows [base, end), C, C', A rows [pre, end),
  // A2, A3 and W rows [r0, end).
  void scores(const RowBlock& b, Mat& s0, Mat& c, Mat& cp, Mat& a, Mat& a2, Mat& a3, Mat& w) const {
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    for (int h = 0; h < H; ++h)
      for (int i = b.base; i < b.end; ++i)
        for (int j = 0; j < b.end; ++j) {
          double d = 0;
          for (int e = 0; e < D; ++e) d += q[(h * T + i) * D + e] * k[(h * T + j) * D + e];
          at(s0, h, i, j) = j <= i ? scale * d : 0.0;
        }
    const Span pre{b.pre, b.end, b.end}, post{b.r0, b.end, b.end};
    if (s.kq_pre)
      conv(s0, c, p.kq_pre, *s.kq_pre, false, pre, b.base, b.end);
    else
      c = s0;
    if (s.head_pre)
      mix(c, cp, p.head_pre, s.head_pre->group, false, pre);
    else
      cp = c;
    for (int h = 0; h < H; ++h)
      for (int i = pre.ra; i < pre.rb; ++i) {
        double m = -INFINITY, sum = 0;
        for (int j = 0; j <= i; ++j) m = std::max(m, get(cp, h, i, j));
        for (int j = 0; j <= i; ++j) sum += std::exp(get(cp, h, i, j) - m);
        for (int j = 0; j < pre.cols; ++j) at(a, h, i, j) = j <= i ? std::exp(get(cp, h, i, j) - m) / sum : 0.0;
      }
    if (s.kq_post)
      conv(a, a2, p.kq_post, *s.kq_post, false, post, b.pre, b.end);
    else
      a2 = a;
    if (s.head_post)
      mix(a2, a3, p.head_post, s.head_post->group, false, post);
    else
      a3 = a2;
    for (int h = 0; h < H; ++h)
      for (int i = post.ra; i < post.rb; ++i)
        for (int j = 0; j < post.cols; ++j) at(w, h, i, j) = j <= i ? get(a3, h, i, j) * keep(h, i, j) : 0.0;
  }

  // Weight gradient terms over the owned rows: conv (in valid from in_lo) and mixing.
  void conv_wgrad(const Mat& in, const Mat& d, const KqConv& kc, std::vector<double>& g, const RowBlock& b,
                  int in_lo) const {
    const int cq = kc.q, ck = kc.k, o = kc.key_offset();
    for (int h = 0; h < H; ++h)
      for (int a = 0; a < cq; ++a)
        for (int c = 0; c < ck; ++c)
          for (int i = b.r0; i < b.r1; ++i)
            for (int j = 0; j <= i; ++j) {
              const int ii = i - (cq - 1) + a, jj = j - o + c;
              if (ii < in_lo || ii >= b.end || jj < 0 || jj > ii) continue;
              g[(h * cq + a) * ck + c] += get(d, h, i, j) * get(in, h, ii, jj);
            }
  }
  void mix_wgrad(const Mat& in, const Mat& d, int gs, std::vector<double>& g, const RowBlock& b) const {
    for (int h = 0; h < H; ++h) {
      const int grp = h / gs, xg = h % gs;
      for (int y = 0; y < gs; ++y)
        for (int i = b.r0; i < b.r1; ++i)
          for (int j = 0; j <= i; ++j) g[(grp * gs + xg) * gs + y] += get(d, h, i, j) * get(in, grp * gs + y, i, j);
    }
  }

  struct Grads {
    std::vector<double> out, dq, dk, dv, kq_pre, head_pre, kq_post, head_post;
  };

  Grads run(int R) const {
    const int hq = s.kq_pre ? s.kq_pre->q - 1 : 0, hp = s.kq_post ? s.kq_post->q - 1 : 0;
    Grads r;
    const size_t n = static_cast<size_t>(H) * T * D;
    r.out.assign(n, kNaN), r.dq.assign(n, kNaN), r.dk.assign(n, 0.0), r.dv.assign(n, 0.0);
    auto sized = [&](const auto& opt, int per_head) {
      return std::vector<double>(opt ? static_cast<size_t>(H) * per_head : 0, 0.0);
    };
    r.kq_pre = sized(s.kq_pre, s.kq_pre ? s.kq_pre->q * s.kq_pre->k : 0);
    r.kq_post = sized(s.kq_post, s.kq_post ? s.kq_post->q * s.kq_post->k : 0);
    r.head_pre = sized(s.head_pre, s.head_pre ? s.head_pre->group : 0);
    r.head_post = sized(s.head_post, s.head_post ? s.head_post->group : 0);

    // Forward (Op::forward_chunk).
    for (int r0 = 0; r0 < T; r0 += R) {
      const RowBlock b = mta::row_block(T, R, hq, hp, r0, false);
      EXPECT_LE(b.end - b.base, mta::row_block_capacity(T, R, hq, hp, false));
      Mat s0 = poisoned(), c = poisoned(), cp = poisoned(), a = poisoned(), a2 = poisoned(), a3 = poisoned(),
          w = poisoned();
      scores(b, s0, c, cp, a, a2, a3, w);
      for (int h = 0; h < H; ++h)
        for (int i = b.r0; i < b.r1; ++i)
          for (int e = 0; e < D; ++e) {
            double acc = 0;
            for (int j = 0; j < b.r1; ++j) acc += get(w, h, i, j) * v[(h * T + j) * D + e];
            r.out[(h * T + i) * D + e] = acc;
          }
    }
    // Backward (mta_backward's block loop).
    for (int r0 = 0; r0 < T; r0 += R) {
      const RowBlock b = mta::row_block(T, R, hq, hp, r0, true);
      EXPECT_LE(b.end - b.base, mta::row_block_capacity(T, R, hq, hp, true));
      Mat s0 = poisoned(), c = poisoned(), cp = poisoned(), a = poisoned(), a2 = poisoned(), a3 = poisoned(),
          w = poisoned(), cur = poisoned(), other = poisoned();
      scores(b, s0, c, cp, a, a2, a3, w);
      for (int h = 0; h < H; ++h) {
        for (int j = 0; j < b.r1; ++j)  // dV += W^T dO over the owned rows
          for (int e = 0; e < D; ++e)
            for (int i = b.r0; i < b.r1; ++i) r.dv[(h * T + j) * D + e] += get(w, h, i, j) * dout[(h * T + i) * D + e];
        for (int i = b.r0; i < b.end; ++i)  // dA3 = dO V^T, causal, through the dropout mask
          for (int j = 0; j < b.end; ++j) {
            double d = 0;
            for (int e = 0; e < D; ++e) d += dout[(h * T + i) * D + e] * v[(h * T + j) * D + e];
            at(cur, h, i, j) = j <= i ? d * keep(h, i, j) : 0.0;
          }
      }
      const Span post{b.r0, b.end, b.end};
      if (s.head_post) {
        mix_wgrad(a2, cur, s.head_post->group, r.head_post, b);
        mix(cur, other, p.head_post, s.head_post->group, true, post);
        std::swap(cur, other);
      }
      int endA = b.end;
      if (s.kq_post) {
        conv_wgrad(a, cur, *s.kq_post, r.kq_post, b, b.pre);
        endA = b.endA;
        other = poisoned();
        conv(cur, other, p.kq_post, *s.kq_post, true, Span{b.r0, endA, b.end}, b.r0, b.end);
        std::swap(cur, other);
      }
      const Span pre{b.r0, endA, b.end};
      for (int h = 0; h < H; ++h)
        for (int i = pre.ra; i < pre.rb; ++i) {
          double dot = 0;
          for (int j = 0; j <= i; ++j) dot += get(cur, h, i, j) * get(a, h, i, j);
          for (int j = 0; j < pre.cols; ++j)
            at(cur, h, i, j) = j <= i ? get(a, h, i, j) * (get(cur, h, i, j) - dot) : 0.0;
        }
      if (s.head_pre) {
        mix_wgrad(c, cur, s.head_pre->group, r.head_pre, b);
        other = poisoned();
        mix(cur, other, p.head_pre, s.head_pre->group, true, pre);
        std::swap(cur, other);
      }
      if (s.kq_pre) {
        conv_wgrad(s0, cur, *s.kq_pre, r.kq_pre, b, b.base);
        other = poisoned();
        conv(cur, other, p.kq_pre, *s.kq_pre, true, Span{b.r0, b.r1, b.end}, b.r0, endA);
        std::swap(cur, other);
      }
      const double scale = 1.0 / std::sqrt(static_cast<double>(D));
      for (int h = 0; h < H; ++h)
        for (int e = 0; e < D; ++e) {
          for (int i = b.r0; i < b.r1; ++i) {  // dQ rows, once
            double acc = 0;
            for (int j = 0; j < b.r1; ++j) acc += get(cur, h, i, j) * k[(h * T + j) * D + e];
            r.dq[(h * T + i) * D + e] = scale * acc;
          }
          for (int j = 0; j < b.r1; ++j)  // dK += dS^T Q over the owned rows
            for (int i = b.r0; i < b.r1; ++i)
              r.dk[(h * T + j) * D + e] += scale * get(cur, h, i, j) * q[(h * T + i) * D + e];
        }
    }
    return r;
  }
};

void check(const AttentionSpec& spec, int T, int R, float dropout, unsigned seed) {
  SCOPED_TRACE(mta::spec_to_json(spec).dump() + " T=" + std::to_string(T) + " R=" + std::to_string(R) +
               " dropout=" + std::to_string(dropout));
  auto c = mta::testing::random_case<double>(spec, 1, T, seed);
  c.opt.dropout = dropout, c.opt.dropout_seed = seed * 13ull + 1;
  const auto p = c.param_ptrs();
  const Replay rp{spec,       spec.heads,    T, spec.head_dim, c.q.data(),        c.k.data(),
                  c.v.data(), c.dout.data(), p, dropout,       c.opt.dropout_seed};
  const auto got = rp.run(R);

  std::vector<double> out(c.q.size()), dq(c.q.size()), dk(c.q.size()), dv(c.q.size());
  std::map<std::string, std::vector<double>> g;
  for (const auto& [name, val] : c.params) g[name].assign(val.size(), 0.0);
  const auto gp = mta::attn_pointers<mta::AttnParamGrads<double>>([&](const char* n) -> double* {
    auto it = g.find(n);
    return it == g.end() ? nullptr : it->second.data();
  });
  mta::cpu::mta_forward<double>(spec, c.dims, c.q.data(), c.k.data(), c.v.data(), p, out.data(), c.opt);
  mta::cpu::mta_backward<double>(spec, c.dims, c.q.data(), c.k.data(), c.v.data(), p, c.dout.data(), dq.data(),
                                 dk.data(), dv.data(), gp, c.opt);
  constexpr double kTol = 1e-11;
  EXPECT_LE(rel_err(got.out, out), kTol) << "out";
  EXPECT_LE(rel_err(got.dq, dq), kTol) << "dq";
  EXPECT_LE(rel_err(got.dk, dk), kTol) << "dk";
  EXPECT_LE(rel_err(got.dv, dv), kTol) << "dv";
  if (spec.kq_pre) EXPECT_LE(rel_err(got.kq_pre, g.at("kq_pre")), kTol) << "kq_pre";
  if (spec.kq_post) EXPECT_LE(rel_err(got.kq_post, g.at("kq_post")), kTol) << "kq_post";
  if (spec.head_pre) EXPECT_LE(rel_err(got.head_pre, g.at("head_pre")), kTol) << "head_pre";
  if (spec.head_post) EXPECT_LE(rel_err(got.head_post, g.at("head_post")), kTol) << "head_post";
}

TEST(MtaRowBlocks, PaperLayoutAcrossBlockSizes) {
  AttentionSpec s;
  s.heads = 4, s.head_dim = 5;
  s.kq_pre = KqConv{4, 7, PadKey::Both};
  s.head_pre = mta::HeadMix{4};
  s.kq_post = KqConv{3, 5, PadKey::Both};
  s.head_post = mta::HeadMix{2};
  s.validate();
  for (int R : {1, 2, 3, 5, 8, 13, 29, 40}) check(s, 29, R, 0.0f, 7u + R);
  check(s, 29, 4, 0.3f, 99u);
}

TEST(MtaRowBlocks, RandomSpecs) {
  std::mt19937 rng(4242);
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (int trial = 0; trial < 40; ++trial) {
    AttentionSpec s;
    s.heads = std::vector<int>{1, 2, 3, 4}[uni(0, 3)];
    s.head_dim = uni(1, 6);
    auto divisor = [&]() {
      int g;
      do g = uni(1, s.heads);
      while (s.heads % g != 0);
      return g;
    };
    auto conv = [&]() {
      KqConv k{uni(1, 5), uni(1, 9), static_cast<PadKey>(uni(0, 2))};
      if (k.pad_key == PadKey::Both && k.k % 2 == 0) k.k += 1;
      return k;
    };
    if (uni(0, 2)) s.kq_pre = conv();
    if (uni(0, 2)) s.kq_post = conv();
    if (uni(0, 1)) s.head_pre = mta::HeadMix{divisor()};
    if (uni(0, 1)) s.head_post = mta::HeadMix{divisor()};
    s.validate();
    const int T = uni(1, 34);
    check(s, T, uni(1, T + 2), trial % 5 == 4 ? 0.25f : 0.0f, 500u + trial);
  }
}

}  // namespace
