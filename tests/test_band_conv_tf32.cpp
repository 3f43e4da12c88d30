// The kq layers' tensor-core convolution tiles (conv_tile_tf32 in src/attention/flash_kq_layer.cu),
// replayed on the CPU with the index functions the kernel calls (mma_layout.h: band_steps, band_a_col,
// band_b_lane) and mma.m16n8k8.tf32 by the PTX fragment definitions (mma_sm80.cuh's mma_tf32): per tap
// row a, the A fragments of k-chunks q = 0 .. band_steps(ck) (window rows, columns x0 + band_a_col),
// the band's B fragments (shuffled from the lanes band_b_lane of a register holding tap row a, flipped
// for the transpose, on lanes < ck and zero elsewhere), and the products of output
// block nb with chunk nb + s. The replayed 16 x 16 tile must equal conv_row8's (and conv_row8_t's) sums
// exactly on tf32-exact inputs, for every compiled-size shape the kernel could take (cq <= 8, ck <= 15).
// A wrong chunk, tap offset, k permutation or row shift fails it on any machine; the GPU tests
// (tests/gpu/test_flash_kq_layer.cpp) check the hardware's side.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <random>
#include <vector>

#include "attention/mma_layout.h"

namespace {

namespace mma = mta::cuda::mma;

constexpr int kPitch = 16;  // a row of taps (kTapPitch)

struct Window {
  int rows, cols;
  std::vector<double> v;
  double at(int r, int c) const {
    EXPECT_GE(r, 0);
    EXPECT_LT(r, rows);
    EXPECT_GE(c, 0);
    EXPECT_LT(c, cols);
    return v.at(static_cast<size_t>(r) * cols + c);
  }
};

// conv_tile_tf32's products for one warp, lane by lane: acc[lane][nb][i] in the accumulator layout.
using Acc = std::array<std::array<std::array<double, 4>, 2>, 32>;
Acc replay(bool transposed, int cq, int ck, const Window& win, const std::vector<double>& w, int wrow0, int x0) {
  const int steps = mma::band_steps(ck);
  Acc acc{};
  for (int a = 0; a < cq; ++a) {
    // Per lane, the fragments as conv_tile_tf32 loads them.
    double x[32][4][4] = {}, b[32][3][2] = {};
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, t = lane & 3;
      const int row_g = wrow0 + (transposed ? a : a - (cq - 1)) + g;
      const int wrow = transposed ? cq - 1 - a : a;
      // The tap register every lane holds, then the shuffles from lanes band_b_lane.
      double tap[32];
      for (int l = 0; l < 32; ++l) tap[l] = l < ck ? w[wrow * kPitch + (transposed ? ck - 1 - l : l)] : 0.0;
      for (int s = 0; s < steps; ++s)
        for (int e = 0; e < 2; ++e) {
          const int src = mma::band_b_lane(s, g, t, e);
          EXPECT_GE(src, 0);
          EXPECT_LT(src, 32);
          b[lane][s][e] = tap[src];
        }
      for (int q = 0; q <= steps; ++q) {
        const int col = x0 + mma::band_a_col(q, t, 0);
        EXPECT_EQ(col % 2, 0) << "float2 loads need even columns";
        EXPECT_EQ(mma::band_a_col(q, t, 1), mma::band_a_col(q, t, 0) + 1);
        x[lane][q][0] = win.at(row_g, col), x[lane][q][2] = win.at(row_g, col + 1);
        x[lane][q][1] = win.at(row_g + 8, col), x[lane][q][3] = win.at(row_g + 8, col + 1);
      }
    }
    // mma.m16n8k8 (tf32): a0 = A[g][t], a1 = A[g + 8][t], a2 = A[g][t + 4], a3 = A[g + 8][t + 4];
    // b0 = B[t][g], b1 = B[t + 4][g]; c0, c1 = C[g][2t, 2t + 1], c2, c3 = C[g + 8][2t, 2t + 1].
    for (int nb = 0; nb < 2; ++nb)
      for (int s = 0; s < steps; ++s) {
        const int q = nb + s;
        double A[16][8], B[8][8];
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane >> 2, t = lane & 3;
          A[g][t] = x[lane][q][0], A[g + 8][t] = x[lane][q][1];
          A[g][t + 4] = x[lane][q][2], A[g + 8][t + 4] = x[lane][q][3];
          B[t][g] = b[lane][s][0], B[t + 4][g] = b[lane][s][1];
        }
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane >> 2, t = lane & 3;
          for (int i = 0; i < 4; ++i) {
            const int m = g + 8 * (i >> 1), n = 2 * t + (i & 1);
            for (int k = 0; k < 8; ++k) acc[lane][nb][i] += A[m][k] * B[k][n];
          }
        }
      }
  }
  return acc;
}

