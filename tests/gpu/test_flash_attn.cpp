// GPU tests of the fused causal attention kernels (attention/flash_attn.h), bf16 in/out, against the
// CPU reference mta::cpu::mta_forward / mta_backward<double> with a standard spec (plain causal
// attention) run on the same bf16-rounded inputs converted to double. Checks out, lse, dq, dk, dv
// (relative L2 error, every entry finite after poisoning the outputs and the scratch with NaN) and
// that the forward pass is bitwise deterministic. Labelled "gpu"; every test skips itself when
// cudaGetDeviceCount reports no device.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "attention/flash_attn.h"
#include "attention/mta_cpu.h"
#include "gpu/gpu_test_util.h"

namespace {

constexpr double kTolRel = 2e-2;  // ||gpu - ref|| / ||ref|| for out, dq, dk, dv (bf16 outputs)
constexpr double kTolLse = 1e-2;  // max |gpu - ref| of lse

using namespace gpu_test;  // NOLINT

struct Shape {
  int B, H, T, D;
  float dropout = 0.0f;  // attention dropout (training), the mask every backend uses
  unsigned long long seed = 0;
  size_t rows() const { return static_cast<size_t>(B) * H * T; }
  size_t numel() const { return rows() * D; }
  std::string str() const {
    return "(B=" + std::to_string(B) + ", H=" + std::to_string(H) + ", T=" + std::to_string(T) +
           ", D=" + std::to_string(D) + ", dropout=" + std::to_string(dropout) + ")";
  }
};

// Reference lse of row i of head bh (natural log-sum-exp of the scaled causal logits), in double.
double ref_lse(const std::vector<double>& q, const std::vector<double>& k, const Shape& s, size_t bh, int i) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
  const double* qi = q.data() + (bh * s.T + i) * s.D;
  std::vector<double> logit(i + 1);
  double mx = -INFINITY;
  for (int j = 0; j <= i; ++j) {
    const double* kj = k.data() + (bh * s.T + j) * s.D;
    double dot = 0;
    for (int d = 0; d < s.D; ++d) dot += qi[d] * kj[d];
    logit[j] = dot * scale;
    mx = std::max(mx, logit[j]);
  }
  double sum = 0;
  for (int j = 0; j <= i; ++j) sum += std::exp(logit[j] - mx);
  return mx + std::log(sum);
}

struct GpuResult {
  std::vector<double> out, lse, dq, dk, dv;
  std::vector<uint16_t> out_bits;
  std::vector<float> lse_raw;
};

// Runs forward (and backward when asked) on the GPU; every output and the scratch start as NaN.
GpuResult run_gpu(const Shape& s, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
                  bool backward) {
  const size_t n = s.numel(), bytes = n * sizeof(uint16_t);
  DevMem dq_in(bytes), dk_in(bytes), dv_in(bytes), o(bytes), lse(s.rows() * sizeof(float));
  dq_in.upload(q.bits), dk_in.upload(k.bits), dv_in.upload(v.bits);
  o.poison(), lse.poison();
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  GpuResult r;
  try {
    using bf = __nv_bfloat16;
    mta::cuda::flash_attn_forward(dq_in.as<bf>(), dk_in.as<bf>(), dv_in.as<bf>(), o.as<bf>(), lse.as<float>(), s.B,
                                  s.H, s.T, s.D, stream, s.dropout, s.seed);
    CUDA_OK(cudaStreamSynchronize(stream));
    r.out_bits = o.download<uint16_t>(n);
    r.out = to_double(r.out_bits);
    r.lse_raw = lse.download<float>(s.rows());
    r.lse.assign(r.lse_raw.begin(), r.lse_raw.end());
    if (backward) {
      DevMem ddo(bytes), gq(bytes), gk(bytes), gv(bytes);
      DevMem scratch(mta::cuda::flash_attn_backward_scratch_bytes(s.B, s.H, s.T, s.D));
      ddo.upload(dout.bits);
      gq.poison(), gk.poison(), gv.poison(), scratch.poison();
      mta::cuda::flash_attn_backward(dq_in.as<bf>(), dk_in.as<bf>(), dv_in.as<bf>(), o.as<bf>(), ddo.as<bf>(),
                                     lse.as<float>(), gq.as<bf>(), gk.as<bf>(), gv.as<bf>(), scratch.as<void>(),
                                     s.B, s.H, s.T, s.D, stream, s.dropout, s.seed);
      CUDA_OK(cudaStreamSynchronize(stream));
      r.dq = to_double(gq.download<uint16_t>(n));
      r.dk = to_double(gk.download<uint16_t>(n));
      r.dv = to_double(gv.download<uint16_t>(n));
    }
  } catch (...) {
    cudaStreamDestroy(stream);
    throw;
  }
  CUDA_OK(cudaStreamDestroy(stream));
  return r;
}

