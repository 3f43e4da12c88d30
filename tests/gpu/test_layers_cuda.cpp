// GPU tests of the non-attention CUDA layers (src/cuda/layers.h) and the cuBLASLt matrix products
// (src/cuda/gemm.h) against the CPU reference (mta::cpu, mta::AdamW, the loops of model.cpp) on random
// inputs with odd sizes. Labelled "gpu" in CTest; every test skips itself (GTEST_SKIP) when there is no
// CUDA device.
//
// Tolerances: ||gpu - cpu|| / ||cpu|| per tensor; 1e-2 where a bf16 rounding enters (the CPU reference
// runs in float on the bf16-rounded inputs), 1e-5 or tighter on the pure fp32 paths; exact equality
// where the GPU promises it (copies, the dropout masks and scaling, the embedding gradient, casts).
// Outputs that are overwritten are poisoned first (all bytes 0xFF: NaN in fp32 and bf16) and checked
// finite afterwards.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/gemm.h"
#include "cuda/layers.h"
#include "model/layers_cpu.h"
#include "model/params.h"
#include "train/optimizer.h"

namespace {

using bf16 = __nv_bfloat16;

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define SKIP_WITHOUT_GPU() \
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device (cudaGetDeviceCount reports none)"

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
void sync() { cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

// A device array: upload, poison (all bytes 0xFF), download. `offset` elements of slack in front let
// a test pass a deliberately misaligned pointer (get() then points past them).
template <typename T>
class Dev {
 public:
  explicit Dev(size_t n, size_t offset = 0) : n_(n), off_(offset) {
    cuda_ok(cudaMalloc(reinterpret_cast<void**>(&base_), std::max<size_t>(n + offset, 1) * sizeof(T)), "cudaMalloc");
  }
  explicit Dev(const std::vector<T>& h, size_t offset = 0) : Dev(h.size(), offset) { upload(h); }
  ~Dev() { cudaFree(base_); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  T* get() const { return base_ + off_; }
  void upload(const std::vector<T>& h) {
    if (n_) cuda_ok(cudaMemcpy(get(), h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  void poison() { cuda_ok(cudaMemset(get(), 0xFF, n_ * sizeof(T)), "cudaMemset"); }
  std::vector<T> host() const {
    std::vector<T> h(n_);
    if (n_) cuda_ok(cudaMemcpy(h.data(), get(), n_ * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return h;
  }

 private:
  size_t n_ = 0, off_ = 0;
  T* base_ = nullptr;
};

// bf16 on the host as raw bits: round to nearest even (as __float2bfloat16_rn), and back.
uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float bf2f(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
std::vector<float> widen(const std::vector<uint16_t>& b) {
  std::vector<float> f(b.size());
  for (size_t i = 0; i < b.size(); ++i) f[i] = bf2f(b[i]);
  return f;
}
std::vector<uint16_t> to_bf(const std::vector<float>& f) {
  std::vector<uint16_t> b(f.size());
  for (size_t i = 0; i < f.size(); ++i) b[i] = f2bf(f[i]);
  return b;
}
bf16* bfp(const Dev<uint16_t>& d) { return reinterpret_cast<bf16*>(d.get()); }

// Random values in +-[lo, hi] (never zero).
std::vector<float> rnd(size_t n, std::mt19937_64& rng, float lo = 0.1f, float hi = 1.0f) {
  std::uniform_real_distribution<float> mag(lo, hi);
  std::bernoulli_distribution sign(0.5);
  std::vector<float> v(n);
  for (auto& x : v) x = sign(rng) ? mag(rng) : -mag(rng);
  return v;
}
// Random bf16 values (as bits) in +-[lo, hi].
std::vector<uint16_t> rnd_bf(size_t n, std::mt19937_64& rng, float lo = 0.1f, float hi = 1.0f) {
  return to_bf(rnd(n, rng, lo, hi));
}

template <typename A, typename Bv>
double rel_err(const A& got, const Bv& want) {
  EXPECT_EQ(got.size(), want.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
    const double d = static_cast<double>(got[i]) - static_cast<double>(want[i]);
    num += d * d;
    den += static_cast<double>(want[i]) * static_cast<double>(want[i]);
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

template <typename V>
bool all_finite(const V& v) {
  for (const auto& x : v)
    if (!std::isfinite(static_cast<double>(x))) return false;
  return true;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// ---------------------------------------------------------------------------------------------

TEST(CudaLayers, Embedding) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(1);
  for (int V : {30, 1000})
    for (int C : {64, 100, 256})
      for (int N : {37, 300}) {
        SCOPED_TRACE("V=" + std::to_string(V) + " C=" + std::to_string(C) + " N=" + std::to_string(N));
        std::uniform_int_distribution<int> tok(0, V - 1);
        std::vector<int32_t> tokens(N);
        for (auto& t : tokens) t = tok(rng);
        const auto E = rnd(static_cast<size_t>(V) * C, rng);
        Dev<int32_t> dt(tokens);
        Dev<float> dE(E), dx(static_cast<size_t>(N) * C);
        dx.poison();
        mta::cuda::embedding_forward(dt.get(), dE.get(), dx.get(), N, C, 0);
        sync();
        std::vector<float> want(static_cast<size_t>(N) * C);
        for (int n = 0; n < N; ++n)
          std::copy_n(E.data() + static_cast<size_t>(tokens[n]) * C, C, want.data() + static_cast<size_t>(n) * C);
        EXPECT_TRUE(same_bits(dx.host(), want));

        // Backward: the CPU's serial scatter-add, which the GPU reproduces bit for bit.
        const auto g = rnd(static_cast<size_t>(N) * C, rng);
        const auto gE0 = rnd(static_cast<size_t>(V) * C, rng);
        std::vector<float> gE = gE0;
        for (int n = 0; n < N; ++n)
          for (int c = 0; c < C; ++c) gE[static_cast<size_t>(tokens[n]) * C + c] += g[static_cast<size_t>(n) * C + c];
        Dev<float> dg(g), dgE(gE0);
        mta::cuda::embedding_backward(dt.get(), dg.get(), dgE.get(), N, C, 0);
        sync();
        const auto got = dgE.host();
        EXPECT_TRUE(all_finite(got));
        EXPECT_LT(rel_err(got, gE), 1e-6);
        EXPECT_TRUE(same_bits(got, gE)) << "embedding_backward is not the CPU's order of additions";
      }
}

TEST(CudaLayers, RmsNorm) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(2);
  const float eps = 1e-5f;
  for (int C : {64, 100, 256})
    for (int N : {37, 300}) {
      SCOPED_TRACE("C=" + std::to_string(C) + " N=" + std::to_string(N));
      const size_t NC = static_cast<size_t>(N) * C;
      const auto x = rnd(NC, rng, 0.1f, 2.0f);
      std::vector<float> w = rnd(C, rng, 0.5f, 1.5f);
      // Forward.
      std::vector<float> y(NC), rstd(N);
      mta::cpu::rmsnorm_forward<float>(x.data(), w.data(), y.data(), rstd.data(), N, C, eps);
      Dev<float> dx(x), dw(w), drstd(N);
      Dev<uint16_t> dy(NC);
      dy.poison(), drstd.poison();
      mta::cuda::rmsnorm_forward(dx.get(), dw.get(), bfp(dy), drstd.get(), N, C, eps, 0);
      sync();
      const auto gy = widen(dy.host());
      const auto grstd = drstd.host();
      EXPECT_TRUE(all_finite(gy));
      EXPECT_TRUE(all_finite(grstd));
      EXPECT_LT(rel_err(gy, y), 1e-2);
      EXPECT_LT(rel_err(grstd, rstd), 1e-5);

      // Backward, with dy bf16 (the CPU gets the same rounded values in float).
      const auto gdy_b = rnd_bf(NC, rng);
      const auto gdy = widen(gdy_b);
      const auto dx0 = rnd(NC, rng), dw0 = rnd(C, rng);
      std::vector<float> dx_cpu = dx0, dw_cpu = dw0;
      mta::cpu::rmsnorm_backward<float>(gdy.data(), x.data(), w.data(), rstd.data(), dx_cpu.data(), dw_cpu.data(), N,
                                        C);
      Dev<uint16_t> ddy(gdy_b);
      Dev<float> ddx(dx0), ddw(dw0), dr(rstd), scratch(mta::cuda::rmsnorm_backward_scratch_floats(N, C));
      mta::cuda::rmsnorm_backward(bfp(ddy), dx.get(), dw.get(), dr.get(), ddx.get(), ddw.get(), scratch.get(), N, C, 0);
      sync();
      const auto gdx = ddx.host(), gdw = ddw.host();
      EXPECT_TRUE(all_finite(gdx));
      EXPECT_TRUE(all_finite(gdw));
      EXPECT_LT(rel_err(gdx, dx_cpu), 1e-5);
      EXPECT_LT(rel_err(gdw, dw_cpu), 1e-5);
      // The increments alone (the accumulators' start values dominate the sums above).
      std::vector<double> inc_g(C), inc_c(C);
      for (int c = 0; c < C; ++c) inc_g[c] = double(gdw[c]) - dw0[c], inc_c[c] = double(dw_cpu[c]) - dw0[c];
      EXPECT_LT(rel_err(inc_g, inc_c), 1e-4);
      // Deterministic: the same inputs give the same bits.
      ddx.upload(dx0), ddw.upload(dw0);
      mta::cuda::rmsnorm_backward(bfp(ddy), dx.get(), dw.get(), dr.get(), ddx.get(), ddw.get(), scratch.get(), N, C, 0);
      sync();
      EXPECT_TRUE(same_bits(ddx.host(), gdx));
      EXPECT_TRUE(same_bits(ddw.host(), gdw));
    }
}

TEST(CudaLayers, HeadsAndRope) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(3);
  const int Bn = 2, T = 37, H = 3;
  struct Case {
    int d;
    bool rope;
    double theta;
    size_t offset;  // elements of misalignment of every pointer
  };
  const Case cases[] = {{64, false, 1e4, 0}, {64, true, 1e4, 0},   {128, true, 5e5, 0}, {128, false, 1e4, 0},
                        {64, true, 1e4, 2},  {6, true, 1e4, 0},    {5, false, 1e4, 0},  {64, false, 1e4, 1}};
  for (const Case& cs : cases) {
    const int d = cs.d;
    SCOPED_TRACE("d=" + std::to_string(d) + " rope=" + std::to_string(cs.rope) + " offset=" + std::to_string(cs.offset));
    const size_t n = static_cast<size_t>(Bn) * T * H * d;
    // to_heads: [B, T, H, d] -> [B, H, T, d], then the rotation.
    const auto xb = rnd_bf(n, rng);
    const auto xf = widen(xb);
    std::vector<float> want(n);
    mta::cpu::to_heads<float>(xf.data(), want.data(), Bn, T, H, d);
    if (cs.rope) mta::cpu::rope_apply<float>(want.data(), Bn, H, T, d, cs.theta, false);
    Dev<uint16_t> dx(xb, cs.offset), dy(n, cs.offset);
    dy.poison();
    mta::cuda::to_heads(bfp(dx), bfp(dy), Bn, T, H, d, cs.rope, cs.theta, 0);
    sync();
    const auto got = widen(dy.host());
    EXPECT_TRUE(all_finite(got));
    if (cs.rope) {
      EXPECT_LT(rel_err(got, want), 1e-2);
    } else {
      EXPECT_TRUE(same_bits(got, want));
    }
    // from_heads: the inverse rotation, then [B, H, T, d] -> [B, T, H, d].
    const auto yb = rnd_bf(n, rng);
    std::vector<float> yf = widen(yb), want2(n);
    if (cs.rope) mta::cpu::rope_apply<float>(yf.data(), Bn, H, T, d, cs.theta, true);
    mta::cpu::from_heads<float>(yf.data(), want2.data(), Bn, T, H, d);
    Dev<uint16_t> dy2(yb, cs.offset), dx2(n, cs.offset);
    dx2.poison();
    mta::cuda::from_heads(bfp(dy2), bfp(dx2), Bn, T, H, d, cs.rope, cs.theta, 0);
    sync();
    const auto got2 = widen(dx2.host());
    EXPECT_TRUE(all_finite(got2));
    if (cs.rope) {
      EXPECT_LT(rel_err(got2, want2), 1e-2);
    } else {
      EXPECT_TRUE(same_bits(got2, want2));
    }
  }
}

// q, k and v read from one [N, 3C] product, and their gradients written into one: to_heads /
// from_heads with a row stride on the token-major side. Against the CPU on the dense slice, bit for bit
// against the dense GPU call (where both take the same kernel variant), and from_heads leaves the
// other columns of the wide matrix untouched (still poisoned).
TEST(CudaLayers, HeadsRowStride) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(11);
  const int Bn = 2, T = 37;
  const double theta = 1e4;
  struct Case {
    int H, d;
    bool rope;
    long long ld, col;  // row stride of the wide matrix, first column of the slice
  };
  const Case cases[] = {
      {3, 64, true, 3 * 192, 0},       {3, 64, true, 3 * 192, 192},  {3, 64, false, 3 * 192, 384},
      {2, 128, true, 3 * 256, 256},    {1, 128, false, 3 * 128, 256},  // DIFF values: H/2 heads of 2d
      {3, 6, true, 3 * 18, 18},        // d % 8 != 0: pairs
      {3, 64, true, 3 * 192 + 2, 192}, // row stride not a multiple of 8: pairs
      {3, 5, false, 3 * 15 + 1, 15},   // odd d and stride: element by element
  };
  for (const Case& cs : cases) {
    const int H = cs.H, d = cs.d, C = H * d;
    const long long ld = cs.ld, col = cs.col;
    SCOPED_TRACE("H=" + std::to_string(H) + " d=" + std::to_string(d) + " rope=" + std::to_string(cs.rope) +
                 " ld=" + std::to_string(ld) + " col=" + std::to_string(col));
    const size_t N = static_cast<size_t>(Bn) * T, n = N * C;
    // Both launches pick the same kernel (so the same rounding sequence) unless the stride alone
    // demotes the strided one from 8-element vectors to pairs.
    const bool same_variant = d % 8 != 0 || ld % 8 == 0;
    // to_heads from the slice [:, col, col + C) of a wide [N, ld] matrix.
    const auto wb = rnd_bf(N * ld, rng);
    std::vector<uint16_t> sb(n);
    for (size_t r = 0; r < N; ++r)
      for (int c = 0; c < C; ++c) sb[r * C + c] = wb[r * ld + col + c];
    const auto sf = widen(sb);
    std::vector<float> want(n);
    mta::cpu::to_heads<float>(sf.data(), want.data(), Bn, T, H, d);
    if (cs.rope) mta::cpu::rope_apply<float>(want.data(), Bn, H, T, d, theta, false);
    Dev<uint16_t> dw(wb), ds(sb), dy(n), dy_dense(n);
    dy.poison(), dy_dense.poison();
    mta::cuda::to_heads(bfp(dw) + col, bfp(dy), Bn, T, H, d, cs.rope, theta, 0, ld);
    mta::cuda::to_heads(bfp(ds), bfp(dy_dense), Bn, T, H, d, cs.rope, theta, 0);
    sync();
    const auto got_b = dy.host();
    const auto got = widen(got_b);
    EXPECT_TRUE(all_finite(got));
    if (cs.rope) {
      EXPECT_LT(rel_err(got, want), 1e-2);
      if (same_variant) EXPECT_EQ(got_b, dy_dense.host());
    } else {
      EXPECT_TRUE(same_bits(got, want));
    }
    // from_heads into the slice of a poisoned wide matrix.
    const auto yb = rnd_bf(n, rng);
    std::vector<float> yf = widen(yb), want2(n);
    if (cs.rope) mta::cpu::rope_apply<float>(yf.data(), Bn, H, T, d, theta, true);
    mta::cpu::from_heads<float>(yf.data(), want2.data(), Bn, T, H, d);
    Dev<uint16_t> dyin(yb), dx(N * ld), dx_dense(n);
    dx.poison(), dx_dense.poison();
    mta::cuda::from_heads(bfp(dyin), bfp(dx) + col, Bn, T, H, d, cs.rope, theta, 0, ld);
    mta::cuda::from_heads(bfp(dyin), bfp(dx_dense), Bn, T, H, d, cs.rope, theta, 0);
    sync();
    const auto wide = dx.host();
    std::vector<uint16_t> got2_b(n);
    size_t untouched = 0, outside = 0;
    for (size_t r = 0; r < N; ++r)
      for (long long c = 0; c < ld; ++c) {
        const uint16_t x = wide[r * ld + c];
        if (c >= col && c < col + C) {
          got2_b[r * C + (c - col)] = x;
        } else {
          ++outside;
          untouched += x == 0xFFFFu;
        }
      }
    EXPECT_EQ(untouched, outside) << "from_heads wrote outside its columns";
    const auto got2 = widen(got2_b);
    EXPECT_TRUE(all_finite(got2));
    if (cs.rope) {
      EXPECT_LT(rel_err(got2, want2), 1e-2);
      if (same_variant) EXPECT_EQ(got2_b, dx_dense.host());
    } else {
      EXPECT_TRUE(same_bits(got2, want2));
    }
  }
  // A row stride shorter than a row is refused.
  Dev<uint16_t> a(64 * 8), b(64 * 8);
  EXPECT_THROW(mta::cuda::to_heads(bfp(a), bfp(b), 1, 8, 2, 32, false, theta, 0, 63), std::invalid_argument);
  EXPECT_THROW(mta::cuda::from_heads(bfp(a), bfp(b), 1, 8, 2, 32, false, theta, 0, 32), std::invalid_argument);
}

// rope_rows: q and k rotated in place in the rows of a wide [N, 3C + pad] product, the same bits as
// to_heads with the table writes, the other columns untouched; bad strides refused.
TEST(CudaLayers, RopeRowsInPlace) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(14);
  const int Bn = 2, T = 37;
  const double theta = 1e4;
  for (const auto& [H, d] : {std::pair{3, 64}, std::pair{2, 128}, std::pair{4, 8}}) {
    const int C = H * d;
    const long long ld = 3LL * C + 8;
    SCOPED_TRACE("H=" + std::to_string(H) + " d=" + std::to_string(d));
    const size_t N = static_cast<size_t>(Bn) * T, n = N * C;
    Dev<float> dtab(mta::cuda::rope_table_floats(T + 5, d));
    const mta::cuda::RopeTable tab = mta::cuda::make_rope_table(dtab.get(), T + 5, d, theta, 0);
    const auto wb = rnd_bf(N * ld, rng);
    Dev<uint16_t> dw(wb), q_heads(n), k_heads(n), q_back(n), k_back(n);
    mta::cuda::to_heads(bfp(dw), bfp(q_heads), Bn, T, H, d, true, theta, 0, ld, &tab);
    mta::cuda::to_heads(bfp(dw) + C, bfp(k_heads), Bn, T, H, d, true, theta, 0, ld, &tab);
    mta::cuda::rope_rows(bfp(dw), Bn, T, 2 * H, d, ld, tab, 0);
    mta::cuda::to_heads(bfp(dw), bfp(q_back), Bn, T, H, d, false, theta, 0, ld);
    mta::cuda::to_heads(bfp(dw) + C, bfp(k_back), Bn, T, H, d, false, theta, 0, ld);
    sync();
    EXPECT_EQ(q_back.host(), q_heads.host()) << "q rotated in place differs from to_heads";
    EXPECT_EQ(k_back.host(), k_heads.host()) << "k rotated in place differs from to_heads";
    const auto after = dw.host();
    size_t changed = 0, rotated_changed = 0;
    for (size_t r = 0; r < N; ++r)
      for (long long c = 0; c < ld; ++c) {
        const bool differs = after[r * ld + c] != wb[r * ld + c];
        if (c >= 2 * C) changed += differs;
        else if (r % T != 0) rotated_changed += differs;  // position 0 is the identity rotation
      }
    EXPECT_EQ(changed, 0u) << "v or the spare columns changed";
    EXPECT_GT(rotated_changed, (N - Bn) * 2 * C / 2) << "the rotation left most of q and k as they were";
  }
  Dev<uint16_t> a(64 * 64);
  Dev<float> dtab(mta::cuda::rope_table_floats(8, 64));
  const mta::cuda::RopeTable tab = mta::cuda::make_rope_table(dtab.get(), 8, 64, theta, 0);
  EXPECT_THROW(mta::cuda::rope_rows(bfp(a), 1, 8, 2, 64, 100, tab, 0), std::invalid_argument);   // stride < H*d
  EXPECT_THROW(mta::cuda::rope_rows(bfp(a), 1, 16, 1, 64, 64, tab, 0), std::invalid_argument);   // table too short
  EXPECT_THROW(mta::cuda::rope_rows(bfp(a), 1, 8, 1, 64, 68, tab, 0), std::invalid_argument);    // stride % 8
}

// RoPE from a table (make_rope_table): the table holds the rotations of rope_apply (cos / sin of
// t * theta^(-2i/d) in double, rounded to float), and to_heads / from_heads give the same bits with the
// table as without (where the kernel computes every angle), dense and with a row stride, also when
// the table covers more positions than the call.
TEST(CudaLayers, RopeTable) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(13);
  const int Bn = 2, T = 37;
  struct Case {
    int H, d;
    double theta;
    long long ld;  // 0: dense
    int table_T;
  };
  const Case cases[] = {{3, 64, 1e4, 0, T},        {2, 128, 5e5, 0, T},      {3, 64, 1e4, 3 * 192, 50},
                        {3, 6, 1e4, 0, T},         {3, 6, 1e4, 3 * 18, 40},  {3, 64, 1e4, 3 * 192 + 2, T}};
  for (const Case& cs : cases) {
    const int H = cs.H, d = cs.d, C = H * d, half = d / 2;
    const long long ld = cs.ld == 0 ? C : cs.ld;
    SCOPED_TRACE("H=" + std::to_string(H) + " d=" + std::to_string(d) + " theta=" + std::to_string(cs.theta) +
                 " ld=" + std::to_string(ld) + " table_T=" + std::to_string(cs.table_T));
    Dev<float> dtab(mta::cuda::rope_table_floats(cs.table_T, d));
    dtab.poison();
    const mta::cuda::RopeTable tab = mta::cuda::make_rope_table(dtab.get(), cs.table_T, d, cs.theta, 0);
    EXPECT_EQ(tab.cs, dtab.get());
    EXPECT_EQ(tab.T, cs.table_T);
    EXPECT_EQ(tab.d, d);
    sync();
    // The table against the host's double-precision cos / sin rounded to float (rope_apply's values):
    // the device's pow / sincos may differ from the host's in the last bits of the double, which
    // survives the rounding to float rarely, and then by one ulp.
    const auto ht = dtab.host();
    ASSERT_EQ(ht.size(), static_cast<size_t>(cs.table_T) * d);
    size_t exact = 0, total = 0;
    for (int t = 0; t < cs.table_T; ++t)
      for (int i = 0; i < half; ++i) {
        const double ang = static_cast<double>(t) * std::pow(cs.theta, -2.0 * i / d);
        const float want[2] = {static_cast<float>(std::cos(ang)), static_cast<float>(std::sin(ang))};
        for (int k = 0; k < 2; ++k) {
          const float got = ht[2 * (static_cast<size_t>(t) * half + i) + k];
          ++total;
          exact += got == want[k];
          EXPECT_LE(std::fabs(got - want[k]), std::max(std::fabs(want[k]), 1e-30f) * 1.2e-7f)
              << "t=" << t << " i=" << i << (k ? " sin" : " cos");
        }
      }
    EXPECT_GE(exact, total * 99 / 100);
    // to_heads / from_heads with the table: the bits of the table-free kernel.
    const size_t N = static_cast<size_t>(Bn) * T, n = N * C;
    const auto xb = rnd_bf(N * ld, rng);
    Dev<uint16_t> dx(xb), y1(n), y2(n);
    y1.poison(), y2.poison();
    mta::cuda::to_heads(bfp(dx), bfp(y1), Bn, T, H, d, true, cs.theta, 0, cs.ld);
    mta::cuda::to_heads(bfp(dx), bfp(y2), Bn, T, H, d, true, cs.theta, 0, cs.ld, &tab);
    Dev<uint16_t> x1(N * ld), x2(N * ld);
    x1.poison(), x2.poison();
    mta::cuda::from_heads(bfp(y1), bfp(x1), Bn, T, H, d, true, cs.theta, 0, cs.ld);
    mta::cuda::from_heads(bfp(y1), bfp(x2), Bn, T, H, d, true, cs.theta, 0, cs.ld, &tab);
    sync();
    const auto h1 = y1.host();
    EXPECT_EQ(y2.host(), h1);
    EXPECT_EQ(x2.host(), x1.host());
    // And against the CPU (dense slice): RoPE of the bf16 inputs, rounded once.
    std::vector<float> sf(n), want(n);
    for (size_t r = 0; r < N; ++r)
      for (int c = 0; c < C; ++c) sf[r * C + c] = bf2f(xb[r * ld + c]);
    mta::cpu::to_heads<float>(sf.data(), want.data(), Bn, T, H, d);
    mta::cpu::rope_apply<float>(want.data(), Bn, H, T, d, cs.theta, false);
    EXPECT_LT(rel_err(widen(h1), want), 1e-2);
  }
  // A table that does not fit the call is refused: too few positions, another d or theta.
  Dev<float> dtab(mta::cuda::rope_table_floats(8, 64));
  const mta::cuda::RopeTable tab = mta::cuda::make_rope_table(dtab.get(), 8, 64, 1e4, 0);
  Dev<uint16_t> a(2 * 16 * 64), b(2 * 16 * 64);
  EXPECT_THROW(mta::cuda::to_heads(bfp(a), bfp(b), 1, 16, 2, 64, true, 1e4, 0, 0, &tab), std::invalid_argument);
  EXPECT_THROW(mta::cuda::to_heads(bfp(a), bfp(b), 1, 8, 4, 32, true, 1e4, 0, 0, &tab), std::invalid_argument);
  EXPECT_THROW(mta::cuda::from_heads(bfp(a), bfp(b), 1, 8, 2, 64, true, 5e5, 0, 0, &tab), std::invalid_argument);
  // Without RoPE the table is not used.
  EXPECT_NO_THROW(mta::cuda::to_heads(bfp(a), bfp(b), 1, 16, 2, 64, false, 1e4, 0, 0, &tab));
  sync();
}

TEST(CudaLayers, SwiGLU) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(4);
  for (long long n : {1LL, 7LL, 12345LL, 65539LL})
    for (size_t off : {size_t(0), size_t(1)}) {
      SCOPED_TRACE("n=" + std::to_string(n) + " offset=" + std::to_string(off));
      const auto ab = rnd_bf(n, rng, 0.05f, 4.0f), bb = rnd_bf(n, rng), gb = rnd_bf(n, rng);
      const auto a = widen(ab), b = widen(bb), dg = widen(gb);
      std::vector<float> g(n), da(n), db(n);
      mta::cpu::swiglu_forward<float>(a.data(), b.data(), g.data(), n);
      mta::cpu::swiglu_backward<float>(dg.data(), a.data(), b.data(), da.data(), db.data(), n);
      Dev<uint16_t> d_a(ab, off), d_b(bb, off), d_dg(gb, off), d_g(n, off), d_da(n, off), d_db(n, off);
      d_g.poison(), d_da.poison(), d_db.poison();
      mta::cuda::swiglu_forward(bfp(d_a), bfp(d_b), bfp(d_g), n, 0);
      mta::cuda::swiglu_backward(bfp(d_dg), bfp(d_a), bfp(d_b), bfp(d_da), bfp(d_db), n, 0);
      sync();
      const auto gg = widen(d_g.host()), gda = widen(d_da.host()), gdb = widen(d_db.host());
      EXPECT_TRUE(all_finite(gg) && all_finite(gda) && all_finite(gdb));
      EXPECT_LT(rel_err(gg, g), 1e-2);
      EXPECT_LT(rel_err(gda, da), 1e-2);
      EXPECT_LT(rel_err(gdb, db), 1e-2);
    }
}

// SwiGLU on the two halves of one [N, 2F] product (a = h, b = h + F, row stride ld >= 2F), gradients
// written into one [N, 2F] matrix the same way: against the CPU on the dense halves, bit for bit
// against the dense GPU functions, and columns past 2F of the gradient matrix stay untouched.
TEST(CudaLayers, SwiGLURowStride) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(12);
  struct Case {
    int rows, cols;
    long long ld;
  };
  // Vectors of 8 (cols and ld multiples of 8), element by element (cols or ld not), a single element.
  const Case cases[] = {{37, 64, 128}, {300, 2048, 4096}, {7, 24, 56}, {37, 50, 100}, {5, 64, 130}, {1, 1, 2}};
  for (const Case& cs : cases) {
    const int R = cs.rows, F = cs.cols;
    const long long ld = cs.ld;
    SCOPED_TRACE("rows=" + std::to_string(R) + " cols=" + std::to_string(F) + " ld=" + std::to_string(ld));
    const size_t n = static_cast<size_t>(R) * F, nw = static_cast<size_t>(R) * ld;
    const auto hb = rnd_bf(nw, rng, 0.05f, 4.0f), gb = rnd_bf(n, rng);
    std::vector<uint16_t> ab(n), bb(n);
    for (size_t r = 0; r < static_cast<size_t>(R); ++r)
      for (int c = 0; c < F; ++c) ab[r * F + c] = hb[r * ld + c], bb[r * F + c] = hb[r * ld + F + c];
    const auto a = widen(ab), b = widen(bb), dg = widen(gb);
    std::vector<float> g(n), da(n), db(n);
    mta::cpu::swiglu_forward<float>(a.data(), b.data(), g.data(), static_cast<long long>(n));
    mta::cpu::swiglu_backward<float>(dg.data(), a.data(), b.data(), da.data(), db.data(), static_cast<long long>(n));
    Dev<uint16_t> dh(hb), d_dg(gb), d_g(n), d_dh(nw);
    d_g.poison(), d_dh.poison();
    mta::cuda::swiglu_forward_strided(bfp(dh), bfp(dh) + F, ld, bfp(d_g), R, F, 0);
    mta::cuda::swiglu_backward_strided(bfp(d_dg), bfp(dh), bfp(dh) + F, ld, bfp(d_dh), bfp(d_dh) + F, R, F, 0);
    // The dense functions on the same values.
    Dev<uint16_t> d_a(ab), d_b(bb), d_g2(n), d_da2(n), d_db2(n);
    mta::cuda::swiglu_forward(bfp(d_a), bfp(d_b), bfp(d_g2), static_cast<long long>(n), 0);
    mta::cuda::swiglu_backward(bfp(d_dg), bfp(d_a), bfp(d_b), bfp(d_da2), bfp(d_db2), static_cast<long long>(n), 0);
    sync();
    const auto gg_b = d_g.host(), wide = d_dh.host();
    std::vector<uint16_t> gda_b(n), gdb_b(n);
    size_t untouched = 0, outside = 0;
    for (size_t r = 0; r < static_cast<size_t>(R); ++r)
      for (long long c = 0; c < ld; ++c) {
        const uint16_t x = wide[r * ld + c];
        if (c < F) {
          gda_b[r * F + c] = x;
        } else if (c < 2 * F) {
          gdb_b[r * F + (c - F)] = x;
        } else {
          ++outside;
          untouched += x == 0xFFFFu;
        }
      }
    EXPECT_EQ(untouched, outside) << "swiglu_backward_strided wrote past its columns";
    EXPECT_EQ(gg_b, d_g2.host());
    EXPECT_EQ(gda_b, d_da2.host());
    EXPECT_EQ(gdb_b, d_db2.host());
    const auto gg = widen(gg_b), gda = widen(gda_b), gdb = widen(gdb_b);
    EXPECT_TRUE(all_finite(gg) && all_finite(gda) && all_finite(gdb));
    EXPECT_LT(rel_err(gg, g), 1e-2);
    EXPECT_LT(rel_err(gda, da), 1e-2);
    EXPECT_LT(rel_err(gdb, db), 1e-2);
  }
  Dev<uint16_t> x(64);
  EXPECT_THROW(mta::cuda::swiglu_forward_strided(bfp(x), bfp(x), 3, bfp(x), 2, 4, 0), std::invalid_argument);
  EXPECT_THROW(mta::cuda::swiglu_backward_strided(bfp(x), bfp(x), bfp(x), 3, bfp(x), bfp(x), 2, 4, 0),
               std::invalid_argument);
}

TEST(CudaLayers, DropoutMasksEqualCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(5);
  for (long long n : {10007LL, 65541LL})
    for (float p : {0.0f, 0.1f, 0.5f})
      for (size_t off : {size_t(0), size_t(1)}) {
        const uint64_t seed = rng();
        SCOPED_TRACE("n=" + std::to_string(n) + " p=" + std::to_string(p) + " offset=" + std::to_string(off));
        const auto x = rnd(n, rng), y = rnd(n, rng);
        std::vector<float> tmp = y, want(n);
        mta::cpu::dropout_apply<float>(tmp.data(), n, p, seed);
        for (long long i = 0; i < n; ++i) want[i] = x[i] + tmp[i];
        long long dropped = 0;
        for (long long i = 0; i < n; ++i) dropped += tmp[i] == 0.0f;
        if (p > 0) EXPECT_NEAR(static_cast<double>(dropped) / n, p, 0.03);
        Dev<float> dx(x, off), dy(y, off), dout(n, off);
        dout.poison();
        mta::cuda::residual_dropout_forward(dx.get(), dy.get(), dout.get(), n, p, seed, 0);
        // Gradient side: dropout(dout) rounded to bf16.
        std::vector<float> gt = y;
        mta::cpu::dropout_apply<float>(gt.data(), n, p, seed);
        Dev<uint16_t> dgb(n, off);
        dgb.poison();
        mta::cuda::dropout_to_bf16(dy.get(), bfp(dgb), n, p, seed, 0);
        sync();
        const auto got = dout.host();
        EXPECT_TRUE(all_finite(got));
        EXPECT_TRUE(same_bits(got, want)) << "residual_dropout_forward differs from x + cpu::dropout_apply(y)";
        EXPECT_TRUE(dgb.host() == to_bf(gt)) << "dropout_to_bf16 differs from bf16(cpu::dropout_apply(dout))";
      }
}

// The CPU's cross-entropy (model.cpp's loop, T = float).
void cross_entropy_cpu(const std::vector<float>& logits, const std::vector<int32_t>& targets,
                       const std::vector<float>& weights, float grad_scale, int R, int V, std::vector<float>& loss,
                       std::vector<int32_t>& argmax, std::vector<float>& dlogits) {
  loss.assign(R, 0), argmax.assign(R, 0), dlogits.assign(static_cast<size_t>(R) * V, 0);
  for (int r = 0; r < R; ++r) {
    const float* lg = logits.data() + static_cast<size_t>(r) * V;
    float* dl = dlogits.data() + static_cast<size_t>(r) * V;
    int best = 0;
    float m = lg[0];
    for (int c = 1; c < V; ++c)
      if (lg[c] > m) m = lg[c], best = c;
    argmax[r] = best;
    double sum = 0;
    for (int c = 0; c < V; ++c) sum += std::exp(static_cast<double>(lg[c] - m));
    const float w = weights[r];
    if (w != 0) loss[r] = static_cast<float>(w * (m + std::log(sum) - lg[targets[r]]));
    const float s = w * grad_scale;
    const float inv = static_cast<float>(1.0 / sum);
    for (int c = 0; c < V; ++c) dl[c] = s * std::exp(lg[c] - m) * inv;
    if (w != 0) dl[targets[r]] -= s;
  }
}

TEST(CudaLayers, CrossEntropy) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(6);
  for (int V : {30, 1000, 5003})
    for (int R : {1, 37}) {
      SCOPED_TRACE("V=" + std::to_string(V) + " R=" + std::to_string(R));
      auto logits = rnd(static_cast<size_t>(R) * V, rng, 0.1f, 4.0f);
      // Ties: the lowest index of the maximum wins.
      logits[5] = logits[std::min(17, V - 1)] = 50.0f;
      if (R > 1) logits[static_cast<size_t>(V)] = logits[static_cast<size_t>(V) + V - 1] = 60.0f;
      std::vector<int32_t> targets(R);
      std::vector<float> weights(R);
      std::uniform_int_distribution<int> tgt(0, V - 1);
      for (int r = 0; r < R; ++r) {
        weights[r] = r % 5 == 3 ? 0.0f : (r % 2 ? 0.5f : 1.0f);
        targets[r] = weights[r] == 0.0f ? -1 : tgt(rng);  // never read where the weight is 0
      }
      // Masked logits (-inf, never the target): they add nothing to the sum. Columns 8..11 are all of
      // one thread's logits when V = 1000 (vectors of 4), one thread each when V = 30.
      for (int c = 8; c < 12; ++c) logits[c] = -INFINITY;
      if (targets[0] >= 8 && targets[0] < 12) targets[0] = 0;
      const float gs = 0.25f;
      std::vector<float> loss, dl;
      std::vector<int32_t> am;
      cross_entropy_cpu(logits, targets, weights, gs, R, V, loss, am, dl);
      Dev<float> dlog(logits), dw(weights), dloss(R);
      Dev<int32_t> dt(targets), dam(R);
      Dev<uint16_t> ddl(static_cast<size_t>(R) * V);
      dloss.poison(), dam.poison(), ddl.poison();
      mta::cuda::cross_entropy(dlog.get(), dt.get(), dw.get(), gs, dloss.get(), dam.get(), bfp(ddl), R, V, 0);
      sync();
      const auto gl = dloss.host();
      const auto gdl = widen(ddl.host());
      EXPECT_TRUE(all_finite(gl));
      EXPECT_TRUE(all_finite(gdl));
      EXPECT_LT(rel_err(gl, loss), 1e-5);
      EXPECT_EQ(dam.host(), am);
      EXPECT_EQ(dam.host()[0], 5);
      EXPECT_LT(rel_err(gdl, dl), 1e-2);
      for (int r = 0; r < R; ++r)
        if (weights[r] == 0.0f) EXPECT_EQ(gl[r], 0.0f);
      // Without argmax and gradient.
      dloss.poison();
      mta::cuda::cross_entropy(dlog.get(), dt.get(), dw.get(), gs, dloss.get(), nullptr, nullptr, R, V, 0);
      sync();
      EXPECT_TRUE(same_bits(dloss.host(), gl));
    }
}

TEST(CudaLayers, AdamWMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(7);
  mta::ParamLayout layout;
  layout.add("a", {37, 11}, true);
  layout.add("b", {100}, false);
  layout.add("c", {64, 33}, true);
  layout.add("d", {7}, false);
  const size_t n = layout.total();
  std::vector<uint8_t> decay(n, 0);
  for (const auto& v : layout.views())
    if (v.decay) std::fill(decay.begin() + v.offset, decay.begin() + v.offset + v.size, 1);
  mta::AdamWConfig cfg;
  cfg.beta1 = 0.9, cfg.beta2 = 0.95, cfg.eps = 1e-8, cfg.weight_decay = 0.1;
  for (long long step : {1LL, 2LL, 1000LL}) {
    SCOPED_TRACE("step=" + std::to_string(step));
    const double lr = 3.7e-3;
    std::vector<float> p = rnd(n, rng), g = rnd(n, rng, 1e-3f, 1.0f), m0 = rnd(n, rng, 1e-3f, 0.1f),
                       v0 = rnd(n, rng, 1e-4f, 1e-2f);
    for (auto& x : v0) x = std::fabs(x);
    mta::AdamW opt(layout, cfg);
    opt.m() = m0, opt.v() = v0;
    std::vector<float> pc = p;
    opt.update(pc, g, lr, step);
    Dev<float> dp(p), dg(g), dm(m0), dv(v0);
    Dev<uint8_t> dd(decay);
    Dev<uint16_t> dpb(n);
    dpb.poison();
    const double bc1 = 1.0 - std::pow(cfg.beta1, static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(cfg.beta2, static_cast<double>(step));
    mta::cuda::adamw_update(dp.get(), bfp(dpb), dg.get(), dm.get(), dv.get(), dd.get(), static_cast<long long>(n), lr,
                            static_cast<float>(cfg.beta1), static_cast<float>(cfg.beta2), static_cast<float>(cfg.eps),
                            cfg.weight_decay, bc1, bc2, 0);
    sync();
    const auto gp = dp.host(), gm = dm.host(), gv = dv.host();
    EXPECT_TRUE(all_finite(gp) && all_finite(gm) && all_finite(gv));
    EXPECT_LT(rel_err(gp, pc), 1e-6);
    EXPECT_LT(rel_err(gm, opt.m()), 1e-6);
    EXPECT_LT(rel_err(gv, opt.v()), 1e-6);
    // The update itself (p - p0), which the start values would hide.
    std::vector<double> du_g(n), du_c(n);
    for (size_t i = 0; i < n; ++i) du_g[i] = double(gp[i]) - p[i], du_c[i] = double(pc[i]) - p[i];
    EXPECT_LT(rel_err(du_g, du_c), 1e-5);
    size_t equal = 0;
    for (size_t i = 0; i < n; ++i) equal += gp[i] == pc[i];
    std::printf("adamw step %lld: %zu of %zu parameters equal the CPU's bit for bit\n", step, equal, n);
    EXPECT_EQ(dpb.host(), to_bf(gp));
  }
}

TEST(CudaLayers, SumSquaresScaleCasts) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(8);
  for (long long n : {1LL, 1000LL, 10007LL, (1LL << 20) + 3}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    const auto g = rnd(n, rng, 1e-3f, 3.0f);
    double want = 0;
    for (float x : g) want += static_cast<double>(x) * x;
    Dev<float> dg(g);
    Dev<double> out(1), scratch(mta::cuda::sum_squares_scratch_doubles(n));
    out.poison();
    mta::cuda::sum_squares(dg.get(), n, out.get(), scratch.get(), 0);
    sync();
    const double got = out.host()[0];
    EXPECT_NEAR(got, want, 1e-11 * want);
    mta::cuda::sum_squares(dg.get(), n, out.get(), scratch.get(), 0);
    sync();
    EXPECT_EQ(std::memcmp(&got, out.host().data(), sizeof(double)), 0) << "sum_squares is not deterministic";

    for (size_t off : {size_t(0), size_t(1)}) {
      // scale: exact (one rounded product per element).
      const float f = 0.37f;
      std::vector<float> ws = g;
      for (auto& x : ws) x *= f;
      Dev<float> ds(g, off);
      mta::cuda::scale(ds.get(), n, f, 0);
      // Casts: exact, round to nearest even.
      Dev<float> dx(g, off), dback(n, off);
      Dev<uint16_t> db(n, off);
      db.poison(), dback.poison();
      mta::cuda::cast_to_bf16(dx.get(), bfp(db), n, 0);
      mta::cuda::cast_to_f32(bfp(db), dback.get(), n, 0);
      sync();
      EXPECT_TRUE(same_bits(ds.host(), ws));
      EXPECT_EQ(db.host(), to_bf(g));
      EXPECT_TRUE(same_bits(dback.host(), widen(to_bf(g))));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Matrix products: every transpose combination, both output types, beta 0 (poisoned C) and 1, odd
// shapes and padded leading dimensions, against a double-precision host product of the bf16 inputs.

struct GemmCase {
  int M, N, K;
  int pad;  // added to every leading dimension
};

TEST(CudaGemm, AllTransposesAndOutputs) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(9);
  const GemmCase cases[] = {{77, 130, 64, 0}, {64, 64, 64, 0}, {1, 33, 17, 0}, {300, 257, 129, 0}, {77, 130, 64, 8},
                            {5, 3, 1000, 3}, {512, 1000, 768, 0}};
  for (const GemmCase& cs : cases)
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb)
        for (int out_bf16 = 0; out_bf16 < 2; ++out_bf16)
          for (float beta : {0.0f, 1.0f}) {
            const int M = cs.M, N = cs.N, K = cs.K;
            const float alpha = beta == 0.0f ? 1.0f : 0.5f;
            SCOPED_TRACE("M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                         " pad=" + std::to_string(cs.pad) + " ta=" + std::to_string(ta) + " tb=" +
                         std::to_string(tb) + " out=" + (out_bf16 ? "bf16" : "fp32") + " beta=" + std::to_string(beta));
            // Stored shapes (row-major): A is M x K (K x M when ta), B is K x N (N x K when tb).
            const int a_rows = ta ? K : M, a_cols = ta ? M : K, b_rows = tb ? N : K, b_cols = tb ? K : N;
            const int lda = a_cols + cs.pad, ldb = b_cols + cs.pad, ldc = N + cs.pad;
            const auto Ab = rnd_bf(static_cast<size_t>(a_rows) * lda, rng);
            const auto Bb = rnd_bf(static_cast<size_t>(b_rows) * ldb, rng);
            const auto Af = widen(Ab), Bf = widen(Bb);
            // op(A) as M x K and op(B)^T as N x K, row-major doubles.
            std::vector<double> opA(static_cast<size_t>(M) * K), opBt(static_cast<size_t>(N) * K);
            for (int i = 0; i < M; ++i)
              for (int k = 0; k < K; ++k) opA[size_t(i) * K + k] = ta ? Af[size_t(k) * lda + i] : Af[size_t(i) * lda + k];
            for (int j = 0; j < N; ++j)
              for (int k = 0; k < K; ++k) opBt[size_t(j) * K + k] = tb ? Bf[size_t(j) * ldb + k] : Bf[size_t(k) * ldb + j];
            const size_t nc = static_cast<size_t>(M) * ldc;
            std::vector<float> C0 = rnd(nc, rng);
            if (out_bf16) C0 = widen(to_bf(C0));
            std::vector<double> want(static_cast<size_t>(M) * N);
            double scale = 0;
            for (int i = 0; i < M; ++i)
              for (int j = 0; j < N; ++j) {
                double acc = 0;
                const double* a = opA.data() + size_t(i) * K;
                const double* b = opBt.data() + size_t(j) * K;
                for (int k = 0; k < K; ++k) acc += a[k] * b[k];
                want[size_t(i) * N + j] = alpha * acc + (beta != 0.0f ? beta * double(C0[size_t(i) * ldc + j]) : 0.0);
                scale = std::max(scale, std::fabs(want[size_t(i) * N + j]));
              }
            Dev<uint16_t> dA(Ab), dB(Bb);
            std::vector<float> got(static_cast<size_t>(M) * N), pad_got, pad_want;
            if (!out_bf16) {
              Dev<float> dC(C0);
              if (beta == 0.0f) dC.poison();  // beta = 0: C must not be read
              mta::cuda::gemm_bf16(ta, tb, M, N, K, alpha, bfp(dA), lda, bfp(dB), ldb, beta, dC.get(), ldc, 0);
              sync();
              const auto h = dC.host();
              for (int i = 0; i < M; ++i)
                for (int j = 0; j < N; ++j) got[size_t(i) * N + j] = h[size_t(i) * ldc + j];
              for (int i = 0; i < M; ++i)
                for (int j = N; j < ldc; ++j) pad_got.push_back(h[size_t(i) * ldc + j]), pad_want.push_back(C0[size_t(i) * ldc + j]);
              if (beta == 0.0f) pad_got.clear(), pad_want.clear();  // poisoned padding stays poisoned
              EXPECT_TRUE(all_finite(got));
              const double e = rel_err(got, want);
              EXPECT_LT(e, 1e-3);
              if (e > 1e-5) std::printf("gemm fp32 out M=%d N=%d K=%d ta=%d tb=%d beta=%g: rel err %.3g\n", M, N, K, ta,
                                        tb, beta, e);
            } else {
              Dev<uint16_t> dC(to_bf(C0));
              if (beta == 0.0f) dC.poison();
              mta::cuda::gemm_bf16(ta, tb, M, N, K, alpha, bfp(dA), lda, bfp(dB), ldb, beta, bfp(dC), ldc, 0);
              sync();
              const auto h = widen(dC.host());
              for (int i = 0; i < M; ++i)
                for (int j = 0; j < N; ++j) got[size_t(i) * N + j] = h[size_t(i) * ldc + j];
              for (int i = 0; i < M; ++i)
                for (int j = N; j < ldc; ++j) pad_got.push_back(h[size_t(i) * ldc + j]), pad_want.push_back(C0[size_t(i) * ldc + j]);
              if (beta == 0.0f) pad_got.clear(), pad_want.clear();
              EXPECT_TRUE(all_finite(got));
              // Against the exact product rounded to bf16. With beta = 0 the result is rounded once (at
              // most one ulp off, at a rounding boundary); with beta != 0 cuBLASLt's epilogue may round
              // alpha * op(A) op(B) to bf16 before adding beta * C, so two roundings (RMS ~2.7e-3 seen on
              // an H200), hence the looser bound there.
              std::vector<float> want_b(want.size());
              for (size_t i = 0; i < want.size(); ++i) want_b[i] = bf2f(f2bf(static_cast<float>(want[i])));
              const double e = rel_err(got, want_b);
              EXPECT_LT(e, beta == 0.0f ? 1e-3 : 5e-3);
              if (e > 1e-4) std::printf("gemm bf16 out M=%d N=%d K=%d ta=%d tb=%d beta=%g: rel err %.3g\n", M, N, K, ta,
                                        tb, beta, e);
              size_t bad = 0;
              for (size_t i = 0; i < want.size(); ++i)
                if (std::fabs(got[i] - want[i]) > std::fabs(want[i]) * (1.0 / 128) + 1e-3 * scale) ++bad;
              EXPECT_EQ(bad, 0u);
            }
            // The padding columns of C are never written.
            EXPECT_TRUE(pad_got == pad_want);
          }
}

// gemm_bf16_add: D = A B^T + C with C and D distinct (the model's residual connections), against the
// product into a temporary then an fp32 addition (the path it replaces), and the double reference.
// C is left as it was.
TEST(CudaGemm, ResidualAdd) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(12);
  for (const auto& [M, N, K] : {std::tuple{77, 130, 64}, std::tuple{512, 768, 2048}, std::tuple{3, 5, 7}}) {
    SCOPED_TRACE("M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K));
    const auto Ab = rnd_bf(static_cast<size_t>(M) * K, rng), Bb = rnd_bf(static_cast<size_t>(N) * K, rng);
    const auto C0 = rnd(static_cast<size_t>(M) * N, rng, 1.0f, 4.0f);
    Dev<uint16_t> dA(Ab), dB(Bb);
    Dev<float> dC(C0), dD(C0.size()), dT(C0.size());
    dD.poison(), dT.poison();
    mta::cuda::gemm_bf16_add(false, true, M, N, K, bfp(dA), K, bfp(dB), K, dC.get(), dD.get(), N, 0);
    mta::cuda::gemm_bf16(false, true, M, N, K, 1.0f, bfp(dA), K, bfp(dB), K, 0.0f, dT.get(), N, 0);
    sync();
    const auto got = dD.host(), prod = dT.host();
    EXPECT_TRUE(same_bits(dC.host(), C0)) << "C was modified";
    const auto Af = widen(Ab), Bf = widen(Bb);
    std::vector<double> want(C0.size());
    std::vector<float> two_step(C0.size());
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        double acc = 0;
        for (int k = 0; k < K; ++k) acc += double(Af[size_t(i) * K + k]) * Bf[size_t(j) * K + k];
        want[size_t(i) * N + j] = acc + C0[size_t(i) * N + j];
        two_step[size_t(i) * N + j] = prod[size_t(i) * N + j] + C0[size_t(i) * N + j];
      }
    EXPECT_TRUE(all_finite(got));
    EXPECT_LT(rel_err(got, want), 1e-6);
    EXPECT_LT(rel_err(got, two_step), 1e-6);
  }
}

TEST(CudaGemm, EmptyProducts) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(10);
  // K = 0: C = beta * C.
  const int M = 7, N = 9;
  const auto C0 = rnd(static_cast<size_t>(M) * N, rng);
  Dev<float> dC(C0);
  Dev<uint16_t> dA(16), dB(16);
  mta::cuda::gemm_bf16(false, false, M, N, 0, 1.0f, bfp(dA), 1, bfp(dB), N, 0.5f, dC.get(), N, 0);
  sync();
  std::vector<float> want = C0;
  for (auto& x : want) x *= 0.5f;
  EXPECT_TRUE(same_bits(dC.host(), want));
  dC.poison();
  mta::cuda::gemm_bf16(false, false, M, N, 0, 1.0f, bfp(dA), 1, bfp(dB), N, 0.0f, dC.get(), N, 0);
  sync();
  EXPECT_TRUE(same_bits(dC.host(), std::vector<float>(static_cast<size_t>(M) * N, 0.0f)));
  // M = 0 or N = 0: nothing to do, nothing touched.
  mta::cuda::gemm_bf16(false, false, 0, N, 5, 1.0f, bfp(dA), 5, bfp(dB), N, 0.0f, dC.get(), N, 0);
  sync();
  // A bad leading dimension is refused.
  EXPECT_THROW(mta::cuda::gemm_bf16(false, false, M, N, 5, 1.0f, bfp(dA), 4, bfp(dB), N, 0.0f, dC.get(), N, 0),
               std::invalid_argument);
}

}  // namespace
