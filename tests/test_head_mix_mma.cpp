// The fragment mechanics of FlashMix's tensor-core head mixing (src/attention/head_mix_mma.cuh), of
// kernel Q's dS-tile products (flash_kq_layer_bwd.cu; KqLayerFragments) and of the kq_pre kernels' banded
// convolution loads (flash_mta.cu's banded_rows; KqPreFragments),
// replayed on the CPU with the layout functions the kernels themselves call (head_mix_layout.h,
// mma_layout.h): put_tile's bf16 writes and rounding remainders at in_offset, ldmatrix.x4 (plain and
// .trans) from mix_a_offset / grad_a_offset / grad_b_offset / staged_grad_a_offset, the coefficient
// fragments of b_frag_kn and frag_coef (hi and lo parts), mma.m16n8k16 by the PTX fragment definitions
// (mma_sm80.cuh), and the result stores at out_offset. The replayed mixes (every kind, hi + lo and hi only) and
// weight-gradient products must equal the direct sums. A wrong offset, fragment index or layout
// constant fails it on any machine (the GPU tests, tests/gpu/test_flash_mix.cpp, need an H200).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attention/head_mix_layout.h"
#include "util/bf16_bits.h"

namespace {

using namespace mta::cuda::headmix;  // NOLINT: the layout under test
namespace mma = mta::cuda::mma;

using Bits = std::vector<uint16_t>;                   // a shared-memory buffer of bf16
using Tile = std::array<std::array<float, 16>, 16>;  // one head's 16 x 16 positions

float bf(float x) { return mta::bf16_bits_to_float(mta::float_to_bf16_bits(x)); }

// Per lane, four b32 registers of two bf16 each (as floats): ldmatrix.x4 results and A fragments.
using Regs = std::array<std::array<std::array<float, 2>, 4>, 32>;
// Per lane, B fragments {b0, b1} (two bf16 each) and fp32 accumulators.
using BFrag = std::array<std::array<std::array<float, 2>, 2>, 32>;
using Acc = std::array<std::array<double, 4>, 32>;

// ldmatrix.x4: lanes 8i .. 8i + 7 give the 8 row addresses of matrix i; register i of lane (g, t)
// receives (row g, columns 2t, 2t + 1), or with .trans (rows 2t, 2t + 1, column g).
// Each row address must be 16-byte aligned (8 bf16), as the instruction requires.
Regs ldmatrix_x4(const Bits& buf, const std::array<int, 32>& addr, bool trans) {
  for (int lane = 0; lane < 32; ++lane) EXPECT_EQ(addr[lane] % 8, 0) << "ldmatrix row address of lane " << lane;
  Regs out{};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i)
      for (int e = 0; e < 2; ++e) {
        const int a = trans ? addr[8 * i + 2 * t + e] + g : addr[8 * i + g] + 2 * t + e;
        EXPECT_GE(a, 0);
        EXPECT_LT(a, static_cast<int>(buf.size()));
        out[lane][i][e] = mta::bf16_bits_to_float(buf.at(a));
      }
  }
  return out;
}

// c += A B, m16n8k16: a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
// b0 = B[2t..][g], b1 = B[2t+8..][g]; c0, c1 = C[g][2t..], c2, c3 = C[g+8][2t..].
void mma_m16n8k16(Acc& c, const Regs& a, const BFrag& b) {
  double A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = a[lane][0][e];
      A[g + 8][2 * t + e] = a[lane][1][e];
      A[g][2 * t + 8 + e] = a[lane][2][e];
      A[g + 8][2 * t + 8 + e] = a[lane][3][e];
      B[2 * t + e][g] = b[lane][0][e];
      B[2 * t + 8 + e][g] = b[lane][1][e];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int e4 = 0; e4 < 4; ++e4) {
      const int row = g + 8 * (e4 >> 1), col = 2 * t + (e4 & 1);
      double s = 0;
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      c[lane][e4] += s;
    }
  }
}

// put_tile: warp x's tile, lane (g, t) holding rows g + 8r, columns 8j + 2t + e.
void put_tile(Bits& hi, Bits* lo, int x, const Tile& v) {
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int j = 0; j < 2; ++j)
      for (int r = 0; r < 2; ++r)
        for (int e = 0; e < 2; ++e) {
          const float val = v[g + 8 * r][8 * j + 2 * t + e];
          const int off = in_offset(x, g + 8 * r, 8 * j + 2 * t) + e;
          const uint16_t h = mta::float_to_bf16_bits(val);
          hi.at(off) = h;
          if (lo) lo->at(off) = mta::float_to_bf16_bits(val - mta::bf16_bits_to_float(h));
        }
  }
}