void check_case(const Shape& s, unsigned seed) {
  SCOPED_TRACE(s.str());
  std::mt19937 rng(seed);
  const size_t n = s.numel();
  const Tensor q = randn_bf16(n, rng), k = randn_bf16(n, rng), v = randn_bf16(n, rng), dout = randn_bf16(n, rng);

  const GpuResult g = run_gpu(s, q, k, v, dout, /*backward=*/true);

  // CPU reference in double on the bf16-rounded inputs; a standard spec is plain causal attention.
  mta::AttentionSpec spec;
  spec.heads = s.H, spec.head_dim = s.D;
  ASSERT_TRUE(spec.is_standard());
  const mta::AttnDims dims{s.B, s.H, s.T, s.D};
  std::vector<double> out(n), dq(n), dk(n), dv(n);
  mta::AttnOptions opt;
  opt.dropout = s.dropout, opt.dropout_seed = s.seed;
  mta::cpu::mta_forward<double>(spec, dims, q.val.data(), k.val.data(), v.val.data(), mta::AttnParams<double>{},
                                out.data(), opt);
  mta::cpu::mta_backward<double>(spec, dims, q.val.data(), k.val.data(), v.val.data(), mta::AttnParams<double>{},
                                 dout.val.data(), dq.data(), dk.data(), dv.data(), mta::AttnParamGrads<double>{}, opt);

  EXPECT_EQ(non_finite(g.out), 0) << "out has non-finite entries";
  EXPECT_EQ(non_finite(g.lse), 0) << "lse has non-finite entries";
  EXPECT_EQ(non_finite(g.dq), 0) << "dq has non-finite entries";
  EXPECT_EQ(non_finite(g.dk), 0) << "dk has non-finite entries";
  EXPECT_EQ(non_finite(g.dv), 0) << "dv has non-finite entries";
  const double e_out = rel_err(g.out, out), e_dq = rel_err(g.dq, dq), e_dk = rel_err(g.dk, dk),
               e_dv = rel_err(g.dv, dv);
  EXPECT_LE(e_out, kTolRel) << "out";
  EXPECT_LE(e_dq, kTolRel) << "dq";
  EXPECT_LE(e_dk, kTolRel) << "dk";
  EXPECT_LE(e_dv, kTolRel) << "dv";

  // lse: every row of small cases; a strided subset of rows (all heads, first and last rows included)
  // of large ones, to keep the O(T^2 D) double loop short.
  const int stride = s.rows() * static_cast<size_t>(s.T) > (1u << 22) ? 7 : 1;
  double e_lse = 0;
  for (size_t bh = 0; bh < static_cast<size_t>(s.B) * s.H; ++bh)
    for (int i = 0; i < s.T; ++i) {
      if (i % stride != 0 && i != s.T - 1) continue;
      const double got = g.lse[bh * s.T + i];
      e_lse = std::max(e_lse, std::isfinite(got) ? std::abs(got - ref_lse(q.val, k.val, s, bh, i)) : INFINITY);
    }
  EXPECT_LE(e_lse, kTolLse) << "lse (max abs error)";
  std::printf("[ flash ] %s rel err out %.2e dq %.2e dk %.2e dv %.2e; lse max abs err %.2e\n", s.str().c_str(),
              e_out, e_dq, e_dk, e_dv, e_lse);
}

