// The model on one GPU: the same architecture, parameter layout and names as ModelT (model.cpp),
// with bf16 activations for the matrix products, fp32 residual stream, fp32 master weights,
// gradients and AdamW moments, and a bf16 copy of the weights. See src/cuda/layers.h.
//
// Attention: standard attention and DIFF attention run the flash kernel, attention dropout included
// (D = 64 or 128; DIFF as two calls per sub-head, one per half of its 2D-wide values);
// MTA layers and other head dims run the materialized fp32 op
// (mta::cuda::mta_forward/backward) on fp32 copies of q, k, v (MTA layers with bf16_products: Q K^T
// and the dS products on tensor cores, attention_op.h). MTA layers whose options apart from
// the epilogue (norm, depth scaling, gate) the fused kernels cover run those plus the epilogue
// kernels (attention/epilogue_cuda.h): kq_pre only (attention/flash_mta.h, dropout included) or head
// mixing only (attention/flash_mix.h: groups of up to 16 heads, no attention dropout in training);
// D = 64 or 128. MTA_FLASH_MTA=0 in the environment sends every MTA layer through the materialized op.
// The kq layers (kq convolutions with head mixing) run attention/flash_kq_layer.h (no dropout): both
// passes at D = 64, the forward alone at D = 128 (with the materialized op's backward, faster there).
// See fused_allowed and use_fused for MTA_FUSED_KQ_LAYER.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "attention/attention_op.h"
#include "attention/flash_attn.h"
#include "attention/fused_attention.h"
#include "attention/mta_cuda.h"
#include "cuda/check.h"
#include "cuda/gemm.h"
#include "cuda/layers.h"
#include "cuda/phase_timer.h"
#include "model/layer_naming.h"
#include "model/trainable.h"
#include "util/env.h"
#include "util/error.h"

namespace mta {
namespace {

using cuda::bf16;

#define CK(x) MTA_CUDA_CHECK(x)
#define CK_LAUNCH() MTA_CUDA_CHECK_LAUNCH("kernel")

// A device allocation that frees itself.
template <typename T>
class DevBuf {
 public:
  DevBuf() = default;
  explicit DevBuf(size_t n) { resize(n); }
  ~DevBuf() { release(); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  DevBuf& operator=(DevBuf&& o) noexcept {
    if (this != &o) release(), p_ = o.p_, n_ = o.n_, o.p_ = nullptr, o.n_ = 0;
    return *this;
  }
  void resize(size_t n) {
    if (n == n_) return;
    release();
    if (n) CK(cudaMalloc(&p_, n * sizeof(T)));
    n_ = n;
  }
  void zero(cudaStream_t s) {
    if (n_) CK(cudaMemsetAsync(p_, 0, n_ * sizeof(T), s));
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  void release() {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  size_t n_ = 0;
};

std::string lname(int l, const std::string& rest) { return layer_param_name(l, rest); }
uint64_t site_seed(uint64_t base, int layer, int site) { return dropout_site_seed(base, layer, site); }

constexpr int kThreads = 256;
inline int blocks_for(long long n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

// DIFF helpers. Sub-head h of [B, H, T, dv] shares value head h/2 of [B, H/2, T, dv].
__global__ void dup_values_kernel(const bf16* v, float* vdup, int B, int H, long long hs) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long total = static_cast<long long>(B) * H * hs;
  if (i >= total) return;
  const long long bh = i / hs, e = i % hs;
  const long long b = bh / H, h = bh % H;
  vdup[i] = __bfloat162float(v[(b * (H / 2) + h / 2) * hs + e]);
}
// comb[b, h] = o[b, 2h] - lambda * o[b, 2h + 1]
__global__ void diff_combine_kernel(const float* o, float* comb, float lambda, int B, int Hd, long long hs) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<long long>(B) * Hd * hs) return;
  const long long bh = i / hs, e = i % hs;
  const long long b = bh / Hd, h = bh % Hd;
  const float* o1 = o + (b * 2 * Hd + 2 * h) * hs;
  comb[i] = o1[e] - lambda * o1[hs + e];
}
// dout[b, 2h] = dcomb, dout[b, 2h + 1] = -lambda dcomb.
__global__ void diff_split_grad_kernel(const float* dcomb, float* dout, float lambda, int B, int Hd, long long hs) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<long long>(B) * Hd * hs) return;
  const long long bh = i / hs, e = i % hs;
  const long long b = bh / Hd, h = bh % Hd;
  float* d1 = dout + (b * 2 * Hd + 2 * h) * hs;
  d1[e] = dcomb[i];
  d1[hs + e] = -lambda * dcomb[i];
}
// dv[b, h] = dvdup[b, 2h] + dvdup[b, 2h + 1], as bf16.
__global__ void diff_sum_pairs_kernel(const float* dvdup, bf16* dv, int B, int Hd, long long hs) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<long long>(B) * Hd * hs) return;
  const long long bh = i / hs, e = i % hs;
  const long long b = bh / Hd, h = bh % Hd;
  const float* a = dvdup + (b * 2 * Hd + 2 * h) * hs;
  dv[i] = __float2bfloat16(a[e] + a[hs + e]);
}
// DIFF through the flash kernel (head dim d = 64 or 128, values of 2d shared by sub-head pairs): the
// 2d-wide values are two d-wide value tensors, so a sub-head is two flash calls with the same q, k
// (and the same lse); their outputs are joined and their gradients added (dq, dk: the softmax
// gradient is linear in dO V^T and in rowsum(dO * O), so the halves' contributions simply add).
// vhalf_e[b, h, t, i] = v[b, h/2, t, e*d + i] for e = 0, 1.
__global__ void diff_value_halves_kernel(const bf16* v, bf16* v0, bf16* v1, int H, int T, int d, long long total) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const long long row = i / d, bh = row / T, t = row % T, b = bh / H, h = bh % H;
  const bf16* src = v + ((b * (H / 2) + h / 2) * T + t) * (2LL * d) + i % d;
  v0[i] = src[0];
  v1[i] = src[d];
}
// o[r, e*d + i] = half_e[r, i] (r = b, h, t), as float.
__global__ void diff_join_halves_kernel(const bf16* h0, const bf16* h1, float* o, int d, long long total) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  float* dst = o + (i / d) * (2LL * d) + i % d;
  dst[0] = __bfloat162float(h0[i]);
  dst[d] = __bfloat162float(h1[i]);
}
// half_e[r, i] = bf16(o[r, e*d + i]).
__global__ void diff_split_halves_kernel(const float* o, bf16* h0, bf16* h1, int d, long long total) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const float* src = o + (i / d) * (2LL * d) + i % d;
  h0[i] = __float2bfloat16(src[0]);
  h1[i] = __float2bfloat16(src[d]);
}
// out = a + b, summed in fp32.
__global__ void add_bf16_kernel(const bf16* a, const bf16* b, bf16* out, long long n) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = __float2bfloat16(__bfloat162float(a[i]) + __bfloat162float(b[i]));
}
// dv[b, m, t, e*d + i] = dv_e[b, 2m, t, i] + dv_e[b, 2m+1, t, i] (total = B * H/2 * T * 2d).
__global__ void diff_value_grad_kernel(const bf16* dv0, const bf16* dv1, bf16* dv, int Hd, int T, int d,
                                       long long total) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const long long row = i / (2LL * d), col = i % (2LL * d), bm = row / T, t = row % T;
  const long long b = bm / Hd, m = bm % Hd;
  const int e = static_cast<int>(col / d);
  const bf16* src = e ? dv1 : dv0;
  const long long sub0 = ((b * 2 * Hd + 2 * m) * T + t) * d + col % d, step = static_cast<long long>(T) * d;
  dv[i] = __float2bfloat16(__bfloat162float(src[sub0]) + __bfloat162float(src[sub0 + step]));
}