struct Coefs {
  BFrag hi[2], lo[2];  // per n-block
};
// build_frags for one kind.
Coefs frags(const float* m, int gs, int head0, int G, bool adjoint, int reps = 1) {
  Coefs c{};
  for (int lane = 0; lane < 32; ++lane)
    for (int nt = 0; nt < 2; ++nt)
      for (int reg = 0; reg < 2; ++reg)
        for (int e = 0; e < 2; ++e) {
          int k, n;
          b_frag_kn(lane, nt, reg, e, k, n);
          EXPECT_EQ(n / 8, nt);
          const float v = frag_coef(m, gs, head0, G, adjoint, k, n, reps);
          c.hi[nt][lane][reg][e] = bf(v);
          c.lo[nt][lane][reg][e] = bf(v - bf(v));
        }
  return c;
}

// mix_tiles_owned: the tile rows of `warps` warps, results into MixOut (slots < G).
void mix_tiles(const Bits& hi, const Bits* lo, const Coefs& cf, std::vector<float>& out, int G, int warps) {
  for (int warp = 0; warp < warps; ++warp)
    for (int r = warp; r < kTile; r += warps) {
      std::array<int, 32> addr;
      for (int lane = 0; lane < 32; ++lane) addr[lane] = mix_a_offset(lane, r);
      const Regs ah = ldmatrix_x4(hi, addr, true);
      Regs al{};
      if (lo) al = ldmatrix_x4(*lo, addr, true);
      for (int nt = 0; nt < 2; ++nt) {
        Acc c{};
        mma_m16n8k16(c, ah, cf.lo[nt]);
        if (lo) mma_m16n8k16(c, al, cf.hi[nt]);
        mma_m16n8k16(c, ah, cf.hi[nt]);
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane >> 2, t = lane & 3, x0 = 8 * nt + 2 * t;
          if (x0 < G) out.at(out_offset(x0, r, g)) = c[lane][0], out.at(out_offset(x0, r, g + 8)) = c[lane][2];
          if (x0 + 1 < G)
            out.at(out_offset(x0 + 1, r, g)) = c[lane][1], out.at(out_offset(x0 + 1, r, g + 8)) = c[lane][3];
        }
      }
    }
}

struct Case {
  int G, gs, units, unit;
  bool adjoint, with_lo;
  unsigned seed;
  std::string str() const {
    return "G=" + std::to_string(G) + " gs=" + std::to_string(gs) + " unit " + std::to_string(unit) + "/" +
           std::to_string(units) + (adjoint ? " adjoint" : "") + (with_lo ? " hi+lo" : " hi");
  }
};

std::vector<Case> cases() {
  std::vector<Case> out;
  unsigned seed = 1;
  for (int G : {1, 2, 3, 4, 6, 8, 12, 16})
    for (int gs = 1; gs <= G; ++gs) {
      if (G % gs) continue;
      for (bool adjoint : {false, true})
        for (bool with_lo : {true, false}) out.push_back({G, gs, 3, static_cast<int>(seed % 3), adjoint, with_lo, seed++});
    }
  return out;
}

std::vector<Tile> random_tiles(int G, std::mt19937& rng, float scale) {
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<Tile> v(G);
  for (auto& tile : v)
    for (auto& row : tile)
      for (auto& x : row) x = rng() % 7 == 0 ? 0.f : nd(rng);  // some masked (zero) positions
  return v;
}

TEST(HeadMixMma, MixingMatchesDirectSums) {
  for (const Case& cs : cases()) {
    SCOPED_TRACE(cs.str());
    std::mt19937 rng(cs.seed);
    std::normal_distribution<float> nd(0.f, 0.7f);
    const int H = cs.G * cs.units, head0 = cs.unit * cs.G;
    std::vector<float> m(static_cast<size_t>(H / cs.gs) * cs.gs * cs.gs);
    for (auto& x : m) x = nd(rng);
    const std::vector<Tile> in = random_tiles(cs.G, rng, 6.f);  // logit-sized values
    Bits hi(kInElems, 0), lo(kInElems, 0);
    for (int x = 0; x < cs.G; ++x) put_tile(hi, cs.with_lo ? &lo : nullptr, x, in[x]);
    std::vector<float> out(static_cast<size_t>(cs.G) * kXT, NAN);
    mix_tiles(hi, cs.with_lo ? &lo : nullptr, frags(m.data(), cs.gs, head0, cs.G, cs.adjoint), out, cs.G, cs.G);
    // hi + lo keeps ~16 bits of every operand; hi alone 8.
    const double rel = cs.with_lo ? 1e-4 : 1.5e-2;
    double worst = 0;
    for (int x = 0; x < cs.G; ++x)
      for (int row = 0; row < kTile; ++row)
        for (int col = 0; col < kTile; ++col) {
          double want = 0, mag = 0;
          for (int y = 0; y < cs.G; ++y) {
            const double c = cs.adjoint ? cta_coef(m.data(), cs.gs, head0, cs.G, y, x)
                                        : cta_coef(m.data(), cs.gs, head0, cs.G, x, y);
            want += c * in[y][row][col], mag += std::abs(c * in[y][row][col]);
          }
          // As get_pair reads it: a float2 at the even column's offset.
          const double got = out.at(out_offset(x, row, col & ~1) + (col & 1));
          ASSERT_TRUE(std::isfinite(got)) << "head " << x << " (" << row << ", " << col << ") not written";
          worst = std::max(worst, std::abs(got - want) / (mag + 1e-30));
          ASSERT_LE(std::abs(got - want), rel * mag + 1e-6) << "head " << x << " (" << row << ", " << col << ")";
        }
    if (cs.with_lo) EXPECT_LT(worst, 1e-4);
  }
}

