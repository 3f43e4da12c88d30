// The decomposition planned for the fused MTA layer (docs/flash-mta.md, "What comes next"), replayed
// on the CPU in float64 and compared with the reference op, for every combination of the core's
// options (kq_pre, head_pre, kq_post, head_post): tiles of BQ query rows x BK keys, each recomputing
// the halos its stages need (attention/fused_regions.h) instead of carrying state between tiles;
//   pass 1: C' on the tile -> row statistics (lse);
//   pass 2: A on the post convolution's inputs -> A2 -> A3 on the tile -> O += A3 V;
//   delta pass: delta_i = sum_j A dA over the row's tiles;
//   main backward pass: dS on the tile and the gradient terms it owns (dV, dQ, dK, and the four
//   parameter gradients over its positions).
// Every stage reads its input through a Field that refuses positions outside the region computed
// for it, so a region too small for a stage fails here; the comparison with the reference checks that
// the regions are also right (masks at the sequence's edges, T not a multiple of the tile, tiles of
// one row or key, kernels larger than the tile). Only the storage and the tensor-core mechanics are
// left to the kernels.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/fused_regions.h"
#include "attention/mta_cpu.h"
#include "attention/spec.h"
#include "attn_test_util.h"

using mta::testing::rel_err;

namespace {

using mta::AttentionSpec;
using mta::fused::Reach;
using mta::fused::Region;
using mta::fused::TileRegions;

// One value per head of a unit and position of a region; reading or writing outside it throws.
struct Field {
  Region reg;
  int G = 0;
  std::vector<double> v;
  Field(const Region& r, int g) : reg(r), G(g), v(static_cast<size_t>(g) * r.rows() * r.cols(), 0.0) {}
  double& at(int h, int i, int j) {
    if (!reg.contains(i, j))
      throw std::out_of_range("position (" + std::to_string(i) + ", " + std::to_string(j) +
                              ") outside the region rows [" + std::to_string(reg.r0) + ", " +
                              std::to_string(reg.r1) + ") keys [" +
                              std::to_string(reg.c0) + ", " + std::to_string(reg.c1) + ")");
    return v[(static_cast<size_t>(h) * reg.rows() + (i - reg.r0)) * reg.cols() + (j - reg.c0)];
  }
  double get(int h, int i, int j) const { return const_cast<Field*>(this)->at(h, i, j); }
};

struct Replay {
  const AttentionSpec& spec;
  int B, H, T, D, BQ, BK;
  const std::vector<double>&q, &k, &v, &dout;
  const std::map<std::string, std::vector<double>>& params;

