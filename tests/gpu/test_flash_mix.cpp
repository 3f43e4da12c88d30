// GPU tests of the fused head-mixing kernels (attention/flash_mix.h) against the CPU reference
// mta::cpu::mta_forward / mta_backward<double> on the same bf16-rounded inputs (out, lse, and where
// the backward covers the group size dq, dk, dv and the mixing-weight gradients), for random specs (head_pre and / or
// head_post, every group size dividing H, H up to 16), random mixing matrices (identity plus noise),
// head dims 64 and 128, and T below, at and across the 16-row tile. Outputs start as NaN; every entry
// must be finite. lse is checked against a direct float64 evaluation of the mixed logits.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "attention/attn_files.h"
#include "attention/epilogue_cuda.h"
#include "attention/flash_mix.h"
#include "attention/init.h"
#include "attention/mta_cpu.h"
#include "gpu/gpu_test_util.h"

namespace {

using namespace gpu_test;  // NOLINT

constexpr double kTolOut = 2e-2;   // relative L2 error of out (bf16 inputs and A3, fp32 accumulation)
constexpr double kTolLse = 2e-2;   // max abs error of lse
constexpr double kTolGrad = 3e-2;  // relative L2 error of dq, dk, dv (bf16 operands of every product)
constexpr double kTolDm = 5e-2;    // relative L2 error of the mixing-weight gradients (sums over T^2 terms)

// Random mixing matrices [H/g][g][g]: identity plus noise, so the mixing matters and is well posed.
std::vector<float> mixing(int H, int g, std::mt19937& rng) {
  std::uniform_real_distribution<float> ud(-0.3f, 0.3f);
  std::vector<float> m(static_cast<size_t>(H) * g);
  for (int grp = 0; grp < H / g; ++grp)
    for (int x = 0; x < g; ++x)
      for (int y = 0; y < g; ++y) m[(static_cast<size_t>(grp) * g + x) * g + y] = (x == y ? 1.f : 0.f) + ud(rng);
  return m;
}

// lse of head h of batch b: log sum_{j<=i} exp(C'[i, j]), C' = Mpre-mixed S0 (S0 without head_pre).
std::vector<double> ref_lse(const std::vector<double>& q, const std::vector<double>& k, const std::vector<float>& mpre,
                            int gpre, int H, int T, int D, int b, int h) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  auto s0 = [&](int y, int i, int j) {
    double d = 0;
    const size_t qo = ((static_cast<size_t>(b) * H + y) * T + i) * D,
                 ko = ((static_cast<size_t>(b) * H + y) * T + j) * D;
    for (int e = 0; e < D; ++e) d += q[qo + e] * k[ko + e];
    return scale * d;
  };
  std::vector<double> lse(T);
  for (int i = 0; i < T; ++i) {
    std::vector<double> row(i + 1);
    double mx = -INFINITY;
    for (int j = 0; j <= i; ++j) {
      if (gpre) {
        const int grp = h / gpre, x = h % gpre;
        row[j] = 0;
        for (int y = 0; y < gpre; ++y)
          row[j] += mpre[(static_cast<size_t>(grp) * gpre + x) * gpre + y] * s0(grp * gpre + y, i, j);
      } else {
        row[j] = s0(h, i, j);
      }
      mx = std::max(mx, row[j]);
    }
    double sum = 0;
    for (double x : row) sum += std::exp(x - mx);
    lse[i] = mx + std::log(sum);
  }
  return lse;
}

struct Case {
  int B, H, T, D, gpre, gpost;  // g = 0: the option is off
  std::string str() const {
    return "(B=" + std::to_string(B) + " H=" + std::to_string(H) + " T=" + std::to_string(T) +
           " D=" + std::to_string(D) + " head_pre " + std::to_string(gpre) + " head_post " + std::to_string(gpost) +
           ")";
  }
};