// Two tiles per head (FlashMix's backward at G <= 8, D = 64: frag_coef's reps): tile i of head x in slot
// x + i G, one product over all slots with G warps, and each copy must come out mixed on its own, as if
// it were alone (no term from the other copy, nothing from the slots past 2 G).
TEST(HeadMixMma, TwoTilesPerHeadMixSeparately) {
  unsigned seed = 500;
  for (int G : {1, 2, 3, 4, 6, 8})
    for (int gs = 1; gs <= G; ++gs) {
      if (G % gs) continue;
      for (bool adjoint : {false, true}) {
        SCOPED_TRACE("G=" + std::to_string(G) + " gs=" + std::to_string(gs) + (adjoint ? " adjoint" : ""));
        std::mt19937 rng(seed++);
        std::normal_distribution<float> nd(0.f, 0.7f);
        const int units = 2, head0 = G;  // the second group unit: head0 indexes the coefficients
        std::vector<float> m(static_cast<size_t>(G * units / gs) * gs * gs);
        for (auto& x : m) x = nd(rng);
        const std::vector<Tile> in = random_tiles(2 * G, rng, 6.f);  // in[x + i G]: tile i of head x
        Bits hi(kInElems, 0), lo(kInElems, 0);
        for (int x = 0; x < 2 * G; ++x) put_tile(hi, &lo, x, in[x]);
        std::vector<float> out(static_cast<size_t>(2 * G) * kXT, NAN);
        mix_tiles(hi, &lo, frags(m.data(), gs, head0, G, adjoint, 2), out, 2 * G, G);
        for (int i = 0; i < 2; ++i)
          for (int x = 0; x < G; ++x)
            for (int row = 0; row < kTile; ++row)
              for (int col = 0; col < kTile; ++col) {
                double want = 0, mag = 0;
                for (int y = 0; y < G; ++y) {
                  const double c = adjoint ? cta_coef(m.data(), gs, head0, G, y, x) : cta_coef(m.data(), gs, head0, G, x, y);
                  want += c * in[y + i * G][row][col], mag += std::abs(c * in[y + i * G][row][col]);
                }
                const double got = out.at(out_offset(x + i * G, row, col & ~1) + (col & 1));
                ASSERT_TRUE(std::isfinite(got)) << "slot " << x + i * G << " not written";
                ASSERT_LE(std::abs(got - want), 1e-4 * mag + 1e-6)
                    << "tile " << i << " head " << x << " (" << row << ", " << col << ")";
              }
      }
    }
}

// One tile row of grad_tiles (head_mix_mma.cuh): the A fragments a times V's B fragments (hi, then lo
// when given, both from the addresses ba) into acc, one n-block of 8 heads each.
void grad_products(Acc (&acc)[2], const Regs& a, const Bits& vh, const Bits* vl, const std::array<int, 32>& ba) {
  for (const Bits* v : {&vh, vl}) {
    if (!v) continue;
    const Regs b = ldmatrix_x4(*v, ba, false);
    for (int nb = 0; nb < 2; ++nb) {
      BFrag bf{};
      for (int lane = 0; lane < 32; ++lane) bf[lane][0] = b[lane][2 * nb], bf[lane][1] = b[lane][2 * nb + 1];
      mma_m16n8k16(acc[nb], a, bf);
    }
  }
}

