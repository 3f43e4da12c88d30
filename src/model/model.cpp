#include "model/model.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>

#include "attention/attention_op.h"
#include "attention/init.h"
#include "attention/mta_cpu.h"
#include "model/layer_naming.h"
#include "model/layers_cpu.h"
#include "util/blas.h"
#include "util/error.h"

namespace mta {
namespace {

std::string lname(int l, const std::string& rest) { return layer_param_name(l, rest); }
uint64_t site_seed(uint64_t base, int layer, int site) { return dropout_site_seed(base, layer, site); }

// The calling thread's contiguous share [lo, hi) of n items (all of them outside a parallel region).
std::pair<int, int> thread_share(int n) {
  const long long nt = omp_get_num_threads(), t = omp_get_thread_num();
  return {static_cast<int>(n * t / nt), static_cast<int>(n * (t + 1) / nt)};
}

// dw += the per-thread partial sums parts[t * C + c], added in thread order (deterministic), each
// thread of the team adding its share of the C columns.
template <typename T>
void add_thread_parts(T* dw, const std::vector<T>& parts, int C) {
  const auto [c0, c1] = thread_share(C);
  const int nt = static_cast<int>(parts.size() / C);
  for (int t = 0; t < nt; ++t)
    for (int c = c0; c < c1; ++c) dw[c] += parts[static_cast<size_t>(t) * C + c];
}

}  // namespace

double Batch::weight_sum() const {
  double s = 0;
  for (float w : weights) s += w;
  return s;
}

// Activations saved by the forward pass for the backward pass, for one (B, T).
template <typename T>
struct ModelT<T>::Acts {
  int B = 0, seq = 0;
  struct Layer {
    std::vector<T> x_in, xn1, rstd1, q, k, v, att, comb, comb_rstd, a_flat, x_mid, xn2, rstd2, h1, h3, g;
  };
  std::vector<Layer> layers;
  std::vector<T> x_final, xf, rstdf;
  // Scratch reused by every layer and step (allocating and zeroing them per call cost ~4% of a step).
  std::vector<T> s_tmp, s_dy, s_dy2, s_dg, s_dh1, s_dh3, s_dxn, s_da, s_dqh, s_dkh, s_dvh, s_fq, s_fk, s_fv, s_datt;
  std::optional<cpu::RopeTable<T>> rope;  // for positions < seq
  int N() const { return B * seq; }
};

template <typename T>
ModelT<T>::ModelT(const ModelConfig& cfg) : cfg_(cfg) {
  const long long C = cfg.dim, V = cfg.vocab_size, F = cfg.ffn_hidden, d = cfg.head_dim();
  layout_.add("tok_embeddings.weight", {V, C}, true);
  for (int l = 0; l < cfg.n_layers; ++l) {
    layout_.add(lname(l, "attention_norm.weight"), {C}, false);
    // wq|wk|wv and w1|w3 are packed back to back (no padding between them): one [3C, C] and one
    // [2F, C] matrix, which the GPU model multiplies as one product each (src/cuda/model_cuda.cu).
    layout_.add(lname(l, "attention.wq.weight"), {C, C}, true, /*pack_next=*/true);
    layout_.add(lname(l, "attention.wk.weight"), {C, C}, true, /*pack_next=*/true);
    layout_.add(lname(l, "attention.wv.weight"), {C, C}, true);
    layout_.add(lname(l, "attention.wo.weight"), {C, C}, true);
    if (cfg.attention == AttentionKind::Mta) {
      for (const auto& info : attention_params(cfg.layer_spec(l)))
        layout_.add(lname(l, "attention." + info.name), info.shape, false);
    } else if (cfg.attention == AttentionKind::Diff) {
      for (const char* n : {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"}) layout_.add(lname(l, std::string("attention.") + n), {d}, false);
      layout_.add(lname(l, "attention.subln.weight"), {2 * d}, false);
    }
    layout_.add(lname(l, "ffn_norm.weight"), {C}, false);
    layout_.add(lname(l, "feed_forward.w1.weight"), {F, C}, true, /*pack_next=*/true);
    layout_.add(lname(l, "feed_forward.w3.weight"), {F, C}, true);
    layout_.add(lname(l, "feed_forward.w2.weight"), {C, F}, true);
  }
  layout_.add("norm.weight", {C}, false);
  params_.assign(layout_.total(), T(0));
  grads_.assign(layout_.total(), T(0));
  acts_ = std::make_unique<Acts>();
}

template <typename T>
ModelT<T>::~ModelT() = default;

template <typename T>
size_t ModelT<T>::num_params() const {
  size_t n = 0;
  for (const auto& v : layout_.views()) n += v.size;
  return n;
}

template <typename T>
void ModelT<T>::zero_grads() { std::fill(grads_.begin(), grads_.end(), T(0)); }

template <typename T>
void ModelT<T>::init(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::fill(params_.begin(), params_.end(), T(0));
  for (const auto& v : layout_.views()) {
    T* x = params_.data() + v.offset;
    const std::string& n = v.name;
    auto ends_with = [&](const std::string& suffix) {
      return n.size() >= suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    if (v.decay) {
      for (size_t i = 0; i < v.size; ++i) x[i] = static_cast<T>(cfg_.init_std * nd(rng));
    } else if (ends_with("norm.weight") || ends_with("subln.weight")) {
      std::fill(x, x + v.size, 1.0f);
    } else if (n.find("lambda_") != std::string::npos) {
      for (size_t i = 0; i < v.size; ++i) x[i] = static_cast<T>(0.1 * nd(rng));
    } else {
      // An MTA parameter: identity initialisation.
      const int l = std::stoi(n.substr(7, n.find('.', 7) - 7));
      const AttentionSpec spec = cfg_.layer_spec(l);
      const std::string pname = n.substr(n.rfind('.') + 1);
      for (const auto& info : attention_params(spec))
        if (info.name == pname) init_attention_param_identity(spec, info, x);
    }
  }
}

template <typename T>
LossStats ModelT<T>::forward(const Batch& batch, std::vector<int32_t>* argmax) {
  return run(batch, false, T(0), false, 0, argmax);
}

template <typename T>
const std::vector<T>& ModelT<T>::final_hidden() const { return acts_->xf; }

template <typename T>
LossStats ModelT<T>::forward_backward(const Batch& batch, T grad_scale, bool train, uint64_t dropout_seed) {
  return run(batch, true, grad_scale, train, dropout_seed, nullptr);
}

template <typename T>
void ModelT<T>::attention_forward(int l, Acts& a, bool train, uint64_t seed) {
  typename Acts::Layer& L = a.layers[l];
  const int B = a.B, Tn = a.seq, H = cfg_.n_heads, d = cfg_.head_dim();
  AttnOptions opt;
  if (train) opt.dropout = cfg_.dropout, opt.dropout_seed = site_seed(seed, l, kDropAttnWeights);
  const AttentionSpec spec = cfg_.layer_spec(l);
  if (cfg_.attention != AttentionKind::Diff) {
    const std::string pre = lname(l, "attention.");
    const auto p = attn_pointers<AttnParams<T>>(
        [&](const char* n) -> const T* { return layout_.has(pre + n) ? params_.data() + layout_.view(pre + n).offset : nullptr; });
    cpu::mta_forward<T>(spec, AttnDims{B, H, Tn, d}, L.q.data(), L.k.data(), L.v.data(), p, L.att.data(), opt);
    return;
  }
  // DIFF: H sub-heads of dim d in pairs (2h, 2h+1) sharing the value head h of dim 2d.
  const int Hd = H / 2, dv = 2 * d;
  const long long hs = static_cast<long long>(Tn) * dv;
  std::vector<T> vdup(static_cast<size_t>(B) * H * hs);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      std::copy_n(L.v.data() + (static_cast<long long>(b) * Hd + h / 2) * hs, hs, vdup.data() + (static_cast<long long>(b) * H + h) * hs);
  std::vector<T> o(vdup.size());
  cpu::mta_forward<T>(spec, AttnDims{B, H, Tn, d, dv}, L.q.data(), L.k.data(), vdup.data(), {}, o.data(), opt);
  L.comb.resize(static_cast<size_t>(B) * Hd * hs);
  const T* lq1 = param(lname(l, "attention.lambda_q1"));
  const T* lk1 = param(lname(l, "attention.lambda_k1"));
  const T* lq2 = param(lname(l, "attention.lambda_q2"));
  const T* lk2 = param(lname(l, "attention.lambda_k2"));
  double s1 = 0, s2 = 0;
  for (int e = 0; e < d; ++e) s1 += lq1[e] * lk1[e], s2 += lq2[e] * lk2[e];
  const T lambda = static_cast<T>(std::exp(s1) - std::exp(s2) + diff_lambda_init(l));
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hd; ++h) {
      const T* o1 = o.data() + (static_cast<long long>(b) * H + 2 * h) * hs;
      const T* o2 = o1 + hs;
      T* c = L.comb.data() + (static_cast<long long>(b) * Hd + h) * hs;
      for (long long i = 0; i < hs; ++i) c[i] = o1[i] - lambda * o2[i];
    }
  L.att.assign(o.begin(), o.end());  // keep the sub-head outputs for backward
  // Per-head RMSNorm, then the (1 - lambda_init) scaling; written to comb_out via a_flat later.
  const int rows = B * Hd * Tn;
  L.comb_rstd.resize(rows);
  std::vector<T> y(L.comb.size());
  cpu::rmsnorm_forward(L.comb.data(), param(lname(l, "attention.subln.weight")), y.data(), L.comb_rstd.data(), rows, dv,
                       T(1e-5));
  const T scale = static_cast<T>(1.0 - diff_lambda_init(l));
  for (auto& e : y) e *= scale;
  cpu::from_heads(y.data(), L.a_flat.data(), B, Tn, Hd, dv);
}

template <typename T>
void ModelT<T>::attention_backward(int l, Acts& a, const T* datt, T* dq, T* dk, T* dv_out, bool train,
                               uint64_t seed) {
  typename Acts::Layer& L = a.layers[l];
  const int B = a.B, Tn = a.seq, H = cfg_.n_heads, d = cfg_.head_dim();
  AttnOptions opt;
  if (train) opt.dropout = cfg_.dropout, opt.dropout_seed = site_seed(seed, l, kDropAttnWeights);
  const AttentionSpec spec = cfg_.layer_spec(l);
  const std::string pre = lname(l, "attention.");
  if (cfg_.attention != AttentionKind::Diff) {
    const auto p = attn_pointers<AttnParams<T>>(
        [&](const char* n) -> const T* { return layout_.has(pre + n) ? params_.data() + layout_.view(pre + n).offset : nullptr; });
    const auto g = attn_pointers<AttnParamGrads<T>>(
        [&](const char* n) -> T* { return layout_.has(pre + n) ? grads_.data() + layout_.view(pre + n).offset : nullptr; });
    cpu::mta_backward<T>(spec, AttnDims{B, H, Tn, d}, L.q.data(), L.k.data(), L.v.data(), p, datt, dq, dk, dv_out, g,
                         opt);
    return;
  }
  const int Hd = H / 2, dvd = 2 * d;
  const long long hs = static_cast<long long>(Tn) * dvd;
  const int rows = B * Hd * Tn;
  std::vector<T> dy(datt, datt + static_cast<size_t>(rows) * dvd), dcomb(dy.size(), T(0));
  const T scale = static_cast<T>(1.0 - diff_lambda_init(l));
  for (auto& e : dy) e *= scale;
  cpu::rmsnorm_backward(dy.data(), L.comb.data(), param(pre + "subln.weight"), L.comb_rstd.data(), dcomb.data(),
                        grads_.data() + layout_.view(pre + "subln.weight").offset, rows, dvd);
  const T* lq1 = param(pre + "lambda_q1");
  const T* lk1 = param(pre + "lambda_k1");
  const T* lq2 = param(pre + "lambda_q2");
  const T* lk2 = param(pre + "lambda_k2");
  double s1 = 0, s2 = 0;
  for (int e = 0; e < d; ++e) s1 += lq1[e] * lk1[e], s2 += lq2[e] * lk2[e];
  const double e1 = std::exp(s1), e2 = std::exp(s2);
  const T lambda = static_cast<T>(e1 - e2 + diff_lambda_init(l));
  // d(sub-head outputs) and d(lambda) = -sum dcomb * o2.
  std::vector<T> dout(static_cast<size_t>(B) * H * hs);
  double dlambda = 0;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hd; ++h) {
      const T* dc = dcomb.data() + (static_cast<long long>(b) * Hd + h) * hs;
      const T* o2 = L.att.data() + (static_cast<long long>(b) * H + 2 * h + 1) * hs;
      T* d1 = dout.data() + (static_cast<long long>(b) * H + 2 * h) * hs;
      T* d2 = d1 + hs;
      for (long long i = 0; i < hs; ++i) {
        d1[i] = dc[i];
        d2[i] = -lambda * dc[i];
        dlambda -= static_cast<double>(dc[i]) * o2[i];
      }
    }
  T* g_lq1 = grads_.data() + layout_.view(pre + "lambda_q1").offset;
  T* g_lk1 = grads_.data() + layout_.view(pre + "lambda_k1").offset;
  T* g_lq2 = grads_.data() + layout_.view(pre + "lambda_q2").offset;
  T* g_lk2 = grads_.data() + layout_.view(pre + "lambda_k2").offset;
  for (int e = 0; e < d; ++e) {
    g_lq1[e] += static_cast<T>(dlambda * e1 * lk1[e]);
    g_lk1[e] += static_cast<T>(dlambda * e1 * lq1[e]);
    g_lq2[e] -= static_cast<T>(dlambda * e2 * lk2[e]);
    g_lk2[e] -= static_cast<T>(dlambda * e2 * lq2[e]);
  }
  std::vector<T> vdup(static_cast<size_t>(B) * H * hs), dvdup(vdup.size());
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      std::copy_n(L.v.data() + (static_cast<long long>(b) * Hd + h / 2) * hs, hs, vdup.data() + (static_cast<long long>(b) * H + h) * hs);
  cpu::mta_backward<T>(spec, AttnDims{B, H, Tn, d, dvd}, L.q.data(), L.k.data(), vdup.data(), {}, dout.data(), dq, dk,
                           dvdup.data(), {}, opt);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hd; ++h) {
      const T* a1 = dvdup.data() + (static_cast<long long>(b) * H + 2 * h) * hs;
      const T* a2 = a1 + hs;
      T* dst = dv_out + (static_cast<long long>(b) * Hd + h) * hs;
      for (long long i = 0; i < hs; ++i) dst[i] = a1[i] + a2[i];
    }
}

// The token-wise parts of a layer (norms, projections, RoPE, residuals, feed-forward) run in one
// parallel region per side of the attention op, which alone needs all tokens of a sequence at once:
// each thread takes a contiguous share of the N token rows through the whole chain, calling the
// kernels on its rows (inside a parallel region they and BLAS run single-threaded). Weight
// gradients, sums over all rows, follow a barrier, each thread computing a share of their rows.
// Why: at the toy models' sizes the ~50 parallel regions a layer (one per kernel and GEMM) cost
// more than their work, and on a shared machine every barrier waits for the slowest thread.
template <typename T>
void ModelT<T>::layer_forward(int l, Acts& a, bool train, uint64_t seed) {
  typename Acts::Layer& L = a.layers[l];
  const int N = a.N(), C = cfg_.dim, F = cfg_.ffn_hidden, H = cfg_.n_heads, d = cfg_.head_dim();
  const int Hv = cfg_.attention == AttentionKind::Diff ? H / 2 : H;
  const T eps = static_cast<T>(cfg_.norm_eps);
  const float drop = train ? cfg_.dropout : 0.0f;
  const T *w_norm1 = param(lname(l, "attention_norm.weight")), *wq = param(lname(l, "attention.wq.weight")),
          *wk = param(lname(l, "attention.wk.weight")), *wv = param(lname(l, "attention.wv.weight")),
          *wo = param(lname(l, "attention.wo.weight")), *w_norm2 = param(lname(l, "ffn_norm.weight")),
          *w1 = param(lname(l, "feed_forward.w1.weight")), *w3 = param(lname(l, "feed_forward.w3.weight")),
          *w2 = param(lname(l, "feed_forward.w2.weight"));
  T* tmp = a.s_tmp.data();
  const cpu::RopeTable<T>* const no_rope = nullptr;
  // Attention inputs: q, k (with RoPE) and v in heads-major layout.
#pragma omp parallel
  {
    const auto [r0, r1] = thread_share(N);
    const int rows = r1 - r0;
    const long long o = static_cast<long long>(r0) * C;
    cpu::rmsnorm_forward(L.x_in.data() + o, w_norm1, L.xn1.data() + o, L.rstd1.data() + r0, rows, C, eps);
    cpu::linear_forward(L.xn1.data() + o, wq, tmp + o, rows, C, C);
    cpu::to_heads_tokens(tmp, L.q.data(), a.seq, H, d, &*a.rope, r0, r1);
    cpu::linear_forward(L.xn1.data() + o, wk, tmp + o, rows, C, C);
    cpu::to_heads_tokens(tmp, L.k.data(), a.seq, H, d, &*a.rope, r0, r1);
    cpu::linear_forward(L.xn1.data() + o, wv, tmp + o, rows, C, C);
    cpu::to_heads_tokens(tmp, L.v.data(), a.seq, Hv, C / Hv, no_rope, r0, r1);
  }
  attention_forward(l, a, train, seed);
  // x_mid = x + dropout(a_flat Wo^T); out = x_mid + dropout(W2 (silu(W1 xn2) * W3 xn2)), xn2 = norm(x_mid).
  T* out = l + 1 < cfg_.n_layers ? a.layers[l + 1].x_in.data() : a.x_final.data();
#pragma omp parallel
  {
    const auto [r0, r1] = thread_share(N);
    const int rows = r1 - r0;
    const long long o = static_cast<long long>(r0) * C, of = static_cast<long long>(r0) * F, nc = 1LL * rows * C;
    if (cfg_.attention != AttentionKind::Diff)  // (DIFF attention writes a_flat itself)
      cpu::from_heads_tokens(L.att.data(), L.a_flat.data(), a.seq, H, d, no_rope, r0, r1);
    cpu::linear_forward(L.a_flat.data() + o, wo, tmp + o, rows, C, C);
    cpu::dropout_apply(tmp + o, nc, drop, site_seed(seed, l, kDropAttnOut), o);
    for (long long i = o; i < o + nc; ++i) L.x_mid[i] = L.x_in[i] + tmp[i];
    cpu::rmsnorm_forward(L.x_mid.data() + o, w_norm2, L.xn2.data() + o, L.rstd2.data() + r0, rows, C, eps);
    cpu::linear_forward(L.xn2.data() + o, w1, L.h1.data() + of, rows, C, F);
    cpu::linear_forward(L.xn2.data() + o, w3, L.h3.data() + of, rows, C, F);
    cpu::swiglu_forward(L.h1.data() + of, L.h3.data() + of, L.g.data() + of, 1LL * rows * F);
    cpu::linear_forward(L.g.data() + of, w2, tmp + o, rows, F, C);
    cpu::dropout_apply(tmp + o, nc, drop, site_seed(seed, l, kDropFfnOut), o);
    for (long long i = o; i < o + nc; ++i) out[i] = L.x_mid[i] + tmp[i];
  }
}

template <typename T>
void ModelT<T>::layer_backward(int l, Acts& a, T* dx, bool train, uint64_t seed) {
  typename Acts::Layer& L = a.layers[l];
  const int N = a.N(), C = cfg_.dim, F = cfg_.ffn_hidden, H = cfg_.n_heads, d = cfg_.head_dim();
  const int Hv = cfg_.attention == AttentionKind::Diff ? H / 2 : H;
  const float drop = train ? cfg_.dropout : 0.0f;
  auto p = [&](const char* n) { return param(lname(l, n)); };
  auto g = [&](const char* n) { return grads_.data() + layout_.view(lname(l, n)).offset; };
  T *dy = a.s_dy.data(), *dy2 = a.s_dy2.data(), *dg = a.s_dg.data(), *dh1 = a.s_dh1.data(), *dh3 = a.s_dh3.data(),
    *dxn = a.s_dxn.data(), *da = a.s_da.data(), *datt = a.s_datt.data();
  const cpu::RopeTable<T>* const no_rope = nullptr;
  std::vector<T> parts(static_cast<size_t>(omp_get_max_threads()) * C, T(0));  // per-thread RMSNorm dw
  // Feed-forward: dx holds d(out) = d(x_mid) through the residual; then the attention's output
  // projection: dx holds d(x_mid) = d(x_in) through the residual.
#pragma omp parallel
  {
    const auto [r0, r1] = thread_share(N);
    const int rows = r1 - r0;
    const long long o = static_cast<long long>(r0) * C, of = static_cast<long long>(r0) * F, nc = 1LL * rows * C;
    std::copy(dx + o, dx + o + nc, dy + o);
    cpu::dropout_apply(dy + o, nc, drop, site_seed(seed, l, kDropFfnOut), o);
    cpu::linear_backward_input(dy + o, p("feed_forward.w2.weight"), dg + of, rows, F, C);
    cpu::swiglu_backward(dg + of, L.h1.data() + of, L.h3.data() + of, dh1 + of, dh3 + of, 1LL * rows * F);
    cpu::linear_backward_input(dh1 + of, p("feed_forward.w1.weight"), dxn + o, rows, C, F);
    cpu::linear_backward_input(dh3 + of, p("feed_forward.w3.weight"), dxn + o, rows, C, F, /*accumulate_dx=*/true);
    cpu::rmsnorm_backward(dxn + o, L.x_mid.data() + o, p("ffn_norm.weight"), L.rstd2.data() + r0, dx + o,
                          parts.data() + static_cast<size_t>(omp_get_thread_num()) * C, rows, C);
    std::copy(dx + o, dx + o + nc, dy2 + o);
    cpu::dropout_apply(dy2 + o, nc, drop, site_seed(seed, l, kDropAttnOut), o);
    cpu::linear_backward_input(dy2 + o, p("attention.wo.weight"), da + o, rows, C, C);
    cpu::to_heads_tokens(da, datt, a.seq, Hv, C / Hv, no_rope, r0, r1);  // the layout of v, for either kind
#pragma omp barrier
    const auto [c0, c1] = thread_share(C);
    const auto [f0, f1] = thread_share(F);
    cpu::linear_backward_weight(dy, L.g.data(), g("feed_forward.w2.weight"), N, F, C, c0, c1);
    cpu::linear_backward_weight(dh1, L.xn2.data(), g("feed_forward.w1.weight"), N, C, F, f0, f1);
    cpu::linear_backward_weight(dh3, L.xn2.data(), g("feed_forward.w3.weight"), N, C, F, f0, f1);
    cpu::linear_backward_weight(dy2, L.a_flat.data(), g("attention.wo.weight"), N, C, C, c0, c1);
    add_thread_parts(g("ffn_norm.weight"), parts, C);
  }
  T *dqh = a.s_dqh.data(), *dkh = a.s_dkh.data(), *dvh = a.s_dvh.data();
  attention_backward(l, a, datt, dqh, dkh, dvh, train, seed);
  // q, k, v projections and the attention norm.
  std::fill(parts.begin(), parts.end(), T(0));
  T* flat[] = {a.s_fq.data(), a.s_fk.data(), a.s_fv.data()};
  const T* w_qkv[] = {p("attention.wq.weight"), p("attention.wk.weight"), p("attention.wv.weight")};
  T* g_qkv[] = {g("attention.wq.weight"), g("attention.wk.weight"), g("attention.wv.weight")};
#pragma omp parallel
  {
    const auto [r0, r1] = thread_share(N);
    const int rows = r1 - r0;
    const long long o = static_cast<long long>(r0) * C;
    cpu::from_heads_tokens(dqh, flat[0], a.seq, H, d, &*a.rope, r0, r1);
    cpu::from_heads_tokens(dkh, flat[1], a.seq, H, d, &*a.rope, r0, r1);
    cpu::from_heads_tokens(dvh, flat[2], a.seq, Hv, C / Hv, no_rope, r0, r1);
    for (int i = 0; i < 3; ++i) cpu::linear_backward_input(flat[i] + o, w_qkv[i], dxn + o, rows, C, C, i > 0);
    cpu::rmsnorm_backward(dxn + o, L.x_in.data() + o, p("attention_norm.weight"), L.rstd1.data() + r0, dx + o,
                          parts.data() + static_cast<size_t>(omp_get_thread_num()) * C, rows, C);
#pragma omp barrier
    const auto [c0, c1] = thread_share(C);
    for (int i = 0; i < 3; ++i) cpu::linear_backward_weight(flat[i], L.xn1.data(), g_qkv[i], N, C, C, c0, c1);
    add_thread_parts(g("attention_norm.weight"), parts, C);
  }
}

template <typename T>
void ModelT<T>::check_batch(const Batch& batch) const {
  const int B = batch.B, Tn = batch.T, V = cfg_.vocab_size;
  if (B < 1 || Tn < 1) throw InputError("batch: B and T must be at least 1");
  if (Tn > cfg_.max_seq_len)
    throw InputError("batch: sequence length " + std::to_string(Tn) + " exceeds model.max_seq_len = " +
                     std::to_string(cfg_.max_seq_len));
  const size_t N = static_cast<size_t>(B) * Tn;
  if (batch.inputs.size() != N || batch.targets.size() != N || batch.weights.size() != N)
    throw InputError("batch: inputs, targets and weights must each hold B*T values");
  for (size_t i = 0; i < N; ++i) {
    if (batch.inputs[i] < 0 || batch.inputs[i] >= V)
      throw InputError("batch: token id " + std::to_string(batch.inputs[i]) + " is outside the vocabulary [0, " +
                       std::to_string(V) + ")");
    if (batch.weights[i] != 0 && (batch.targets[i] < 0 || batch.targets[i] >= V))
      throw InputError("batch: target id " + std::to_string(batch.targets[i]) + " is outside the vocabulary");
  }
}

template <typename T>
LossStats ModelT<T>::run(const Batch& batch, bool backward, T grad_scale, bool train, uint64_t seed,
                     std::vector<int32_t>* argmax) {
  const int B = batch.B, Tn = batch.T, C = cfg_.dim, V = cfg_.vocab_size, F = cfg_.ffn_hidden;
  check_batch(batch);
  const size_t N = static_cast<size_t>(B) * Tn;
  Acts& a = *acts_;
  if (a.B != B || a.seq != Tn || a.layers.size() != static_cast<size_t>(cfg_.n_layers)) {
    a = Acts();
    a.B = B, a.seq = Tn;
    a.layers.resize(cfg_.n_layers);
    const size_t NC = N * C, NF = N * F;
    for (auto& L : a.layers) {
      for (auto* v : {&L.x_in, &L.xn1, &L.q, &L.k, &L.v, &L.a_flat, &L.x_mid, &L.xn2}) v->assign(NC, T(0));
      L.att.assign(NC, T(0));
      for (auto* v : {&L.rstd1, &L.rstd2}) v->assign(N, T(0));
      for (auto* v : {&L.h1, &L.h3, &L.g}) v->assign(NF, T(0));
    }
    a.x_final.assign(NC, T(0)), a.xf.assign(NC, T(0)), a.rstdf.assign(N, T(0));
    for (auto* v : {&a.s_tmp, &a.s_dy, &a.s_dy2, &a.s_dxn, &a.s_da, &a.s_dqh, &a.s_dkh, &a.s_dvh, &a.s_fq, &a.s_fk,
                    &a.s_fv, &a.s_datt})
      v->assign(NC, T(0));
    for (auto* v : {&a.s_dg, &a.s_dh1, &a.s_dh3}) v->assign(NF, T(0));
    a.rope.emplace(Tn, cfg_.head_dim(), cfg_.rope_theta);
  }
  // Embedding.
  const T* E = param("tok_embeddings.weight");
#pragma omp parallel for schedule(static)
  for (long long n = 0; n < static_cast<long long>(N); ++n)
    std::copy_n(E + static_cast<long long>(batch.inputs[n]) * C, C, a.layers[0].x_in.data() + n * C);
  for (int l = 0; l < cfg_.n_layers; ++l) layer_forward(l, a, train, seed);
  cpu::rmsnorm_forward(a.x_final.data(), param("norm.weight"), a.xf.data(), a.rstdf.data(), static_cast<int>(N), C,
                       static_cast<T>(cfg_.norm_eps));

  // Output layer (tied embedding) and cross-entropy in chunks of rows, so that the [N, V] logits of a
  // large vocabulary never exist at once (a chunk holds up to ~1M logits; a small vocabulary is done
  // in one chunk, fewer and larger GEMMs); in backward, the chunk's gradient is formed and consumed
  // immediately.
  LossStats st;
  std::vector<T> dxf(backward ? N * C : 0, T(0));
  T* gE = grads_.data() + layout_.view("tok_embeddings.weight").offset;
  if (argmax) argmax->assign(N, 0);
  const int R = static_cast<int>(std::min<size_t>(N, std::max(256, (1 << 20) / V)));
  std::vector<T> logits(static_cast<size_t>(R) * V);
  for (size_t r0 = 0; r0 < N; r0 += R) {
    const int rows = static_cast<int>(std::min<size_t>(R, N - r0));
    cpu::linear_forward(a.xf.data() + r0 * C, E, logits.data(), rows, C, V);
    // Per-row losses summed serially afterwards: a reduction clause would add in thread-timing order.
    std::vector<double> row_loss(rows, 0.0);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; ++r) {
      T* lg = logits.data() + static_cast<size_t>(r) * V;
      const size_t n = r0 + r;
      int best = 0;
      T m = lg[0];
      for (int c = 1; c < V; ++c)
        if (lg[c] > m) m = lg[c], best = c;
      if (argmax) (*argmax)[n] = best;
      double sum = 0;
      for (int c = 0; c < V; ++c) sum += std::exp(static_cast<double>(lg[c] - m));
      const T w = static_cast<T>(batch.weights[n]);
      if (w != 0) row_loss[r] = w * (m + std::log(sum) - lg[batch.targets[n]]);
      if (backward) {
        // d(loss_sum)/d(logits) = w * (softmax - onehot), scaled.
        const T s = w * grad_scale;
        const T inv = static_cast<T>(1.0 / sum);
        for (int c = 0; c < V; ++c) lg[c] = s * std::exp(lg[c] - m) * inv;
        if (w != 0) lg[batch.targets[n]] -= s;
      }
    }
    for (int r = 0; r < rows; ++r) {
      st.loss_sum += row_loss[r];
      st.weight_sum += batch.weights[r0 + r];
    }
    if (backward) cpu::linear_backward(logits.data(), a.xf.data() + r0 * C, E, dxf.data() + r0 * C, gE, rows, C, V);
  }
  if (!backward) return st;

  std::vector<T> dx(N * C, T(0));
  cpu::rmsnorm_backward(dxf.data(), a.x_final.data(), param("norm.weight"), a.rstdf.data(), dx.data(),
                        grads_.data() + layout_.view("norm.weight").offset, static_cast<int>(N), C);
  for (int l = cfg_.n_layers - 1; l >= 0; --l) layer_backward(l, a, dx.data(), train, seed);
  // Embedding gradient: a scatter-add, serial over positions so the sum order is fixed.
  for (size_t n = 0; n < N; ++n) {
    T* dst = gE + static_cast<long long>(batch.inputs[n]) * C;
    const T* src = dx.data() + n * C;
    for (int c = 0; c < C; ++c) dst[c] += src[c];
  }
  return st;
}

template class ModelT<float>;
template class ModelT<double>;

}  // namespace mta
