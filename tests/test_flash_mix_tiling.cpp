// The algorithm of the fused head-mixing kernels (src/attention/flash_mix.cu), replayed on the CPU in
// float64 and compared with the reference op: CTAs of one group of G heads (one "warp" per head) and
// 16 query rows (forward, delta pass) or 16 keys (backward); per block of 16 the logit tiles of every
// head with the first mask, the position-wise mixing through the exchange with each head's row
// (forward) or column (adjoint) of its group's matrix, the two forward passes (row statistics, then
// A3 V), the delta pass delta_y = rowsum(A_y * sum_x Mpost[x, y] dA3_x), the key-tile pass with
// transposed tiles (dV; dA3 -> dA -> dC' -> dS; dK; dQ summed over key tiles) and the mixing-weight
// gradients as per-CTA partials. Only the mma fragment mechanics are left out, so a mistake in the
// design shows here, on any machine, before the GPU test (tests/gpu/test_flash_mix.cpp).
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attention/mta_cpu.h"
#include "attn_test_util.h"

using mta::testing::rel_err;

namespace {

constexpr int kTile = 16;
using Tiles = std::vector<std::vector<double>>;  // [warp][16 x 16 positions, row-major]

struct Problem {
  int B, H, T, D, gpre, gpost;  // g = 0: the option is off
  int G() const { return std::lcm(gpre ? gpre : 1, gpost ? gpost : 1); }
  std::string str() const {
    return "B=" + std::to_string(B) + " H=" + std::to_string(H) + " T=" + std::to_string(T) +
           " D=" + std::to_string(D) + " head_pre " + std::to_string(gpre) + " head_post " + std::to_string(gpost);
  }
};

struct Replay {
  const Problem& pb;
  const std::vector<double>&q, &k, &v, &dout, &mpre, &mpost;

  double scale() const { return 1.0 / std::sqrt(static_cast<double>(pb.D)); }
  size_t row(int b, int h, int i) const { return (static_cast<size_t>(b) * pb.H + h) * pb.T + i; }
  double dot(const std::vector<double>& x, const std::vector<double>& y, size_t rx, size_t ry) const {
    double s = 0;
    for (int e = 0; e < pb.D; ++e) s += x[rx * pb.D + e] * y[ry * pb.D + e];
    return s;
  }
  // Head h's row (or column) of its group's matrix (load_coefficients).
  static double coef(const std::vector<double>& m, int gs, int h, int y, bool column) {
    const size_t base = static_cast<size_t>(h / gs) * gs * gs;
    return column ? m[base + y * gs + h % gs] : m[base + (h % gs) * gs + y];
  }
  // sum_y coef(h, y) * tile of warp (first + y) at one position (mix_pair); the own tile without the option.
  static double mix(const Tiles& x, const std::vector<double>& m, int gs, int w, int h, int pos, bool column) {
    if (!gs) return x[w][pos];
    double acc = 0;
    const int first = w - h % gs;
    for (int y = 0; y < gs; ++y) acc += coef(m, gs, h, y, column) * x[first + y][pos];
    return acc;
  }

  struct Out {
    std::vector<double> o, dq, dk, dv, gpre, gpost;
  };