// Per-block partial sums of -dcomb * o[2h+1] (d lambda), summed on the host in block order.
__global__ void diff_dlambda_kernel(const float* dcomb, const float* o, double* partial, int B, int Hd, long long hs) {
  __shared__ double sh[kThreads];
  const long long total = static_cast<long long>(B) * Hd * hs;
  double acc = 0;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long bh = i / hs, e = i % hs;
    const long long b = bh / Hd, h = bh % Hd;
    acc -= static_cast<double>(dcomb[i]) * o[(b * 2 * Hd + 2 * h + 1) * hs + e];
  }
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}
__global__ void scale_bf16_kernel(bf16* x, long long n, float s) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i < n) x[i] = __float2bfloat16(__bfloat162float(x[i]) * s);
}

class CudaModel : public TrainableModel {
 public:
  explicit CudaModel(const ModelConfig& cfg) : host_(cfg) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0)
      throw InputError("device \"cuda\": no CUDA device is available on this machine");
    CK(cudaStreamCreate(&stream_));
    const size_t total = layout().total();
    p32_.resize(total), p16_.resize(total), g32_.resize(total), m_.resize(total), v_.resize(total);
    decay_.resize(total);
    std::vector<uint8_t> decay(total, 0);
    for (const auto& v : layout().views())
      if (v.decay) std::fill(decay.begin() + v.offset, decay.begin() + v.offset + v.size, 1);
    CK(cudaMemcpy(decay_.get(), decay.data(), total, cudaMemcpyHostToDevice));
    g32_.zero(stream_), m_.zero(stream_), v_.zero(stream_);
    upload_params(host_.params());
    check_packed_layout();
  }
  ~CudaModel() override {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }

  const ModelConfig& config() const override { return host_.config(); }
  const ParamLayout& layout() const override { return host_.layout(); }
  std::string device() const override { return "cuda"; }

  void init(uint64_t seed) override {
    host_.init(seed);  // the CPU model's initialisation, exactly
    upload_params(host_.params());
    m_.zero(stream_), v_.zero(stream_);
  }
  void zero_grads() override { g32_.zero(stream_); }

  LossStats forward_backward(const Batch& batch, float grad_scale, bool train, uint64_t seed) override {
    return run(batch, true, grad_scale, train, seed, nullptr);
  }
  LossStats forward(const Batch& batch, std::vector<int32_t>* argmax) override {
    return run(batch, false, 0.0f, false, 0, argmax);
  }

  double clip_grad_norm(double max_norm) override {
    const long long n = static_cast<long long>(layout().total());
    prof_.begin(stream_);
    scratch_d_.resize(cuda::sum_squares_scratch_doubles(n) + 1);
    cuda::sum_squares(g32_.get(), n, scratch_d_.get(), scratch_d_.get() + 1, stream_);
    double ss = 0;
    CK(cudaMemcpyAsync(&ss, scratch_d_.get(), sizeof(double), cudaMemcpyDeviceToHost, stream_));
    CK(cudaStreamSynchronize(stream_));
    const double norm = std::sqrt(ss);
    if (max_norm > 0 && norm > max_norm) cuda::scale(g32_.get(), n, static_cast<float>(max_norm / (norm + 1e-6)), stream_);
    prof_.mark("clip_grad_norm", stream_);
    return norm;
  }

  void optimizer_step(const AdamWConfig& c, double lr, long long step) override {
    const double bc1 = 1.0 - std::pow(c.beta1, static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(c.beta2, static_cast<double>(step));
    cuda::adamw_update(p32_.get(), p16_.get(), g32_.get(), m_.get(), v_.get(), decay_.get(),
                       static_cast<long long>(layout().total()), lr, static_cast<float>(c.beta1),
                       static_cast<float>(c.beta2), static_cast<float>(c.eps), c.weight_decay, bc1, bc2, stream_);
    prof_.mark("adamw", stream_);
    prof_.collect();
  }

  void get_state(std::vector<float>* p, std::vector<float>* m, std::vector<float>* v) override {
    auto down = [&](std::vector<float>* dst, const DevBuf<float>& src) {
      if (!dst) return;
      dst->resize(src.size());
      CK(cudaMemcpyAsync(dst->data(), src.get(), src.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    };
    down(p, p32_), down(m, m_), down(v, v_);
    CK(cudaStreamSynchronize(stream_));
  }
  void set_state(const std::vector<float>& p, const std::vector<float>* m, const std::vector<float>* v) override {
    if (p.size() != layout().total()) throw std::invalid_argument("set_state: wrong parameter count");
    upload_params(p);
    if (m) CK(cudaMemcpyAsync(m_.get(), m->data(), m->size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
    if (v) CK(cudaMemcpyAsync(v_.get(), v->data(), v->size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
    CK(cudaStreamSynchronize(stream_));
  }

  void synchronize() override { CK(cudaStreamSynchronize(stream_)); }

  std::vector<float> get_grads() override {
    std::vector<float> g(g32_.size());
    CK(cudaMemcpyAsync(g.data(), g32_.get(), g.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    CK(cudaStreamSynchronize(stream_));
    return g;
  }

 private:
  struct Layer {
    DevBuf<float> x_in, rstd1, x_mid, rstd2;
    DevBuf<bf16> xn1, q, k, v, att, a_flat, xn2, h13, g;  // h13: [N, 2F], xn2 w1^T | xn2 w3^T
    // Standard attention through the flash kernels: q (rotated) | k (rotated) | v as the [N, 3C] product
    // itself, read there by the kernels (q, k, v, att stay empty; the output goes to a_flat directly).
    DevBuf<bf16> qkv;
    DevBuf<float> lse;                    // flash attention row statistics
    DevBuf<float> comb, comb_rstd, o_sub;  // DIFF: combined heads (pre-norm), sub-head outputs
    DevBuf<bf16> att_core;                 // fused MTA layers with an epilogue: the core's output
    DevBuf<float> att_core32;              // fused kq layers with an epilogue: the same in fp32 (no bf16)
  };

  // The fused products multiply wq|wk|wv as one [3C, C] matrix and w1|w3 as one [2F, C] matrix (and
  // their gradients as one each): the layout must hold them back to back (model.cpp adds them with
  // pack_next).
  void check_packed_layout() const {
    const size_t C = config().dim, F = config().ffn_hidden;
    struct Group {
      std::vector<const char*> names;
      size_t size;  // of each member
      const char* what;
    };
    const Group groups[] = {{{"attention.wq.weight", "attention.wk.weight", "attention.wv.weight"}, C * C, "[3C, C]"},
                            {{"feed_forward.w1.weight", "feed_forward.w3.weight"}, F * C, "[2F, C]"}};
    for (int l = 0; l < config().n_layers; ++l)
      for (const Group& g : groups) {
        size_t next = layout().view(lname(l, g.names[0])).offset;
        std::string joined;
        for (const char* n : g.names) joined += std::string(joined.empty() ? "" : " | ") + n;
        for (const char* n : g.names) {
          const ParamView& v = layout().view(lname(l, n));
          if (v.offset != next || v.size != g.size)
            throw std::logic_error("CudaModel: layer " + std::to_string(l) + ": the parameter layout does not hold " +
                                   joined + " back to back as one " + g.what + " matrix (" + v.name + " at offset " +
                                   std::to_string(v.offset) + ", size " + std::to_string(v.size) + "; expected offset " +
                                   std::to_string(next) + ", size " + std::to_string(g.size) +
                                   "): the fused products need them contiguous (see ParamLayout::add's pack_next)");
          next = v.offset + v.size;
        }
      }
  }

  void upload_params(const std::vector<float>& p) {
    CK(cudaMemcpyAsync(p32_.get(), p.data(), p.size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
    cuda::cast_to_bf16(p32_.get(), p16_.get(), static_cast<long long>(p.size()), stream_);
    CK(cudaStreamSynchronize(stream_));
  }
  float* P(const std::string& n) { return p32_.get() + layout().view(n).offset; }
  bf16* P16(const std::string& n) { return p16_.get() + layout().view(n).offset; }
  float* G(const std::string& n) { return g32_.get() + layout().view(n).offset; }
  float* Pl(int l, const std::string& n) { return P(lname(l, n)); }
  bf16* P16l(int l, const std::string& n) { return P16(lname(l, n)); }
  float* Gl(int l, const std::string& n) { return G(lname(l, n)); }

  // Whether MTA layer l runs the fused path (see the top of the file).
  // The backward pass. The kq layers' fused backward at D = 128 holds 4 heads per CTA and measured
  // 1.2-2.2x slower than the materialized op's (bench/RESULTS.md, session 10); in session 18 the paper
  // layer (16 heads) was 1.03-1.06x slower, but a 350M LM with 8 heads of 128 trained 10% slower with it
  // (44.4k against 49.5k tokens/s, configs/bench/lm-350m-d128-mta.json). So there the model pairs the
  // fused forward with the materialized backward unless MTA_FUSED_KQ_LAYER=1 (O(T) memory: the
  // materialized backward of that paper layer took 2.8 GB at B = 2, T = 4096, the fused one 0.48).
  bool use_fused(int l, bool train) const {
    if (!fused_allowed(l, train)) return false;
    const AttentionSpec spec = config().layer_spec(l);
    const int d = config().head_dim();
    const float dropout = train ? config().dropout : 0.f;
    if (d == 128 && cuda::fused_attention_is_kq_layer(spec, d, dropout) &&
        !env_switch("MTA_FUSED_KQ_LAYER").value_or(false))
      return false;
    return cuda::fused_attention_supported(spec, d, dropout);
  }

  // The flash path's layouts: q, k, v (and their gradients) as rows of 3C, o and dout as rows of C.
  std::pair<cuda::HeadLayout, cuda::HeadLayout> flash_layouts() const {
    const ModelConfig& c = config();
    return {cuda::token_major(T_, c.head_dim(), 3LL * c.dim), cuda::token_major(T_, c.head_dim(), c.dim)};
  }

  // The forward pass: also the kq layers at D = 128 whose backward is the materialized op's (use_fused).
  bool use_fused_forward(int l, bool train) const {
    if (!fused_allowed(l, train)) return false;
    return cuda::fused_attention_supported(config().layer_spec(l), config().head_dim(), train ? config().dropout : 0.f);
  }

  // MTA_FLASH_MTA=0: no fused MTA layer. The kq layers run fused (at D = 128 the forward: use_fused);
  // MTA_FUSED_KQ_LAYER=0 sends every kq layer to the materialized op. Measured (bench/RESULTS.md,
  // session 10, with the clusters' exchanges as pushes): the 350M LM (16 coupled heads, clusters of
  // two CTAs) 29.2k fused against 25.5k tokens/s materialized, the 125M LM (12 heads) 66.8k against
  // 67.4k; in session 8, before the pushes, the clustered groups were 12% slower, and only groups of
  // <= 8 heads ran fused by default. Read per call: tests switch them.
  bool fused_allowed(int l, bool train) const {
    if (env_switch("MTA_FLASH_MTA") == false || config().attention != AttentionKind::Mta) return false;
    const AttentionSpec spec = config().layer_spec(l);
    if (!cuda::fused_attention_is_kq_layer(spec, config().head_dim(), train ? config().dropout : 0.f)) return true;
    return env_switch("MTA_FUSED_KQ_LAYER").value_or(true);
  }

  bool use_flash() const {
    const int d = config().head_dim();
    return config().attention == AttentionKind::Standard && (d == 64 || d == 128);
  }
  // DIFF layers through the flash kernel (two calls per sub-head, see diff_value_halves_kernel).
  bool use_flash_diff() const {
    const int d = config().head_dim();
    return config().attention == AttentionKind::Diff && (d == 64 || d == 128);
  }

  void ensure_acts(int B, int T) {
    if (B == B_ && T == T_) return;
    const ModelConfig& c = config();
    B_ = B, T_ = T;
    const size_t N = static_cast<size_t>(B) * T, NC = N * c.dim, NF = N * c.ffn_hidden;
    layers_.clear();
    layers_.resize(c.n_layers);
    for (auto& L : layers_) {
      L.x_in.resize(NC), L.x_mid.resize(NC), L.rstd1.resize(N), L.rstd2.resize(N);
      L.xn1.resize(NC), L.a_flat.resize(NC);
      if (use_flash())
        L.qkv.resize(3 * NC);
      else
        L.q.resize(NC), L.k.resize(NC), L.v.resize(NC), L.att.resize(NC);
      L.xn2.resize(NC), L.h13.resize(2 * NF), L.g.resize(NF);
      L.lse.resize(static_cast<size_t>(B) * c.n_heads * T);
      if (c.attention == AttentionKind::Diff) {
        L.comb.resize(NC), L.comb_rstd.resize(N * c.n_heads / 2), L.o_sub.resize(2 * NC);
      }
    }
    x_final_.resize(NC), xf_.resize(NC), rstdf_.resize(N);
    tmp32_.resize(std::max(NC, NF)), tmp32b_.resize(std::max(NC, NF));
    tmp16_.resize(NC), tmp16b_.resize(std::max(NC, NF)), tmp16c_.resize(NC);
    wide16_.resize(std::max(3 * NC, 2 * NF));
    dx_.resize(NC);
    tokens_.resize(N), targets_.resize(N), weights_.resize(N), row_loss_.resize(N), argmax_.resize(N);
    size_t rs = cuda::rmsnorm_backward_scratch_floats(static_cast<int>(N), c.dim);
    if (c.attention == AttentionKind::Diff)  // the per-head norm: B * H/2 * T rows of 2 * head_dim
      rs = std::max(rs, cuda::rmsnorm_backward_scratch_floats(static_cast<int>(N * (c.n_heads / 2)), 2 * c.head_dim()));
    rms_scratch_.resize(rs);
    if (rope_.T != T) {  // RoPE's cos / sin for positions 0 .. T-1, once per T (not per call of to_heads)
      rope_cs_.resize(cuda::rope_table_floats(T, c.head_dim()));
      rope_ = cuda::make_rope_table(rope_cs_.get(), T, c.head_dim(), c.rope_theta, stream_);
    }
  }

  // ---- attention: forward writes L.att (heads) or, for DIFF, L.a_flat directly ----
  AttnParams<float> mta_params(int l) {
    const std::string pre = lname(l, "attention.");
    return attn_pointers<AttnParams<float>>([&](const char* n) -> const float* { return layout().has(pre + n) ? P(pre + n) : nullptr; });
  }
  AttnParamGrads<float> mta_grads(int l) {
    const std::string pre = lname(l, "attention.");
    return attn_pointers<AttnParamGrads<float>>([&](const char* n) -> float* { return layout().has(pre + n) ? G(pre + n) : nullptr; });
  }

  // lambda of a DIFF layer and its pieces, from the fp32 master weights (4 vectors of head_dim).
  struct DiffLambda {
    double e1, e2, lambda;
    std::vector<float> q1, k1, q2, k2;
  };
  DiffLambda diff_lambda(int l) {
    const int d = config().head_dim();
    DiffLambda r;
    for (auto [vec, n] : {std::pair{&r.q1, "lambda_q1"}, {&r.k1, "lambda_k1"}, {&r.q2, "lambda_q2"}, {&r.k2, "lambda_k2"}}) {
      vec->resize(d);
      CK(cudaMemcpyAsync(vec->data(), Pl(l, std::string("attention.") + n), d * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    }
    CK(cudaStreamSynchronize(stream_));
    double s1 = 0, s2 = 0;
    for (int e = 0; e < d; ++e) s1 += r.q1[e] * r.k1[e], s2 += r.q2[e] * r.k2[e];
    r.e1 = std::exp(s1), r.e2 = std::exp(s2);
    r.lambda = r.e1 - r.e2 + diff_lambda_init(l);
    return r;
  }

  void attention_forward(int l, Layer& L, bool train, uint64_t seed) {
    const ModelConfig& c = config();
    const int B = B_, T = T_, H = c.n_heads, d = c.head_dim();
    const long long n = static_cast<long long>(B) * H * T * d;
    AttnOptions opt;
    if (train) opt.dropout = c.dropout, opt.dropout_seed = site_seed(seed, l, kDropAttnWeights);
    if (use_flash()) {  // q | k | v rows of L.qkv in, a_flat rows out (flash_layouts)
      const bf16* qkv = L.qkv.get();
      const auto [lin, lout] = flash_layouts();
      cuda::flash_attn_forward(qkv, qkv + c.dim, qkv + 2 * c.dim, L.a_flat.get(), L.lse.get(), B, H, T, d, lin, lout,
                               stream_, opt.dropout, opt.dropout_seed);
      return;
    }
    const AttentionSpec spec = c.layer_spec(l);
    if (use_fused_forward(l, train)) {
      opt.fp16_overflow = fp16_overflow_.get() + l;  // read back at the end of run()
      const size_t n32 = cuda::fused_attention_core32_floats(spec, B, T);
      if (n32)  // a kq layer with an epilogue: the core's output in fp32 only
        L.att_core32.resize(n32);
      else if (cuda::fused_attention_has_epilogue(spec))
        L.att_core.resize(static_cast<size_t>(n));
      cuda::fused_attention_forward(spec, L.q.get(), L.k.get(), L.v.get(), mta_params(l), L.att_core.get(), L.att.get(),
                                    L.lse.get(), B, T, opt, stream_, n32 ? L.att_core32.get() : nullptr);
      return;
    }
    // DIFF: sub-heads of dim d, values of dim 2d shared by pairs.
    const int Hd = H / 2, dv = 2 * d;
    const long long hs = static_cast<long long>(T) * dv;
    if (use_flash_diff()) {
      diff16_.resize(kDiffFlashBufs * static_cast<size_t>(n));  // one size for forward and backward: no reallocation
      bf16 *v0 = diff16_.get(), *v1 = v0 + n, *o0 = v1 + n, *o1 = o0 + n;
      diff_value_halves_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(L.v.get(), v0, v1, H, T, d, n);
      CK_LAUNCH();
      // The same weights (and dropout mask) meet both halves of the values.
      cuda::flash_attn_forward(L.q.get(), L.k.get(), v0, o0, L.lse.get(), B, H, T, d, stream_, opt.dropout,
                               opt.dropout_seed);
      cuda::flash_attn_forward(L.q.get(), L.k.get(), v1, o1, L.lse.get(), B, H, T, d, stream_, opt.dropout,
                               opt.dropout_seed);
      diff_join_halves_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(o0, o1, L.o_sub.get(), d, n);
      CK_LAUNCH();
    } else {
      float* q32 = op_q_.get();
      float* k32 = op_k_.get();
      cuda::cast_to_f32(L.q.get(), q32, n, stream_);
      cuda::cast_to_f32(L.k.get(), k32, n, stream_);
      if (c.attention != AttentionKind::Diff) {
        cuda::cast_to_f32(L.v.get(), op_v_.get(), n, stream_);
        AttnOptions o16 = opt;
        o16.bf16_products = true;  // q, k hold bf16 values: Q K^T on tensor cores (attention_op.h)
        cuda::mta_forward<float>(spec, AttnDims{B, H, T, d}, q32, k32, op_v_.get(), mta_params(l), op_o_.get(), o16,
                                 stream_);
        cuda::cast_to_bf16(op_o_.get(), L.att.get(), n, stream_);
        return;
      }
      dup_values_kernel<<<blocks_for(2 * n), kThreads, 0, stream_>>>(L.v.get(), op_v_.get(), B, H, hs);
      CK_LAUNCH();
      cuda::mta_forward<float>(spec, AttnDims{B, H, T, d, dv}, q32, k32, op_v_.get(), {}, L.o_sub.get(), opt, stream_);
    }
    const DiffLambda lam = diff_lambda(l);
    diff_combine_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(L.o_sub.get(), L.comb.get(), static_cast<float>(lam.lambda),
                                                                  B, Hd, hs);
    CK_LAUNCH();
    const int rows = B * Hd * T;
    cuda::rmsnorm_forward(L.comb.get(), Pl(l, "attention.subln.weight"), tmp16_.get(), L.comb_rstd.get(), rows, dv,
                          1e-5f, stream_);
    scale_bf16_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(tmp16_.get(), n, static_cast<float>(1.0 - diff_lambda_init(l)));
    CK_LAUNCH();
    cuda::from_heads(tmp16_.get(), L.a_flat.get(), B, T, Hd, dv, false, 0.0, stream_);
  }

  // da_flat: d(attention output) [N, C] bf16. Writes dq, dk (heads, pre-RoPE-inverse) and dv (heads) bf16.
  void attention_backward(int l, Layer& L, const bf16* da_flat, bf16* dq, bf16* dk, bf16* dv, bool train, uint64_t seed) {
    const ModelConfig& c = config();
    const int B = B_, T = T_, H = c.n_heads, d = c.head_dim();
    const long long n = static_cast<long long>(B) * H * T * d;
    AttnOptions opt;
    if (train) opt.dropout = c.dropout, opt.dropout_seed = site_seed(seed, l, kDropAttnWeights);
    if (use_flash()) {  // dq | dk | dv (rotated back by RoPE) into the rows of one [N, 3C] matrix at dq
      const bf16* qkv = L.qkv.get();
      const auto [lin, lout] = flash_layouts();
      flash_scratch_.resize(cuda::flash_attn_backward_scratch_bytes(B, H, T, d));
      cuda::flash_attn_backward(qkv, qkv + c.dim, qkv + 2 * c.dim, L.a_flat.get(), da_flat, L.lse.get(), dq,
                                dq + c.dim, dq + 2 * c.dim, flash_scratch_.get(), B, H, T, d, lin, lout, rope_.cs,
                                stream_, opt.dropout, opt.dropout_seed);
      return;
    }
    const AttentionSpec spec = c.layer_spec(l);
    if (use_fused(l, train)) {
      bf16* datt = tmp16c_.get();
      cuda::to_heads(da_flat, datt, B, T, H, d, false, 0.0, stream_);
      flash_scratch_.resize(cuda::fused_attention_backward_scratch_bytes(spec, B, T));
      const bf16* core_out = cuda::fused_attention_has_epilogue(spec) ? L.att_core.get() : L.att.get();
      cuda::fused_attention_backward(spec, L.q.get(), L.k.get(), L.v.get(), mta_params(l), core_out, datt, L.lse.get(),
                                     dq, dk, dv, mta_grads(l), flash_scratch_.get(), B, T, opt, stream_,
                                     L.att_core32.get());
      return;
    }
    float* q32 = op_q_.get();
    float* k32 = op_k_.get();
    if (c.attention != AttentionKind::Diff) {
      cuda::cast_to_f32(L.q.get(), q32, n, stream_);
      cuda::cast_to_f32(L.k.get(), k32, n, stream_);
      cuda::to_heads(da_flat, tmp16c_.get(), B, T, H, d, false, 0.0, stream_);
      cuda::cast_to_f32(tmp16c_.get(), op_o_.get(), n, stream_);  // d(out)
      cuda::cast_to_f32(L.v.get(), op_v_.get(), n, stream_);
      AttnOptions o16 = opt;
      o16.bf16_products = true;  // as in the forward; dS rounded to bf16 for dQ, dK
      cuda::mta_backward<float>(spec, AttnDims{B, H, T, d}, q32, k32, op_v_.get(), mta_params(l), op_o_.get(),
                                op_dq_.get(), op_dk_.get(), op_dv_.get(), mta_grads(l), o16, stream_);
      cuda::cast_to_bf16(op_dq_.get(), dq, n, stream_);
      cuda::cast_to_bf16(op_dk_.get(), dk, n, stream_);
      cuda::cast_to_bf16(op_dv_.get(), dv, n, stream_);
      return;
    }
    const int Hd = H / 2, dvd = 2 * d;
    const long long hs = static_cast<long long>(T) * dvd;
    const int rows = B * Hd * T;
    bf16* dy = tmp16c_.get();
    cuda::to_heads(da_flat, dy, B, T, Hd, dvd, false, 0.0, stream_);
    scale_bf16_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(dy, n, static_cast<float>(1.0 - diff_lambda_init(l)));
    CK_LAUNCH();
    float* dcomb = op_o_.get();  // [B, Hd, T, 2d] = n floats
    CK(cudaMemsetAsync(dcomb, 0, n * sizeof(float), stream_));
    cuda::rmsnorm_backward(dy, L.comb.get(), Pl(l, "attention.subln.weight"), L.comb_rstd.get(), dcomb,
                           Gl(l, "attention.subln.weight"), rms_scratch_.get(), rows, dvd, stream_);
    const DiffLambda lam = diff_lambda(l);
    // d lambda, then the lambda vectors' gradients (4 x head_dim floats, updated on the host).
    const int nb = 256;
    partial_.resize(nb);
    diff_dlambda_kernel<<<nb, kThreads, 0, stream_>>>(dcomb, L.o_sub.get(), partial_.get(), B, Hd, hs);
    CK_LAUNCH();
    std::vector<double> part(nb);
    CK(cudaMemcpyAsync(part.data(), partial_.get(), nb * sizeof(double), cudaMemcpyDeviceToHost, stream_));
    CK(cudaStreamSynchronize(stream_));
    double dl = 0;
    for (double x : part) dl += x;
    // lambda = exp(q1.k1) - exp(q2.k2) + lambda_init: d/dq1 = e1 k1, d/dk1 = e1 q1, d/dq2 = -e2 k2, ...
    for (auto [name, other, sign, e] :
         {std::tuple{"lambda_q1", &lam.k1, 1.0, lam.e1}, std::tuple{"lambda_k1", &lam.q1, 1.0, lam.e1},
          std::tuple{"lambda_q2", &lam.k2, -1.0, lam.e2}, std::tuple{"lambda_k2", &lam.q2, -1.0, lam.e2}}) {
      std::vector<float> g(d);
      float* gp = Gl(l, std::string("attention.") + name);
      CK(cudaMemcpyAsync(g.data(), gp, d * sizeof(float), cudaMemcpyDeviceToHost, stream_));
      CK(cudaStreamSynchronize(stream_));
      for (int i = 0; i < d; ++i) g[i] += static_cast<float>(sign * dl * e * (*other)[i]);
      CK(cudaMemcpyAsync(gp, g.data(), d * sizeof(float), cudaMemcpyHostToDevice, stream_));
      CK(cudaStreamSynchronize(stream_));  // g is freed at the end of the iteration
    }
    float* dsub = op_dv_.get();  // [B, H, T, 2d] = 2n floats (op_dv_ is sized for it)
    diff_split_grad_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(dcomb, dsub, static_cast<float>(lam.lambda), B, Hd, hs);
    CK_LAUNCH();
    if (use_flash_diff()) {
      diff16_.resize(kDiffFlashBufs * static_cast<size_t>(n));
      bf16* b16 = diff16_.get();
      bf16 *v0 = b16, *v1 = v0 + n, *o0 = v1 + n, *o1 = o0 + n, *do0 = o1 + n, *do1 = do0 + n;
      bf16 *dq0 = do1 + n, *dq1 = dq0 + n, *dk0 = dq1 + n, *dk1 = dk0 + n, *dv0 = dk1 + n, *dv1 = dv0 + n;
      diff_value_halves_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(L.v.get(), v0, v1, H, T, d, n);
      CK_LAUNCH();
      diff_split_halves_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(L.o_sub.get(), o0, o1, d, n);  // exact
      CK_LAUNCH();
      diff_split_halves_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(dsub, do0, do1, d, n);
      CK_LAUNCH();
      flash_scratch_.resize(cuda::flash_attn_backward_scratch_bytes(B, H, T, d));
      cuda::flash_attn_backward(L.q.get(), L.k.get(), v0, o0, do0, L.lse.get(), dq0, dk0, dv0, flash_scratch_.get(), B,
                                H, T, d, stream_, opt.dropout, opt.dropout_seed);
      cuda::flash_attn_backward(L.q.get(), L.k.get(), v1, o1, do1, L.lse.get(), dq1, dk1, dv1, flash_scratch_.get(), B,
                                H, T, d, stream_, opt.dropout, opt.dropout_seed);
      add_bf16_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(dq0, dq1, dq, n);
      CK_LAUNCH();
      add_bf16_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(dk0, dk1, dk, n);
      CK_LAUNCH();
      diff_value_grad_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(dv0, dv1, dv, Hd, T, d, n);
      CK_LAUNCH();
      return;
    }
    cuda::cast_to_f32(L.q.get(), q32, n, stream_);
    cuda::cast_to_f32(L.k.get(), k32, n, stream_);
    dup_values_kernel<<<blocks_for(2 * n), kThreads, 0, stream_>>>(L.v.get(), op_v_.get(), B, H, hs);
    CK_LAUNCH();
    float* dvdup = op_o2_.get();
    cuda::mta_backward<float>(spec, AttnDims{B, H, T, d, dvd}, q32, k32, op_v_.get(), {}, dsub, op_dq_.get(),
                              op_dk_.get(), dvdup, {}, opt, stream_);
    cuda::cast_to_bf16(op_dq_.get(), dq, n, stream_);
    cuda::cast_to_bf16(op_dk_.get(), dk, n, stream_);
    diff_sum_pairs_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(dvdup, dv, B, Hd, hs);
    CK_LAUNCH();
  }

  void ensure_op_buffers() {
    if (use_flash()) return;
    const size_t n = static_cast<size_t>(B_) * config().dim * T_;
    op_q_.resize(n), op_k_.resize(n), op_dq_.resize(n), op_dk_.resize(n);
    op_v_.resize(2 * n), op_o_.resize(2 * n), op_o2_.resize(2 * n), op_dv_.resize(2 * n);
  }

  // out = x + dropout(a W^T) for a [N, K] activation a and a [C, K] weight W, fp32 residual stream. Without
  // dropout the addition happens in the product's epilogue (gemm_bf16_add: the same fp32 sums).
  void linear_residual(const bf16* a, int K, const bf16* W, const float* x, float* out, bool train, uint64_t site) {
    const int N = B_ * T_, C = config().dim;
    const float p = train ? config().dropout : 0.0f;
    if (p == 0.0f) {
      cuda::gemm_bf16_add(false, true, N, C, K, a, K, W, K, x, out, C, stream_);
      return;
    }
    float* t32 = tmp32_.get();
    cuda::gemm_bf16(false, true, N, C, K, 1.0f, a, K, W, K, 0.0f, t32, C, stream_);
    cuda::residual_dropout_forward(x, t32, out, static_cast<long long>(N) * C, p, site, stream_);
  }

  void layer_forward(int l, bool train, uint64_t seed) {
    const ModelConfig& c = config();
    Layer& L = layers_[l];
    const int N = B_ * T_, C = c.dim, F = c.ffn_hidden, H = c.n_heads, d = c.head_dim();
    const float eps = static_cast<float>(c.norm_eps);
    cuda::rmsnorm_forward(L.x_in.get(), Pl(l, "attention_norm.weight"), L.xn1.get(), L.rstd1.get(), N, C, eps, stream_);
    // q|k|v = xn1 Wqkv^T: one [N, 3C] product with the packed [3C, C] weight wq|wk|wv, then each third
    // to the head layout (rows of 3C). DIFF values: H/2 heads of 2d, the same C columns.
    // The flash path keeps the product (q and k rotated in place) and attends to it there.
    bf16* qkv = use_flash() ? L.qkv.get() : wide16_.get();
    const long long C3 = 3LL * C;
    cuda::gemm_bf16(false, true, N, 3 * C, C, 1.0f, L.xn1.get(), C, P16l(l, "attention.wq.weight"), C, 0.0f, qkv,
                    3 * C, stream_);
    if (use_flash()) {
      cuda::rope_rows(qkv, B_, T_, 2 * H, d, C3, rope_, stream_);  // q and k: 2H heads of d per row
    } else {
      cuda::to_heads(qkv, L.q.get(), B_, T_, H, d, true, c.rope_theta, stream_, C3, &rope_);
      cuda::to_heads(qkv + C, L.k.get(), B_, T_, H, d, true, c.rope_theta, stream_, C3, &rope_);
      const int Hv = c.attention == AttentionKind::Diff ? H / 2 : H;
      cuda::to_heads(qkv + 2 * C, L.v.get(), B_, T_, Hv, C / Hv, false, 0.0, stream_, C3);
    }
    prof_.mark("fwd.norm+qkv", stream_);
    attention_forward(l, L, train, seed);
    prof_.mark("fwd.attention", stream_);
    if (c.attention != AttentionKind::Diff && !use_flash())
      cuda::from_heads(L.att.get(), L.a_flat.get(), B_, T_, H, d, false, 0.0, stream_);
    linear_residual(L.a_flat.get(), C, P16l(l, "attention.wo.weight"), L.x_in.get(), L.x_mid.get(), train,
                    site_seed(seed, l, kDropAttnOut));
    prof_.mark("fwd.wo+residual", stream_);
    cuda::rmsnorm_forward(L.x_mid.get(), Pl(l, "ffn_norm.weight"), L.xn2.get(), L.rstd2.get(), N, C, eps, stream_);
    // h1|h3 = xn2 W13^T: one [N, 2F] product with the packed [2F, C] weight w1|w3; SwiGLU reads the
    // two halves of each row.
    cuda::gemm_bf16(false, true, N, 2 * F, C, 1.0f, L.xn2.get(), C, P16l(l, "feed_forward.w1.weight"), C, 0.0f,
                    L.h13.get(), 2 * F, stream_);
    cuda::swiglu_forward_strided(L.h13.get(), L.h13.get() + F, 2LL * F, L.g.get(), N, F, stream_);
    float* out = l + 1 < c.n_layers ? layers_[l + 1].x_in.get() : x_final_.get();
    linear_residual(L.g.get(), F, P16l(l, "feed_forward.w2.weight"), L.x_mid.get(), out, train,
                    site_seed(seed, l, kDropFfnOut));
    prof_.mark("fwd.norm+ffn", stream_);
  }

  void layer_backward(int l, bool train, uint64_t seed) {
    const ModelConfig& c = config();
    Layer& L = layers_[l];
    const int N = B_ * T_, C = c.dim, F = c.ffn_hidden, H = c.n_heads, d = c.head_dim();
    const long long NC = static_cast<long long>(N) * C;
    float* dx = dx_.get();
    // Feed-forward; dx holds d(out) = d(x_mid) through the residual.
    bf16* dy = tmp16_.get();
    cuda::dropout_to_bf16(dx, dy, NC, train ? c.dropout : 0.0f, site_seed(seed, l, kDropFfnOut), stream_);
    bf16* dg = tmp16b_.get();
    cuda::gemm_bf16(false, false, N, F, C, 1.0f, dy, C, P16l(l, "feed_forward.w2.weight"), F, 0.0f, dg, F, stream_);
    cuda::gemm_bf16(true, false, C, F, N, 1.0f, dy, C, L.g.get(), F, 1.0f, Gl(l, "feed_forward.w2.weight"), F, stream_);
    // dh1|dh3 into one [N, 2F] matrix, then d(xn2) = dh13 W13 (K = 2F) and d(w1|w3) += dh13^T xn2 into
    // the packed [2F, C] gradient.
    bf16* dh13 = wide16_.get();
    cuda::swiglu_backward_strided(dg, L.h13.get(), L.h13.get() + F, 2LL * F, dh13, dh13 + F, N, F, stream_);
    // d(xn2) straight to bf16 (the fp32 sums rounded once, as a cast of an fp32 result would); dy, in
    // the same buffer, is not read after the w2 products.
    bf16* dxn = tmp16_.get();
    cuda::gemm_bf16(false, false, N, C, 2 * F, 1.0f, dh13, 2 * F, P16l(l, "feed_forward.w1.weight"), C, 0.0f, dxn, C,
                    stream_);
    cuda::gemm_bf16(true, false, 2 * F, C, N, 1.0f, dh13, 2 * F, L.xn2.get(), C, 1.0f, Gl(l, "feed_forward.w1.weight"),
                    C, stream_);
    cuda::rmsnorm_backward(dxn, L.x_mid.get(), Pl(l, "ffn_norm.weight"), L.rstd2.get(), dx, Gl(l, "ffn_norm.weight"),
                           rms_scratch_.get(), N, C, stream_);
    prof_.mark("bwd.norm+ffn", stream_);
    // Attention; dx now holds d(x_mid) = d(x_in) through the residual.
    cuda::dropout_to_bf16(dx, dy, NC, train ? c.dropout : 0.0f, site_seed(seed, l, kDropAttnOut), stream_);
    bf16* da = tmp16b_.get();
    cuda::gemm_bf16(false, false, N, C, C, 1.0f, dy, C, P16l(l, "attention.wo.weight"), C, 0.0f, da, C, stream_);
    cuda::gemm_bf16(true, false, C, C, N, 1.0f, dy, C, L.a_flat.get(), C, 1.0f, Gl(l, "attention.wo.weight"), C, stream_);
    prof_.mark("bwd.wo", stream_);
    // dq|dk|dv into one [N, 3C] matrix (rows of 3C), then d(xn1) = dqkv Wqkv (K = 3C) and
    // d(wq|wk|wv) += dqkv^T xn1 into the packed [3C, C] gradient. The flash path writes them there
    // itself; the others in the head layout, then copied.
    bf16* dqkv = wide16_.get();
    if (use_flash()) {
      attention_backward(l, L, da, dqkv, nullptr, nullptr, train, seed);
      prof_.mark("bwd.attention", stream_);
    } else {
      dqh_.resize(NC), dkh_.resize(NC), dvh_.resize(NC);
      attention_backward(l, L, da, dqh_.get(), dkh_.get(), dvh_.get(), train, seed);
      prof_.mark("bwd.attention", stream_);
      const long long C3 = 3LL * C;
      const int Hv = c.attention == AttentionKind::Diff ? H / 2 : H;
      cuda::from_heads(dqh_.get(), dqkv, B_, T_, H, d, true, c.rope_theta, stream_, C3, &rope_);
      cuda::from_heads(dkh_.get(), dqkv + C, B_, T_, H, d, true, c.rope_theta, stream_, C3, &rope_);
      cuda::from_heads(dvh_.get(), dqkv + 2 * C, B_, T_, Hv, C / Hv, false, 0.0, stream_, C3);
    }
    cuda::gemm_bf16(false, false, N, C, 3 * C, 1.0f, dqkv, 3 * C, P16l(l, "attention.wq.weight"), C, 0.0f, dxn, C,
                    stream_);
    cuda::gemm_bf16(true, false, 3 * C, C, N, 1.0f, dqkv, 3 * C, L.xn1.get(), C, 1.0f, Gl(l, "attention.wq.weight"), C,
                    stream_);
    cuda::rmsnorm_backward(dxn, L.x_in.get(), Pl(l, "attention_norm.weight"), L.rstd1.get(), dx,
                           Gl(l, "attention_norm.weight"), rms_scratch_.get(), N, C, stream_);
    prof_.mark("bwd.qkv+norm", stream_);
  }

  LossStats run(const Batch& batch, bool backward, float grad_scale, bool train, uint64_t seed,
                std::vector<int32_t>* argmax) {
    const ModelConfig& c = config();
    const int B = batch.B, T = batch.T, C = c.dim, V = c.vocab_size;
    host_.check_batch(batch);
    ensure_acts(B, T);
    ensure_op_buffers();
    const int N = B * T;
    prof_.begin(stream_);
    fp16_overflow_.resize(static_cast<size_t>(c.n_layers));
    fp16_overflow_.zero(stream_);
    CK(cudaMemcpyAsync(tokens_.get(), batch.inputs.data(), N * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
    CK(cudaMemcpyAsync(targets_.get(), batch.targets.data(), N * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
    CK(cudaMemcpyAsync(weights_.get(), batch.weights.data(), N * sizeof(float), cudaMemcpyHostToDevice, stream_));
    cuda::embedding_forward(tokens_.get(), P("tok_embeddings.weight"), layers_[0].x_in.get(), N, C, stream_);
    prof_.mark("fwd.embedding", stream_);
    for (int l = 0; l < c.n_layers; ++l) layer_forward(l, train, seed);
    cuda::rmsnorm_forward(x_final_.get(), P("norm.weight"), xf_.get(), rstdf_.get(), N, C,
                          static_cast<float>(c.norm_eps), stream_);
    // Output layer and cross-entropy in row chunks (no [N, V] logits).
    // 256 MB of fp32 logits per chunk: few, large matrix products (M >= 2048 rows at V = 32000).
    const int R = std::max(1, std::min(N, static_cast<int>((256LL << 20) / (static_cast<long long>(V) * 4))));
    logits_.resize(static_cast<size_t>(R) * V), dlogits_.resize(static_cast<size_t>(R) * V);
    float* dxf32 = tmp32b_.get();
    for (int r0 = 0; r0 < N; r0 += R) {
      const int rows = std::min(R, N - r0);
      cuda::gemm_bf16(false, true, rows, V, C, 1.0f, xf_.get() + static_cast<size_t>(r0) * C, C,
                      P16("tok_embeddings.weight"), C, 0.0f, logits_.get(), V, stream_);
      cuda::cross_entropy(logits_.get(), targets_.get() + r0, weights_.get() + r0, grad_scale, row_loss_.get() + r0,
                          argmax ? argmax_.get() + r0 : nullptr, backward ? dlogits_.get() : nullptr, rows, V, stream_);
      if (backward) {
        cuda::gemm_bf16(false, false, rows, C, V, 1.0f, dlogits_.get(), V, P16("tok_embeddings.weight"), C, 0.0f,
                        dxf32 + static_cast<size_t>(r0) * C, C, stream_);
        cuda::gemm_bf16(true, false, V, C, rows, 1.0f, dlogits_.get(), V, xf_.get() + static_cast<size_t>(r0) * C, C,
                        1.0f, G("tok_embeddings.weight"), C, stream_);
      }
    }
    prof_.mark(backward ? "output+cross_entropy (f+b)" : "output+cross_entropy", stream_);
    std::vector<float> losses(N);
    CK(cudaMemcpyAsync(losses.data(), row_loss_.get(), N * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    std::vector<unsigned int> overflow(c.n_layers);
    CK(cudaMemcpyAsync(overflow.data(), fp16_overflow_.get(), overflow.size() * sizeof(unsigned int),
                       cudaMemcpyDeviceToHost, stream_));
    if (argmax) {
      argmax->resize(N);
      CK(cudaMemcpyAsync(argmax->data(), argmax_.get(), N * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
    }
    if (backward) {
      const long long NC = static_cast<long long>(N) * C;
      bf16* dxf = tmp16_.get();
      cuda::cast_to_bf16(dxf32, dxf, NC, stream_);
      dx_.zero(stream_);
      cuda::rmsnorm_backward(dxf, x_final_.get(), P("norm.weight"), rstdf_.get(), dx_.get(), G("norm.weight"),
                             rms_scratch_.get(), N, C, stream_);
      for (int l = c.n_layers - 1; l >= 0; --l) layer_backward(l, train, seed);
      cuda::embedding_backward(tokens_.get(), dx_.get(), G("tok_embeddings.weight"), N, C, stream_);
      prof_.mark("bwd.embedding", stream_);
    }
    CK(cudaStreamSynchronize(stream_));
    prof_.collect();
    for (int l = 0; l < c.n_layers; ++l)
      if (overflow[l])
        throw std::runtime_error("layer " + std::to_string(l) + ": the fused kq_pre kernel met a scaled logit or a kq_pre "
                                 "weight beyond fp16's range (|x| > 65504), so its output is not MTA's; rerun with "
                                 "MTA_FLASH_MTA=0 (the float32 materialized op) or lower train.lr");
    LossStats st;
    for (int i = 0; i < N; ++i) st.loss_sum += losses[i], st.weight_sum += batch.weights[i];
    return st;
  }

  cuda::PhaseTimer prof_;  // MTA_CUDA_PROFILE=1: device time by phase
  Model host_;  // configuration, layout, initialisation and batch validation (its buffers stay unused)
  cudaStream_t stream_ = nullptr;
  DevBuf<float> p32_, g32_, m_, v_;
  DevBuf<bf16> p16_;
  DevBuf<uint8_t> decay_;
  DevBuf<double> scratch_d_, partial_;
  int B_ = 0, T_ = 0;
  std::vector<Layer> layers_;
  DevBuf<float> x_final_, rstdf_, tmp32_, tmp32b_, dx_, weights_, row_loss_, logits_, rms_scratch_;
  DevBuf<bf16> xf_, tmp16_, tmp16b_, tmp16c_, dlogits_, dqh_, dkh_, dvh_;
  // [N, 3C] or [N, 2F]: q|k|v out of the fused product (forward); dh1|dh3, then dq|dk|dv (backward).
  DevBuf<bf16> wide16_;
  DevBuf<int32_t> tokens_, targets_, argmax_;
  DevBuf<unsigned int> fp16_overflow_;  // per layer: the fused kq_pre kernel's range flag (AttnOptions)
  DevBuf<float> rope_cs_;  // RoPE table for T_ positions (rope_ describes it)
  cuda::RopeTable rope_;
  DevBuf<float> op_q_, op_k_, op_v_, op_o_, op_o2_, op_dq_, op_dk_, op_dv_;
  DevBuf<char> flash_scratch_;
  // DIFF through flash: value, output, output-gradient and q / k / v gradient halves, n = B*H*T*d each.
  static constexpr int kDiffFlashBufs = 12;
  DevBuf<bf16> diff16_;
};

}  // namespace

std::unique_ptr<TrainableModel> make_cuda_trainable_model(const ModelConfig& cfg) {
  return std::make_unique<CudaModel>(cfg);
}

}  // namespace mta
