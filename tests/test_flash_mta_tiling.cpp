// The tiling of the FlashMTA kq_pre kernels (src/attention/flash_mta.cu), replayed on the CPU in
// float64 and compared with the reference op: the 16-row / 16-column halo tile, the 32 x 8 banded
// matrices of the convolution and of its transpose, the zero-padded dC frame, the band diagonals that
// give dW, the extended-tile dQ / dK products (on the rows whose dS0 a tile completes, the dC rows
// above carried from the previous tile). Each loop below mirrors one stage of the kernels with
// the same index arithmetic (only the mma fragment mechanics, shared with the tested flash kernels,
// are left out), so an indexing error in the design shows here, on any machine, before the GPU test.
// Attention dropout is replayed the way the kernels apply it (after the row sums, through the mask).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "attention/mta_cpu.h"

namespace {

constexpr int BM = 64, BN = 64, kHalo = 16, kRowsE = BM + kHalo, kColsE = BN + kHalo;
constexpr int SS = BN + 24, kRowsF = 88, FS = 104;

struct Head {
  int T, D, cq, ck, o;
  const double *q, *k, *v, *W;
  float dropout;  // attention dropout with the shared mask (dropout_keep of (seed, bh = 0, i, j))
  unsigned long long seed;
  // The dropout factor of weight (i, j): 1 without dropout, else 0 or 1 / (1 - p).
  double mask(int i, int j) const {
    if (dropout <= 0.f) return 1.0;
    return mta::dropout_keep(seed, 0, T, i, j, dropout) ? 1.0 / (1.0 - static_cast<double>(dropout)) : 0.0;
  }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(D)); }
  double qk(int i, int j) const {
    double s = 0;
    for (int d = 0; d < D; ++d) s += q[i * D + d] * k[j * D + d];
    return s;
  }
};

// Band_a[kk][n] of the forward convolution and of its transpose (build_band).
double band(const Head& h, int a, int kk, int n, bool transposed) {
  const int c = transposed ? 16 + n - kk : kk - n;
  return (a < h.cq && c >= 0 && c < h.ck) ? h.W[a * h.ck + c] : 0.0;
}
// The band rows the kernels multiply: k-step 1 runs as a k8 product (banded_rows), rows 24 .. 31 unused.
constexpr int kBandRows = 24;

// s0_extended: S0 on the halo tile of (m0, n0).
std::vector<double> s0_tile(const Head& h, int m0, int n0) {
  std::vector<double> sS(static_cast<size_t>(kRowsE) * SS, 0.0);
  for (int lr = 0; lr < kRowsE; ++lr)
    for (int lc = 0; lc < kColsE; ++lc) {
      const int ii = m0 - kHalo + lr, jj = n0 - h.o + lc;
      const bool in = ii >= 0 && ii < h.T && jj >= 0 && jj < h.T;  // rows and keys outside load as zeros
      sS[lr * SS + lc] = (!in || jj > ii) ? 0.0 : h.scale() * h.qk(ii, jj);
    }
  return sS;
}

// conv_tile for all 64 rows of the tile: C[r][8 nj + n] = sum_a sum_kk sS[16 + r - (cq-1) + a][8 nj + kk] Band_a[kk][n].
std::vector<double> conv_tile(const Head& h, const std::vector<double>& sS) {
  std::vector<double> C(BM * BN, 0.0);
  for (int a = 0; a < h.cq; ++a)
    for (int r = 0; r < BM; ++r)
      for (int nj = 0; nj < BN / 8; ++nj)
        for (int n = 0; n < 8; ++n)
          for (int kk = 0; kk < kBandRows; ++kk)
            C[r * BN + 8 * nj + n] += sS[(kHalo + r - (h.cq - 1) + a) * SS + 8 * nj + kk] * band(h, a, kk, n, false);
  return C;
}

void forward(const Head& h, std::vector<double>& out, std::vector<double>& lse) {
  out.assign(static_cast<size_t>(h.T) * h.D, 0.0), lse.assign(h.T, 0.0);
  for (int m0 = 0; m0 < h.T; m0 += BM) {
    std::vector<std::vector<double>> rowC(BM);  // the full rows; the kernel's online softmax is exact
    for (int n0 = 0; n0 < std::min(h.T, m0 + BM); n0 += BN) {
      const std::vector<double> C = conv_tile(h, s0_tile(h, m0, n0));
      for (int r = 0; r < BM; ++r)
        for (int n = 0; n < BN; ++n)
          if (n0 + n <= m0 + r && n0 + n < h.T) rowC[r].push_back(C[r * BN + n]);
    }
    for (int r = 0; r < BM && m0 + r < h.T; ++r) {
      const int i = m0 + r;
      double mx = -INFINITY, sum = 0;
      for (double c : rowC[r]) mx = std::max(mx, c);
      for (double c : rowC[r]) sum += std::exp(c - mx);
      lse[i] = mx + std::log(sum);
      for (int j = 0; j <= i; ++j)
        for (int d = 0; d < h.D; ++d)
          out[i * h.D + d] += std::exp(rowC[r][j] - lse[i]) * h.mask(i, j) * h.v[j * h.D + d];
    }
  }
}