// The weight-gradient product G[x][y] = sum_p D_x(p) V_y(p) over the 256 positions, summed over the
// warps' tile rows, with V's remainder (as dMpre takes S0's) or without.
TEST(HeadMixMma, GradientProductMatchesDirectSums) {
  for (int G : {1, 2, 4, 5, 8, 16})
    for (bool with_lo : {true, false}) {
      SCOPED_TRACE("G=" + std::to_string(G) + (with_lo ? " hi+lo" : " hi"));
      std::mt19937 rng(100 + G);
      const std::vector<Tile> d = random_tiles(G, rng, 0.01f), v = random_tiles(G, rng, 5.f);
      Bits dh(kInElems, 0), vh(kInElems, 0), vl(kInElems, 0);
      for (int x = 0; x < G; ++x) put_tile(dh, nullptr, x, d[x]), put_tile(vh, with_lo ? &vl : nullptr, x, v[x]);
      double got[16][16] = {};
      for (int warp = 0; warp < G; ++warp) {
        Acc acc[2]{};
        for (int r = warp; r < kTile; r += G) {
          std::array<int, 32> aa, ba;
          for (int lane = 0; lane < 32; ++lane) aa[lane] = grad_a_offset(lane, r), ba[lane] = grad_b_offset(lane, r);
          grad_products(acc, ldmatrix_x4(dh, aa, false), vh, with_lo ? &vl : nullptr, ba);
        }
        for (int lane = 0; lane < 32; ++lane)
          for (int nb = 0; nb < 2; ++nb)
            for (int e = 0; e < 4; ++e)
              got[(lane >> 2) + 8 * (e >> 1)][8 * nb + 2 * (lane & 3) + (e & 1)] += acc[nb][lane][e];
      }
      for (int x = 0; x < 16; ++x)
        for (int y = 0; y < 16; ++y) {
          double want = 0, mag = 0;
          if (x < G && y < G)
            for (int row = 0; row < kTile; ++row)
              for (int col = 0; col < kTile; ++col) {
                const double term = static_cast<double>(bf(d[x][row][col])) * v[y][row][col];
                want += term, mag += std::abs(term);
              }
          const double tol = (with_lo ? 1e-4 : 1.5e-2) * mag + 1e-12;
          ASSERT_LE(std::abs(got[x][y] - want), tol) << "x " << x << " y " << y;
        }
    }
}

// The clustered kq-layer kernels' mixing-weight gradient terms (flash_kq_layer_bwd.cu, grad_terms_cl): each
// of the CTA's L warps stages its head's gradient tile D_x as bf16 hi and lo in its own MixOut slot
// (staged_offset), and the warps' tile rows give G[x][y] = sum_p D_x(p) V_y(p) against the 16 MixIn
// slots (V hi + lo) with A rows from staged_grad_a_offset: rows >= L repeat a staged head and must stay
// inside the L slots (ldmatrix_x4 checks every address against the buffer, sized to L slots).
TEST(HeadMixMma, StagedGradientProductMatchesDirectSums) {
  for (int L : {1, 3, 4, 7, 8}) {
    SCOPED_TRACE("L=" + std::to_string(L));
    std::mt19937 rng(300 + L);
    const std::vector<Tile> d = random_tiles(L, rng, 0.01f), v = random_tiles(kMaxG, rng, 5.f);
    Bits vh(kInElems, 0), vl(kInElems, 0), staged(static_cast<size_t>(2 * kXT) * L, 0);
    for (int y = 0; y < kMaxG; ++y) put_tile(vh, &vl, y, v[y]);
    // grad_terms_cl's stores: lane (r, half) holds row r, columns 8 half .. 8 half + 7.
    for (int x = 0; x < L; ++x)
      for (int lane = 0; lane < 32; ++lane)
        for (int e = 0; e < 8; ++e) {
          const int r = lane & 15, col = 8 * (lane >> 4) + e, off = staged_offset(x, r, 8 * (lane >> 4)) + e;
          const float val = d[x][r][col];
          const uint16_t h = mta::float_to_bf16_bits(val);
          staged.at(off) = h;
          staged.at(off + kStageLo) = mta::float_to_bf16_bits(val - mta::bf16_bits_to_float(h));
        }
    double got[8][16] = {};
    for (int warp = 0; warp < L; ++warp) {
      Acc acc[2]{};
      for (int r = warp; r < kTile; r += L) {
        std::array<int, 32> ah, al, ba;
        for (int lane = 0; lane < 32; ++lane) {
          ah[lane] = staged_grad_a_offset(lane, r, L);
          al[lane] = ah[lane] + kStageLo;
          ba[lane] = grad_b_offset(lane, r);
        }
        // d hi (v hi + v lo), then d lo v hi, as grad_terms_cl's two grad_tiles_at calls.
        for (const auto& [aa, with_vlo] : {std::pair{ah, true}, std::pair{al, false}}) {
          grad_products(acc, ldmatrix_x4(staged, aa, false), vh, with_vlo ? &vl : nullptr, ba);
        }
      }
      for (int lane = 0; lane < 32; ++lane)  // rows g (e < 2) only: rows 8 .. 15 repeat them
        for (int nb = 0; nb < 2; ++nb)
          for (int e = 0; e < 2; ++e) got[lane >> 2][8 * nb + 2 * (lane & 3) + e] += acc[nb][lane][e];
    }
    for (int x = 0; x < L; ++x)
      for (int y = 0; y < kMaxG; ++y) {
        double want = 0, mag = 0;
        for (int row = 0; row < kTile; ++row)
          for (int col = 0; col < kTile; ++col) {
            const double term = static_cast<double>(d[x][row][col]) * v[y][row][col];
            want += term, mag += std::abs(term);
          }
        ASSERT_LE(std::abs(got[x][y] - want), 1e-4 * mag + 1e-12) << "x " << x << " y " << y;
      }
  }
}