void check_case(const Case& c, unsigned seed) {
  SCOPED_TRACE(c.str());
  mta::AttentionSpec spec;
  spec.heads = c.H, spec.head_dim = c.D;
  if (c.gpre) spec.head_pre = mta::HeadMix{c.gpre};
  if (c.gpost) spec.head_post = mta::HeadMix{c.gpost};
  ASSERT_TRUE(mta::cuda::flash_mix_supported(spec, c.D));
  std::mt19937 rng(seed);
  const size_t n = static_cast<size_t>(c.B) * c.H * c.T * c.D, rows = static_cast<size_t>(c.B) * c.H * c.T;
  const Tensor q = randn_bf16(n, rng), k = randn_bf16(n, rng), v = randn_bf16(n, rng);
  const std::vector<float> mpre = c.gpre ? mixing(c.H, c.gpre, rng) : std::vector<float>{};
  const std::vector<float> mpost = c.gpost ? mixing(c.H, c.gpost, rng) : std::vector<float>{};

  DevMem dq(n * 2), dk(n * 2), dv(n * 2), dout(n * 2), dlse(rows * 4), dpre(mpre.size() * 4 + 4),
      dpost(mpost.size() * 4 + 4);
  dq.upload(q.bits), dk.upload(k.bits), dv.upload(v.bits);
  if (c.gpre) dpre.upload(mpre);
  if (c.gpost) dpost.upload(mpost);
  dout.poison(), dlse.poison();
  using bf = __nv_bfloat16;
  mta::cuda::flash_mix_forward(spec, dq.as<bf>(), dk.as<bf>(), dv.as<bf>(), c.gpre ? dpre.as<float>() : nullptr,
                               c.gpost ? dpost.as<float>() : nullptr, dout.as<bf>(), dlse.as<float>(), c.B, c.T,
                               nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<double> out = to_double(dout.download<uint16_t>(n));
  const std::vector<float> lse = dlse.download<float>(rows);

  const std::vector<double> pre_d(mpre.begin(), mpre.end()), post_d(mpost.begin(), mpost.end());
  mta::AttnParams<double> p;
  p.head_pre = c.gpre ? pre_d.data() : nullptr;
  p.head_post = c.gpost ? post_d.data() : nullptr;
  std::vector<double> ref(n);
  mta::cpu::mta_forward<double>(spec, mta::AttnDims{c.B, c.H, c.T, c.D}, q.val.data(), k.val.data(), v.val.data(), p,
                                ref.data());
  EXPECT_EQ(non_finite(out), 0) << "out has non-finite (unwritten) entries";
  EXPECT_LE(rel_err(out, ref), kTolOut) << "out";
  double e_lse = 0;
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.H; ++h) {
      const std::vector<double> r = ref_lse(q.val, k.val, mpre, c.gpre, c.H, c.T, c.D, b, h);
      for (int i = 0; i < c.T; ++i) {
        const float got = lse[(static_cast<size_t>(b) * c.H + h) * c.T + i];
        e_lse = std::max(e_lse, std::isfinite(got) ? std::abs(got - r[i]) : INFINITY);
      }
    }
  EXPECT_LE(e_lse, kTolLse) << "lse";
  if (!mta::cuda::flash_mix_backward_supported(spec, c.D)) return;

  // Backward: every output poisoned; the weight gradients are added to, so they start at zero.
  const Tensor gout = randn_bf16(n, rng);
  DevMem ddo(n * 2), gq(n * 2), gk(n * 2), gv(n * 2), gpre(mpre.size() * 4 + 4), gpost(mpost.size() * 4 + 4);
  DevMem scratch(mta::cuda::flash_mix_backward_scratch_bytes(c.B, c.H, c.T, c.D));
  ddo.upload(gout.bits);
  gq.poison(), gk.poison(), gv.poison(), scratch.poison();
  CUDA_OK(cudaMemset(gpre.as<void>(), 0, mpre.size() * 4 + 4));
  CUDA_OK(cudaMemset(gpost.as<void>(), 0, mpost.size() * 4 + 4));
  mta::cuda::flash_mix_backward(spec, dq.as<bf>(), dk.as<bf>(), dv.as<bf>(), c.gpre ? dpre.as<float>() : nullptr,
                                c.gpost ? dpost.as<float>() : nullptr, ddo.as<bf>(), dlse.as<float>(), gq.as<bf>(),
                                gk.as<bf>(), gv.as<bf>(), c.gpre ? gpre.as<float>() : nullptr,
                                c.gpost ? gpost.as<float>() : nullptr, scratch.as<void>(), c.B, c.T, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<double> rq(n), rk(n), rv(n), rpre(mpre.size(), 0.0), rpost(mpost.size(), 0.0);
  mta::AttnParamGrads<double> pg;
  pg.head_pre = c.gpre ? rpre.data() : nullptr;
  pg.head_post = c.gpost ? rpost.data() : nullptr;
  mta::cpu::mta_backward<double>(spec, mta::AttnDims{c.B, c.H, c.T, c.D}, q.val.data(), k.val.data(), v.val.data(), p,
                                 gout.val.data(), rq.data(), rk.data(), rv.data(), pg);
  const std::vector<double> g_q = to_double(gq.download<uint16_t>(n)), g_k = to_double(gk.download<uint16_t>(n)),
                            g_v = to_double(gv.download<uint16_t>(n));
  for (const auto& [name, got] : {std::pair{"dq", &g_q}, {"dk", &g_k}, {"dv", &g_v}})
    EXPECT_EQ(non_finite(*got), 0) << name << " has non-finite (unwritten) entries";
  EXPECT_LE(rel_err(g_q, rq), kTolGrad) << "dq";
  EXPECT_LE(rel_err(g_k, rk), kTolGrad) << "dk";
  EXPECT_LE(rel_err(g_v, rv), kTolGrad) << "dv";
  if (c.gpre) {
    const std::vector<float> f = gpre.download<float>(mpre.size());
    EXPECT_LE(rel_err(std::vector<double>(f.begin(), f.end()), rpre), kTolDm) << "d head_pre";
  }
  if (c.gpost) {
    const std::vector<float> f = gpost.download<float>(mpost.size());
    EXPECT_LE(rel_err(std::vector<double>(f.begin(), f.end()), rpost), kTolDm) << "d head_post";
  }
}

TEST(FlashMix, PaperGroups) {
  SKIP_WITHOUT_GPU();
  check_case(Case{2, 16, 200, 64, 16, 16}, 1);  // the paper LM's mixing, both sides
  check_case(Case{2, 8, 150, 64, 8, 8}, 6);     // the 35M LM configs' mixing
  check_case(Case{1, 8, 129, 128, 8, 8}, 2);    // the largest group at D = 128
  check_case(Case{2, 8, 64, 64, 8, 0}, 3);      // before the softmax only
  check_case(Case{1, 8, 33, 64, 0, 8}, 4);      // after the softmax only
  check_case(Case{1, 4, 1, 64, 2, 4}, 5);       // T = 1, different groups before and after
  // Groups of up to 8 at D = 64 take two query blocks per step in the main backward pass (session 12);
  // the one-block kernel they ran before, kept for comparisons, must stay right too.
  setenv("MTA_FLASH_MIX_TWO_BLOCKS", "0", 1);
  check_case(Case{2, 8, 150, 64, 8, 8}, 6);
  check_case(Case{1, 4, 47, 64, 2, 4}, 7);
  unsetenv("MTA_FLASH_MIX_TWO_BLOCKS");
}

// Groups of 9-16 heads at D = 128 run on clusters of 2 or 3 CTAs that exchange the mixing inputs
// through distributed shared memory (group_cluster.cuh); each CTA sums the weight gradients' terms over
// its share of the tile rows. MTA_FLASH_MIX_CLUSTER=1 puts D = 64 groups of 10-16 on pairs too (read
// per launch).
TEST(FlashMix, ClusterGroups) {
  SKIP_WITHOUT_GPU();
  check_case(Case{2, 16, 200, 128, 16, 16}, 21);  // the paper LM's mixing at D = 128, both sides
  check_case(Case{1, 12, 77, 128, 12, 6}, 22);     // 12 heads, a post group of 6 inside the cluster
  check_case(Case{1, 16, 33, 128, 0, 16}, 23);     // after the softmax only
  check_case(Case{2, 10, 1, 128, 10, 0}, 24);      // T = 1, before the softmax only
  // Odd groups: 2 CTAs, the second with one padding warp (session 11).
  check_case(Case{1, 9, 70, 128, 9, 3}, 27);    // 5 + 4 heads
  check_case(Case{2, 15, 33, 128, 5, 15}, 28);  // 8 + 7
  check_case(Case{2, 11, 50, 128, 11, 11}, 29);  // 6 + 5
  check_case(Case{1, 13, 97, 128, 13, 13}, 30);  // 7 + 6
  check_case(Case{2, 13, 17, 128, 0, 13}, 31);   // after the softmax only
  setenv("MTA_FLASH_MIX_CLUSTER", "1", 1);
  check_case(Case{2, 16, 150, 64, 16, 16}, 25);
  check_case(Case{1, 12, 40, 64, 4, 12}, 26);
  check_case(Case{1, 11, 40, 64, 11, 11}, 32);  // padding at D = 64 too
  unsetenv("MTA_FLASH_MIX_CLUSTER");
}

TEST(FlashMix, RandomSpecs) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(77);
  const int Ts[] = {1, 5, 15, 16, 17, 31, 48, 100, 257};
  for (int trial = 0; trial < 20; ++trial) {
    Case c;
    c.D = trial % 3 == 2 ? 128 : 64;
    const std::vector<int> hs = c.D == 64 ? std::vector<int>{1, 2, 4, 8, 16} : std::vector<int>{1, 2, 4, 8};
    c.H = hs[rng() % hs.size()];
    auto divisor = [&]() {
      int g;
      do g = 1 + static_cast<int>(rng() % c.H);
      while (c.H % g != 0);
      return g;
    };
    c.gpre = rng() % 3 ? divisor() : 0;
    c.gpost = c.gpre == 0 || rng() % 3 ? divisor() : 0;
    c.B = 1 + static_cast<int>(rng() % 2);
    c.T = Ts[rng() % (sizeof(Ts) / sizeof(Ts[0]))];
    check_case(c, 300u + static_cast<unsigned>(trial));
  }
}