  Out run() const {
    const int B = pb.B, H = pb.H, T = pb.T, D = pb.D, G = pb.G(), ntiles = (T + kTile - 1) / kTile;
    const size_t n = static_cast<size_t>(B) * H * T * D, rows = static_cast<size_t>(B) * H * T;
    Out r;
    r.o.assign(n, 0), r.dq.assign(n, 0), r.dk.assign(n, 0), r.dv.assign(n, 0);
    r.gpre.assign(mpre.size(), 0), r.gpost.assign(mpost.size(), 0);
    std::vector<double> lse(rows, 0), delta(rows, 0);
    const Tiles zero(G, std::vector<double>(kTile * kTile, 0.0));

    for (int b = 0; b < B; ++b)
      for (int u = 0; u < H / G; ++u) {
        // ---- Forward passes and the delta pass: CTAs of 16 query rows [m0, m0 + 16).
        for (int tile = 0; tile < ntiles; ++tile) {
          const int m0 = tile * kTile;
          // The tiles of key block n0 (rows = queries): S0 and dA3 = dO V^T, masked to 0.
          auto block = [&](int n0, Tiles& S, Tiles& D3) {
            S = zero, D3 = zero;
            for (int w = 0; w < G; ++w)
              for (int rl = 0; rl < kTile; ++rl)
                for (int cl = 0; cl < kTile; ++cl) {
                  const int i = m0 + rl, j = n0 + cl, h = u * G + w;
                  if (i >= T || j > i || j >= T) continue;
                  S[w][rl * kTile + cl] = scale() * dot(q, k, row(b, h, i), row(b, h, j));
                  D3[w][rl * kTile + cl] = dot(dout, v, row(b, h, i), row(b, h, j));
                }
          };
          auto visible = [&](int n0, int rl, int cl) { return m0 + rl < T && n0 + cl <= m0 + rl && n0 + cl < T; };
          const int n_end = std::min(T, m0 + kTile);
          // Pass 1: online row max and sum of C' per head -> lse.
          std::vector<double> mx(G * kTile, -INFINITY), sm(G * kTile, 0.0);
          for (int n0 = 0; n0 < n_end; n0 += kTile) {
            Tiles S, D3;
            block(n0, S, D3);
            for (int w = 0; w < G; ++w)
              for (int rl = 0; rl < kTile; ++rl)
                for (int cl = 0; cl < kTile; ++cl) {
                  if (!visible(n0, rl, cl)) continue;
                  const double c = mix(S, mpre, pb.gpre, w, u * G + w, rl * kTile + cl, false);
                  double& m = mx[w * kTile + rl];
                  const double m_new = std::max(m, c);
                  sm[w * kTile + rl] = sm[w * kTile + rl] * std::exp(m - m_new) + std::exp(c - m_new);
                  m = m_new;
                }
          }
          for (int w = 0; w < G; ++w)
            for (int rl = 0; rl < kTile && m0 + rl < T; ++rl)
              lse[row(b, u * G + w, m0 + rl)] = mx[w * kTile + rl] + std::log(sm[w * kTile + rl]);
          // Pass 2 (O += A3 V) and the delta pass (delta += A * dA), with A = exp(C' - lse).
          for (int n0 = 0; n0 < n_end; n0 += kTile) {
            Tiles S, D3, A = zero;
            block(n0, S, D3);
            for (int w = 0; w < G; ++w)
              for (int rl = 0; rl < kTile; ++rl)
                for (int cl = 0; cl < kTile; ++cl)
                  if (visible(n0, rl, cl))
                    A[w][rl * kTile + cl] = std::exp(mix(S, mpre, pb.gpre, w, u * G + w, rl * kTile + cl, false) -
                                                     lse[row(b, u * G + w, m0 + rl)]);
            for (int w = 0; w < G; ++w) {
              const int h = u * G + w;
              for (int rl = 0; rl < kTile; ++rl)
                for (int cl = 0; cl < kTile; ++cl) {
                  if (!visible(n0, rl, cl)) continue;
                  const int pos = rl * kTile + cl, i = m0 + rl, j = n0 + cl;
                  const double a3 = mix(A, mpost, pb.gpost, w, h, pos, false);
                  for (int e = 0; e < D; ++e) r.o[row(b, h, i) * D + e] += a3 * v[row(b, h, j) * D + e];
                  delta[row(b, h, i)] += A[w][pos] * mix(D3, mpost, pb.gpost, w, h, pos, true);
                }
            }
          }
        }
        // ---- Backward, key-tile pass: CTAs of 16 keys [n0, n0 + 16), query blocks from the diagonal.
        for (int tile = 0; tile < ntiles; ++tile) {
          const int n0 = tile * kTile;
          std::vector<double> cta_pre(G * 16, 0.0), cta_post(G * 16, 0.0);  // per-CTA partials [warp][y]
          for (int m0 = n0; m0 < T; m0 += kTile) {
            // Transposed tiles: position (key rl, query cl).
            auto ok = [&](int rl, int cl) { return n0 + rl <= m0 + cl && m0 + cl < T && n0 + rl < T; };
            Tiles S = zero, D3 = zero, A = zero, DC = zero;
            for (int w = 0; w < G; ++w)
              for (int rl = 0; rl < kTile; ++rl)
                for (int cl = 0; cl < kTile; ++cl) {
                  if (!ok(rl, cl)) continue;
                  const int h = u * G + w, key = n0 + rl, qi = m0 + cl;
                  S[w][rl * kTile + cl] = scale() * dot(k, q, row(b, h, key), row(b, h, qi));
                  D3[w][rl * kTile + cl] = dot(v, dout, row(b, h, key), row(b, h, qi));
                }
            for (int w = 0; w < G; ++w)  // (1) -> A^T
              for (int rl = 0; rl < kTile; ++rl)
                for (int cl = 0; cl < kTile; ++cl)
                  if (ok(rl, cl))
                    A[w][rl * kTile + cl] = std::exp(mix(S, mpre, pb.gpre, w, u * G + w, rl * kTile + cl, false) -
                                                     lse[row(b, u * G + w, m0 + cl)]);
            for (int w = 0; w < G; ++w) {  // (2) -> A3^T, dV, dMpost, dA, dC', dMpre
              const int h = u * G + w;
              for (int rl = 0; rl < kTile; ++rl)
                for (int cl = 0; cl < kTile; ++cl) {
                  const int pos = rl * kTile + cl, key = n0 + rl, qi = m0 + cl;
                  const double a3 = mix(A, mpost, pb.gpost, w, h, pos, false);
                  const double da = mix(D3, mpost, pb.gpost, w, h, pos, true);
                  const double dc = A[w][pos] * (da - (qi < T ? delta[row(b, h, qi)] : 0.0));
                  DC[w][pos] = dc;
                  if (!ok(rl, cl)) continue;
                  for (int e = 0; e < D; ++e) r.dv[row(b, h, key) * D + e] += a3 * dout[row(b, h, qi) * D + e];
                  for (int y = 0; pb.gpost && y < pb.gpost; ++y)
                    cta_post[w * 16 + y] += D3[w][pos] * A[w - h % pb.gpost + y][pos];
                  for (int y = 0; pb.gpre && y < pb.gpre; ++y) cta_pre[w * 16 + y] += dc * S[w - h % pb.gpre + y][pos];
                }
            }
            for (int w = 0; w < G; ++w) {  // (4) -> dS^T, dK, dQ
              const int h = u * G + w;
              for (int rl = 0; rl < kTile; ++rl)
                for (int cl = 0; cl < kTile; ++cl) {
                  const int pos = rl * kTile + cl, key = n0 + rl, qi = m0 + cl;
                  if (key >= T || qi >= T) continue;
                  const double ds = mix(DC, mpre, pb.gpre, w, h, pos, true);
                  for (int e = 0; e < D; ++e) {
                    r.dk[row(b, h, key) * D + e] += scale() * ds * q[row(b, h, qi) * D + e];
                    r.dq[row(b, h, qi) * D + e] += scale() * ds * k[row(b, h, key) * D + e];
                  }
                }
            }
          }
          for (int w = 0; w < G; ++w) {  // the CTA's partials, added in CTA order (reduce_mix_grad_kernel)
            const int h = u * G + w;
            for (int y = 0; pb.gpre && y < pb.gpre; ++y) r.gpre[h * pb.gpre + y] += cta_pre[w * 16 + y];
            for (int y = 0; pb.gpost && y < pb.gpost; ++y) r.gpost[h * pb.gpost + y] += cta_post[w * 16 + y];
          }
        }
      }
    return r;
  }
};

void check(const Problem& pb, unsigned seed) {
  SCOPED_TRACE(pb.str());
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  const size_t n = static_cast<size_t>(pb.B) * pb.H * pb.T * pb.D;
  auto randn = [&](size_t count) {
    std::vector<double> x(count);
    for (auto& e : x) e = nd(rng);
    return x;
  };
  auto mixing = [&](int gs) {
    std::vector<double> m(gs ? static_cast<size_t>(pb.H) * gs : 0);
    for (size_t i = 0; i < m.size(); ++i) m[i] = 0.3 * nd(rng) + ((i / gs) % gs == i % gs ? 1.0 : 0.0);
    return m;
  };
  const std::vector<double> q = randn(n), k = randn(n), v = randn(n), dout = randn(n);
  const std::vector<double> mpre = mixing(pb.gpre), mpost = mixing(pb.gpost);
  const Replay rp{pb, q, k, v, dout, mpre, mpost};
  const Replay::Out got = rp.run();

  mta::AttentionSpec spec;
  spec.heads = pb.H, spec.head_dim = pb.D;
  if (pb.gpre) spec.head_pre = mta::HeadMix{pb.gpre};
  if (pb.gpost) spec.head_post = mta::HeadMix{pb.gpost};
  mta::AttnParams<double> p;
  p.head_pre = pb.gpre ? mpre.data() : nullptr;
  p.head_post = pb.gpost ? mpost.data() : nullptr;
  const mta::AttnDims dims{pb.B, pb.H, pb.T, pb.D};
  std::vector<double> o(n), dq(n), dk(n), dv(n), gpre(mpre.size(), 0.0), gpost(mpost.size(), 0.0);
  mta::AttnParamGrads<double> g;
  g.head_pre = pb.gpre ? gpre.data() : nullptr;
  g.head_post = pb.gpost ? gpost.data() : nullptr;
  mta::cpu::mta_forward<double>(spec, dims, q.data(), k.data(), v.data(), p, o.data());
  mta::cpu::mta_backward<double>(spec, dims, q.data(), k.data(), v.data(), p, dout.data(), dq.data(), dk.data(),
                                 dv.data(), g);
  constexpr double kTol = 1e-11;
  EXPECT_LE(rel_err(got.o, o), kTol) << "out";
  EXPECT_LE(rel_err(got.dq, dq), kTol) << "dq";
  EXPECT_LE(rel_err(got.dk, dk), kTol) << "dk";
  EXPECT_LE(rel_err(got.dv, dv), kTol) << "dv";
  if (pb.gpre) EXPECT_LE(rel_err(got.gpre, gpre), kTol) << "d head_pre";
  if (pb.gpost) EXPECT_LE(rel_err(got.gpost, gpost), kTol) << "d head_post";
}

TEST(FlashMixTiling, ForwardAndBackwardMatchTheReference) {
  check(Problem{1, 4, 37, 3, 4, 4}, 1);  // both sides, T across three tiles
  check(Problem{2, 4, 16, 2, 2, 4}, 2);  // different groups, T = one tile
  check(Problem{1, 2, 20, 3, 2, 0}, 3);  // before the softmax only
  check(Problem{1, 3, 5, 2, 0, 3}, 4);   // after the softmax only, T below a tile
  check(Problem{1, 8, 33, 2, 8, 2}, 5);  // the 35M LM configs' group of 8 before the softmax
}

}  // namespace