  int G() const { return spec.coupled_heads(); }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(D)); }
  bool valid(int i, int j) const { return i >= 0 && i < T && j >= 0 && j <= i; }
  size_t row(int b, int h, int i) const { return (static_cast<size_t>(b) * H + h) * T + i; }
  double dot(const std::vector<double>& x, const std::vector<double>& y, size_t rx, size_t ry) const {
    double s = 0;
    for (int e = 0; e < D; ++e) s += x[rx * D + e] * y[ry * D + e];
    return s;
  }
  static Reach reach(const std::optional<mta::KqConv>& kc) {
    return kc ? mta::fused::conv_reach(kc->q, kc->k, kc->key_offset()) : Reach{};
  }

  // The stages over one unit (batch b, heads h0 .. h0 + G - 1).
  struct Unit {
    const Replay& r;
    int b, h0;
    Field s0(const Region& reg) const {
      Field f(reg, r.G());
      for (int x = 0; x < r.G(); ++x)
        for (int i = reg.r0; i < reg.r1; ++i)
          for (int j = reg.c0; j < reg.c1; ++j)
            if (r.valid(i, j)) f.at(x, i, j) = r.scale() * r.dot(r.q, r.k, r.row(b, h0 + x, i), r.row(b, h0 + x, j));
      return f;
    }
    // The convolution (or, adjoint, its adjoint) of `in` onto out_reg; the identity when absent.
    Field conv(const Field& in, const std::optional<mta::KqConv>& kc, const char* name, const Region& out_reg,
               bool adjoint) const {
      Field f(out_reg, r.G());
      const Reach k = reach(kc);
      const int cq = kc ? kc->q : 1, ck = kc ? kc->k : 1;
      for (int x = 0; x < r.G(); ++x) {
        const double* w = kc ? r.params.at(name).data() + static_cast<size_t>(h0 + x) * cq * ck : nullptr;
        for (int i = out_reg.r0; i < out_reg.r1; ++i)
          for (int j = out_reg.c0; j < out_reg.c1; ++j) {
            double s = 0;
            for (int a = 0; a < cq; ++a)
              for (int c = 0; c < ck; ++c)
                s += (w ? w[a * ck + c] : 1.0) * (adjoint ? in.get(x, i + k.up - a, j + k.left - c)
                                                          : in.get(x, i - k.up + a, j - k.left + c));
            f.at(x, i, j) = s;
          }
      }
      return f;
    }
    // Head mixing (transpose: its adjoint) in place; the identity when absent.
    void mix(Field& f, const std::optional<mta::HeadMix>& hm, const char* name, bool transpose) const {
      if (!hm) return;
      const int g = hm->group;
      const std::vector<double>& m = r.params.at(name);
      std::vector<double> in(r.G());
      for (int i = f.reg.r0; i < f.reg.r1; ++i)
        for (int j = f.reg.c0; j < f.reg.c1; ++j) {
          for (int x = 0; x < r.G(); ++x) in[x] = f.get(x, i, j);
          for (int x = 0; x < r.G(); ++x) {
            const int first = x - x % g, grp = (h0 + x) / g;
            double s = 0;
            for (int y = 0; y < g; ++y) {
              const size_t base = static_cast<size_t>(grp) * g * g;
              s += (transpose ? m[base + y * g + x % g] : m[base + (x % g) * g + y]) * in[first + y];
            }
            f.at(x, i, j) = s;
          }
        }
    }
    // C' on reg (from S0 on the pre convolution's inputs).
    Field c_prime(const Region& reg) const {
      const Field S = s0(mta::fused::conv_inputs(reg, reach(r.spec.kq_pre)));
      Field C = conv(S, r.spec.kq_pre, "kq_pre", reg, false);
      mix(C, r.spec.head_pre, "head_pre", false);
      return C;
    }
    // A = exp(C' - lse) on the causal, in-sequence positions of C', 0 elsewhere (in place).
    void softmax(Field& f, const std::vector<double>& lse) const {
      for (int x = 0; x < r.G(); ++x)
        for (int i = f.reg.r0; i < f.reg.r1; ++i)
          for (int j = f.reg.c0; j < f.reg.c1; ++j)
            f.at(x, i, j) = r.valid(i, j) ? std::exp(f.get(x, i, j) - lse[r.row(b, h0 + x, i)]) : 0.0;
    }
    // dA3 = dO V^T on reg, 0 off the causal part (A2 is 0 there, so its gradient is too).
    Field da3(const Region& reg) const {
      Field f(reg, r.G());
      for (int x = 0; x < r.G(); ++x)
        for (int i = reg.r0; i < reg.r1; ++i)
          for (int j = reg.c0; j < reg.c1; ++j)
            if (r.valid(i, j)) f.at(x, i, j) = r.dot(r.dout, r.v, r.row(b, h0 + x, i), r.row(b, h0 + x, j));
      return f;
    }
    // dA on reg from dA3 on the post adjoint's inputs.
    Field d_a(const Region& reg, const Region& d2) const {
      Field d = da3(d2);
      mix(d, r.spec.head_post, "head_post", true);
      return conv(d, r.spec.kq_post, "kq_post", reg, true);
    }
  };

  struct Out {
    std::vector<double> o, dq, dk, dv;
    std::map<std::string, std::vector<double>> grads;
  };

  Out run() const {
    const size_t n = static_cast<size_t>(B) * H * T * D, rows = static_cast<size_t>(B) * H * T;
    Out out;
    out.o.assign(n, 0), out.dq.assign(n, 0), out.dk.assign(n, 0), out.dv.assign(n, 0);
    for (const auto& [name, val] : params) out.grads[name].assign(val.size(), 0.0);
    std::vector<double> lse(rows, 0), delta(rows, 0);
    const Reach pre = reach(spec.kq_pre), post = reach(spec.kq_post);
    const int Gh = G();
    auto tiles = [&](auto&& body) {  // every tile with a causal position: query tile x key block
      for (int i0 = 0; i0 < T; i0 += BQ)
        for (int j0 = 0; j0 < T && j0 <= i0 + BQ - 1; j0 += BK) body(Region{i0, i0 + BQ, j0, j0 + BK});
    };
    for (int b = 0; b < B; ++b)
      for (int h0 = 0; h0 < H; h0 += Gh) {
        const Unit u{*this, b, h0};
        // Pass 1: row statistics of C' over each row's tiles (max, then the sum rescaled to it).
        std::vector<double> mx(rows, -INFINITY), sum(rows, 0.0);
        tiles([&](const Region& p) {
          const Field C = u.c_prime(p);  // S0 on tile_regions(p).s0_stats
          for (int x = 0; x < Gh; ++x)
            for (int i = p.r0; i < p.r1; ++i)
              for (int j = p.c0; j < p.c1; ++j) {
                if (!valid(i, j)) continue;
                const size_t ri = row(b, h0 + x, i);
                const double c = C.get(x, i, j), m = std::max(mx[ri], c);
                sum[ri] = sum[ri] * std::exp(mx[ri] - m) + std::exp(c - m);
                mx[ri] = m;
              }
        });
        for (int x = 0; x < Gh; ++x)
          for (int i = 0; i < T; ++i) lse[row(b, h0 + x, i)] = mx[row(b, h0 + x, i)] + std::log(sum[row(b, h0 + x, i)]);

        // Pass 2: O += A3 V.
        tiles([&](const Region& p) {
          const TileRegions t = mta::fused::tile_regions(p, pre, post);
          Field A = u.c_prime(t.a_out);
          u.softmax(A, lse);
          Field A3 = u.conv(A, spec.kq_post, "kq_post", p, false);  // A2, then mixed in place
          for (int x = 0; x < Gh; ++x)
            for (int i = p.r0; i < p.r1; ++i)
              for (int j = p.c0; j < p.c1; ++j)
                if (!valid(i, j)) A3.at(x, i, j) = 0.0;  // A2's mask
          u.mix(A3, spec.head_post, "head_post", false);
          for (int x = 0; x < Gh; ++x)
            for (int i = p.r0; i < std::min(p.r1, T); ++i)
              for (int j = p.c0; j < std::min(p.c1, T); ++j)
                for (int e = 0; e < D; ++e)
                  out.o[row(b, h0 + x, i) * D + e] += A3.get(x, i, j) * v[row(b, h0 + x, j) * D + e];
        });

        // Delta pass: delta_i = sum_j A dA.
        tiles([&](const Region& p) {
          const TileRegions t = mta::fused::tile_regions(p, pre, post);
          Field A = u.c_prime(p);
          u.softmax(A, lse);
          const Field dA = u.d_a(p, t.d2_delta);
          for (int x = 0; x < Gh; ++x)
            for (int i = p.r0; i < std::min(p.r1, T); ++i)
              for (int j = p.c0; j < p.c1; ++j) delta[row(b, h0 + x, i)] += A.get(x, i, j) * dA.get(x, i, j);
        });

        // Main backward pass.
        tiles([&](const Region& p) {
          const TileRegions t = mta::fused::tile_regions(p, pre, post);
          const Field S0 = u.s0(t.s0_bwd);
          Field C = u.conv(S0, spec.kq_pre, "kq_pre", t.a_bwd, false);
          Field A = C;
          u.mix(A, spec.head_pre, "head_pre", false);
          u.softmax(A, lse);
          Field A2 = u.conv(A, spec.kq_post, "kq_post", p, false);
          for (int x = 0; x < Gh; ++x)
            for (int i = p.r0; i < p.r1; ++i)
              for (int j = p.c0; j < p.c1; ++j)
                if (!valid(i, j)) A2.at(x, i, j) = 0.0;
          Field A3 = A2;
          u.mix(A3, spec.head_post, "head_post", false);
          const Field dA3 = u.da3(t.d2);
          Field dA2 = dA3;
          u.mix(dA2, spec.head_post, "head_post", true);
          const Field dA = u.conv(dA2, spec.kq_post, "kq_post", t.d1, true);
          Field dCp(t.d1, Gh);  // dC' = A (dA - delta)
          for (int x = 0; x < Gh; ++x)
            for (int i = t.d1.r0; i < t.d1.r1; ++i)
              for (int j = t.d1.c0; j < t.d1.c1; ++j)
                dCp.at(x, i, j) = valid(i, j) ? A.get(x, i, j) * (dA.get(x, i, j) - delta[row(b, h0 + x, i)]) : 0.0;
          Field dC = dCp;
          u.mix(dC, spec.head_pre, "head_pre", true);
          const Field dS0 = u.conv(dC, spec.kq_pre, "kq_pre", p, true);

          // The gradient terms this tile owns: its positions (i, j) in the sequence.
          for (int x = 0; x < Gh; ++x) {
            const int h = h0 + x;
            for (int i = p.r0; i < std::min(p.r1, T); ++i)
              for (int j = p.c0; j < std::min(p.c1, T); ++j) {
                const double ds = valid(i, j) ? dS0.get(x, i, j) : 0.0;
                for (int e = 0; e < D; ++e) {
                  out.dq[row(b, h, i) * D + e] += scale() * ds * k[row(b, h, j) * D + e];
                  out.dk[row(b, h, j) * D + e] += scale() * ds * q[row(b, h, i) * D + e];
                  out.dv[row(b, h, j) * D + e] += A3.get(x, i, j) * dout[row(b, h, i) * D + e];
                }
                auto conv_grad = [&](const std::optional<mta::KqConv>& kc, const char* name, double d, const Field& in) {
                  if (!kc) return;
                  const Reach k = reach(kc);
                  double* gw = out.grads[name].data() + static_cast<size_t>(h) * kc->q * kc->k;
                  for (int a = 0; a < kc->q; ++a)
                    for (int c = 0; c < kc->k; ++c) gw[a * kc->k + c] += d * in.get(x, i - k.up + a, j - k.left + c);
                };
                conv_grad(spec.kq_post, "kq_post", dA2.get(x, i, j), A);
                conv_grad(spec.kq_pre, "kq_pre", dC.get(x, i, j), S0);
                auto mix_grad = [&](const std::optional<mta::HeadMix>& hm, const char* name, const Field& d,
                                    const Field& in) {
                  if (!hm) return;
                  const int g = hm->group, first = x - x % g;
                  double* gm = out.grads[name].data() + static_cast<size_t>(h / g) * g * g + (x % g) * g;
                  for (int y = 0; y < g; ++y) gm[y] += d.get(x, i, j) * in.get(first + y, i, j);
                };
                mix_grad(spec.head_post, "head_post", dA3, A2);
                mix_grad(spec.head_pre, "head_pre", dCp, C);
              }
          }
        });
      }
    return out;
  }
};