class FlashAttnShapes : public ::testing::TestWithParam<Shape> {};

TEST_P(FlashAttnShapes, MatchesCpuReference) {
  SKIP_WITHOUT_GPU();
  const Shape s = GetParam();
  check_case(s, 1234u + static_cast<unsigned>(s.B * 1000003 + s.H * 10007 + s.T * 101 + s.D));
}

INSTANTIATE_TEST_SUITE_P(FlashAttn, FlashAttnShapes,
                         ::testing::Values(Shape{1, 1, 1, 64}, Shape{2, 3, 17, 64}, Shape{1, 2, 128, 64},
                                           Shape{2, 2, 200, 128}, Shape{1, 4, 1000, 64}, Shape{1, 2, 513, 128}),
                         [](const ::testing::TestParamInfo<Shape>& i) {
                           const Shape& s = i.param;
                           return "B" + std::to_string(s.B) + "_H" + std::to_string(s.H) + "_T" +
                                  std::to_string(s.T) + "_D" + std::to_string(s.D);
                         });

// Attention dropout: the kernels drop the weights by the shared mask (after the row sums) and the
// backward pass regenerates it; against the CPU reference with the same mask.
TEST(FlashAttnDropout, MatchesCpuReference) {
  SKIP_WITHOUT_GPU();
  check_case(Shape{2, 3, 77, 64, 0.1f, 11}, 5u);
  check_case(Shape{1, 2, 200, 128, 0.3f, 12}, 6u);
  check_case(Shape{1, 4, 1000, 64, 0.1f, 13}, 7u);
}

TEST(FlashAttnLarge, B2H16T2048D128) {
  SKIP_WITHOUT_GPU();
  check_case(Shape{2, 16, 2048, 128}, 77u);
}

// The same inputs twice give bitwise-identical forward outputs (o and lse).
TEST(FlashAttnDeterminism, ForwardIsBitwiseReproducible) {
  SKIP_WITHOUT_GPU();
  for (const Shape& s : {Shape{2, 3, 300, 64}, Shape{1, 2, 257, 128}}) {
    SCOPED_TRACE(s.str());
    std::mt19937 rng(99);
    const size_t n = s.numel();
    const Tensor q = randn_bf16(n, rng), k = randn_bf16(n, rng), v = randn_bf16(n, rng);
    const GpuResult a = run_gpu(s, q, k, v, v, /*backward=*/false);
    const GpuResult b = run_gpu(s, q, k, v, v, /*backward=*/false);
    EXPECT_EQ(non_finite(a.out), 0);
    EXPECT_TRUE(a.out_bits == b.out_bits) << "forward output differs between two identical runs";
    EXPECT_EQ(std::memcmp(a.lse_raw.data(), b.lse_raw.data(), a.lse_raw.size() * sizeof(float)), 0)
        << "lse differs between two identical runs";
  }
}