// c += A B, m16n8k8 (mma_bf16_k8): the k16 product with A's columns 8 .. 15 (registers 2, 3) and B's rows
// 8 .. 15 (b1) zero; a0, a1 and b0 as given.
void mma_m16n8k8(Acc& c, const Regs& a, const BFrag& b) {
  Regs a8 = a;
  BFrag b8 = b;
  for (int lane = 0; lane < 32; ++lane) a8[lane][2] = a8[lane][3] = b8[lane][1] = {0.f, 0.f};
  mma_m16n8k16(c, a8, b8);
}

// Kernel Q's products over its dS tile (flash_kq_layer_bwd.cu, flash_kq_layer_pre_grad_kernel, step 4): the
// tile holds dS0 rows m0 - 8 .. m0 + 15 ([24][kDsPitch] bf16), K the block's 16 keys ([16][D + 8]), and
// the kept Q rows m0 - 8 .. m0 + 23 ([32][D + 8]; the D = 128 form's ldmatrix loads). Replayed with the
// kernel's offsets: dq of the own rows (A from rows 8 ..), dq of the 8 rows above as K^T dS_above^T (K^T's
// A fragment is the register swap {b0, b2, b1, b3} of dQ's K fragment, and the B fragment the plain
// load of dS rows 0 .. 7), and dK over the 24 rows (a k16 product from rows 0 .. 15 and a k8 one from
// ldmatrix.x2 of rows 16 .. 23, which must not read past row 23).
TEST(KqLayerFragments, KernelQProductsMatchDirectSums) {
  constexpr int kD = 64, kS = kD + 8, kDs = kTile + 8, kRows = 24;
  std::mt19937 rng(77);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  auto fill = [&](Bits& b, int rows, int pitch, int cols) {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) b.at(r * pitch + c) = mta::float_to_bf16_bits(u(rng));
  };
  Bits ds(kRows * kDs, 0), k(kTile * kS, 0), q(32 * kS, 0);
  fill(ds, kRows, kDs, kTile), fill(k, kTile, kS, kD), fill(q, 32, kS, kD);
  auto at = [](const Bits& b, int i) { return static_cast<double>(mta::bf16_bits_to_float(b.at(i))); };
  auto offsets = [](auto f) {
    std::array<int, 32> a{};
    for (int lane = 0; lane < 32; ++lane) a[lane] = f(lane);
    return a;
  };
  auto b_of = [](const Regs& r, int i0, int i1) {
    BFrag b{};
    for (int lane = 0; lane < 32; ++lane) b[lane][0] = r[lane][i0], b[lane][1] = r[lane][i1];
    return b;
  };
  const Regs aq = ldmatrix_x4(ds, offsets([](int l) { return mma::a_offset(l, 8, 0, kDs); }), false);
  const Regs bu = ldmatrix_x4(ds, offsets([](int l) { return mma::bnk_offset(l, 0, 0, kDs); }), false);
  const Regs ak0 = ldmatrix_x4(ds, offsets([](int l) { return mma::at_offset(l, 0, 0, kDs); }), true);
  // ldmatrix.x2: lanes 0 .. 15 give the addresses (those of lanes 16 .. 31 are not read).
  const Regs ak1 = ldmatrix_x4(ds, offsets([](int l) { return mma::at_offset(l & 15, 16, 0, kDs); }), true);
  for (int dn = 0; dn < kD / 16; ++dn) {
    SCOPED_TRACE("dn=" + std::to_string(dn));
    const Regs bb = ldmatrix_x4(k, offsets([&](int l) { return mma::bkn_offset(l, 0, 16 * dn, kS); }), true);
    Regs kt{};  // K^T's A fragment, the kernel's {bb[0], bb[2], bb[1], bb[3]}
    for (int lane = 0; lane < 32; ++lane) kt[lane] = {bb[lane][0], bb[lane][2], bb[lane][1], bb[lane][3]};
    const Regs qb0 = ldmatrix_x4(q, offsets([&](int l) { return mma::bkn_offset(l, 0, 16 * dn, kS); }), true);
    const Regs qb1 = ldmatrix_x4(q, offsets([&](int l) { return mma::bkn_offset(l, 16, 16 * dn, kS); }), true);
    Acc own[2]{}, up{}, dk[2]{};
    for (int nb = 0; nb < 2; ++nb) mma_m16n8k16(own[nb], aq, b_of(bb, 2 * nb, 2 * nb + 1));
    mma_m16n8k16(up, kt, b_of(bu, 0, 1));
    for (int nb = 0; nb < 2; ++nb) {
      mma_m16n8k16(dk[nb], ak0, b_of(qb0, 2 * nb, 2 * nb + 1));
      mma_m16n8k8(dk[nb], ak1, b_of(qb1, 2 * nb, 2 * nb + 1));
    }
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, t = lane & 3;
      for (int e4 = 0; e4 < 4; ++e4) {
        const int m = g + 8 * (e4 >> 1), n = 2 * t + (e4 & 1);
        for (int nb = 0; nb < 2; ++nb) {
          const int col = 16 * dn + 8 * nb + n;
          double want_q = 0, want_k = 0;
          for (int key = 0; key < kTile; ++key) want_q += at(ds, (8 + m) * kDs + key) * at(k, key * kS + col);
          for (int row = 0; row < kRows; ++row) want_k += at(ds, row * kDs + m) * at(q, row * kS + col);
          ASSERT_NEAR(own[nb][lane][e4], want_q, 1e-9) << "dq own row " << m << " column " << col;
          ASSERT_NEAR(dk[nb][lane][e4], want_k, 1e-9) << "dk key " << m << " column " << col;
        }
        double want_up = 0;  // (dS_above K)^T: column 16 dn + m of row n above the tile
        for (int key = 0; key < kTile; ++key) want_up += at(k, key * kS + 16 * dn + m) * at(ds, n * kDs + key);
        ASSERT_NEAR(up[lane][e4], want_up, 1e-9) << "dq row above " << n << " column " << 16 * dn + m;
      }
    }
  }
}

