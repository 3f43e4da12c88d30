// GPU tests of the fused kq layer (attention/flash_kq_layer.h). Pass 1: lse of C' = mix_pre(conv_pre(S0))
// against a float64 reference written here from docs/mta-semantics.md steps 1-4 (its own loops, on the
// same bf16-rounded q and k). The forward (passes 1 and 2): o against the CPU op in float64
// (mta::cpu::mta_forward), with kq_post and head_post. For the paper's kq layer (6 x 11 both, all heads
// mixed), the toy's 2 x 9, and random sizes, pads and groups (the runtime-size convolutions), at D = 64
// and 128, with T below, at and past the 16-row tile and rows whose convolutions reach before the
// sequence start. Every output starts as NaN and must be written. Labelled "gpu"; skipped without a
// device.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "attention/attn_files.h"
#include "attention/epilogue_cuda.h"
#include "attention/flash_kq_layer.h"
#include "attention/fused_attention.h"
#include "attention/mta_cpu.h"
#include "gpu/gpu_test_util.h"
#include "util/error.h"

namespace {

using namespace gpu_test;  // NOLINT

struct Case {
  int B, H, T, D, cq, ck;
  mta::PadKey pad;
  int gpre;  // 0: no head_pre
  int gpost;  // only widens the coupled group (pass 1 does not use Mpost)
  std::string str() const {
    return "B=" + std::to_string(B) + " H=" + std::to_string(H) + " T=" + std::to_string(T) + " D=" +
           std::to_string(D) + " kq_pre " + std::to_string(cq) + "x" + std::to_string(ck) + " pad " +
           std::to_string(static_cast<int>(pad)) + " head_pre " + std::to_string(gpre) + " head_post " +
           std::to_string(gpost);
  }
};

mta::AttentionSpec spec_of(const Case& c) {
  mta::AttentionSpec s;
  s.heads = c.H, s.head_dim = c.D;
  s.kq_pre = mta::KqConv{c.cq, c.ck, c.pad};
  if (c.gpre) s.head_pre = mta::HeadMix{c.gpre};
  if (c.gpost) s.head_post = mta::HeadMix{c.gpost};
  return s;
}

// lse[b, h, i] in float64 from the semantics page: S0 (future -> 0), the convolution with zero padding,
// the head_pre mix over h's group, the future -> -inf, the log-sum-exp.
std::vector<double> reference_lse(const Case& c, const mta::AttentionSpec& spec, const std::vector<double>& q,
                                  const std::vector<double>& k, const std::vector<double>& w,
                                  const std::vector<double>& m) {
  const int B = c.B, H = c.H, T = c.T, D = c.D, o = spec.kq_pre->key_offset();
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> lse(static_cast<size_t>(B) * H * T);
  for (int b = 0; b < B; ++b) {
    std::vector<std::vector<double>> C(H, std::vector<double>(static_cast<size_t>(T) * T, 0.0));
    for (int h = 0; h < H; ++h) {
      const size_t base = (static_cast<size_t>(b) * H + h) * T * D;
      std::vector<double> s0(static_cast<size_t>(T) * T, 0.0);
      for (int i = 0; i < T; ++i)
        for (int j = 0; j <= i; ++j) {
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += q[base + static_cast<size_t>(i) * D + d] * k[base + static_cast<size_t>(j) * D + d];
          s0[static_cast<size_t>(i) * T + j] = scale * dot;
        }
      for (int i = 0; i < T; ++i)
        for (int j = 0; j <= i; ++j) {
          double acc = 0;
          for (int a = 0; a < c.cq; ++a)
            for (int cc = 0; cc < c.ck; ++cc) {
              const int ii = i - (c.cq - 1) + a, jj = j - o + cc;
              if (ii >= 0 && jj >= 0 && jj < T)
                acc += w[(static_cast<size_t>(h) * c.cq + a) * c.ck + cc] * s0[static_cast<size_t>(ii) * T + jj];
            }
          C[h][static_cast<size_t>(i) * T + j] = acc;
        }
    }
    for (int x = 0; x < H; ++x)
      for (int i = 0; i < T; ++i) {
        std::vector<double> row(i + 1);
        double mx = -INFINITY;
        for (int j = 0; j <= i; ++j) {
          double v = C[x][static_cast<size_t>(i) * T + j];
          if (c.gpre) {
            const int g = c.gpre, grp = x / g;
            v = 0;
            for (int y = 0; y < g; ++y)
              v += m[(static_cast<size_t>(grp) * g + x % g) * g + y] * C[grp * g + y][static_cast<size_t>(i) * T + j];
          }
          row[j] = v;
          mx = std::max(mx, v);
        }
        double sum = 0;
        for (int j = 0; j <= i; ++j) sum += std::exp(row[j] - mx);
        lse[(static_cast<size_t>(b) * H + x) * T + i] = mx + std::log(sum);
      }
  }
  return lse;
}

void check_case(const Case& c, unsigned seed) {
  SCOPED_TRACE(c.str());
  const mta::AttentionSpec spec = spec_of(c);
  ASSERT_TRUE(mta::cuda::flash_kq_layer_lse_supported(spec, c.D));
  std::mt19937 rng(seed);
  const size_t n = static_cast<size_t>(c.B) * c.H * c.T * c.D, rows = static_cast<size_t>(c.B) * c.H * c.T;
  const Tensor q = randn_bf16(n, rng), k = randn_bf16(n, rng);
  // Identity plus noise (the paper's initialisation, moved), for the kernels and the mixing.
  std::uniform_real_distribution<double> ud(-0.5, 0.5);
  const int o = spec.kq_pre->key_offset();
  std::vector<double> w(static_cast<size_t>(c.H) * c.cq * c.ck);
  for (auto& x : w) x = ud(rng);
  for (int h = 0; h < c.H; ++h) w[(static_cast<size_t>(h) * c.cq + c.cq - 1) * c.ck + o] += 1.0;
  std::vector<double> m;
  if (c.gpre) {
    m.resize(static_cast<size_t>(c.H) * c.gpre);
    for (auto& x : m) x = ud(rng);
    for (int grp = 0; grp < c.H / c.gpre; ++grp)
      for (int x = 0; x < c.gpre; ++x) m[(static_cast<size_t>(grp) * c.gpre + x) * c.gpre + x] += 1.0;
  }
  const std::vector<float> wf(w.begin(), w.end()), mf(m.begin(), m.end());

  DevMem dq(n * 2), dk(n * 2), dw(wf.size() * 4), dm(std::max<size_t>(mf.size(), 1) * 4), dlse(rows * 4);
  dq.upload(q.bits), dk.upload(k.bits), dw.upload(wf);
  if (!mf.empty()) dm.upload(mf);
  dlse.poison();
  using bf = __nv_bfloat16;
  mta::cuda::flash_kq_layer_lse(spec, dq.as<bf>(), dk.as<bf>(), dw.as<float>(), c.gpre ? dm.as<float>() : nullptr,
                                dlse.as<float>(), c.B, c.T, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<float> got = dlse.download<float>(rows);
  const std::vector<double> want = reference_lse(c, spec, q.val, k.val, w, m);
  double err = 0;
  size_t bad = 0;
  for (size_t i = 0; i < rows; ++i) {
    if (!std::isfinite(got[i])) {
      ++bad;
      continue;
    }
    err = std::max(err, std::fabs(got[i] - want[i]));
  }
  EXPECT_EQ(bad, 0u) << "lse entries not finite (unwritten or overflowed)";
  EXPECT_LE(err, 2e-3) << "max |lse - reference|";
  std::printf("[ kq layer pass 1 ] %s: max |lse error| %.2e\n", c.str().c_str(), err);
}

// The layer's parameters, identity plus noise (kq_pre, kq_post, head_pre, head_post in that order of
// draws; empty when disabled).
// A float32 device copy of x (at least 4 bytes, so that an empty x still has a valid pointer).
std::unique_ptr<DevMem> upload_f32(const std::vector<double>& x) {
  auto d = std::make_unique<DevMem>(std::max<size_t>(x.size(), 1) * 4);
  if (!x.empty()) d->upload(std::vector<float>(x.begin(), x.end()));
  return d;
}

struct LayerParams {
  std::vector<double> wpre, wpost, mpre, mpost;
};
LayerParams random_layer_params(const mta::AttentionSpec& spec, int H, std::mt19937& rng) {
  std::uniform_real_distribution<double> ud(-0.5, 0.5);
  auto kernel = [&](const mta::KqConv& kc) {
    std::vector<double> w(static_cast<size_t>(H) * kc.q * kc.k);
    for (auto& x : w) x = ud(rng);
    for (int h = 0; h < H; ++h) w[(static_cast<size_t>(h) * kc.q + kc.q - 1) * kc.k + kc.key_offset()] += 1.0;
    return w;
  };
  auto mix = [&](int g) {
    std::vector<double> m(static_cast<size_t>(H) * g);
    for (auto& x : m) x = 0.3 * ud(rng);
    for (int grp = 0; grp < H / g; ++grp)
      for (int x = 0; x < g; ++x) m[(static_cast<size_t>(grp) * g + x) * g + x] += 1.0;
    return m;
  };
  LayerParams p;
  if (spec.kq_pre) p.wpre = kernel(*spec.kq_pre);
  if (spec.kq_post) p.wpost = kernel(*spec.kq_post);
  if (spec.head_pre) p.mpre = mix(spec.head_pre->group);
  if (spec.head_post) p.mpost = mix(spec.head_post->group);
  return p;
}

// The forward: o (and lse) for a spec with kq_pre, optional head_pre, kq_post and head_post.
struct FwdCase {
  Case c;
  int cq2, ck2;  // kq_post (0: none)
  mta::PadKey pad2;
};

// The forward's spec: spec_of(c) with kq_post when cq2 > 0.
mta::AttentionSpec spec_of(const FwdCase& f) {
  mta::AttentionSpec s = spec_of(f.c);
  if (f.cq2) s.kq_post = mta::KqConv{f.cq2, f.ck2, f.pad2};
  return s;
}

void check_forward(const FwdCase& f, unsigned seed) {
  const Case& c = f.c;
  SCOPED_TRACE(c.str() + " kq_post " + std::to_string(f.cq2) + "x" + std::to_string(f.ck2));
  const mta::AttentionSpec spec = spec_of(f);
  ASSERT_TRUE(mta::cuda::flash_kq_layer_forward_supported(spec, c.D));
  std::mt19937 rng(seed);
  const size_t n = static_cast<size_t>(c.B) * c.H * c.T * c.D, rows = static_cast<size_t>(c.B) * c.H * c.T;
  const Tensor q = randn_bf16(n, rng), k = randn_bf16(n, rng), v = randn_bf16(n, rng);
  const LayerParams lp = random_layer_params(spec, c.H, rng);
  const std::vector<double>&wpre = lp.wpre, &wpost = lp.wpost, &mpre = lp.mpre, &mpost = lp.mpost;
  const auto dwpre = upload_f32(wpre), dwpost = upload_f32(wpost), dmpre = upload_f32(mpre), dmpost = upload_f32(mpost);
  DevMem dq(n * 2), dk(n * 2), dv(n * 2), dout(n * 2), dlse(rows * 4);
  dq.upload(q.bits), dk.upload(k.bits), dv.upload(v.bits);
  dout.poison(), dlse.poison();
  using bf = __nv_bfloat16;
  mta::cuda::flash_kq_layer_forward(spec, dq.as<bf>(), dk.as<bf>(), dv.as<bf>(), dwpre->as<float>(),
                                    c.gpre ? dmpre->as<float>() : nullptr,
                                    spec.kq_post ? dwpost->as<float>() : nullptr,
                                    c.gpost ? dmpost->as<float>() : nullptr, dout.as<bf>(), dlse.as<float>(), c.B,
                                    c.T, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<double> got = to_double(dout.download<uint16_t>(n));
  mta::AttnParams<double> p;
  p.kq_pre = wpre.data();
  if (c.gpre) p.head_pre = mpre.data();
  if (spec.kq_post) p.kq_post = wpost.data();
  if (c.gpost) p.head_post = mpost.data();
  std::vector<double> want(n);
  mta::cpu::mta_forward<double>(spec, mta::AttnDims{c.B, c.H, c.T, c.D}, q.val.data(), k.val.data(), v.val.data(), p,
                                want.data());
  EXPECT_EQ(non_finite(got), 0) << "o has non-finite (unwritten) entries";
  const double e = rel_err(got, want);
  EXPECT_LE(e, 2e-2) << "o";
  const std::vector<float> lse = dlse.download<float>(rows);
  const std::vector<double> lse_want = reference_lse(c, spec, q.val, k.val, wpre, mpre);
  double e_lse = 0;
  for (size_t i = 0; i < rows; ++i)
    e_lse = std::max(e_lse, std::isfinite(lse[i]) ? std::fabs(lse[i] - lse_want[i]) : INFINITY);
  EXPECT_LE(e_lse, 2e-3) << "lse";
  std::printf("[ kq layer forward ] %s: o rel err %.2e, lse max err %.2e\n", c.str().c_str(), e, e_lse);
}

TEST(FlashKqLayer, PaperLayerForward) {
  SKIP_WITHOUT_GPU();
  check_forward(FwdCase{Case{2, 8, 77, 64, 6, 11, mta::PadKey::Both, 8, 8}, 6, 11, mta::PadKey::Both}, 11u);
  check_forward(FwdCase{Case{1, 8, 130, 128, 6, 11, mta::PadKey::Both, 8, 8}, 6, 11, mta::PadKey::Both}, 12u);
  check_forward(FwdCase{Case{1, 4, 1, 64, 6, 11, mta::PadKey::Both, 4, 4}, 6, 11, mta::PadKey::Both}, 13u);
  // 16 and 12 coupled heads (the paper LM's, and the 125M config's): a cluster of two CTAs per group.
  check_forward(FwdCase{Case{2, 16, 77, 64, 6, 11, mta::PadKey::Both, 16, 16}, 6, 11, mta::PadKey::Both}, 14u);
  check_forward(FwdCase{Case{1, 12, 40, 64, 3, 5, mta::PadKey::Left, 12, 6}, 2, 3, mta::PadKey::Right}, 15u);
  // At D = 128 both passes of 10-16 heads run on clusters (pass 1 too: one CTA holds 8 heads there).
  check_forward(FwdCase{Case{1, 16, 77, 128, 6, 11, mta::PadKey::Both, 16, 16}, 6, 11, mta::PadKey::Both}, 16u);
  check_forward(FwdCase{Case{2, 10, 33, 128, 2, 7, mta::PadKey::Right, 10, 5}, 3, 4, mta::PadKey::Left}, 17u);
  // Groups the CTAs do not split evenly (session 11): pass 2 (8 heads per CTA) on 2 CTAs with a
  // padding warp; at D = 128 pass 1 too.
  check_forward(FwdCase{Case{1, 11, 45, 64, 6, 11, mta::PadKey::Both, 11, 11}, 6, 11, mta::PadKey::Both}, 18u);
  check_forward(FwdCase{Case{2, 13, 30, 128, 3, 5, mta::PadKey::Left, 13, 13}, 2, 3, mta::PadKey::Right}, 19u);
}

// A random convolution: cq in 1..8, any pad, ck in 1..15 (odd with pad both).
void random_conv(std::mt19937& rng, int& cq, int& ck, mta::PadKey& pad) {
  const mta::PadKey pads[] = {mta::PadKey::Left, mta::PadKey::Right, mta::PadKey::Both};
  cq = 1 + static_cast<int>(rng() % 8);
  pad = pads[rng() % 3];
  ck = 1 + static_cast<int>(rng() % 15);
  if (pad == mta::PadKey::Both && ck % 2 == 0) ck += 1;
}

// Runtime sizes of both convolutions, every pad mode, with and without each mix, without kq_post.
TEST(FlashKqLayer, RandomForward) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(77);
  for (int it = 0; it < 8; ++it) {
    FwdCase f;
    Case& c = f.c;
    c.B = 1 + static_cast<int>(rng() % 2);
    c.D = rng() % 2 ? 64 : 128;
    c.H = 4;
    c.T = 1 + static_cast<int>(rng() % 60);
    random_conv(rng, c.cq, c.ck, c.pad);
    if (it % 4 != 3) random_conv(rng, f.cq2, f.ck2, f.pad2);
    else f.cq2 = 0, f.ck2 = 0, f.pad2 = mta::PadKey::Both;
    const int groups[] = {0, 1, 2, 4};
    c.gpre = groups[rng() % 4];
    c.gpost = groups[rng() % 4];
    check_forward(f, 200u + it);
  }
}

// A random layer for the backward checks (draws in the order the checks always took them): B 1..2,
// H = 4, D = 64, T 1..70, random convolutions (no kq_post every third case), groups 0, 1, 2 or 4.
FwdCase random_backward_case(std::mt19937& rng, int it) {
  FwdCase f;
  Case& c = f.c;
  c.B = 1 + static_cast<int>(rng() % 2), c.D = 64, c.H = 4, c.T = 1 + static_cast<int>(rng() % 70);
  random_conv(rng, c.cq, c.ck, c.pad);
  if (it % 3 != 2)
    random_conv(rng, f.cq2, f.ck2, f.pad2);
  else
    f.cq2 = 0, f.ck2 = 0, f.pad2 = mta::PadKey::Both;
  const int groups[] = {0, 1, 2, 4};
  c.gpre = groups[rng() % 4];
  c.gpost = groups[rng() % 4];
  return f;
}

// A random layer at D = 128 for the backward checks (4 heads per CTA there): B 1..2, H 4, 8 or 12, T
// 1..70, random convolutions (no kq_post every third case), groups dividing H (those over 4 heads take
// a cluster of 2 or 3 CTAs).
FwdCase random_wide_case(std::mt19937& rng, int it) {
  FwdCase f;
  Case& c = f.c;
  const int heads[] = {4, 8, 12};
  c.B = 1 + static_cast<int>(rng() % 2), c.D = 128, c.H = heads[rng() % 3], c.T = 1 + static_cast<int>(rng() % 70);
  random_conv(rng, c.cq, c.ck, c.pad);
  if (it % 3 != 2)
    random_conv(rng, f.cq2, f.ck2, f.pad2);
  else
    f.cq2 = 0, f.ck2 = 0, f.pad2 = mta::PadKey::Both;
  std::vector<int> groups{0};
  for (int g = 1; g <= c.H; ++g)
    if (c.H % g == 0) groups.push_back(g);
  c.gpre = groups[rng() % groups.size()];
  c.gpost = groups[rng() % groups.size()];
  return f;
}

// The backward's delta (kernel P's by-product, flash_kq_layer.h): delta_x[i] = sum_j A_x[i, j] dA_x[i, j] in
// float64 from the semantics, with dA3 = dO V^T, dA2 = the future set to 0 in the head_post^T mix of dA3,
// dA = the transposed kq_post convolution of dA2 (tests/oracle/replay_kq_layer_backward.py replays how
// kernel P gets it from its weight-gradient terms, on the CPU).
std::vector<double> reference_delta(const FwdCase& f, const mta::AttentionSpec& spec, const std::vector<double>& q,
                                    const std::vector<double>& k, const std::vector<double>& v,
                                    const std::vector<double>& dout, const std::vector<double>& lse,
                                    const std::vector<double>& wpre, const std::vector<double>& mpre,
                                    const std::vector<double>& wpost, const std::vector<double>& mpost) {
  const Case& c = f.c;
  const int B = c.B, H = c.H, T = c.T, D = c.D, o1 = spec.kq_pre->key_offset();
  const int cq2 = f.cq2 ? f.cq2 : 1, ck2 = f.cq2 ? f.ck2 : 1, o2 = f.cq2 ? spec.kq_post->key_offset() : 0;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const size_t TT = static_cast<size_t>(T) * T;
  auto at = [&](int b, int h, int i) { return (static_cast<size_t>(b) * H + h) * T + i; };
  std::vector<double> delta(static_cast<size_t>(B) * H * T);
  for (int b = 0; b < B; ++b) {
    std::vector<std::vector<double>> C(H, std::vector<double>(TT, 0.0)), d3(H, std::vector<double>(TT, 0.0));
    for (int h = 0; h < H; ++h) {
      std::vector<double> s0(TT, 0.0);
      for (int i = 0; i < T; ++i)
        for (int j = 0; j < T; ++j) {
          double qk = 0, ov = 0;
          for (int d = 0; d < D; ++d) {
            qk += q[at(b, h, i) * D + d] * k[at(b, h, j) * D + d];
            ov += dout[at(b, h, i) * D + d] * v[at(b, h, j) * D + d];
          }
          if (j <= i) s0[static_cast<size_t>(i) * T + j] = scale * qk;
          d3[h][static_cast<size_t>(i) * T + j] = ov;
        }
      for (int i = 0; i < T; ++i)
        for (int j = 0; j <= i; ++j) {
          double acc = 0;
          for (int a = 0; a < c.cq; ++a)
            for (int cc = 0; cc < c.ck; ++cc) {
              const int ii = i - (c.cq - 1) + a, jj = j - o1 + cc;
              if (ii >= 0 && jj >= 0 && jj < T)
                acc += wpre[(static_cast<size_t>(h) * c.cq + a) * c.ck + cc] * s0[static_cast<size_t>(ii) * T + jj];
            }
          C[h][static_cast<size_t>(i) * T + j] = acc;
        }
    }
    for (int x = 0; x < H; ++x) {
      // A_x from C' (the head_pre mix) and lse; dA2_x from the head_post^T mix of dA3, the future at 0.
      std::vector<double> A(TT, 0.0), dA2(TT, 0.0);
      for (int i = 0; i < T; ++i)
        for (int j = 0; j <= i; ++j) {
          double cm = C[x][static_cast<size_t>(i) * T + j], d2 = d3[x][static_cast<size_t>(i) * T + j];
          if (c.gpre) {
            const int g = c.gpre, grp = x / g;
            cm = 0;
            for (int y = 0; y < g; ++y)
              cm += mpre[(static_cast<size_t>(grp) * g + x % g) * g + y] * C[grp * g + y][static_cast<size_t>(i) * T + j];
          }
          if (c.gpost) {
            const int g = c.gpost, grp = x / g;
            d2 = 0;
            for (int y = 0; y < g; ++y)
              d2 += mpost[(static_cast<size_t>(grp) * g + y) * g + x % g] * d3[grp * g + y][static_cast<size_t>(i) * T + j];
          }
          A[static_cast<size_t>(i) * T + j] = std::exp(cm - lse[at(b, x, i)]);
          dA2[static_cast<size_t>(i) * T + j] = d2;
        }
      for (int i = 0; i < T; ++i) {
        double sum = 0;
        for (int j = 0; j <= i; ++j) {
          double da = 0;
          for (int a = 0; a < cq2; ++a)
            for (int cc = 0; cc < ck2; ++cc) {
              const int ii = i + cq2 - 1 - a, jj = j + o2 - cc;
              const double w = f.cq2 ? wpost[(static_cast<size_t>(x) * cq2 + a) * ck2 + cc] : 1.0;
              if (ii < T && jj >= 0 && jj < T) da += w * dA2[static_cast<size_t>(ii) * T + jj];
            }
          sum += A[static_cast<size_t>(i) * T + j] * da;
        }
        delta[at(b, x, i)] = sum;
      }
    }
  }
  return delta;
}


// The CPU op's backward in float64 (mta::cpu::mta_backward) of the layer core with lp's parameters:
// dq, dk, dv and the enabled parameters' gradients (empty when disabled).
struct RefGrads {
  std::vector<double> dq, dk, dv, wpre, mpre, wpost, mpost;
};
RefGrads reference_backward(const Case& c, const mta::AttentionSpec& spec, const Tensor& q, const Tensor& k,
                            const Tensor& v, const std::vector<double>& dout, const LayerParams& lp) {
  const size_t n = q.val.size();
  RefGrads r{std::vector<double>(n), std::vector<double>(n), std::vector<double>(n),
             std::vector<double>(lp.wpre.size()), std::vector<double>(lp.mpre.size()),
             std::vector<double>(lp.wpost.size()), std::vector<double>(lp.mpost.size())};
  mta::AttnParams<double> p;
  mta::AttnParamGrads<double> g;
  p.kq_pre = lp.wpre.data(), g.kq_pre = r.wpre.data();
  if (spec.head_pre) p.head_pre = lp.mpre.data(), g.head_pre = r.mpre.data();
  if (spec.kq_post) p.kq_post = lp.wpost.data(), g.kq_post = r.wpost.data();
  if (spec.head_post) p.head_post = lp.mpost.data(), g.head_post = r.mpost.data();
  mta::cpu::mta_backward<double>(spec, mta::AttnDims{c.B, c.H, c.T, c.D}, q.val.data(), k.val.data(), v.val.data(), p,
                                 dout.data(), r.dq.data(), r.dk.data(), r.dv.data(), g);
  return r;
}

// The main backward pass's post side (kernel P, flash_kq_layer_post_grads): dv, the kq_post and the
// head_post gradients against the CPU op's backward in float64 (mta::cpu::mta_backward) on the same
// bf16-rounded inputs; lse from the float64 reference. dv accumulates into a buffer that starts at 0;
// the parameter gradients are added to values that start at 1 (the API adds, as the model needs).
void check_post_grads(const FwdCase& f, unsigned seed, bool with_lo = false) {
  const Case& c = f.c;
  SCOPED_TRACE(c.str() + " kq_post " + std::to_string(f.cq2) + "x" + std::to_string(f.ck2) +
               (with_lo ? " with dout_lo" : ""));
  const mta::AttentionSpec spec = spec_of(f);
  ASSERT_TRUE(mta::cuda::flash_kq_layer_post_grads_supported(spec, c.D));
  std::mt19937 rng(seed);
  const size_t n = static_cast<size_t>(c.B) * c.H * c.T * c.D;
  const Tensor q = randn_bf16(n, rng), k = randn_bf16(n, rng), v = randn_bf16(n, rng), dO = randn_bf16(n, rng);
  // with_lo: dout = dO + dO_lo, dO_lo of the size of a bf16 rounding remainder (~2^-9 |dO|, as an
  // epilogue's fp32 gradient splits); the reference sees the sum. Ignoring dO_lo would leave the post
  // gradients ~2e-3 off, so with_lo holds them to 3e-4.
  Tensor dO_lo = randn_bf16(n, rng);
  std::vector<double> dO_ref = dO.val;
  for (size_t i = 0; i < n; ++i) {
    dO_lo.bits[i] = float_to_bf16_bits(static_cast<float>(std::ldexp(dO_lo.val[i], -9) * std::fabs(dO.val[i])));
    dO_lo.val[i] = bf16_bits_to_float(dO_lo.bits[i]);
    if (with_lo) dO_ref[i] += dO_lo.val[i];
  }
  const LayerParams lp = random_layer_params(spec, c.H, rng);
  const std::vector<double> lse = reference_lse(c, spec, q.val, k.val, lp.wpre, lp.mpre);
  const auto dwpre = upload_f32(lp.wpre), dwpost = upload_f32(lp.wpost), dmpre = upload_f32(lp.mpre),
             dmpost = upload_f32(lp.mpost), dlse = upload_f32(lse);
  DevMem ddo_lo(n * 2);
  ddo_lo.upload(dO_lo.bits);
  const std::vector<double> ones_w(lp.wpost.size(), 1.0), ones_m(lp.mpost.size(), 1.0);
  const auto gw = upload_f32(ones_w), gm = upload_f32(ones_m);
  DevMem dq(n * 2), dk(n * 2), dv(n * 2), ddo(n * 2), dv_acc(n * 4);
  dq.upload(q.bits), dk.upload(k.bits), dv.upload(v.bits), ddo.upload(dO.bits);
  dv_acc.upload(std::vector<float>(n, 0.f));
  DevMem ws(mta::cuda::flash_kq_layer_post_grads_workspace_floats(spec, c.B, c.T) * 4);
  const size_t n_delta = static_cast<size_t>(c.B) * c.H * c.T;
  DevMem ddelta(n_delta * 4);
  ws.poison(), ddelta.poison();
  using bf = __nv_bfloat16;
  mta::cuda::flash_kq_layer_post_grads(spec, dq.as<bf>(), dk.as<bf>(), dv.as<bf>(), ddo.as<bf>(), dwpre->as<float>(),
                                       c.gpre ? dmpre->as<float>() : nullptr,
                                       spec.kq_post ? dwpost->as<float>() : nullptr,
                                       c.gpost ? dmpost->as<float>() : nullptr, dlse->as<float>(),
                                       dv_acc.as<float>(), spec.kq_post ? gw->as<float>() : nullptr,
                                       c.gpost ? gm->as<float>() : nullptr, ddelta.as<float>(), ws.as<float>(), c.B,
                                       c.T, nullptr, with_lo ? ddo_lo.as<bf>() : nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  // delta from dout + dout_lo (what kernel P's dA3 uses).
  const std::vector<double> want_delta =
      reference_delta(f, spec, q.val, k.val, v.val, dO_ref, lse, lp.wpre, lp.mpre, lp.wpost, lp.mpost);
  const std::vector<float> got_df = ddelta.download<float>(n_delta);
  const std::vector<double> got_delta(got_df.begin(), got_df.end());
  EXPECT_EQ(non_finite(got_delta), 0) << "delta has non-finite (unwritten) entries";
  const double e_d = rel_err(got_delta, want_delta);
  EXPECT_LE(e_d, with_lo ? 1e-3 : 2e-2) << "delta";

  const RefGrads ref = reference_backward(c, spec, q, k, v, dO_ref, lp);
  const std::vector<double>&rq = ref.dq, &rk = ref.dk, &rv = ref.dv, &g_wpre = ref.wpre, &g_mpre = ref.mpre,
                            &g_wpost = ref.wpost, &g_mpost = ref.mpost;
  const std::vector<float> got_v = dv_acc.download<float>(n);
  const double e_v = rel_err(std::vector<double>(got_v.begin(), got_v.end()), rv);
  EXPECT_LE(e_v, 3e-2) << "dv";
  double e_w = 0, e_m = 0;
  auto minus_one = [](const std::vector<float>& x) {
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = static_cast<double>(x[i]) - 1.0;
    return y;
  };
  if (spec.kq_post) {
    e_w = rel_err(minus_one(gw->download<float>(g_wpost.size())), g_wpost);
    EXPECT_LE(e_w, with_lo ? 3e-4 : 3e-2) << "d kq_post";
  }
  if (c.gpost) {
    e_m = rel_err(minus_one(gm->download<float>(g_mpost.size())), g_mpost);
    EXPECT_LE(e_m, with_lo ? 3e-4 : 5e-2) << "d head_post";
  }
  std::printf("[ kq layer kernel P ] %s%s: rel err dv %.2e, d kq_post %.2e, d head_post %.2e, delta %.2e\n",
              c.str().c_str(), with_lo ? " with dout_lo" : "", e_v, e_w, e_m, e_d);
}

TEST(FlashKqLayer, PostGrads) {
  SKIP_WITHOUT_GPU();
  check_post_grads(FwdCase{Case{2, 8, 77, 64, 6, 11, mta::PadKey::Both, 8, 8}, 6, 11, mta::PadKey::Both}, 41u);
  check_post_grads(FwdCase{Case{2, 8, 77, 64, 6, 11, mta::PadKey::Both, 8, 8}, 6, 11, mta::PadKey::Both}, 44u, true);
  check_post_grads(FwdCase{Case{1, 4, 45, 64, 3, 4, mta::PadKey::Left, 2, 4}, 5, 6, mta::PadKey::Right}, 45u, true);
  check_post_grads(FwdCase{Case{1, 4, 1, 64, 6, 11, mta::PadKey::Both, 4, 4}, 6, 11, mta::PadKey::Both}, 42u);
  std::mt19937 rng(43);
  for (int it = 0; it < 6; ++it) check_post_grads(random_backward_case(rng, it), 400u + it);
  // D = 128 (4 heads per CTA): one CTA with dout_lo, 8 heads on a cluster of 2, 16 on a cluster of 4.
  check_post_grads(FwdCase{Case{1, 4, 77, 128, 6, 11, mta::PadKey::Both, 4, 4}, 6, 11, mta::PadKey::Both}, 46u, true);
  check_post_grads(FwdCase{Case{2, 8, 45, 128, 6, 11, mta::PadKey::Both, 8, 8}, 6, 11, mta::PadKey::Both}, 47u);
  check_post_grads(FwdCase{Case{1, 16, 40, 128, 6, 11, mta::PadKey::Both, 16, 16}, 6, 11, mta::PadKey::Both}, 48u);
  for (int it = 0; it < 4; ++it) check_post_grads(random_wide_case(rng, it), 410u + it);
}

// delta (and kernel P's other outputs) over the group layouts: one CTA, clusters at D = 64 and 128, padded
// clusters, random specs.
TEST(FlashKqLayer, DeltaFromKernelP) {
  SKIP_WITHOUT_GPU();
  check_post_grads(FwdCase{Case{2, 8, 77, 64, 6, 11, mta::PadKey::Both, 8, 8}, 6, 11, mta::PadKey::Both}, 31u);
  check_post_grads(FwdCase{Case{1, 4, 1, 64, 6, 11, mta::PadKey::Both, 4, 4}, 6, 11, mta::PadKey::Both}, 32u);
  std::mt19937 rng(33);
  for (int it = 0; it < 6; ++it) check_post_grads(random_backward_case(rng, it), 300u + it);
  // D = 128, where the backward holds 4 heads per CTA with the Q and dO rows in shared memory: one CTA,
  // the paper LM's 16 heads on a cluster of 4; 9 heads at D = 64 on a cluster of 3.
  check_post_grads(FwdCase{Case{1, 4, 77, 128, 6, 11, mta::PadKey::Both, 4, 4}, 6, 11, mta::PadKey::Both}, 34u);
  check_post_grads(FwdCase{Case{1, 16, 40, 128, 6, 11, mta::PadKey::Both, 16, 16}, 6, 11, mta::PadKey::Both}, 35u);
  check_post_grads(FwdCase{Case{1, 9, 33, 64, 3, 5, mta::PadKey::Left, 9, 3}, 2, 7, mta::PadKey::Right}, 36u);
  check_post_grads(FwdCase{Case{1, 13, 40, 64, 6, 11, mta::PadKey::Both, 13, 13}, 6, 11, mta::PadKey::Both}, 37u);  // 7 + 6
  for (int it = 0; it < 4; ++it) check_post_grads(random_wide_case(rng, it), 310u + it);
}

// The whole backward (flash_kq_layer_backward: kernel P with delta, kernel Q) after the fused forward
// (its lse), against the CPU op's backward in float64 on the same bf16-rounded inputs: dq, dk, dv and
// every enabled parameter's gradient (added to values that start at 1, as the API adds). Outputs start
// as NaN and must be written.
// with_lo: dout = dO + dO_lo as in check_post_grads, both kernels given dO_lo; the post-side parameter
// gradients are then held to 3e-4 and the pre-side ones to 1e-3 (kernel Q rounds dO + dO_lo to fp16:
// 3e-4 to 6e-4 measured, session 13). Kernel Q is also run without dO_lo (kernel P's delta still sums it),
// and its pre-side gradients must then be at least twice as far off: dO_lo must reach kernel Q's dA.
void check_backward(const FwdCase& f, unsigned seed, bool with_lo = false) {
  const Case& c = f.c;
  SCOPED_TRACE(c.str() + " kq_post " + std::to_string(f.cq2) + "x" + std::to_string(f.ck2) +
               (with_lo ? " with dout_lo" : ""));
  const mta::AttentionSpec spec = spec_of(f);
  ASSERT_TRUE(mta::cuda::flash_kq_layer_backward_supported(spec, c.D));
  std::mt19937 rng(seed);
  const size_t n = static_cast<size_t>(c.B) * c.H * c.T * c.D, rows = static_cast<size_t>(c.B) * c.H * c.T;
  const Tensor q = randn_bf16(n, rng), k = randn_bf16(n, rng), v = randn_bf16(n, rng), dO = randn_bf16(n, rng);
  Tensor dO_lo = randn_bf16(n, rng);
  std::vector<double> dO_ref = dO.val;
  for (size_t i = 0; i < n; ++i) {
    dO_lo.bits[i] = float_to_bf16_bits(static_cast<float>(std::ldexp(dO_lo.val[i], -9) * std::fabs(dO.val[i])));
    dO_lo.val[i] = bf16_bits_to_float(dO_lo.bits[i]);
    if (with_lo) dO_ref[i] += dO_lo.val[i];
  }
  const LayerParams lp = random_layer_params(spec, c.H, rng);
  const auto dwpre = upload_f32(lp.wpre), dwpost = upload_f32(lp.wpost), dmpre = upload_f32(lp.mpre),
             dmpost = upload_f32(lp.mpost);
  auto ones = [](const std::vector<double>& x) { return upload_f32(std::vector<double>(x.size(), 1.0)); };
  const auto gwpre = ones(lp.wpre), gwpost = ones(lp.wpost), gmpre = ones(lp.mpre), gmpost = ones(lp.mpost);
  DevMem dq(n * 2), dk(n * 2), dv(n * 2), ddo(n * 2), o(n * 2), lse(rows * 4), gq(n * 2), gk(n * 2), gv(n * 2),
      ddo_lo(n * 2);
  dq.upload(q.bits), dk.upload(k.bits), dv.upload(v.bits), ddo.upload(dO.bits), ddo_lo.upload(dO_lo.bits);
  gq.poison(), gk.poison(), gv.poison();
  DevMem ws(mta::cuda::flash_kq_layer_backward_workspace_floats(spec, c.B, c.T) * 4);
  ws.poison();
  using bf = __nv_bfloat16;
  const float* wpost = spec.kq_post ? dwpost->as<float>() : nullptr;
  const float* mpre = c.gpre ? dmpre->as<float>() : nullptr;
  const float* mpost = c.gpost ? dmpost->as<float>() : nullptr;
  mta::cuda::flash_kq_layer_forward(spec, dq.as<bf>(), dk.as<bf>(), dv.as<bf>(), dwpre->as<float>(), mpre, wpost,
                                    mpost, o.as<bf>(), lse.as<float>(), c.B, c.T, nullptr);
  mta::cuda::flash_kq_layer_backward(spec, dq.as<bf>(), dk.as<bf>(), dv.as<bf>(), ddo.as<bf>(), dwpre->as<float>(),
                                     mpre, wpost, mpost, lse.as<float>(), gq.as<bf>(), gk.as<bf>(), gv.as<bf>(),
                                     gwpre->as<float>(), c.gpre ? gmpre->as<float>() : nullptr,
                                     spec.kq_post ? gwpost->as<float>() : nullptr,
                                     c.gpost ? gmpost->as<float>() : nullptr, ws.as<float>(), c.B, c.T, nullptr,
                                     with_lo ? ddo_lo.as<bf>() : nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  {  // dq is reproducible to the bit (session 17: the rows two query tiles share get exactly two bf16
     // additions onto zero); dk and dv are sums of fp32 atomics, whose order varies
    DevMem gq2(n * 2), gk2(n * 2), gv2(n * 2);
    const auto gwpre2 = ones(lp.wpre), gwpost2 = ones(lp.wpost), gmpre2 = ones(lp.mpre), gmpost2 = ones(lp.mpost);
    mta::cuda::flash_kq_layer_backward(spec, dq.as<bf>(), dk.as<bf>(), dv.as<bf>(), ddo.as<bf>(),
                                       dwpre->as<float>(), mpre, wpost, mpost, lse.as<float>(), gq2.as<bf>(),
                                       gk2.as<bf>(), gv2.as<bf>(), gwpre2->as<float>(),
                                       c.gpre ? gmpre2->as<float>() : nullptr,
                                       spec.kq_post ? gwpost2->as<float>() : nullptr,
                                       c.gpost ? gmpost2->as<float>() : nullptr, ws.as<float>(), c.B, c.T, nullptr,
                                       with_lo ? ddo_lo.as<bf>() : nullptr);
    CUDA_OK(cudaDeviceSynchronize());
    EXPECT_TRUE(gq.download<uint16_t>(n) == gq2.download<uint16_t>(n)) << "dq differs between two runs";
  }

  const RefGrads ref = reference_backward(c, spec, q, k, v, dO_ref, lp);
  const std::vector<double>&rq = ref.dq, &rk = ref.dk, &rv = ref.dv, &g_wpre = ref.wpre, &g_mpre = ref.mpre,
                            &g_wpost = ref.wpost, &g_mpost = ref.mpost;
  const std::vector<double> got_q = to_double(gq.download<uint16_t>(n)), got_k = to_double(gk.download<uint16_t>(n)),
                            got_v = to_double(gv.download<uint16_t>(n));
  EXPECT_EQ(non_finite(got_q) + non_finite(got_k) + non_finite(got_v), 0) << "dq, dk, dv not all written";
  const double eq = rel_err(got_q, rq), ek = rel_err(got_k, rk), ev = rel_err(got_v, rv);
  EXPECT_LE(eq, 3e-2) << "dq";
  EXPECT_LE(ek, 3e-2) << "dk";
  EXPECT_LE(ev, 3e-2) << "dv";
  auto param_err = [](const std::unique_ptr<DevMem>& d, const std::vector<double>& want) {
    const std::vector<float> x = d->download<float>(want.size());
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = static_cast<double>(x[i]) - 1.0;
    return rel_err(y, want);
  };
  const double e_wpre = param_err(gwpre, g_wpre);
  EXPECT_LE(e_wpre, with_lo ? 1e-3 : 3e-2) << "d kq_pre";
  double e_mpre = 0, e_wpost = 0, e_mpost = 0;
  if (c.gpre) EXPECT_LE(e_mpre = param_err(gmpre, g_mpre), with_lo ? 1e-3 : 5e-2) << "d head_pre";
  if (spec.kq_post) EXPECT_LE(e_wpost = param_err(gwpost, g_wpost), with_lo ? 3e-4 : 3e-2) << "d kq_post";
  if (c.gpost) EXPECT_LE(e_mpost = param_err(gmpost, g_mpost), with_lo ? 3e-4 : 5e-2) << "d head_post";
  std::printf("[ kq layer backward ] %s kq_post %dx%d%s: rel err dq %.2e dk %.2e dv %.2e, d kq_pre %.2e head_pre "
              "%.2e kq_post %.2e head_post %.2e\n",
              c.str().c_str(), f.cq2, f.ck2, with_lo ? " with dout_lo" : "", eq, ek, ev, e_wpre, e_mpre, e_wpost,
              e_mpost);
  if (!with_lo) return;
  // Kernel P with dO_lo (delta, and scratch post-side outputs), then kernel Q without it.
  DevMem acc(n * 4), delta(rows * 4), ws2(mta::cuda::flash_kq_layer_post_grads_workspace_floats(spec, c.B, c.T) * 4),
      gq2(n * 2);
  acc.upload(std::vector<float>(n, 0.f));
  const auto gwpre2 = ones(lp.wpre), gmpre2 = ones(lp.mpre), gwpost2 = ones(lp.wpost), gmpost2 = ones(lp.mpost);
  mta::cuda::flash_kq_layer_post_grads(spec, dq.as<bf>(), dk.as<bf>(), dv.as<bf>(), ddo.as<bf>(), dwpre->as<float>(),
                                       mpre, wpost, mpost, lse.as<float>(), acc.as<float>(),
                                       spec.kq_post ? gwpost2->as<float>() : nullptr,
                                       c.gpost ? gmpost2->as<float>() : nullptr, delta.as<float>(), ws2.as<float>(),
                                       c.B, c.T, nullptr, ddo_lo.as<bf>());
  acc.upload(std::vector<float>(n, 0.f));
  mta::cuda::flash_kq_layer_pre_grads(spec, dq.as<bf>(), dk.as<bf>(), dv.as<bf>(), ddo.as<bf>(), dwpre->as<float>(),
                                      mpre, wpost, mpost, lse.as<float>(), delta.as<float>(), gq2.as<bf>(),
                                      acc.as<float>(), gwpre2->as<float>(), c.gpre ? gmpre2->as<float>() : nullptr,
                                      ws2.as<float>(), c.B, c.T, nullptr, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const double e_wpre_q = param_err(gwpre2, g_wpre), e_mpre_q = c.gpre ? param_err(gmpre2, g_mpre) : 0.0;
  EXPECT_LE(2 * e_wpre, e_wpre_q) << "d kq_pre: kernel Q's dO_lo should count";
  if (c.gpre) EXPECT_LE(2 * e_mpre, e_mpre_q) << "d head_pre: kernel Q's dO_lo should count";
  std::printf("[ kq layer backward ] without dO_lo in kernel Q: d kq_pre %.2e head_pre %.2e\n", e_wpre_q, e_mpre_q);
}

TEST(FlashKqLayer, Backward) {
  SKIP_WITHOUT_GPU();
  check_backward(FwdCase{Case{2, 8, 77, 64, 6, 11, mta::PadKey::Both, 8, 8}, 6, 11, mta::PadKey::Both}, 51u);
  check_backward(FwdCase{Case{1, 4, 1, 64, 6, 11, mta::PadKey::Both, 4, 4}, 6, 11, mta::PadKey::Both}, 52u);
  check_backward(FwdCase{Case{1, 8, 100, 64, 2, 9, mta::PadKey::Both, 0, 0}, 0, 0, mta::PadKey::Both}, 53u);
  // With dout_lo (as the model's epilogue gives it): one CTA at D = 64, a cluster of two, D = 128 on a
  // cluster of 4, runtime sizes.
  check_backward(FwdCase{Case{2, 8, 77, 64, 6, 11, mta::PadKey::Both, 8, 8}, 6, 11, mta::PadKey::Both}, 71u, true);
  check_backward(FwdCase{Case{1, 16, 50, 64, 6, 11, mta::PadKey::Both, 16, 16}, 6, 11, mta::PadKey::Both}, 72u, true);
  check_backward(FwdCase{Case{1, 16, 40, 128, 6, 11, mta::PadKey::Both, 16, 16}, 6, 11, mta::PadKey::Both}, 73u, true);
  check_backward(FwdCase{Case{2, 4, 45, 64, 3, 4, mta::PadKey::Left, 2, 4}, 5, 6, mta::PadKey::Right}, 74u, true);
  // Clusters of two CTAs per group: 16 heads (the paper LM's layer), 12 heads with a post mix of 6.
  check_backward(FwdCase{Case{2, 16, 77, 64, 6, 11, mta::PadKey::Both, 16, 16}, 6, 11, mta::PadKey::Both}, 55u);
  check_backward(FwdCase{Case{1, 12, 40, 64, 3, 5, mta::PadKey::Left, 12, 6}, 2, 3, mta::PadKey::Right}, 56u);
  check_backward(FwdCase{Case{1, 16, 20, 64, 2, 4, mta::PadKey::Right, 8, 16}, 0, 0, mta::PadKey::Both}, 57u);
  std::mt19937 rng(54);
  for (int it = 0; it < 8; ++it) check_backward(random_backward_case(rng, it), 500u + it);
  // Groups that split over 3 CTAs at D = 64: 9 heads (3 each), 15 heads (5 each).
  check_backward(FwdCase{Case{1, 9, 50, 64, 6, 11, mta::PadKey::Both, 9, 9}, 6, 11, mta::PadKey::Both}, 58u);
  check_backward(FwdCase{Case{1, 15, 30, 64, 2, 9, mta::PadKey::Both, 15, 5}, 3, 4, mta::PadKey::Right}, 59u);
  // D = 128 (4 heads per CTA): the paper LM's layer (16 heads, a cluster of 4), one CTA of 4 heads with T
  // below the tile, 8 heads on 2 CTAs, 12 on 3, 10 on 5 (2 each), 14 on 7 (2 each).
  check_backward(FwdCase{Case{1, 16, 77, 128, 6, 11, mta::PadKey::Both, 16, 16}, 6, 11, mta::PadKey::Both}, 60u);
  check_backward(FwdCase{Case{2, 4, 5, 128, 6, 11, mta::PadKey::Both, 4, 2}, 6, 11, mta::PadKey::Both}, 61u);
  check_backward(FwdCase{Case{2, 8, 45, 128, 3, 5, mta::PadKey::Left, 8, 4}, 2, 3, mta::PadKey::Right}, 62u);
  check_backward(FwdCase{Case{1, 12, 33, 128, 2, 9, mta::PadKey::Both, 12, 6}, 0, 0, mta::PadKey::Both}, 63u);
  check_backward(FwdCase{Case{1, 10, 20, 128, 4, 7, mta::PadKey::Right, 10, 5}, 5, 3, mta::PadKey::Left}, 64u);
  check_backward(FwdCase{Case{1, 14, 18, 128, 6, 11, mta::PadKey::Both, 14, 7}, 6, 11, mta::PadKey::Both}, 65u);
  for (int it = 0; it < 6; ++it) check_backward(random_wide_case(rng, it), 510u + it);
  // Groups the CTAs do not split evenly (session 11), the last CTA padded: at D = 64 11 heads on 2
  // CTAs (6 + 5) and 13 (7 + 6); at D = 128 11 on 3 CTAs (4 + 4 + 3) and 13 on 4 (4 + 4 + 4 + 1).
  check_backward(FwdCase{Case{1, 11, 50, 64, 6, 11, mta::PadKey::Both, 11, 11}, 6, 11, mta::PadKey::Both}, 66u);
  check_backward(FwdCase{Case{2, 13, 21, 64, 2, 9, mta::PadKey::Both, 13, 13}, 3, 4, mta::PadKey::Right}, 67u);
  check_backward(FwdCase{Case{1, 11, 40, 128, 6, 11, mta::PadKey::Both, 11, 11}, 6, 11, mta::PadKey::Both}, 68u);
  check_backward(FwdCase{Case{1, 13, 33, 128, 4, 7, mta::PadKey::Right, 13, 0}, 5, 3, mta::PadKey::Left}, 69u);
  // 7 heads at D = 128 (4 + 3). B H T = 175 is odd: before session 11 that left the backward's fp32
  // accumulator, after delta in the workspace, misaligned for kernel P's float2 atomics.
  check_backward(FwdCase{Case{1, 7, 25, 128, 6, 11, mta::PadKey::Both, 7, 7}, 6, 11, mta::PadKey::Both}, 70u);
}

TEST(FlashKqLayer, PaperLayerLse) {
  SKIP_WITHOUT_GPU();
  // The paper LM's kq layer: 6 x 11 both, every head of the layer in one mixing group, pre and post.
  check_case(Case{2, 8, 77, 64, 6, 11, mta::PadKey::Both, 8, 8}, 1u);
  check_case(Case{1, 16, 40, 64, 6, 11, mta::PadKey::Both, 16, 16}, 2u);
  check_case(Case{1, 8, 130, 128, 6, 11, mta::PadKey::Both, 8, 8}, 3u);
  check_case(Case{1, 16, 50, 128, 6, 11, mta::PadKey::Both, 16, 16}, 7u);  // a cluster of two CTAs
}

TEST(FlashKqLayer, ToyAndSmallT) {
  SKIP_WITHOUT_GPU();
  check_case(Case{2, 2, 1, 64, 2, 9, mta::PadKey::Both, 0, 0}, 4u);   // T = 1: one row, one key
  check_case(Case{2, 2, 16, 128, 2, 9, mta::PadKey::Both, 0, 0}, 5u);
  check_case(Case{1, 4, 33, 64, 2, 9, mta::PadKey::Both, 2, 0}, 6u);
}

// Runtime sizes (the generic convolution path), every pad mode, groups smaller than H, a head_post
// group that only widens the CTA's group.
TEST(FlashKqLayer, RandomSpecs) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(2026);
  for (int it = 0; it < 8; ++it) {
    Case c;
    c.B = 1 + static_cast<int>(rng() % 2);
    c.D = rng() % 2 ? 64 : 128;
    c.H = (c.D == 64 ? 8 : 4);
    c.T = 1 + static_cast<int>(rng() % 70);
    random_conv(rng, c.cq, c.ck, c.pad);
    const int groups[] = {0, 1, 2, 4};
    c.gpre = groups[rng() % 4];
    c.gpost = groups[rng() % 4];
    check_case(c, 100u + it);
  }
}

TEST(FlashKqLayer, RefusesUnsupported) {
  mta::AttentionSpec s;
  s.heads = 4, s.head_dim = 64;
  EXPECT_FALSE(mta::cuda::flash_kq_layer_lse_supported(s, 64));  // no convolution: flash_mix.h's
  s.kq_post = mta::KqConv{2, 3, mta::PadKey::Left};
  EXPECT_TRUE(mta::cuda::flash_kq_layer_backward_supported(s, 64));  // kq_post alone: identity kq_pre
  s.kq_post.reset();
  s.kq_pre = mta::KqConv{9, 3, mta::PadKey::Both};
  EXPECT_FALSE(mta::cuda::flash_kq_layer_lse_supported(s, 64));  // cq > 8
  s.kq_pre = mta::KqConv{2, 3, mta::PadKey::Both};
  EXPECT_TRUE(mta::cuda::flash_kq_layer_lse_supported(s, 64));
  EXPECT_FALSE(mta::cuda::flash_kq_layer_lse_supported(s, 96));
  EXPECT_THROW(mta::cuda::flash_kq_layer_lse(s, nullptr, nullptr, nullptr, nullptr, nullptr, 1, 8, nullptr),
               std::invalid_argument);
  // Groups: over the fewest CTAs that hold them (16 heads: 2 CTAs at D = 64, 4 in the backward at
  // D = 128), any size up to 16 (MixIn holds 16), the last CTA padded where the split is uneven.
  s.heads = 16, s.head_pre = mta::HeadMix{16};
  EXPECT_TRUE(mta::cuda::flash_kq_layer_backward_supported(s, 64));
  s.head_dim = 128;
  EXPECT_TRUE(mta::cuda::flash_kq_layer_forward_supported(s, 128));
  EXPECT_TRUE(mta::cuda::flash_kq_layer_backward_supported(s, 128));
  s.head_dim = 64;
  s.heads = 9, s.head_pre = mta::HeadMix{9};
  EXPECT_TRUE(mta::cuda::flash_kq_layer_backward_supported(s, 64));
  for (int g = 1; g <= 16; ++g)
    for (int d : {64, 128}) {
      s.heads = g, s.head_pre = mta::HeadMix{g}, s.head_dim = d;
      EXPECT_TRUE(mta::cuda::flash_kq_layer_backward_supported(s, d)) << g << " " << d;
    }
  s.head_dim = 64;
  s.heads = 18, s.head_pre = mta::HeadMix{18};
  EXPECT_FALSE(mta::cuda::flash_kq_layer_lse_supported(s, 64));
  EXPECT_FALSE(mta::cuda::flash_kq_layer_backward_supported(s, 64));
  // Kernels P and Q add float pairs into their fp32 accumulators: one that is not 16-byte aligned is
  // refused before any device work (session 11: an odd B H T once misaligned the backward's own
  // accumulator and faulted). The other pointers are aligned stand-ins, never dereferenced.
  {
    mta::AttentionSpec a;
    a.heads = 4, a.head_dim = 64, a.kq_pre = mta::KqConv{2, 3, mta::PadKey::Both};
    using bf = __nv_bfloat16;
    const bf* rows = reinterpret_cast<const bf*>(uintptr_t{256});
    float* f = reinterpret_cast<float*>(uintptr_t{256});
    float* misaligned = reinterpret_cast<float*>(uintptr_t{260});
    EXPECT_THROW(mta::cuda::flash_kq_layer_post_grads(a, rows, rows, rows, rows, f, nullptr, nullptr, nullptr, f,
                                                      misaligned, nullptr, nullptr, f, f, 1, 8, nullptr),
                 std::invalid_argument);
    EXPECT_THROW(mta::cuda::flash_kq_layer_pre_grads(a, rows, rows, rows, rows, f, nullptr, nullptr, nullptr, f, f,
                                                     reinterpret_cast<bf*>(uintptr_t{256}), misaligned, f, nullptr,
                                                     f, 1, 8, nullptr),
                 std::invalid_argument);
    // Kernel P writes delta (it may not be null); kernel Q reads dout_lo as 16-byte rows.
    EXPECT_THROW(mta::cuda::flash_kq_layer_post_grads(a, rows, rows, rows, rows, f, nullptr, nullptr, nullptr, f, f,
                                                      nullptr, nullptr, nullptr, f, 1, 8, nullptr),
                 std::invalid_argument);
    EXPECT_THROW(mta::cuda::flash_kq_layer_pre_grads(a, rows, rows, rows, rows, f, nullptr, nullptr, nullptr, f, f,
                                                     reinterpret_cast<bf*>(uintptr_t{256}), f, f, nullptr, f, 1, 8,
                                                     nullptr, reinterpret_cast<const bf*>(uintptr_t{258})),
                 std::invalid_argument);
  }
  // A kq layer with an epilogue keeps the core's output in fp32 for its backward: without it, a clear
  // error before any device work.
  s.heads = 4, s.head_pre = mta::HeadMix{4}, s.norm = true;
  ASSERT_TRUE(mta::cuda::fused_attention_supported(s, 64));
  EXPECT_GT(mta::cuda::fused_attention_core32_floats(s, 1, 8), 0u);
  EXPECT_THROW(mta::cuda::fused_attention_backward(s, nullptr, nullptr, nullptr, mta::AttnParams<float>{}, nullptr,
                                                   nullptr, nullptr, nullptr, nullptr, nullptr,
                                                   mta::AttnParamGrads<float>{}, nullptr, 1, 8, mta::AttnOptions{},
                                                   nullptr, nullptr),
               std::invalid_argument);
}

// `mta attn` inputs for spec (q, k, v bf16-exact; parameters identity plus noise; dout when asked),
// as F32 (for the CUDA paths) and F64 (for the CPU reference).
std::pair<mta::io::SafeTensors, mta::io::SafeTensors> attn_inputs(const mta::AttentionSpec& spec, int B, int T,
                                                                  bool with_dout, std::mt19937& rng) {
  const std::vector<int64_t> shape{B, spec.heads, T, spec.head_dim};
  const size_t n = static_cast<size_t>(B) * spec.heads * T * spec.head_dim;
  mta::io::SafeTensors t32, t64;
  auto put = [&](const std::string& name, const std::vector<int64_t>& shp, const std::vector<double>& v) {
    const std::vector<float> f(v.begin(), v.end());
    t32.tensors[name] = mta::io::make_tensor(shp, f.data());
    t64.tensors[name] = mta::io::make_tensor(shp, v.data());
  };
  for (const char* name : {"q", "k", "v"}) put(name, shape, randn_bf16(n, rng).val);  // bf16-exact
  std::uniform_real_distribution<double> ud(-0.5, 0.5);
  for (const auto& info : mta::attention_params(spec)) {
    size_t count = 1;
    for (auto d : info.shape) count *= static_cast<size_t>(d);
    std::vector<double> w(count);
    for (auto& x : w) x = ud(rng);
    if (info.name == "kq_pre" || info.name == "kq_post") {  // identity tap plus noise
      const mta::KqConv& kc = info.name == "kq_pre" ? *spec.kq_pre : *spec.kq_post;
      for (int h = 0; h < spec.heads; ++h) w[(static_cast<size_t>(h) * kc.q + kc.q - 1) * kc.k + kc.key_offset()] += 1.0;
    } else if (info.name == "head_pre" || info.name == "head_post") {
      const int g = static_cast<int>(info.shape.back());
      for (auto& x : w) x *= 0.6;
      for (int h = 0; h < spec.heads; ++h) w[static_cast<size_t>(h) * g + h % g] += 1.0;
    } else if (info.name == "norm") {
      for (auto& x : w) x += 1.0;
    }
    put(info.name, std::vector<int64_t>(info.shape.begin(), info.shape.end()), w);
  }
  if (with_dout) put("dout", shape, randn_bf16(n, rng).val);
  return {t32, t64};
}

// Every tensor of `mta attn`'s CPU result `ref` (out and the gradients) in `got`, within bf16 tolerances
// (the mixing weights' gradients, sums over every position, 5e-2); prints each error after `label`.
// `unchecked`: a tensor whose relative error is printed but not held to a tolerance (see its caller).
void expect_outputs_match(const mta::io::SafeTensors& got, const mta::io::SafeTensors& ref, const std::string& label,
                          const std::string& unchecked = "") {
  for (const auto& [name, want] : ref.tensors) {
    ASSERT_TRUE(got.tensors.count(name)) << name;
    const double e = rel_err(mta::io::to_f64(got.at(name), name), mta::io::to_f64(want, name));
    if (name != unchecked) EXPECT_LE(e, name.find("head_") != std::string::npos ? 5e-2 : 3e-2) << name;
    std::printf("%s: %s rel err %.2e%s\n", label.c_str(), name.c_str(), e, name == unchecked ? " (unchecked)" : "");
  }
}

// `mta attn --device cuda` on a kq layer with norm and gate: without dout the fused forward at D = 64
// and 128; with dout the fused backward at D = 64 and 128 (out and every gradient against the float64
// CPU op).
TEST(FlashKqLayer, AttnCommand) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(404);
  mta::AttentionSpec spec;
  spec.heads = 4, spec.head_dim = 64;
  spec.kq_pre = mta::KqConv{3, 5, mta::PadKey::Both};
  spec.kq_post = mta::KqConv{2, 4, mta::PadKey::Right};
  spec.head_pre = mta::HeadMix{2}, spec.head_post = mta::HeadMix{4};
  spec.norm = true, spec.gate = true;
  const int B = 2, T = 83;
  for (int D : {64, 128}) {
    spec.head_dim = D;
    const auto [fwd32, fwd64] = attn_inputs(spec, B, T, false, rng);
    const auto ref = mta::run_attention_tensors(spec, fwd64, mta::Device::Cpu);
    const auto fused = mta::run_attention_tensors(spec, fwd32, mta::Device::Cuda);
    EXPECT_EQ(fused.metadata.at("impl"), "fused");
    EXPECT_EQ(fused.metadata.count("impl_reason"), 0u);
    const double e = rel_err(mta::io::to_f64(fused.at("out"), "out"), mta::io::to_f64(ref.at("out"), "out"));
    EXPECT_LE(e, 2e-2);
    std::printf("[ attn forward-only ] kq layer D=%d with norm and gate: out rel err %.2e\n", D, e);
  }
  for (int D : {64, 128}) {
    spec.head_dim = D;
    const auto [both32, both64] = attn_inputs(spec, B, T, true, rng);
    const auto ref = mta::run_attention_tensors(spec, both64, mta::Device::Cpu);
    const auto fused = mta::run_attention_tensors(spec, both32, mta::Device::Cuda);  // auto: the fused path
    EXPECT_EQ(fused.metadata.at("impl"), "fused");
    expect_outputs_match(fused, ref, "[ attn with dout ] kq layer D=" + std::to_string(D) + " with norm and gate");
  }
  // 13 coupled heads (a prime over the CTAs' 8 or 4 heads: the last CTA padded) take the fused path too.
  // gate_b's gradient is printed, not checked: it is one scalar, a sum over B H T rows of terms of both
  // signs, whose value here (B = 1, T = 37) ranges over about +-60 with the draw while a 2^-8 relative
  // perturbation of q, k, v and dout moves it by ~0.2 (float64 CPU op, session 11); with this draw it
  // is near 0 and its relative error (0.27 at D = 64, call 3) says nothing about the kernels. Every
  // other tensor, gate_w's gradient included, is held to the usual tolerances; the gate_b gradient is
  // checked at 4 heads above.
  spec.heads = 13, spec.head_pre = mta::HeadMix{13}, spec.head_post = mta::HeadMix{13};
  spec.kq_pre = mta::KqConv{6, 11, mta::PadKey::Both}, spec.kq_post = mta::KqConv{6, 11, mta::PadKey::Both};
  for (int D : {64, 128}) {
    spec.head_dim = D;
    const auto [both32, both64] = attn_inputs(spec, 1, 37, true, rng);
    const auto ref = mta::run_attention_tensors(spec, both64, mta::Device::Cpu);
    const auto fused = mta::run_attention_tensors(spec, both32, mta::Device::Cuda);
    EXPECT_EQ(fused.metadata.at("impl"), "fused");
    expect_outputs_match(fused, ref, "[ attn with dout ] kq layer, 13 heads, D=" + std::to_string(D), "grad_gate_b");
  }
}

// A layer with kq_post but no kq_pre runs the kq-layer kernels with the identity 1 x 1 in kq_pre's place
// (flash_kq_layer.h): through `mta attn --device cuda` (out and every gradient against the float64 CPU
// op), with and without head mixing (up to a cluster of 16 heads) and an epilogue, T below and past a
// 16-row tile, at D = 64 and 128.
TEST(FlashKqLayer, KqPostWithoutKqPre) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(405);
  struct PostCase {
    int H, D, T, gpre, gpost;
    mta::KqConv post;
    bool epilogue;
  };
  const PostCase cases[] = {
      {4, 64, 83, 0, 0, mta::KqConv{6, 11, mta::PadKey::Both}, false},   // kq_post alone, no mixing
      {4, 64, 5, 0, 4, mta::KqConv{3, 4, mta::PadKey::Left}, true},      // T below the tile, norm and gate
      {8, 64, 50, 8, 2, mta::KqConv{2, 7, mta::PadKey::Right}, true},    // both mixes
      {16, 64, 37, 16, 16, mta::KqConv{6, 11, mta::PadKey::Both}, true},  // the paper's mixing, a cluster
      {4, 128, 40, 0, 4, mta::KqConv{4, 5, mta::PadKey::Both}, false},    // D = 128, one CTA
      {8, 128, 21, 8, 8, mta::KqConv{6, 11, mta::PadKey::Both}, true},    // D = 128, a cluster of 2
  };
  for (const PostCase& pc : cases) {
    mta::AttentionSpec spec;
    spec.heads = pc.H, spec.head_dim = pc.D;
    spec.kq_post = pc.post;
    if (pc.gpre) spec.head_pre = mta::HeadMix{pc.gpre};
    if (pc.gpost) spec.head_post = mta::HeadMix{pc.gpost};
    spec.norm = pc.epilogue, spec.gate = pc.epilogue;
    SCOPED_TRACE(mta::spec_to_json(spec).dump());
    ASSERT_TRUE(mta::cuda::flash_kq_layer_backward_supported(mta::cuda::attn_core_spec(spec), pc.D));
    const auto [in32, in64] = attn_inputs(spec, 2, pc.T, true, rng);
    const auto ref = mta::run_attention_tensors(spec, in64, mta::Device::Cpu);
    const auto got = mta::run_attention_tensors(spec, in32, mta::Device::Cuda, nullptr, mta::AttnImpl::Fused);
    EXPECT_EQ(got.metadata.at("impl"), "fused");
    expect_outputs_match(got, ref,
                         "[ kq_post without kq_pre ] H=" + std::to_string(pc.H) + " D=" + std::to_string(pc.D) + " G=" + std::to_string(pc.gpre) +
                             "/" + std::to_string(pc.gpost) + " T=" + std::to_string(pc.T));
  }
}

}  // namespace