struct Case {
  AttentionSpec spec;
  int B, T, BQ, BK;
  unsigned seed;
};

void check(const Case& cs) {
  SCOPED_TRACE(mta::spec_to_json(cs.spec).dump() + " B=" + std::to_string(cs.B) + " T=" + std::to_string(cs.T) +
               " tile " + std::to_string(cs.BQ) + " x " + std::to_string(cs.BK));
  const auto c = mta::testing::random_case<double>(cs.spec, cs.B, cs.T, cs.seed);
  const size_t n = c.q.size();
  std::vector<double> out(n), dq(n), dk(n), dv(n);
  std::map<std::string, std::vector<double>> grads;
  for (const auto& [name, val] : c.params) grads[name].assign(val.size(), 0.0);
  const auto gp = mta::attn_pointers<mta::AttnParamGrads<double>>([&](const char* nm) -> double* {
    auto it = grads.find(nm);
    return it == grads.end() ? nullptr : it->second.data();
  });
  mta::cpu::mta_forward<double>(cs.spec, c.dims, c.q.data(), c.k.data(), c.v.data(), c.param_ptrs(), out.data());
  mta::cpu::mta_backward<double>(cs.spec, c.dims, c.q.data(), c.k.data(), c.v.data(), c.param_ptrs(), c.dout.data(),
                                 dq.data(), dk.data(), dv.data(), gp);
  const Replay rp{cs.spec, cs.B, cs.spec.heads, cs.T, cs.spec.head_dim, cs.BQ, cs.BK, c.q, c.k, c.v, c.dout, c.params};
  const Replay::Out got = rp.run();
  constexpr double kTol = 1e-10;
  EXPECT_LE(rel_err(got.o, out), kTol) << "out";
  EXPECT_LE(rel_err(got.dq, dq), kTol) << "grad_q";
  EXPECT_LE(rel_err(got.dk, dk), kTol) << "grad_k";
  EXPECT_LE(rel_err(got.dv, dv), kTol) << "grad_v";
  for (const auto& [name, val] : grads) EXPECT_LE(rel_err(got.grads.at(name), val), kTol) << "grad_" << name;
}