// flash_mta.cu's banded_rows (session 20): per tap a, the tap's 16 rows (row0 + step a ..) are read as
// kNB + 2 eight-column halves H_m (the registers a0, a1 of an A fragment at column 8 (nb0 + m)), two per
// ldmatrix.x4 at an even half and an .x2 for an odd last one; output block m is the k16 product of
// (H_m, H_m+1) with k-step 0 of the banded operand, then the k8 product of H_m+2 with k-step 1 (the band
// fragments as build_band lays them out: sBand[((a * 2 + ks) * 2 + half) * 32 + lane] holds rows
// kk = 16 ks + 2t + 8 half (+1), column g). Replayed with a_offset for the kernels' three shapes (kNB 8:
// conv_tile; 4: the 8-warp backward's halves of C; 5 from block 0 or 5: dS0's half bands, reading down)
// against the direct convolution sum over the band's 24 rows.
TEST(KqPreFragments, BandedRowsHalvesMatchDirectSums) {
  constexpr int kCq = 6, kCk = 11, kRowsIn = 48;
  struct Shape {
    int nb_blocks, nb0, stride, row0, step;
  };
  const Shape shapes[] = {{8, 0, 88, 9, 1}, {4, 4, 88, 25, 1}, {5, 0, 104, 21, -1}, {5, 5, 104, 30, -1}};
  std::mt19937 rng(2020);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  double w[kCq][kCk];
  for (auto& row : w)
    for (double& x : row) x = bf(u(rng));
  // Band_a[kk][n] = W[a, kk - n] (the forward's; the transposed band only changes the values).
  auto band = [&](int a, int kk, int n) { return kk - n >= 0 && kk - n < kCk ? w[a][kk - n] : 0.0; };
  for (const Shape& sh : shapes) {
    SCOPED_TRACE("kNB=" + std::to_string(sh.nb_blocks) + " nb0=" + std::to_string(sh.nb0));
    const int halves = sh.nb_blocks + 2;
    Bits in(kRowsIn * sh.stride, 0);
    for (int r = 0; r < kRowsIn; ++r)
      for (int c = 0; c < sh.stride; ++c) in.at(r * sh.stride + c) = mta::float_to_bf16_bits(u(rng));
    auto at = [&](int r, int c) { return static_cast<double>(mta::bf16_bits_to_float(in.at(r * sh.stride + c))); };
    std::vector<Acc> acc(sh.nb_blocks);
    for (int a = 0; a < kCq; ++a) {
      const int r = sh.row0 + sh.step * a;
      BFrag b0{}, b1{};  // k-step 0 (both registers), k-step 1 (its first register: rows 16 .. 23)
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        for (int half = 0; half < 2; ++half)
          for (int e = 0; e < 2; ++e) {
            b0[lane][half][e] = static_cast<float>(band(a, 2 * t + 8 * half + e, g));
            if (half == 0) b1[lane][0][e] = static_cast<float>(band(a, 16 + 2 * t + e, g));
          }
      }
      std::vector<Regs> h(halves);  // h[m][lane][0 .. 1]: H_m
      for (int p = 0; 2 * p < halves; ++p) {
        std::array<int, 32> addr{};
        const bool x2 = 2 * p + 1 >= halves;  // .x2: lanes 0 .. 15 give the addresses
        for (int lane = 0; lane < 32; ++lane)
          addr[lane] = mma::a_offset(x2 ? lane & 15 : lane, r, (sh.nb0 + 2 * p) * 8, sh.stride);
        const Regs x = ldmatrix_x4(in, addr, false);
        for (int lane = 0; lane < 32; ++lane) {
          h[2 * p][lane][0] = x[lane][0], h[2 * p][lane][1] = x[lane][1];
          if (!x2) h[2 * p + 1][lane][0] = x[lane][2], h[2 * p + 1][lane][1] = x[lane][3];
        }
      }
      for (int m = 0; m < sh.nb_blocks; ++m) {
        Regs af{}, a8{};
        for (int lane = 0; lane < 32; ++lane) {
          af[lane] = {h[m][lane][0], h[m][lane][1], h[m + 1][lane][0], h[m + 1][lane][1]};
          a8[lane][0] = h[m + 2][lane][0], a8[lane][1] = h[m + 2][lane][1];
        }
        mma_m16n8k16(acc[m], af, b0);
        mma_m16n8k8(acc[m], a8, b1);
      }
    }
    for (int m = 0; m < sh.nb_blocks; ++m)
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        for (int e4 = 0; e4 < 4; ++e4) {
          const int i = g + 8 * (e4 >> 1), n = 2 * t + (e4 & 1);
          double want = 0;
          for (int a = 0; a < kCq; ++a)
            for (int kk = 0; kk < 24; ++kk)
              want += at(sh.row0 + sh.step * a + i, 8 * (sh.nb0 + m) + kk) * band(a, kk, n);
          ASSERT_NEAR(acc[m][lane][e4], want, 1e-9) << "block " << m << " row " << i << " column " << n;
        }
      }
  }
}

