// GPU tests of the fused MTA kernels (attention/flash_mta.h) against the CPU reference
// mta::cpu::mta_forward / mta_backward<double> on the same bf16-rounded inputs (out, dq, dk, dv and the
// kernel-weight gradient), for random kq_pre specs (cq 1..8,
// ck 1..15, every pad), random weights (identity plus noise, so the convolution matters), head dims 64
// and 128, and T below, at and across the tile size. Outputs start as NaN; every entry must be finite.
// lse is checked against a direct float64 evaluation of the convolved logits.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/attn_files.h"
#include "attention/flash_mta.h"
#include "attention/mta_cpu.h"
#include "util/error.h"
#include "gpu/gpu_test_util.h"

namespace {

using namespace gpu_test;  // NOLINT

constexpr double kTolOut = 2e-2;   // relative L2 error of out (bf16 output, fp16 convolution operands)
constexpr double kTolLse = 2e-2;   // max abs error of lse
constexpr double kTolGrad = 3e-2;  // relative L2 error of dq, dk, dv (bf16 P, dS0, dC operands)
constexpr double kTolDw = 5e-2;    // relative L2 error of d kq_pre (a sum over T^2 bf16 products)

struct Case {
  int B, H, T, D, cq, ck;
  mta::PadKey pad;
  float dropout = 0.0f;  // attention dropout (training), same masks as the CPU reference
  std::string str() const {
    return "(B=" + std::to_string(B) + " H=" + std::to_string(H) + " T=" + std::to_string(T) + " D=" +
           std::to_string(D) + " kq_pre " + std::to_string(cq) + "x" + std::to_string(ck) + " pad " +
           std::to_string(static_cast<int>(pad)) + " dropout " + std::to_string(dropout) + ")";
  }
};

mta::AttentionSpec spec_of(const Case& c) {
  mta::AttentionSpec s;
  s.heads = c.H, s.head_dim = c.D;
  s.kq_pre = mta::KqConv{c.cq, c.ck, c.pad};
  return s;
}

// lse_i = log sum_{j<=i} exp(C[i,j]) of one head, C by the definition in docs/mta-semantics.md.
std::vector<double> ref_lse(const std::vector<double>& q, const std::vector<double>& k, const double* W,
                            const Case& c, size_t bh) {
  const int T = c.T, D = c.D, o = mta::KqConv{c.cq, c.ck, c.pad}.key_offset();
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> s0(static_cast<size_t>(T) * T, 0.0), lse(T);
  for (int i = 0; i < T; ++i)
    for (int j = 0; j <= i; ++j) {
      double dot = 0;
      for (int d = 0; d < D; ++d) dot += q[(bh * T + i) * D + d] * k[(bh * T + j) * D + d];
      s0[static_cast<size_t>(i) * T + j] = scale * dot;
    }
  for (int i = 0; i < T; ++i) {
    std::vector<double> row(i + 1, 0.0);
    double mx = -INFINITY;
    for (int j = 0; j <= i; ++j) {
      for (int a = 0; a < c.cq; ++a)
        for (int cc = 0; cc < c.ck; ++cc) {
          const int ii = i - (c.cq - 1) + a, jj = j - o + cc;
          if (ii >= 0 && jj >= 0 && jj < T) row[j] += W[a * c.ck + cc] * s0[static_cast<size_t>(ii) * T + jj];
        }
      mx = std::max(mx, row[j]);
    }
    double sum = 0;
    for (int j = 0; j <= i; ++j) sum += std::exp(row[j] - mx);
    lse[i] = mx + std::log(sum);
  }
  return lse;
}

void check_case(const Case& c, unsigned seed) {
  SCOPED_TRACE(c.str());
  std::mt19937 rng(seed);
  const size_t n = static_cast<size_t>(c.B) * c.H * c.T * c.D, rows = static_cast<size_t>(c.B) * c.H * c.T;
  const Tensor q = randn_bf16(n, rng), k = randn_bf16(n, rng), v = randn_bf16(n, rng);
  const mta::AttentionSpec spec = spec_of(c);
  ASSERT_TRUE(mta::cuda::flash_mta_supported(spec, c.D));
  // Identity plus noise: the layer is neither standard attention nor dominated by noise.
  std::uniform_real_distribution<float> ud(-0.5f, 0.5f);
  const int o = spec.kq_pre->key_offset();
  std::vector<float> w(static_cast<size_t>(c.H) * c.cq * c.ck);
  for (auto& x : w) x = ud(rng);
  for (int h = 0; h < c.H; ++h) w[(static_cast<size_t>(h) * c.cq + c.cq - 1) * c.ck + o] += 1.0f;
  const std::vector<double> wd(w.begin(), w.end());

  const Tensor gout = randn_bf16(n, rng);

  DevMem dq(n * 2), dk(n * 2), dv(n * 2), dout(n * 2), dw(w.size() * 4), dlse(rows * 4);
  dq.upload(q.bits), dk.upload(k.bits), dv.upload(v.bits), dw.upload(w);
  dout.poison(), dlse.poison();
  using bf = __nv_bfloat16;
  mta::AttnOptions opt;
  opt.dropout = c.dropout, opt.dropout_seed = seed * 977ull + 5;
  mta::cuda::flash_mta_forward(spec, dq.as<bf>(), dk.as<bf>(), dv.as<bf>(), dw.as<float>(), dout.as<bf>(),
                               dlse.as<float>(), c.B, c.T, opt, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<double> out = to_double(dout.download<uint16_t>(n));
  const std::vector<float> lse_f = dlse.download<float>(rows);

  // Backward, every output poisoned; the weight gradient is added to, so it starts at zero.
  DevMem ddo(n * 2), gq(n * 2), gk(n * 2), gv(n * 2), gw(w.size() * 4);
  DevMem scratch(mta::cuda::flash_mta_backward_scratch_bytes(c.B, c.H, c.T, c.D));
  ddo.upload(gout.bits);
  gq.poison(), gk.poison(), gv.poison(), scratch.poison();
  CUDA_OK(cudaMemset(gw.as<void>(), 0, w.size() * 4));
  mta::cuda::flash_mta_backward(spec, dq.as<bf>(), dk.as<bf>(), dv.as<bf>(), dw.as<float>(), dout.as<bf>(), ddo.as<bf>(),
                                dlse.as<float>(), gq.as<bf>(), gk.as<bf>(), gv.as<bf>(), gw.as<float>(),
                                scratch.as<void>(), c.B, c.T, opt, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<double> g_q = to_double(gq.download<uint16_t>(n)), g_k = to_double(gk.download<uint16_t>(n)),
                            g_v = to_double(gv.download<uint16_t>(n));
  const std::vector<float> g_w_f = gw.download<float>(w.size());
  const std::vector<double> g_w(g_w_f.begin(), g_w_f.end());

  mta::AttnParams<double> p;
  p.kq_pre = wd.data();
  std::vector<double> ref(n);
  mta::cpu::mta_forward<double>(spec, mta::AttnDims{c.B, c.H, c.T, c.D}, q.val.data(), k.val.data(), v.val.data(), p,
                                ref.data(), opt);
  EXPECT_EQ(non_finite(out), 0) << "out has non-finite (unwritten) entries";
  const double e_out = rel_err(out, ref);
  EXPECT_LE(e_out, kTolOut) << "out";

  // The reference backward takes the GPU's rounded output gradient as given (same dout bits).
  std::vector<double> rq(n), rk(n), rv(n), rw(w.size(), 0.0);
  mta::AttnParamGrads<double> pg;
  pg.kq_pre = rw.data();
  mta::cpu::mta_backward<double>(spec, mta::AttnDims{c.B, c.H, c.T, c.D}, q.val.data(), k.val.data(), v.val.data(), p,
                                 gout.val.data(), rq.data(), rk.data(), rv.data(), pg, opt);
  for (const auto& [name, got] : {std::pair{"dq", &g_q}, {"dk", &g_k}, {"dv", &g_v}})
    EXPECT_EQ(non_finite(*got), 0) << name << " has non-finite (unwritten) entries";
  const double e_q = rel_err(g_q, rq), e_k = rel_err(g_k, rk), e_v = rel_err(g_v, rv), e_w = rel_err(g_w, rw);
  EXPECT_LE(e_q, kTolGrad) << "dq";
  EXPECT_LE(e_k, kTolGrad) << "dk";
  EXPECT_LE(e_v, kTolGrad) << "dv";
  EXPECT_LE(e_w, kTolDw) << "d kq_pre";

  double e_lse = 0;
  for (size_t bh = 0; bh < static_cast<size_t>(c.B) * c.H; ++bh) {
    const std::vector<double> want = ref_lse(q.val, k.val, wd.data() + (bh % c.H) * c.cq * c.ck, c, bh);
    for (int i = 0; i < c.T; ++i) {
      const double got = lse_f[bh * c.T + i];
      e_lse = std::max(e_lse, std::isfinite(got) ? std::abs(got - want[i]) : INFINITY);
    }
  }
  EXPECT_LE(e_lse, kTolLse) << "lse (max abs error)";
  std::printf("[ flash_mta ] %s rel err out %.2e dq %.2e dk %.2e dv %.2e dW %.2e; lse max abs err %.2e\n",
              c.str().c_str(), e_out, e_q, e_k, e_v, e_w, e_lse);
}

TEST(FlashMta, PaperConfigurations) {
  SKIP_WITHOUT_GPU();
  // The toy (2 x 9, both; with the toy's attention dropout 0.1 too) and kq-only (6 x 11, both)
  // configurations, T across tile boundaries.
  for (const Case& c : {Case{2, 2, 130, 64, 2, 9, mta::PadKey::Both}, Case{1, 2, 200, 128, 6, 11, mta::PadKey::Both},
                        Case{1, 1, 64, 64, 6, 11, mta::PadKey::Both}, Case{1, 1, 1, 128, 2, 9, mta::PadKey::Both},
                        Case{2, 2, 321, 128, 2, 9, mta::PadKey::Both, 0.1f}})
    check_case(c, 7u + static_cast<unsigned>(c.T * 31 + c.D));
}

TEST(FlashMta, RandomSpecs) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(2026);
  const int Ts[] = {1, 3, 17, 63, 64, 65, 127, 190, 257};
  for (int trial = 0; trial < 24; ++trial) {
    Case c;
    c.B = 1 + static_cast<int>(rng() % 2);
    c.H = 1 + static_cast<int>(rng() % 3);
    c.T = Ts[rng() % (sizeof(Ts) / sizeof(Ts[0]))];
    c.D = rng() % 2 ? 64 : 128;
    c.cq = 1 + static_cast<int>(rng() % 8);
    c.pad = static_cast<mta::PadKey>(rng() % 3);
    c.ck = 1 + static_cast<int>(rng() % 15);
    if (c.pad == mta::PadKey::Both && c.ck % 2 == 0) c.ck += c.ck == 14 ? -1 : 1;
    c.dropout = trial % 4 == 3 ? 0.2f : 0.0f;
    check_case(c, 100u + static_cast<unsigned>(trial));
  }
}

TEST(FlashMta, RefusesWhatItDoesNotCover) {
  mta::AttentionSpec s;
  s.heads = 2, s.head_dim = 64;
  s.kq_pre = mta::KqConv{2, 3, mta::PadKey::Both};
  EXPECT_TRUE(mta::cuda::flash_mta_supported(s, 64));
  EXPECT_FALSE(mta::cuda::flash_mta_supported(s, 32));
  s.gate = true;
  EXPECT_FALSE(mta::cuda::flash_mta_supported(s, 64));
  EXPECT_THROW(
      mta::cuda::flash_mta_forward(s, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, 8, {}, nullptr),
      std::invalid_argument);
  s.gate = false;
  s.kq_pre = mta::KqConv{9, 3, mta::PadKey::Both};
  EXPECT_FALSE(mta::cuda::flash_mta_supported(s, 64));
}

// What `mta attn --device cuda` runs (run_attention_tensors): F32 input of a covered spec goes through
// the fused kernels (metadata impl "fused", compute_dtype "BF16") and matches the float64 CPU op within
// bf16 tolerance; --impl materialized and F64 input take the materialized path (float32 tolerance).
// AttnOptions::fp16_overflow: the forward kernel raises the flag when a scaled logit (q scaled by 2^15,
// so that |q . k| / sqrt(D) passes 65504 somewhere) or a kq_pre weight (70000) lies beyond fp16's
// range, and leaves it at 0 for ordinary inputs.
TEST(FlashMta, Fp16OverflowFlag) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(7);
  mta::AttentionSpec spec;
  spec.heads = 2, spec.head_dim = 64;
  spec.kq_pre = mta::KqConv{2, 3, mta::PadKey::Both};
  const int B = 1, T = 70, D = 64;
  const size_t n = static_cast<size_t>(B) * spec.heads * T * D;
  const Tensor q = randn_bf16(n, rng), k = randn_bf16(n, rng), v = randn_bf16(n, rng);
  std::vector<uint16_t> qbig(q.bits.size());
  for (size_t i = 0; i < n; ++i) qbig[i] = float_to_bf16_bits(bf16_bits_to_float(q.bits[i]) * 32768.0f);
  // Somewhere |q_i . k_j| must pass 65504 * sqrt(D) after the scaling: check it on the host.
  double max_logit = 0;
  for (int h = 0; h < spec.heads; ++h)
    for (int i = 0; i < T; ++i)
      for (int j = 0; j <= i; ++j) {
        double dot = 0;
        for (int d = 0; d < D; ++d)
          dot += double(bf16_bits_to_float(qbig[(size_t(h) * T + i) * D + d])) * k.val[(size_t(h) * T + j) * D + d];
        max_logit = std::max(max_logit, std::fabs(dot) / 8.0);
      }
  ASSERT_GT(max_logit, 65504.0);
  const std::vector<float> w_ok(static_cast<size_t>(spec.heads) * 2 * 3, 0.5f);
  std::vector<float> w_big = w_ok;
  w_big[4] = 70000.f;
  using bf = __nv_bfloat16;
  auto flag = [&](const std::vector<uint16_t>& qbits, const std::vector<float>& w) {
    DevMem dq(n * 2), dk(n * 2), dv(n * 2), dout(n * 2), dw(w.size() * 4), dlse(n / D * 4), f(4);
    dq.upload(qbits), dk.upload(k.bits), dv.upload(v.bits), dw.upload(w);
    CUDA_OK(cudaMemset(f.as<void>(), 0, 4));
    mta::AttnOptions opt;
    opt.fp16_overflow = f.as<unsigned int>();
    mta::cuda::flash_mta_forward(spec, dq.as<bf>(), dk.as<bf>(), dv.as<bf>(), dw.as<float>(), dout.as<bf>(),
                                 dlse.as<float>(), B, T, opt, nullptr);
    CUDA_OK(cudaDeviceSynchronize());
    return f.download<unsigned int>(1)[0];
  };
  EXPECT_EQ(flag(q.bits, w_ok), 0u) << "ordinary inputs";
  EXPECT_EQ(flag(qbig, w_ok), 1u) << "logits beyond 65504";
  EXPECT_EQ(flag(q.bits, w_big), 1u) << "a weight beyond 65504";
}

TEST(FlashMta, AttnCommandPaths) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(99);
  mta::AttentionSpec spec;
  spec.heads = 2, spec.head_dim = 64;
  spec.kq_pre = mta::KqConv{3, 5, mta::PadKey::Left};
  const int B = 2, T = 77;
  const std::vector<int64_t> shape{B, spec.heads, T, spec.head_dim};
  const size_t n = static_cast<size_t>(B) * spec.heads * T * spec.head_dim;
  // bf16-exact values, so the fused path's rounding of its inputs changes nothing.
  auto values = [&](size_t count) { return randn_bf16(count, rng).val; };
  std::map<std::string, std::vector<double>> vals{{"q", values(n)}, {"k", values(n)}, {"v", values(n)},
                                                  {"dout", values(n)}};
  std::vector<double> w(static_cast<size_t>(spec.heads) * 3 * 5);
  std::uniform_real_distribution<double> ud(-0.5, 0.5);
  for (auto& x : w) x = ud(rng);
  for (int h = 0; h < spec.heads; ++h) w[(h * 3 + 2) * 5 + 4] += 1.0;  // identity at a = cq-1, c = o = ck-1
  mta::io::SafeTensors in32, in64;
  for (const auto& [name, v] : vals) {
    const std::vector<float> f(v.begin(), v.end());
    in32.tensors[name] = mta::io::make_tensor(shape, f.data());
    in64.tensors[name] = mta::io::make_tensor(shape, v.data());
  }
  const std::vector<float> wf(w.begin(), w.end());
  in32.tensors["kq_pre"] = mta::io::make_tensor({spec.heads, 3, 5}, wf.data());
  in64.tensors["kq_pre"] = mta::io::make_tensor({spec.heads, 3, 5}, w.data());