// The paper LM's kq layer at a small size (6 x 11 both sides, mixing of all heads), tiles smaller
// than the kernels' halos and T not a multiple of them.
TEST(FusedLayerTiling, PaperLmLayer) {
  AttentionSpec s;
  s.heads = 4, s.head_dim = 4;
  s.kq_pre = mta::KqConv{6, 11, mta::PadKey::Both};
  s.head_pre = mta::HeadMix{4};
  s.kq_post = mta::KqConv{6, 11, mta::PadKey::Both};
  s.head_post = mta::HeadMix{4};
  s.validate();
  check({s, 1, 29, 8, 8, 1});
  check({s, 1, 29, 4, 16, 2});
  check({s, 2, 13, 16, 4, 3});
}

// Random combinations of the four options (each may be absent), every pad mode, groups that differ
// before and after the softmax, tiles of one row or one key up to larger than T.
TEST(FusedLayerTiling, RandomSpecs) {
  std::mt19937 rng(2026);
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const int heads[] = {1, 2, 4, 6};
  for (int t = 0; t < 24; ++t) {
    AttentionSpec s;
    s.heads = heads[t % 4];
    s.head_dim = uni(1, 5);
    auto divisor = [&] {
      std::vector<int> d;
      for (int x = 1; x <= s.heads; ++x)
        if (s.heads % x == 0) d.push_back(x);
      return d[uni(0, static_cast<int>(d.size()) - 1)];
    };
    auto conv = [&] {
      mta::KqConv k;
      k.pad_key = static_cast<mta::PadKey>(uni(0, 2));
      k.q = uni(1, 4), k.k = uni(1, 7);
      if (k.pad_key == mta::PadKey::Both && k.k % 2 == 0) ++k.k;
      return k;
    };
    const int mask = t < 16 ? t : uni(0, 15);  // the first 16: every subset of the four options
    if (mask & 1) s.kq_pre = conv();
    if (mask & 2) s.head_pre = mta::HeadMix{divisor()};
    if (mask & 4) s.kq_post = conv();
    if (mask & 8) s.head_post = mta::HeadMix{divisor()};
    s.validate();
    const int T = uni(1, 24);
    const int tiles[] = {1, 2, 3, 5, 8, 32};
    check({s, uni(1, 2), T, tiles[uni(0, 5)], tiles[uni(0, 5)], 100u + t});
  }
}