// conv_row8 (forward) / conv_row8_t (transposed) for output row r (window row wrow0 + r) and key x0 + e.
double direct(bool transposed, int cq, int ck, const Window& win, const std::vector<double>& w, int wrow0, int x0,
              int r, int e) {
  double sum = 0;
  for (int a = 0; a < cq; ++a)
    for (int c = 0; c < ck; ++c) {
      const double tap = transposed ? w[(cq - 1 - a) * kPitch + ck - 1 - c] : w[a * kPitch + c];
      const int row = transposed ? wrow0 + r + a : wrow0 + r - (cq - 1) + a;
      sum += tap * win.at(row, x0 + e + c);
    }
  return sum;
}

TEST(BandConvTf32, TileEqualsTheStencils) {
  std::mt19937 rng(11);
  // Multiples of 1/8 in [-4, 4]: exact in tf32 and in the sums (so the comparison is exact).
  std::uniform_int_distribution<int> val(-32, 32);
  const std::array<std::array<int, 2>, 7> shapes{{{6, 11}, {2, 9}, {8, 15}, {1, 1}, {3, 5}, {7, 14}, {4, 16}}};
  for (const auto& [cq, ck] : shapes) {
    if (ck > 15) continue;  // the kernels' limit (kMaxCk); {4, 16} stays out
    for (const bool transposed : {false, true}) {
      SCOPED_TRACE(std::to_string(cq) + "x" + std::to_string(ck) + (transposed ? " transposed" : ""));
      const int steps = mma::band_steps(ck);
      ASSERT_GE(8 * steps, 7 + ck) << "the chunks reach the last tap of the last output";
      ASSERT_LE(steps, 3) << "replay's fragment arrays";
      const int wrow0 = transposed ? 0 : cq - 1, x0 = 16;
      Window win{16 + cq - 1 + 8, x0 + 8 * (steps + 1) + 8, {}};
      win.v.resize(static_cast<size_t>(win.rows) * win.cols);
      for (double& v : win.v) v = val(rng) / 8.0;
      std::vector<double> w(static_cast<size_t>(cq) * kPitch, 1e30);  // past ck: must never be read
      for (int a = 0; a < cq; ++a)
        for (int c = 0; c < ck; ++c) w[a * kPitch + c] = val(rng) / 8.0;
      const Acc acc = replay(transposed, cq, ck, win, w, wrow0, x0);
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        for (int nb = 0; nb < 2; ++nb)
          for (int i = 0; i < 4; ++i) {
            const int r = g + 8 * (i >> 1), e = 8 * nb + 2 * t + (i & 1);
            EXPECT_EQ(acc[lane][nb][i], direct(transposed, cq, ck, win, w, wrow0, x0, r, e))
                << "row " << r << " key " << e;
          }
      }
    }
  }
}

// The reach of the loads: columns x0 .. x0 + 8 band_steps(ck) + 7, which conv_tile_tf32's callers must
// keep finite (the kq layers' rings: every column written or zero-filled before it is read).
TEST(BandConvTf32, ColumnsRead) {
  EXPECT_EQ(mma::band_steps(11), 3);  // the paper's 6 x 11: 4 chunks, columns x0 .. x0 + 31
  EXPECT_EQ(mma::band_steps(9), 2);
  EXPECT_EQ(mma::band_steps(15), 3);
  EXPECT_EQ(mma::band_a_col(mma::band_steps(15), 3, 1), 31);  // < 32: within two 16-key tiles of x0
}

}  // namespace