// The CTAs a group takes (group_cluster.cuh): the kq layers' backward holds 8 heads per CTA at D = 64
// and 4 at D = 128, their forward and FlashMix 8 at D = 128. Where the CTAs do not split the group
// evenly, the last one's last warps are padding (11 and 13 heads: session 11).
TEST(HeadMixLayout, ClusterSizes) {
  using mta::cuda::headmix::cluster_size;
  using mta::cuda::headmix::group_warps;
  for (int G = 1; G <= 8; ++G) EXPECT_EQ(cluster_size(G, 8), 1) << G;
  EXPECT_EQ(cluster_size(16, 8), 2);
  EXPECT_EQ(cluster_size(12, 8), 2);
  EXPECT_EQ(cluster_size(10, 8), 2);
  EXPECT_EQ(cluster_size(9, 8), 2);   // 5 + 4 heads and one padding warp
  EXPECT_EQ(cluster_size(15, 8), 2);  // 8 + 7
  EXPECT_EQ(cluster_size(11, 8), 2);  // 6 + 5
  EXPECT_EQ(cluster_size(13, 8), 2);  // 7 + 6
  EXPECT_EQ(group_warps(13, 2), 7);
  EXPECT_EQ(cluster_size(16, 4), 4);
  EXPECT_EQ(cluster_size(8, 4), 2);
  EXPECT_EQ(cluster_size(12, 4), 3);
  EXPECT_EQ(cluster_size(10, 4), 3);  // 4 + 4 + 2
  EXPECT_EQ(cluster_size(13, 4), 4);  // 4 + 4 + 4 + 1
  EXPECT_EQ(group_warps(10, 3), 4);
  EXPECT_EQ(cluster_size(7, 4), 2);
  EXPECT_EQ(cluster_size(16, 16), 1);
  EXPECT_EQ(cluster_size(18, 2), 0);  // 9 CTAs: over a cluster's portable 8
  EXPECT_EQ(cluster_size(0, 8), 0);
  // Every answer holds the group within the limits, leaves the last CTA at least one real head (the
  // padding is fewer than C warps), and no smaller C would hold it.
  for (int L : {2, 4, 8, 16})
    for (int G = 1; G <= 16; ++G) {
      const int C = cluster_size(G, L);
      if (C == 0) {
        EXPECT_GT((G + L - 1) / L, 8) << G << " " << L;
        continue;
      }
      const int W = group_warps(G, C);
      EXPECT_LE(W, L) << G << " " << L;
      EXPECT_GE(C * W, G);
      EXPECT_LT(C * W - G, C) << G << " " << L;
      EXPECT_LT((C - 1) * W, G) << G << " " << L;
      for (int c = 1; c < C; ++c) EXPECT_GT((G + c - 1) / c, L) << G << " " << L;
    }
}

}  // namespace