void backward(const Head& h, const std::vector<double>& out, const std::vector<double>& lse, const double* dout,
              std::vector<double>& dq, std::vector<double>& dk, std::vector<double>& dv, std::vector<double>& dW) {
  const int T = h.T, D = h.D;
  dq.assign(static_cast<size_t>(T) * D, 0.0), dk = dq, dv = dq, dW.assign(h.cq * h.ck, 0.0);
  std::vector<double> delta(T, 0.0);
  for (int i = 0; i < T; ++i)
    for (int d = 0; d < D; ++d) delta[i] += dout[i * D + d] * out[i * D + d];
  // dS0 of extended rows [lr0, lr1) of the tile at (m0, n0) from the dC frame: frame rows shifted by
  // cq - 1 - a times the transposed bands, masked; then dQ += dS0 K and dK += dS0^T Q.
  auto ds0_rows = [&](const std::vector<double>& frame, int m0, int n0, int lr0, int lr1) {
    for (int lr = lr0; lr < lr1; ++lr)
      for (int lc = 0; lc < kColsE; ++lc) {
        const int rb = lr / 16, row = lr % 16, cb = lc / 16, nn = (lc % 16) / 8, n = lc % 8;
        const int ii = m0 - kHalo + lr, jj = n0 - h.o + lc;
        if (!(ii >= 0 && ii < T && jj >= 0 && jj <= ii)) continue;
        double g = 0;
        for (int a = 0; a < h.cq; ++a)
          for (int kk = 0; kk < kBandRows; ++kk)
            g += frame[(rb * 16 + h.cq - 1 - a + row) * FS + cb * 16 + nn * 8 + kk] * band(h, a, kk, n, true);
        for (int d = 0; d < D; ++d) {
          dq[ii * D + d] += g * h.k[jj * D + d] * h.scale();
          dk[jj * D + d] += g * h.q[ii * D + d] * h.scale();
        }
      }
  };
  // As the kernel since session 22: a tile completes the dS0 of its extended rows 0 .. 63 (the frame's
  // 16 rows above hold the previous tile's last 16 rows of dC), its last 16 rows wait for the next
  // tile, and the last tile's are done after the loop.
  constexpr int kOwnRows = kRowsE - 16;
  for (int n0 = 0; n0 < T; n0 += BN) {
    std::vector<double> frame(static_cast<size_t>(kRowsF) * FS, 0.0);
    int m_last = 0;
    for (int m0 = (n0 / BM) * BM; m0 < T; m0 += BM) {
      m_last = m0;
      const std::vector<double> sS = s0_tile(h, m0, n0);
      const std::vector<double> C = conv_tile(h, sS);
      std::vector<double> P(BM * BN, 0.0);
      for (int r = 0; r < kHalo; ++r)  // the carried rows of dC; the tile's own rows are rewritten below
        for (int c = 0; c < FS; ++c) frame[r * FS + c] = frame[(BM + r) * FS + c];
      for (size_t i = static_cast<size_t>(kHalo) * FS; i < frame.size(); ++i) frame[i] = 0.0;
      for (int r = 0; r < BM; ++r)
        for (int n = 0; n < BN; ++n) {
          const int row = m0 + r, col = n0 + n;
          if (!(row < T && col <= row)) continue;
          double dp = 0;
          for (int d = 0; d < D; ++d) dp += dout[row * D + d] * h.v[col * D + d];
          // As the kernel: P for the softmax's adjoint, the dropped P for dV, dP through the mask.
          const double p = std::exp(C[r * BN + n] - lse[row]), mask = h.mask(row, col);
          P[r * BN + n] = p * mask;
          frame[(kHalo + r) * FS + kHalo + n] = p * (dp * mask - delta[row]);
        }
      for (int n = 0; n < BN; ++n)  // dV: P^T dO
        for (int r = 0; r < BM; ++r)
          for (int d = 0; d < D && n0 + n < T && m0 + r < T; ++d) dv[(n0 + n) * D + d] += P[r * BN + n] * dout[(m0 + r) * D + d];
      // dW: per 16 keys (warp w), M = dC^T X_a over a 32-column window, band M[rr][rr + c].
      for (int a = 0; a < h.cq; ++a)
        for (int w = 0; w < BN / 16; ++w)
          for (int rr = 0; rr < 16; ++rr)
            for (int c = 0; c < h.ck; ++c) {
              double m = 0;
              for (int i = 0; i < BM; ++i)
                m += frame[(kHalo + i) * FS + kHalo + 16 * w + rr] *
                     sS[(kHalo - (h.cq - 1) + a + i) * SS + 16 * w + rr + c];
              dW[a * h.ck + c] += m;
            }
      ds0_rows(frame, m0, n0, 0, kOwnRows);
    }
    ds0_rows(frame, m_last, n0, kOwnRows, kRowsE);
  }
}