// The strided entry points (HeadLayout): q | k | v read from, and dq | dk | dv written into, one
// token-major [B * T, W] matrix, o and dout as [B * T, Wo] rows (both with spare columns), dq and dk
// rotated back by a RoPE table. Against the contiguous kernels on the gathered operands (themselves
// checked against the CPU above): o, lse and dv bitwise (the same arithmetic in the same order), dk
// and dq within two bf16 roundings of the contiguous result rotated back on the host (the strided path
// rotates the fp32 value and rounds once), and the spare columns left as they were.
TEST(FlashAttnLayouts, TokenMajorRowsAndRopeGradients) {
  SKIP_WITHOUT_GPU();
  using bf = __nv_bfloat16;
  for (const Shape& s : {Shape{2, 3, 77, 64}, Shape{1, 2, 200, 128}}) {
    for (const bool rope : {false, true}) {
      SCOPED_TRACE(s.str() + (rope ? " rope" : " no rope"));
      std::mt19937 rng(31 + s.T);
      const int B = s.B, H = s.H, T = s.T, D = s.D, C = H * D, W = 3 * C + 8, Wo = C + 16;
      const size_t N = static_cast<size_t>(B) * T, n = s.numel();
      const Tensor wide = randn_bf16(N * W, rng), dout_w = randn_bf16(N * Wo, rng);
      // Contiguous copies of q, k, v and dout.
      auto gather = [&](const std::vector<uint16_t>& src, int width, int col0) {
        std::vector<uint16_t> out(n);
        for (int b = 0; b < B; ++b)
          for (int h = 0; h < H; ++h)
            for (int t = 0; t < T; ++t)
              for (int c = 0; c < D; ++c)
                out[((static_cast<size_t>(b) * H + h) * T + t) * D + c] =
                    src[(static_cast<size_t>(b) * T + t) * width + col0 + h * D + c];
        return out;
      };
      const auto qb = gather(wide.bits, W, 0), kb = gather(wide.bits, W, C), vb = gather(wide.bits, W, 2 * C);
      const auto dob = gather(dout_w.bits, Wo, 0);
      // A RoPE table of random rotations (cos, sin of random angles).
      std::vector<float> tab(static_cast<size_t>(T) * D);
      std::uniform_real_distribution<float> ang(-3.f, 3.f);
      for (size_t i = 0; i < tab.size(); i += 2) {
        const float a = ang(rng);
        tab[i] = std::cos(a), tab[i + 1] = std::sin(a);
      }
      const size_t bytes = n * 2;
      DevMem dq_(bytes), dk_(bytes), dv_(bytes), ddo(bytes), oc(bytes), lsec(s.rows() * 4), gq(bytes), gk(bytes),
          gv(bytes), scratch(mta::cuda::flash_attn_backward_scratch_bytes(B, H, T, D));
      DevMem dwide(N * W * 2), ddo_w(N * Wo * 2), os(N * Wo * 2), lses(s.rows() * 4), gwide(N * W * 2),
          dtab(tab.size() * 4);
      dq_.upload(qb), dk_.upload(kb), dv_.upload(vb), ddo.upload(dob), dwide.upload(wide.bits),
          ddo_w.upload(dout_w.bits), dtab.upload(tab);
      oc.poison(), lsec.poison(), os.poison(), lses.poison(), gwide.poison(), gq.poison(), gk.poison(), gv.poison();
      const mta::cuda::HeadLayout lin = mta::cuda::token_major(T, D, W), lout = mta::cuda::token_major(T, D, Wo);
      const bf* w = dwide.as<bf>();
      bf* g = gwide.as<bf>();
      mta::cuda::flash_attn_forward(dq_.as<bf>(), dk_.as<bf>(), dv_.as<bf>(), oc.as<bf>(), lsec.as<float>(), B, H, T,
                                    D, 0);
      mta::cuda::flash_attn_forward(w, w + C, w + 2 * C, os.as<bf>(), lses.as<float>(), B, H, T, D, lin, lout, 0);
      mta::cuda::flash_attn_backward(dq_.as<bf>(), dk_.as<bf>(), dv_.as<bf>(), oc.as<bf>(), ddo.as<bf>(),
                                     lsec.as<float>(), gq.as<bf>(), gk.as<bf>(), gv.as<bf>(), scratch.as<void>(), B, H,
                                     T, D, 0);
      mta::cuda::flash_attn_backward(w, w + C, w + 2 * C, os.as<bf>(), ddo_w.as<bf>(), lses.as<float>(), g, g + C,
                                     g + 2 * C, scratch.as<void>(), B, H, T, D, lin, lout,
                                     rope ? dtab.as<float>() : nullptr, 0);
      CUDA_OK(cudaDeviceSynchronize());
      const auto o_wide = os.download<uint16_t>(N * Wo), g_wide = gwide.download<uint16_t>(N * W);
      EXPECT_TRUE(gather(o_wide, Wo, 0) == oc.download<uint16_t>(n)) << "o differs from the contiguous kernel's";
      const auto l1 = lsec.download<float>(s.rows()), l2 = lses.download<float>(s.rows());
      EXPECT_EQ(std::memcmp(l1.data(), l2.data(), l1.size() * 4), 0) << "lse differs";
      EXPECT_TRUE(gather(g_wide, W, 2 * C) == gv.download<uint16_t>(n)) << "dv differs from the contiguous kernel's";
      // The contiguous dq, dk rotated back on the host (pair i of position t: the transposed rotation).
      for (const auto& [name, col, dev] : {std::tuple{"dq", 0, &gq}, std::tuple{"dk", C, &gk}}) {
        const std::vector<double> ref = to_double(dev->download<uint16_t>(n));
        std::vector<double> want(ref);
        if (rope)
          for (size_t r = 0; r < s.rows(); ++r)
            for (int i = 0; i < D / 2; ++i) {
              const int t = static_cast<int>(r % T);
              const double c = tab[2 * (static_cast<size_t>(t) * (D / 2) + i)],
                           sn = tab[2 * (static_cast<size_t>(t) * (D / 2) + i) + 1];
              const double x0 = ref[r * D + 2 * i], x1 = ref[r * D + 2 * i + 1];
              want[r * D + 2 * i] = x0 * c + x1 * sn;
              want[r * D + 2 * i + 1] = x1 * c - x0 * sn;
            }
        const std::vector<double> got = to_double(gather(g_wide, W, col));
        EXPECT_EQ(non_finite(got), 0) << name;
        const double e = rel_err(got, want);
        EXPECT_LE(e, 8e-3) << name;  // two bf16 roundings (2^-8 each) against one
        std::printf("[ flash layouts ] %s %s: %s rel err %.2e against the contiguous kernel\n", s.str().c_str(),
                    rope ? "rope" : "plain", name, e);
      }
      // Spare columns untouched.
      size_t spare_o = 0, spare_g = 0;
      for (size_t r = 0; r < N; ++r) {
        for (int c = C; c < Wo; ++c) spare_o += o_wide[r * Wo + c] != 0xFFFFu;
        for (int c = 3 * C; c < W; ++c) spare_g += g_wide[r * W + c] != 0xFFFFu;
      }
      EXPECT_EQ(spare_o, 0u) << "the forward wrote outside o's columns";
      EXPECT_EQ(spare_g, 0u) << "the backward wrote outside dq | dk | dv's columns";
    }
  }
  // Strides that break the 16-byte rows are refused.
  DevMem a(4096), l(4096);
  EXPECT_THROW(mta::cuda::flash_attn_forward(a.as<bf>(), a.as<bf>(), a.as<bf>(), a.as<bf>(), l.as<float>(), 1, 1, 4,
                                             64, mta::cuda::HeadLayout{256, 64, 68}, mta::cuda::contiguous_heads(1, 4, 64),
                                             0),
               std::invalid_argument);
}

// Invalid arguments are refused on the host, before any device work.
TEST(FlashAttnArgs, RejectsUnsupportedHeadDim) {
  EXPECT_THROW(mta::cuda::flash_attn_backward_scratch_bytes(1, 1, 16, 96), std::invalid_argument);
  EXPECT_THROW(mta::cuda::flash_attn_backward_scratch_bytes(1, 1, 0, 64), std::invalid_argument);
  EXPECT_THROW(mta::cuda::flash_attn_forward(nullptr, nullptr, nullptr, nullptr, nullptr, 1, 1, 16, 64, 0),
               std::invalid_argument);
}

}  // namespace