namespace {

// Shared-memory wavefronts of one warp-wide access of `width` 4-byte words per lane at word addresses
// `word` (-1: lane inactive): the warp is served in phases (all 32 lanes for 4-byte accesses, half-warps
// for 8-byte, quarter-warps for 16-byte), and a phase takes as many wavefronts as the most distinct
// words that fall on one of the 32 banks (one word read by several lanes is one broadcast).
int wavefronts(const std::array<int, 32>& word, int width) {
  const int phase = 32 / width;
  int total = 0;
  for (int p0 = 0; p0 < 32; p0 += phase) {
    std::array<std::vector<int>, 32> bank;
    for (int lane = p0; lane < p0 + phase; ++lane) {
      if (word[lane] < 0) continue;
      for (int w = 0; w < width; ++w) {
        const int a = word[lane] + w;
        auto& b = bank[a % 32];
        if (std::find(b.begin(), b.end(), a) == b.end()) b.push_back(a);
      }
    }
    size_t most = 0;
    for (const auto& b : bank) most = std::max(most, b.size());
    total += static_cast<int>(most);
  }
  return total;
}

std::array<int, 32> per_lane(const std::function<int(int)>& f) {
  std::array<int, 32> a{};
  for (int lane = 0; lane < 32; ++lane) a[lane] = f(lane);
  return a;
}

}  // namespace

// MixOut's and the coefficient fragments' accesses at FlashMix's lane mappings, each at its ideal
// wavefront count (session 21: the fragment reads took 2x theirs, 23-38% of the FlashMix kernels'
// bank-conflict excess in ncu; conflict-free, head-mix f+b -1.5 to -3.7%).
TEST(HeadMixLayout, MixOutAndFragmentAccessesAreConflictFree) {
  auto g = [](int lane) { return lane >> 2; };
  auto t = [](int lane) { return lane & 3; };
  for (int x0 : {0, 2, 5}) {  // a warp's own head slot, or a cluster's local offsets
    // mix_tiles_owned's result stores: lane (g, t) writes heads 8 nt + 2t (+1), row r, columns g, g + 8.
    for (int nt = 0; nt < 2; ++nt)
      for (int r = 0; r < kTile; ++r)
        for (int d = 0; d < 2; ++d)
          for (int c8 : {0, 8})
            EXPECT_EQ(wavefronts(per_lane([&](int l) { return out_offset(8 * nt + 2 * t(l) + d, r, g(l) + c8); }), 1), 1)
                << "result store nt " << nt << " row " << r;
    // get_pair in the mma accumulator layout (FlashMix, kq-layer fwd): rows g + 8 r, columns 8 j + 2t.
    for (int r = 0; r < 2; ++r)
      for (int j = 0; j < 2; ++j)
        EXPECT_EQ(wavefronts(per_lane([&](int l) { return out_offset(x0, g(l) + 8 * r, 8 * j + 2 * t(l)); }), 2), 2)
            << "mma-layout pair r " << r << " j " << j;
    // Not tested: the kq layers' row-per-lane float2 reads (4-way; see out_offset) and kernel P's
    // transposed scalar reads (2-way).
  }
  // A head's 256 values take distinct words inside its kXT, float2 pairs 8-byte aligned.
  std::vector<bool> used(kXT, false);
  for (int row = 0; row < kTile; ++row)
    for (int col = 0; col < kTile; ++col) {
      const int w = out_offset(0, row, col);
      ASSERT_GE(w, 0);
      ASSERT_LT(w, kXT);
      EXPECT_FALSE(used[w]) << row << " " << col;
      used[w] = true;
      if (col % 2 == 0) EXPECT_EQ(w % 2, 0) << row << " " << col;
    }
  // The fragments: each kind's hi and lo blocks of 32 lanes x 4 words tile kFragWords without overlap
  // (kind k within its own 1 KB), and a warp's 16-byte reads of either take the ideal 4 wavefronts.
  std::vector<int> owner(kFragWords, -1);
  for (int kind = 0; kind < 4; ++kind) {
    for (int part = 0; part < 2; ++part) {
      const auto words = per_lane([&](int l) { return frag_hi(kind, l) + part * kFragLo; });
      EXPECT_EQ(wavefronts(words, 4), 4) << "fragment kind " << kind << " part " << part;
      for (int lane = 0; lane < 32; ++lane)
        for (int w = 0; w < 4; ++w) {
          const int a = words[lane] + w;
          ASSERT_GE(a, kind * 256);
          ASSERT_LT(a, (kind + 1) * 256);
          EXPECT_EQ(owner[a], -1) << "fragment word " << a << " written twice";
          owner[a] = kind;
        }
    }
  }
}