TEST(FlashMix, CoverageAndRefusals) {
  mta::AttentionSpec s;
  s.heads = 16, s.head_dim = 64;
  s.head_pre = mta::HeadMix{16};
  EXPECT_TRUE(mta::cuda::flash_mix_supported(s, 64));
  EXPECT_TRUE(mta::cuda::flash_mix_backward_supported(s, 64));
  s.head_dim = 128;
  EXPECT_TRUE(mta::cuda::flash_mix_supported(s, 128));  // 16 heads at D = 128: a cluster of two CTAs
  for (int g = 9; g <= 16; ++g) {  // a pair of CTAs; odd groups with one padding warp
    s.heads = g, s.head_pre = mta::HeadMix{g};
    EXPECT_TRUE(mta::cuda::flash_mix_supported(s, 128)) << g;
  }
  s.heads = 18, s.head_pre = mta::HeadMix{18};
  EXPECT_FALSE(mta::cuda::flash_mix_supported(s, 128));  // MixIn holds 16 heads
  s.heads = 9, s.head_pre = mta::HeadMix{9};
  s.head_dim = 64;
  EXPECT_TRUE(mta::cuda::flash_mix_supported(s, 64));  // one CTA of 9 warps
  s.head_dim = 128;
  s.heads = 8, s.head_pre = mta::HeadMix{8};
  EXPECT_TRUE(mta::cuda::flash_mix_supported(s, 128));
  EXPECT_TRUE(mta::cuda::flash_mix_backward_supported(s, 128));
  s.gate = true;
  EXPECT_FALSE(mta::cuda::flash_mix_supported(s, 128));
  s.gate = false;
  s.kq_pre = mta::KqConv{2, 3, mta::PadKey::Both};
  EXPECT_FALSE(mta::cuda::flash_mix_supported(s, 128));
  mta::AttentionSpec plain;
  plain.heads = 4, plain.head_dim = 64;
  EXPECT_FALSE(mta::cuda::flash_mix_supported(plain, 64));  // standard attention: flash_attn
  EXPECT_THROW(
      mta::cuda::flash_mix_forward(s, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, 8, nullptr),
      std::invalid_argument);
}