// The regions grow as the stages need: spot values of the paper LM's (6 x 11, both) on a 64 x 64 tile.
TEST(FusedLayerTiling, RegionsOfThePaperLayer) {
  const Reach k = mta::fused::conv_reach(6, 11, 5);
  const mta::fused::TileRegions t = mta::fused::tile_regions(Region{128, 192, 64, 128}, k, k);
  EXPECT_EQ(t.s0_stats.r0, 123);
  EXPECT_EQ(t.s0_stats.c0, 59);
  EXPECT_EQ(t.s0_stats.c1, 133);
  EXPECT_EQ(t.s0_out.r0, 118);
  EXPECT_EQ(t.s0_out.c0, 54);
  EXPECT_EQ(t.s0_out.c1, 138);
  EXPECT_EQ(t.d1.r1, 197);
  EXPECT_EQ(t.d2.r1, 202);
  EXPECT_EQ(t.d2.c0, 54);
  EXPECT_EQ(t.d2.c1, 138);
  EXPECT_EQ(t.a_bwd.r0, 123);
  EXPECT_EQ(t.a_bwd.r1, 197);
  EXPECT_EQ(t.s0_bwd.r0, 118);
  EXPECT_EQ(t.s0_bwd.r1, 197);
  EXPECT_EQ(t.s0_bwd.c0, 54);
  EXPECT_EQ(t.s0_bwd.c1, 138);
}

}  // namespace