  const auto ref = mta::run_attention_tensors(spec, in64, mta::Device::Cpu);
  const auto fused = mta::run_attention_tensors(spec, in32, mta::Device::Cuda);
  const auto mat = mta::run_attention_tensors(spec, in32, mta::Device::Cuda, nullptr, mta::AttnImpl::Materialized);
  const auto mat64 = mta::run_attention_tensors(spec, in64, mta::Device::Cuda);
  EXPECT_EQ(fused.metadata.at("impl"), "fused");
  EXPECT_EQ(fused.metadata.at("compute_dtype"), "BF16");
  EXPECT_EQ(mat.metadata.at("impl"), "materialized");
  EXPECT_EQ(mat64.metadata.at("impl"), "materialized");
  for (const char* name : {"out", "grad_q", "grad_k", "grad_v", "grad_kq_pre"}) {
    SCOPED_TRACE(name);
    const std::vector<double> r = mta::io::to_f64(ref.at(name), name);
    const double tol = std::string(name) == "grad_kq_pre" ? kTolDw : std::string(name) == "out" ? kTolOut : kTolGrad;
    EXPECT_LE(rel_err(mta::io::to_f64(fused.at(name), name), r), tol);
    EXPECT_LE(rel_err(mta::io::to_f64(mat.at(name), name), r), 1e-5);
    EXPECT_LE(rel_err(mta::io::to_f64(mat64.at(name), name), r), 1e-10);
  }
  // Asking for the fused path where it cannot run is an input error, not a silent fallback.
  EXPECT_THROW(mta::run_attention_tensors(spec, in64, mta::Device::Cuda, nullptr, mta::AttnImpl::Fused),
               mta::InputError);
  mta::AttentionSpec mixed = spec;  // kq_pre with head mixing: not covered by the fused kernels yet
  mixed.head_pre = mta::HeadMix{2};
  EXPECT_THROW(mta::run_attention_tensors(mixed, in32, mta::Device::Cuda, nullptr, mta::AttnImpl::Fused),
               mta::InputError);