// What `mta attn --device cuda` runs for F32 input of specs the fused core covers once the epilogue is
// split off (run_attention_tensors): head mixing with norm, depth scaling and gate, and kq_pre with
// norm and gate -- the fused core plus the epilogue kernels -- against the float64 CPU op.
void check_attn_command(const mta::AttentionSpec& spec, unsigned seed, int T = 45) {
  SCOPED_TRACE(mta::spec_to_json(spec).dump());
  std::mt19937 rng(seed);
  const int B = 2;
  const std::vector<int64_t> shape{B, spec.heads, T, spec.head_dim};
  const size_t n = static_cast<size_t>(B) * spec.heads * T * spec.head_dim;
  mta::io::SafeTensors in32, in64;
  for (const char* name : {"q", "k", "v", "dout"}) {
    const std::vector<double> val = randn_bf16(n, rng).val;  // bf16-exact: the fused path's rounding is exact
    const std::vector<float> f(val.begin(), val.end());
    in32.tensors[name] = mta::io::make_tensor(shape, f.data());
    in64.tensors[name] = mta::io::make_tensor(shape, val.data());
  }
  std::uniform_real_distribution<double> ud(-0.2, 0.2);
  for (const auto& info : mta::attention_params(spec)) {
    size_t cnt = 1;
    for (auto d : info.shape) cnt *= static_cast<size_t>(d);
    std::vector<double> x(cnt);
    std::vector<float> init(cnt);
    mta::init_attention_param_identity(spec, info, init.data());
    for (size_t i = 0; i < cnt; ++i) x[i] = init[i] + ud(rng);
    const std::vector<float> f(x.begin(), x.end());
    const std::vector<int64_t> shp(info.shape.begin(), info.shape.end());
    in32.tensors[info.name] = mta::io::make_tensor(shp, f.data());
    in64.tensors[info.name] = mta::io::make_tensor(shp, x.data());
  }
  const auto ref = mta::run_attention_tensors(spec, in64, mta::Device::Cpu);
  const auto got = mta::run_attention_tensors(spec, in32, mta::Device::Cuda);
  EXPECT_EQ(got.metadata.at("impl"), "fused");
  for (const auto& [name, t] : ref.tensors) {
    SCOPED_TRACE(name);
    const double tol = name == "out" ? kTolOut : name.rfind("grad_", 0) == 0 && t.shape.size() == 4 ? kTolGrad : kTolDm;
    EXPECT_LE(rel_err(mta::io::to_f64(got.at(name), name), mta::io::to_f64(t, name)), tol);
  }
}

