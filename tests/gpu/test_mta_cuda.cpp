// GPU tests of the CUDA path (mta::cuda) against the CPU reference (mta::cpu): forward and every
// gradient, float32 and float64, on random specs covering every option, pad mode and group size, plus
// one large paper-LM-like case and determinism checks. Labelled "gpu" in CTest; every test that needs
// a device skips itself (GTEST_SKIP) when cudaGetDeviceCount reports none. The one test that needs no
// device, Conditioning, checks on the CPU that the random cases are well-conditioned enough for the
// tolerances below (the CPU reference in float against itself in double).
//
// Environment: MTA_TEST_VERBOSE=1 prints every tensor's error; the cases marked "workspace=1MiB" set
// MTA_CUDA_WORKSPACE_MB=1 so that the op splits its units into several chunks.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention/mta_cpu.h"
#include "attention/mta_cuda.h"
#include "attn_test_util.h"
#include "util/error.h"

using mta::AttentionSpec;
using mta::AttnDims;
using mta::KqConv;
using mta::PadKey;
using mta::testing::AttnCase;

namespace {

constexpr int kRandomCases = 72;
// ||gpu - cpu|| / ||cpu||, per tensor.
constexpr double kTolOutF32 = 1e-5, kTolGradF32 = 2e-5, kTolF64 = 1e-12;

bool have_gpu() { return mta::cuda::device_count() > 0; }

#define SKIP_WITHOUT_GPU() \
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device (cudaGetDeviceCount reports none)"

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// A device array for the tests: upload, poison (all bytes 0xFF: NaN in float and double), download.
template <typename T>
class DevBuf {
 public:
  explicit DevBuf(size_t n) : n_(n) { cuda_ok(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc"); }
  explicit DevBuf(const std::vector<T>& h) : DevBuf(h.size()) {
    if (n_) cuda_ok(cudaMemcpy(p_, h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  ~DevBuf() { cudaFree(p_); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  T* get() const { return p_; }
  void poison() { cuda_ok(cudaMemset(p_, 0xFF, n_ * sizeof(T)), "cudaMemset"); }
  std::vector<T> host() const {
    std::vector<T> h(n_);
    if (n_) cuda_ok(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return h;
  }

 private:
  size_t n_ = 0;
  T* p_ = nullptr;
};

// Sets an environment variable for the lifetime of the object.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    if (value) setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (had_) setenv(name_.c_str(), old_.c_str(), 1);
    else unsetenv(name_.c_str());
  }

 private:
  std::string name_, old_;
  bool had_ = false;
};

template <typename T>
struct Result {
  std::vector<T> out, dq, dk, dv;
  std::map<std::string, std::vector<T>> grads;  // by parameter name
};

template <typename P, typename M>
P ptrs(M& m) {
  return mta::attn_pointers<P>([&](const char* n) -> decltype(P{}.kq_pre) {
    auto it = m.find(n);
    return it == m.end() ? nullptr : it->second;
  });
}

// Parameter gradients start from these (non-zero) values: the op must ADD into them.
template <typename T>
std::map<std::string, std::vector<T>> initial_grads(const AttnCase<T>& c, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 0.1);
  std::map<std::string, std::vector<T>> g;
  for (const auto& [name, val] : c.params) {
    auto& x = g[name];
    for (size_t i = 0; i < val.size(); ++i) x.push_back(static_cast<T>(nd(rng)));
  }
  return g;
}

template <typename T>
Result<T> run_cpu(const AttnCase<T>& c, const std::map<std::string, std::vector<T>>& g0, bool backward = true) {
  Result<T> r;
  r.out.assign(c.dims.numel_v(), T(0));
  mta::cpu::mta_forward<T>(c.spec, c.dims, c.q.data(), c.k.data(), c.v.data(), c.param_ptrs(), r.out.data(), c.opt);
  if (!backward) return r;
  r.dq.assign(c.dims.numel(), T(0)), r.dk.assign(c.dims.numel(), T(0)), r.dv.assign(c.dims.numel_v(), T(0));
  r.grads = g0;
  std::map<std::string, T*> gp;
  for (auto& [name, val] : r.grads) gp[name] = val.data();
  mta::cpu::mta_backward<T>(c.spec, c.dims, c.q.data(), c.k.data(), c.v.data(), c.param_ptrs(), c.dout.data(), r.dq.data(),
                            r.dk.data(), r.dv.data(), ptrs<mta::AttnParamGrads<T>>(gp), c.opt);
  return r;
}

// Outputs are poisoned with NaN before each GPU call, so an element the op fails to write shows up.
template <typename T>
Result<T> run_gpu(const AttnCase<T>& c, const std::map<std::string, std::vector<T>>& g0, bool backward = true) {
  DevBuf<T> q(c.q), k(c.k), v(c.v), dout(c.dout);
  std::map<std::string, std::unique_ptr<DevBuf<T>>> params, grads;
  std::map<std::string, const T*> pp;
  std::map<std::string, T*> gp;
  for (const auto& [name, val] : c.params) {
    params[name] = std::make_unique<DevBuf<T>>(val);
    pp[name] = params[name]->get();
    grads[name] = std::make_unique<DevBuf<T>>(g0.at(name));
    gp[name] = grads[name]->get();
  }
  const auto p = ptrs<mta::AttnParams<T>>(pp);
  Result<T> r;
  DevBuf<T> out(c.dims.numel_v());
  out.poison();
  mta::cuda::mta_forward<T>(c.spec, c.dims, q.get(), k.get(), v.get(), p, out.get(), c.opt);
  r.out = out.host();
  if (!backward) return r;
  DevBuf<T> dq(c.dims.numel()), dk(c.dims.numel()), dv(c.dims.numel_v());
  dq.poison(), dk.poison(), dv.poison();
  mta::cuda::mta_backward<T>(c.spec, c.dims, q.get(), k.get(), v.get(), p, dout.get(), dq.get(), dk.get(), dv.get(),
                             ptrs<mta::AttnParamGrads<T>>(gp), c.opt);
  r.dq = dq.host(), r.dk = dk.host(), r.dv = dv.host();
  for (auto& [name, buf] : grads) r.grads[name] = buf->host();
  return r;
}

template <typename T>
double rel_err(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    num += d * d, den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

template <typename T>
long long non_finite(const std::vector<T>& a) {
  long long n = 0;
  for (T x : a) n += !std::isfinite(x);
  return n;
}

std::vector<double> to_double(const std::vector<float>& a) { return std::vector<double>(a.begin(), a.end()); }
const std::vector<double>& to_double(const std::vector<double>& a) { return a; }

// One tensor: all finite, and ||got - ref|| / ||ref|| <= tol. With ref64 (float32 runs: the CPU in
// float64 on the same case), the tolerance of a tensor that is ill-conditioned grows to 3 times the
// CPU's own float32 error: with a norm, a per-head head_post scale (group 1) is a symmetry of the
// output, so its gradient is ~0 and mostly rounding in any float32 implementation.
template <typename T>
void expect_tensor(const std::string& name, const std::vector<T>& got, const std::vector<T>& ref, double tol,
                   const std::vector<double>* ref64) {
  EXPECT_EQ(non_finite(got), 0) << name << " has non-finite entries";
  const double cpu_err = ref64 ? rel_err(to_double(ref), *ref64) : 0.0;
  const double err = rel_err(got, ref), eff_tol = std::max(tol, 3 * cpu_err);
  if (std::getenv("MTA_TEST_VERBOSE"))
    std::printf("  %-16s gpu vs cpu %.3g (tolerance %.3g%s)\n", name.c_str(), err, eff_tol,
                eff_tol > tol ? ", widened: ill-conditioned" : "");
  EXPECT_LE(err, eff_tol) << name << " (the CPU's float32 error: " << cpu_err << ")";
}

// Compares a result with the reference tensor by tensor.
template <typename T>
void expect_close(const Result<T>& got, const Result<T>& ref, double tol_out, double tol_grad,
                  const Result<double>* ref64 = nullptr) {
  expect_tensor("out", got.out, ref.out, tol_out, ref64 ? &ref64->out : nullptr);
  expect_tensor("grad_q", got.dq, ref.dq, tol_grad, ref64 ? &ref64->dq : nullptr);
  expect_tensor("grad_k", got.dk, ref.dk, tol_grad, ref64 ? &ref64->dk : nullptr);
  expect_tensor("grad_v", got.dv, ref.dv, tol_grad, ref64 ? &ref64->dv : nullptr);
  ASSERT_EQ(got.grads.size(), ref.grads.size());
  for (const auto& [name, val] : ref.grads)
    expect_tensor("grad_" + name, got.grads.at(name), val, tol_grad, ref64 ? &ref64->grads.at(name) : nullptr);
}

// ---------------------------------------------------------------------------------------------
// The random cases.

struct CaseDesc {
  AttentionSpec spec;
  int B = 1, T = 1, Dv = 0;
  float dropout = 0;
  unsigned long long dropout_seed = 0;
  bool small_workspace = false;  // MTA_CUDA_WORKSPACE_MB=1: several chunks of units (and row blocks)
  int row_block = 0;             // MTA_CUDA_ROW_BLOCK: rows per block (0: the op's choice)
  unsigned seed = 0;

  std::string str() const {
    return mta::spec_to_json(spec).dump() + " B=" + std::to_string(B) + " T=" + std::to_string(T) +
           " Dv=" + std::to_string(Dv) + " dropout=" + std::to_string(dropout) +
           (small_workspace ? " workspace=1MiB" : "") +
           (row_block ? " row_block=" + std::to_string(row_block) : "");
  }
};

// Every (H, g) with g dividing H, for the head counts of the brief.
const std::vector<std::pair<int, int>>& head_groups() {
  static const std::vector<std::pair<int, int>> v = [] {
    std::vector<std::pair<int, int>> r;
    for (int H : {1, 2, 3, 4, 6, 8, 16})
      for (int g = 1; g <= H; ++g)
        if (H % g == 0) r.emplace_back(H, g);
    return r;
  }();
  return v;
}

CaseDesc describe(int idx) {
  std::mt19937 rng(20250 + 7919u * idx);
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  auto coin = [&]() { return uni(0, 1) == 1; };
  const auto [H, g] = head_groups()[idx % head_groups().size()];
  CaseDesc c;
  c.seed = 1000 + idx;
  AttentionSpec& s = c.spec;
  s.heads = H;
  s.head_dim = idx % 9 == 4 ? 128 : uni(1, 64);
  auto divisor = [&]() {
    std::vector<int> d;
    for (int x = 1; x <= H; ++x)
      if (H % x == 0) d.push_back(x);
    return d[uni(0, static_cast<int>(d.size()) - 1)];
  };
  auto conv = [&](int pad) {
    KqConv k;
    k.pad_key = static_cast<PadKey>(pad % 3);
    k.q = uni(1, 8);
    k.k = uni(1, 15);
    if (idx % 11 == 7) k.q = 8, k.k = 15;  // the largest kernels of the brief
    if (k.pad_key == PadKey::Both && k.k % 2 == 0) k.k += k.k == 15 ? -1 : 1;
    return k;
  };
  if (idx == 0) {
    // standard causal attention
  } else if (idx == 1) {
    s.kq_pre = conv(0), s.head_pre = mta::HeadMix{g}, s.kq_post = conv(1), s.head_post = mta::HeadMix{divisor()};
    s.norm = true, s.depth_scale_layer = 3, s.gate = true;
  } else {
    if (coin()) s.kq_pre = conv(idx);
    if (coin()) s.kq_post = conv(idx + 1);
    const bool pre = (idx / head_groups().size()) % 2 == 0;
    (pre ? s.head_pre : s.head_post) = mta::HeadMix{g};
    if (coin()) (pre ? s.head_post : s.head_pre) = mta::HeadMix{divisor()};
    s.norm = coin();
    if (coin()) s.depth_scale_layer = uni(0, 12);
    s.gate = coin();
  }
  switch (idx % 6) {
    case 0: c.T = uni(1, 8); break;             // shorter than most kernels
    case 1: c.T = idx % 12 == 1 ? 200 : 199; break;
    default: c.T = uni(1, 200);
  }
  c.B = uni(1, 3);
  if (!s.norm && !s.gate && idx % 5 == 2) c.Dv = uni(1, 64);  // value dim != key dim (DIFF attention)
  if (idx % 8 == 5) c.dropout = 0.1f + 0.1f * static_cast<float>(idx % 4), c.dropout_seed = 77 + idx;
  c.small_workspace = idx % 4 == 3;
  if (idx % 3 == 2) c.row_block = uni(1, 48);  // many row blocks, halos wider than a block included
  s.validate();
  return c;
}

template <typename T>
AttnCase<T> make_case(const CaseDesc& d) {
  AttnCase<T> c = mta::testing::random_case<T>(d.spec, d.B, d.T, d.seed, /*identity=*/false, d.Dv);
  c.opt.dropout = d.dropout;
  c.opt.dropout_seed = d.dropout_seed;
  return c;
}

// The float64 CPU result of a case (for the conditioning of its float32 tensors).
Result<double> cpu_f64(const CaseDesc& d) {
  const AttnCase<double> c = make_case<double>(d);
  return run_cpu(c, initial_grads(c, d.seed + 5));
}

template <typename T>
void check_case(const CaseDesc& d, double tol_out, double tol_grad) {
  const AttnCase<T> c = make_case<T>(d);
  const auto g0 = initial_grads(c, d.seed + 5);
  const Result<T> ref = run_cpu(c, g0);
  Result<double> ref64;
  if constexpr (std::is_same_v<T, float>) ref64 = cpu_f64(d);
  ScopedEnv env("MTA_CUDA_WORKSPACE_MB", d.small_workspace ? "1" : nullptr);
  const std::string rows = std::to_string(d.row_block);
  ScopedEnv rows_env("MTA_CUDA_ROW_BLOCK", d.row_block ? rows.c_str() : nullptr);
  const Result<T> got = run_gpu(c, g0);
  expect_close(got, ref, tol_out, tol_grad, std::is_same_v<T, float> ? &ref64 : nullptr);
}

class RandomSpecs : public ::testing::TestWithParam<int> {};

TEST_P(RandomSpecs, MatchesCpuFloat32) {
  SKIP_WITHOUT_GPU();
  const CaseDesc d = describe(GetParam());
  SCOPED_TRACE(d.str());
  check_case<float>(d, kTolOutF32, kTolGradF32);
}

TEST_P(RandomSpecs, MatchesCpuFloat64) {
  SKIP_WITHOUT_GPU();
  const CaseDesc d = describe(GetParam());
  SCOPED_TRACE(d.str());
  check_case<double>(d, kTolF64, kTolF64);
}

INSTANTIATE_TEST_SUITE_P(MtaCuda, RandomSpecs, ::testing::Range(0, kRandomCases));

// No device needed: the random cases are well-conditioned enough that the float32 tolerances bite.
// The CPU in float32 is within a third of them of the CPU in float64 for every output and for the
// gradients of nearly every case (the exceptions are ill-conditioned gradients: see expect_tensor).
// MTA_TEST_VERBOSE=1 prints each case's errors.
TEST(MtaCudaCases, Conditioning) {
  double worst_out = 0, worst_grad = 0;
  int loose = 0;
  for (int idx = 0; idx < kRandomCases; ++idx) {
    const CaseDesc d = describe(idx);
    SCOPED_TRACE(d.str());
    const AttnCase<float> c32 = make_case<float>(d);
    const Result<float> r32 = run_cpu(c32, initial_grads(c32, d.seed + 5));
    const Result<double> r64 = cpu_f64(d);
    const double eo = rel_err(to_double(r32.out), r64.out);
    double eg = std::max({rel_err(to_double(r32.dq), r64.dq), rel_err(to_double(r32.dk), r64.dk),
                          rel_err(to_double(r32.dv), r64.dv)});
    std::string worst = "grad_q/k/v";
    for (const auto& [name, val] : r64.grads) {
      const double e = rel_err(to_double(r32.grads.at(name)), val);
      if (e > eg) eg = e, worst = "grad_" + name;
    }
    if (std::getenv("MTA_TEST_VERBOSE"))
      std::printf("case %d: out %.3g, worst gradient %.3g (%s)\n", idx, eo, eg, worst.c_str());
    EXPECT_LE(eo, kTolOutF32 / 3) << "out";
    loose += eg > kTolGradF32 / 3;
    worst_out = std::max(worst_out, eo), worst_grad = std::max(worst_grad, eg);
  }
  // (8 to 10 of the 72 here, depending on the machine's BLAS and thread count.)
  EXPECT_LE(loose, kRandomCases / 4) << "cases with a gradient whose float32 CPU error exceeds a third of the tolerance";
  std::printf("float32 CPU vs float64 CPU over %d cases: worst out %.3g, worst gradient %.3g; %d cases with a gradient "
              "above %.3g\n",
              kRandomCases, worst_out, worst_grad, loose, kTolGradF32 / 3);
}

// Coverage of the generator itself: every (H, g) as head_pre and as head_post, every pad mode, dropout,
// T shorter than the kernel, several chunks.
TEST(MtaCudaCases, CoverEveryOption) {
  std::map<std::pair<int, int>, int> pre, post;
  std::map<int, int> pads;
  int dropout = 0, short_t = 0, dv = 0, chunked = 0, d128 = 0;
  for (int idx = 0; idx < kRandomCases; ++idx) {
    const CaseDesc d = describe(idx);
    const AttentionSpec& s = d.spec;
    if (s.head_pre) ++pre[{s.heads, s.head_pre->group}];
    if (s.head_post) ++post[{s.heads, s.head_post->group}];
    for (const auto& k : {s.kq_pre, s.kq_post})
      if (k) {
        ++pads[static_cast<int>(k->pad_key)];
        if (d.T < k->q || d.T < k->k) ++short_t;
      }
    dropout += d.dropout > 0, dv += d.Dv != 0, chunked += d.small_workspace, d128 += s.head_dim == 128;
  }
  for (const auto& hg : head_groups()) {
    EXPECT_GT(pre[hg], 0) << "head_pre H=" << hg.first << " g=" << hg.second;
    EXPECT_GT(post[hg], 0) << "head_post H=" << hg.first << " g=" << hg.second;
  }
  EXPECT_EQ(pads.size(), 3u);
  EXPECT_GT(dropout, 3);
  EXPECT_GT(short_t, 3);
  EXPECT_GT(dv, 1);
  EXPECT_GT(chunked, 10);
  EXPECT_GT(d128, 3);
}

// ---------------------------------------------------------------------------------------------
// Larger and special cases.

AttentionSpec paper_lm_spec(int H, int D) {
  AttentionSpec s;
  s.heads = H, s.head_dim = D;
  s.kq_pre = KqConv{6, 11, PadKey::Both};
  s.head_pre = mta::HeadMix{H};
  s.kq_post = KqConv{6, 11, PadKey::Both};
  s.head_post = mta::HeadMix{H};
  s.norm = true, s.gate = true;
  return s;
}

// B=2, H=16, T=1024, D=64 with the paper LM's options: forward and backward against the CPU, and the
// GPU's backward twice (parameter gradients must be bitwise equal: no atomics).
TEST(MtaCudaLarge, PaperLmT1024) {
  SKIP_WITHOUT_GPU();
  CaseDesc d;
  d.spec = paper_lm_spec(16, 64);
  d.B = 2, d.T = 1024, d.seed = 4242;
  const AttnCase<float> c = make_case<float>(d);
  const auto g0 = initial_grads(c, 99);
  const Result<float> ref = run_cpu(c, g0);
  const Result<float> got = run_gpu(c, g0);
  expect_close(got, ref, kTolOutF32, kTolGradF32);
  const Result<float> again = run_gpu(c, g0);
  EXPECT_EQ(again.out, got.out);
  EXPECT_EQ(again.dq, got.dq);
  EXPECT_EQ(again.dk, got.dk);
  EXPECT_EQ(again.dv, got.dv);
  EXPECT_EQ(again.grads, got.grads);
}

// The chunking (of units and of rows) does not change the result beyond rounding, and repeated runs are
// bitwise equal.
TEST(MtaCudaLarge, ChunkingAndDeterminism) {
  SKIP_WITHOUT_GPU();
  CaseDesc d;
  d.spec = paper_lm_spec(4, 16);
  d.spec.head_pre = mta::HeadMix{2};
  d.spec.depth_scale_layer = 2;
  d.B = 3, d.T = 300, d.seed = 77, d.dropout = 0.2f, d.dropout_seed = 5;
  const AttnCase<double> c = make_case<double>(d);
  const auto g0 = initial_grads(c, 7);
  const Result<double> ref = run_cpu(c, g0);
  Result<double> whole, chunked, chunked2;
  whole = run_gpu(c, g0);
  {
    ScopedEnv env("MTA_CUDA_WORKSPACE_MB", "1");
    chunked = run_gpu(c, g0);
    chunked2 = run_gpu(c, g0);
  }
  expect_close(whole, ref, kTolF64, kTolF64);
  expect_close(chunked, ref, kTolF64, kTolF64);
  EXPECT_EQ(chunked.out, chunked2.out);
  EXPECT_EQ(chunked.dq, chunked2.dq);
  EXPECT_EQ(chunked.dk, chunked2.dk);
  EXPECT_EQ(chunked.dv, chunked2.dv);
  EXPECT_EQ(chunked.grads, chunked2.grads);
  // Row blocks of 37 rows (the 6 x 11 halos span several blocks' edges), also with chunks of units.
  Result<double> rowed, rowed2;
  {
    ScopedEnv rows("MTA_CUDA_ROW_BLOCK", "37");
    rowed = run_gpu(c, g0);
    ScopedEnv env("MTA_CUDA_WORKSPACE_MB", "1");
    rowed2 = run_gpu(c, g0);
  }
  expect_close(rowed, ref, kTolF64, kTolF64);
  expect_close(rowed2, ref, kTolF64, kTolF64);
}

// Identity parameters: the layer is standard attention (then norm and gate), on the GPU too.
TEST(MtaCudaSpecial, IdentityParameters) {
  SKIP_WITHOUT_GPU();
  AttentionSpec s = paper_lm_spec(4, 8);
  AttnCase<double> c = mta::testing::random_case<double>(s, 2, 37, 3, /*identity=*/true);
  const auto g0 = initial_grads(c, 1);
  expect_close(run_gpu(c, g0), run_cpu(c, g0), kTolF64, kTolF64);
}

// Kernels larger than the tiled stage kernels take (cq > 8, ck > 15, g > 16) run the generic forms:
// both are checked against the CPU, in float64 and float32, with T crossing several 32 x 32 tiles.
TEST(MtaCudaSpecial, BeyondTheTiledSizes) {
  SKIP_WITHOUT_GPU();
  CaseDesc d;
  AttentionSpec& s = d.spec;
  s.heads = 32, s.head_dim = 8;
  s.kq_pre = KqConv{10, 17, PadKey::Both};
  s.head_pre = mta::HeadMix{32};
  s.kq_post = KqConv{9, 16, PadKey::Left};
  s.head_post = mta::HeadMix{2};
  s.validate();
  d.B = 1, d.T = 70, d.seed = 31;
  check_case<double>(d, kTolF64, kTolF64);
  check_case<float>(d, kTolOutF32, kTolGradF32);
  d.spec.head_pre = mta::HeadMix{16}, d.spec.head_post = mta::HeadMix{32};  // tiled mixing, generic convolution
  d.T = 33;
  check_case<double>(d, kTolF64, kTolF64);
}

// The kernels compiled for the paper's convolution sizes (6 x 11, and the toy task's 2 x 9; float32,
// attention/conv_fixed.cuh) against the CPU, for every pad mode, T shorter than one tile and crossing
// several, row blocks whose halos cross their edges; and against the runtime-size kernels
// (MTA_CUDA_GENERIC_CONV=1): the convolution adds the same terms in the same order, so the output is
// bitwise equal; the weight gradients differ by float partial sums only.
TEST(MtaCudaSpecial, FixedSizeConvolutions) {
  SKIP_WITHOUT_GPU();
  const std::pair<int, int> sizes[] = {{6, 11}, {2, 9}};
  int n = 0;
  for (const auto& [cq, ck] : sizes)
    for (int pad = 0; pad < 3; ++pad) {
      CaseDesc d;
      AttentionSpec& s = d.spec;
      s.heads = 4, s.head_dim = 16;
      s.kq_pre = KqConv{cq, ck, static_cast<PadKey>(pad)};
      s.kq_post = KqConv{cq, ck, static_cast<PadKey>((pad + 1) % 3)};
      s.head_pre = mta::HeadMix{2};
      s.validate();
      d.B = 2, d.seed = 600 + n;
      d.T = n % 3 == 0 ? 5 : n % 3 == 1 ? 160 : 300;
      d.row_block = n % 2 == 1 ? 37 : 0;
      SCOPED_TRACE(d.str());
      check_case<float>(d, kTolOutF32, kTolGradF32);
      const AttnCase<float> c = make_case<float>(d);
      const auto g0 = initial_grads(c, d.seed + 5);
      const std::string rows = std::to_string(d.row_block);
      ScopedEnv rows_env("MTA_CUDA_ROW_BLOCK", d.row_block ? rows.c_str() : nullptr);
      const Result<float> fixed = run_gpu(c, g0);
      Result<float> runtime;
      {
        ScopedEnv env("MTA_CUDA_GENERIC_CONV", "1");
        runtime = run_gpu(c, g0);
      }
      EXPECT_EQ(fixed.out, runtime.out);
      expect_close(fixed, runtime, 0.0, 1e-6);
      ++n;
    }
}

// AttnOptions::bf16_products (the model's setting): inputs that are bf16 values, Q K^T and the dS
// products on tensor cores (dS rounded to bf16), against the CPU in float64 on the same inputs. The
// tolerance allows dS's rounding (~2^-9 per element); row blocks of 37 rows, with and without the
// epilogue.
TEST(MtaCudaSpecial, Bf16Products) {
  SKIP_WITHOUT_GPU();
  auto to_bf16 = [](std::vector<float>& x) {
    for (float& e : x) e = static_cast<float>(__nv_bfloat16(e));
  };
  for (int epi = 0; epi < 2; ++epi) {
    CaseDesc d;
    d.spec = paper_lm_spec(4, 16);
    d.spec.norm = d.spec.gate = epi == 1;
    d.B = 2, d.T = 150, d.seed = 900 + epi, d.row_block = 37;
    SCOPED_TRACE(d.str());
    AttnCase<float> c = make_case<float>(d);
    to_bf16(c.q), to_bf16(c.k), to_bf16(c.v), to_bf16(c.dout);
    AttnCase<double> c64 = make_case<double>(d);
    c64.q.assign(c.q.begin(), c.q.end()), c64.k.assign(c.k.begin(), c.k.end());
    c64.v.assign(c.v.begin(), c.v.end()), c64.dout.assign(c.dout.begin(), c.dout.end());
    for (auto& [name, val] : c.params) c64.params[name].assign(val.begin(), val.end());
    const auto g0 = initial_grads(c, d.seed + 5);
    std::map<std::string, std::vector<double>> g64;
    for (const auto& [name, val] : g0) g64[name].assign(val.begin(), val.end());
    const Result<double> ref = run_cpu(c64, g64);
    c.opt.bf16_products = true;
    const std::string rows = std::to_string(d.row_block);
    ScopedEnv rows_env("MTA_CUDA_ROW_BLOCK", rows.c_str());
    const Result<float> got = run_gpu(c, g0);
    Result<double> got64{to_double(got.out), to_double(got.dq), to_double(got.dk), to_double(got.dv), {}};
    for (const auto& [name, val] : got.grads) got64.grads[name] = to_double(val);
    expect_close(got64, ref, 1e-2, 2e-2);
    // Not the float32 products: the option must reach the kernels (dq moves by ~1e-3).
    c.opt.bf16_products = false;
    const Result<float> f32 = run_gpu(c, g0);
    EXPECT_NE(f32.dq, got.dq);
  }
}

// Invalid arguments are refused before any device work, as on the CPU.
TEST(MtaCudaSpecial, RefusesWhatTheCpuRefuses) {
  AttentionSpec s;
  s.heads = 2, s.head_dim = 4;
  AttnDims dims{1, 3, 5, 4};  // 3 heads, spec says 2
  EXPECT_THROW(mta::cuda::mta_forward<float>(s, dims, nullptr, nullptr, nullptr, {}, nullptr), mta::InputError);
  s.norm = true;
  AttnDims dv{1, 2, 5, 4, 8};  // value dim != key dim with norm
  EXPECT_THROW(mta::cuda::mta_forward<float>(s, dv, nullptr, nullptr, nullptr, {}, nullptr), mta::InputError);
  AttnDims ok{1, 2, 5, 4};
  EXPECT_THROW(mta::cuda::mta_backward<float>(s, ok, nullptr, nullptr, nullptr, {}, nullptr, nullptr, nullptr, nullptr, {}),
               std::invalid_argument);  // missing gradient buffer for norm
}

}  // namespace