  // Logits beyond the fused kernel's fp16 operands (fused_range.h): q scaled by 2^13 (exact) makes the
  // bound |q| |k| / sqrt(D) exceed 60000 (|q| ~ 8 * 8192, |k| ~ 10, sqrt(D) = 8); auto takes the
  // materialized op and says why, and its results are finite and match the reference (out and grad_v,
  // the well-conditioned ones with logits in the thousands); --impl fused refuses.
  mta::io::SafeTensors big32 = in32, big64 = in64;
  {
    std::vector<double> qb = vals["q"];
    for (auto& x : qb) x *= 8192.0;
    const std::vector<float> qf(qb.begin(), qb.end());
    big32.tensors["q"] = mta::io::make_tensor(shape, qf.data());
    big64.tensors["q"] = mta::io::make_tensor(shape, qb.data());
  }
  const auto big_ref = mta::run_attention_tensors(spec, big64, mta::Device::Cpu);
  const auto big = mta::run_attention_tensors(spec, big32, mta::Device::Cuda);
  EXPECT_EQ(big.metadata.at("impl"), "materialized");
  EXPECT_NE(big.metadata.count("impl_reason"), 0u);
  for (const char* name : {"out", "grad_q", "grad_k", "grad_v", "grad_kq_pre"}) {
    SCOPED_TRACE(std::string("large logits: ") + name);
    const std::vector<double> got = mta::io::to_f64(big.at(name), name);
    EXPECT_EQ(non_finite(got), 0);
    if (std::string(name) == "out" || std::string(name) == "grad_v")
      EXPECT_LE(rel_err(got, mta::io::to_f64(big_ref.at(name), name)), 1e-2);
  }
  EXPECT_THROW(mta::run_attention_tensors(spec, big32, mta::Device::Cuda, nullptr, mta::AttnImpl::Fused),
               mta::InputError);
  EXPECT_EQ(fused.metadata.count("impl_reason"), 0u);
}

}  // namespace