double rel(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num += (a[i] - b[i]) * (a[i] - b[i]), den += b[i] * b[i];
  return std::sqrt(num / std::max(den, 1e-300));
}

// banded_rows drops band rows 24 .. 31 (k-step 1 as a k8 product): they are zero for every tap of every
// supported size (cq <= 8, ck <= 15), in the forward band and in the transposed one.
TEST(FlashMtaTiling, BandRowsPast24AreZero) {
  for (int cq = 1; cq <= 8; ++cq)
    for (int ck = 1; ck <= 15; ++ck) {
      const std::vector<double> w(static_cast<size_t>(cq) * ck, 1.0);
      Head h{};
      h.cq = cq, h.ck = ck, h.W = w.data();
      double inside = 0;
      for (int a = 0; a < cq; ++a)
        for (int n = 0; n < 8; ++n) {
          for (int kk = kBandRows; kk < 32; ++kk)
            for (bool tr : {false, true}) EXPECT_EQ(band(h, a, kk, n, tr), 0.0) << cq << "x" << ck << " kk " << kk;
          for (int kk = 0; kk < kBandRows; ++kk) inside += band(h, a, kk, n, false) + band(h, a, kk, n, true);
        }
      EXPECT_EQ(inside, 2.0 * 8 * cq * ck) << "every tap in rows 0 .. 23 of both bands, for every output column";
    }
}

TEST(FlashMtaTiling, ForwardAndBackwardMatchTheReference) {
  std::mt19937 rng(11);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(-0.5, 0.5);
  struct Case {
    int T, cq, ck;
    mta::PadKey pad;
    float dropout;
  };
  for (const Case& cs : {Case{70, 2, 9, mta::PadKey::Both, 0.f}, Case{130, 6, 11, mta::PadKey::Both, 0.f},
                         Case{65, 8, 15, mta::PadKey::Left, 0.f}, Case{40, 3, 14, mta::PadKey::Right, 0.f},
                         Case{129, 1, 1, mta::PadKey::Both, 0.f}, Case{5, 4, 7, mta::PadKey::Both, 0.f},
                         Case{100, 2, 9, mta::PadKey::Both, 0.2f}}) {
    const int T = cs.T, D = 16;
    SCOPED_TRACE("T=" + std::to_string(T) + " kq " + std::to_string(cs.cq) + "x" + std::to_string(cs.ck) +
                 " dropout " + std::to_string(cs.dropout));
    mta::AttentionSpec spec;
    spec.heads = 1, spec.head_dim = D;
    spec.kq_pre = mta::KqConv{cs.cq, cs.ck, cs.pad};
    std::vector<double> q(T * D), k(T * D), v(T * D), dout(T * D), W(cs.cq * cs.ck);
    for (auto* x : {&q, &k, &v, &dout})
      for (double& e : *x) e = nd(rng);
    for (double& e : W) e = ud(rng);
    W[(cs.cq - 1) * cs.ck + spec.kq_pre->key_offset()] += 1.0;
    const Head h{T, D, cs.cq, cs.ck, spec.kq_pre->key_offset(), q.data(), k.data(), v.data(), W.data(),
                 cs.dropout, 4242ull};
    mta::AttnOptions opt;
    opt.dropout = cs.dropout, opt.dropout_seed = h.seed;

    std::vector<double> out, lse, dq, dk, dv, dW;
    forward(h, out, lse);
    backward(h, out, lse, dout.data(), dq, dk, dv, dW);

    mta::AttnParams<double> p;
    p.kq_pre = W.data();
    std::vector<double> ro(T * D), rq(T * D), rk(T * D), rv(T * D), rW(W.size(), 0.0);
    mta::AttnParamGrads<double> pg;
    pg.kq_pre = rW.data();
    const mta::AttnDims dims{1, 1, T, D};
    mta::cpu::mta_forward<double>(spec, dims, q.data(), k.data(), v.data(), p, ro.data(), opt);
    mta::cpu::mta_backward<double>(spec, dims, q.data(), k.data(), v.data(), p, dout.data(), rq.data(), rk.data(),
                                   rv.data(), pg, opt);
    EXPECT_LT(rel(out, ro), 1e-12) << "out";
    EXPECT_LT(rel(dq, rq), 1e-12) << "dq";
    EXPECT_LT(rel(dk, rk), 1e-12) << "dk";
    EXPECT_LT(rel(dv, rv), 1e-12) << "dv";
    EXPECT_LT(rel(dW, rW), 1e-12) << "dW";
  }
}

}  // namespace