TEST(FlashMix, AttnCommandWithEpilogue) {
  SKIP_WITHOUT_GPU();
  mta::AttentionSpec mix;
  mix.heads = 4, mix.head_dim = 64;
  mix.head_pre = mta::HeadMix{4}, mix.head_post = mta::HeadMix{2};
  mix.norm = true, mix.depth_scale_layer = 3, mix.gate = true;
  check_attn_command(mix, 11);
  mta::AttentionSpec kq;
  kq.heads = 2, kq.head_dim = 128;
  kq.kq_pre = mta::KqConv{3, 5, mta::PadKey::Both};
  kq.norm = true, kq.gate = true;
  check_attn_command(kq, 12);
}

// The epilogue's backward holds a row's values in registers (8 per lane): rows longer than 256 are
// refused with a clear error before any device work, and so are missing gradient buffers.
TEST(FlashMix, EpilogueBackwardRefusals) {
  mta::AttentionSpec spec;
  spec.heads = 2, spec.head_dim = 300;
  spec.norm = true;
  const std::vector<float> ones(300, 1.f);
  float grad[300];
  EXPECT_THROW(mta::cuda::attn_epilogue_backward(spec, nullptr, nullptr, ones.data(), nullptr, nullptr, nullptr, grad,
                                                 nullptr, nullptr, nullptr, 4, 300, nullptr),
               std::invalid_argument);
  EXPECT_THROW(mta::cuda::attn_epilogue_backward(spec, nullptr, nullptr, ones.data(), nullptr, nullptr, nullptr,
                                                 nullptr, nullptr, nullptr, nullptr, 4, 64, nullptr),
               std::invalid_argument);  // norm on, its gradient buffer missing
}

// The epilogue's backward sums its parameter gradients per block of rows (epilogue_cuda.cu): with more
// rows than the 264 blocks x 8 warps, every warp takes several rows; D = 128 gives each lane 4 values.
TEST(FlashMix, AttnCommandEpilogueManyRows) {
  SKIP_WITHOUT_GPU();
  mta::AttentionSpec mix;
  mix.heads = 8, mix.head_dim = 128;
  mix.head_pre = mta::HeadMix{8}, mix.head_post = mta::HeadMix{4};
  mix.norm = true, mix.depth_scale_layer = 1, mix.gate = true;
  check_attn_command(mix, 13, 301);  // 2 x 8 x 301 = 4,816 rows
}

}  // namespace
