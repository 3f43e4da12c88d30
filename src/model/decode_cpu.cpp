#include "model/decode_cpu.h"

#include <algorithm>
#include <cmath>

#include "model/layer_naming.h"
#include "model/layers_cpu.h"
#include "util/error.h"

namespace mta {

template <typename T>
DecoderT<T>::DecoderT(const ModelT<T>& model) : model_(model) {
  const ModelConfig& cfg = model.config();
  const bool diff = cfg.attention == AttentionKind::Diff;
  // DIFF: H sub-heads of dim d whose pairs share a value head of dim 2d (as ModelT computes it).
  const int Hv = diff ? cfg.n_heads / 2 : cfg.n_heads, dv = diff ? 2 * cfg.head_dim() : cfg.head_dim();
  attn_.reserve(cfg.n_layers);
  for (int l = 0; l < cfg.n_layers; ++l) attn_.emplace_back(cfg.layer_spec(l), Hv, dv);
}

template <typename T>
void DecoderT<T>::reset() {
  for (auto& a : attn_) a.reset();
  len_ = 0;
}

template <typename T>
const T* DecoderT<T>::param(const std::string& name) const {
  return model_.params().data() + model_.layout().view(name).offset;
}

template <typename T>
std::vector<T> DecoderT<T>::feed(const std::vector<int32_t>& ids) {
  const ModelConfig& cfg = model_.config();
  const int n = static_cast<int>(ids.size()), C = cfg.dim, V = cfg.vocab_size;
  if (n == 0) throw InputError("decode: no tokens to feed");
  if (static_cast<long long>(len_) + n > cfg.max_seq_len)
    throw InputError("decode: sequence length " + std::to_string(static_cast<long long>(len_) + n) +
                     " exceeds model.max_seq_len = " + std::to_string(cfg.max_seq_len));
  for (int32_t id : ids)
    if (id < 0 || id >= V)
      throw InputError("decode: token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                       std::to_string(V) + ")");
  // The residual stream of the new tokens, [n, C], carried through the layers in place.
  std::vector<T> x(static_cast<size_t>(n) * C);
  const T* E = param("tok_embeddings.weight");
  for (int r = 0; r < n; ++r) std::copy_n(E + static_cast<long long>(ids[r]) * C, C, x.data() + static_cast<size_t>(r) * C);
  for (int l = 0; l < cfg.n_layers; ++l) layer_step(l, x.data(), n);
  len_ += n;
  // Only the last token's logits are needed: final norm and the tied output layer on one row.
  std::vector<T> xf(C), rstd(1), logits(V);
  cpu::rmsnorm_forward(x.data() + static_cast<size_t>(n - 1) * C, param("norm.weight"), xf.data(), rstd.data(), 1, C,
                       static_cast<T>(cfg.norm_eps));
  cpu::linear_forward(xf.data(), E, logits.data(), 1, C, V);
  return logits;
}

// One layer of ModelT::layer_forward for the n new tokens at positions len_ .. len_ + n - 1.
template <typename T>
void DecoderT<T>::layer_step(int l, T* x, int n) {
  const ModelConfig& cfg = model_.config();
  const int C = cfg.dim, F = cfg.ffn_hidden, H = cfg.n_heads, d = cfg.head_dim();
  const T eps = static_cast<T>(cfg.norm_eps);
  const size_t NC = static_cast<size_t>(n) * C, NF = static_cast<size_t>(n) * F;
  auto w = [&](const std::string& rest) { return param(layer_param_name(l, rest)); };

  std::vector<T> xn(NC), rstd(n), q(NC), k(NC), v(NC), att(NC), tmp(NC);
  cpu::rmsnorm_forward(x, w("attention_norm.weight"), xn.data(), rstd.data(), n, C, eps);
  cpu::linear_forward(xn.data(), w("attention.wq.weight"), q.data(), n, C, C);
  cpu::linear_forward(xn.data(), w("attention.wk.weight"), k.data(), n, C, C);
  cpu::linear_forward(xn.data(), w("attention.wv.weight"), v.data(), n, C, C);
  // Rows are token-major [n][H][d]; each token's heads are rotated at the token's own position.
  for (int r = 0; r < n; ++r) {
    cpu::rope_apply(q.data() + static_cast<size_t>(r) * C, 1, H, 1, d, cfg.rope_theta, false, len_ + r);
    cpu::rope_apply(k.data() + static_cast<size_t>(r) * C, 1, H, 1, d, cfg.rope_theta, false, len_ + r);
  }

  const std::string pre = layer_param_name(l, "attention.");
  const ParamLayout& layout = model_.layout();
  const auto p = attn_pointers<AttnParams<T>>(
      [&](const char* name) -> const T* { return layout.has(pre + name) ? param(pre + name) : nullptr; });
  if (cfg.attention != AttentionKind::Diff) {
    for (int r = 0; r < n; ++r) {
      const size_t off = static_cast<size_t>(r) * C;
      attn_[l].step(q.data() + off, k.data() + off, v.data() + off, p, att.data() + off);
    }
  } else {
    // DIFF, as ModelT::attention_forward: sub-head outputs o (H heads of dim 2d), then per head pair
    // o1 - lambda o2, RMSNorm over 2d (subln, eps 1e-5) and the (1 - lambda_init) scale.
    const int Hd = H / 2, dv = 2 * d;
    const T* lq1 = w("attention.lambda_q1");
    const T* lk1 = w("attention.lambda_k1");
    const T* lq2 = w("attention.lambda_q2");
    const T* lk2 = w("attention.lambda_k2");
    double s1 = 0, s2 = 0;
    for (int e = 0; e < d; ++e) s1 += lq1[e] * lk1[e], s2 += lq2[e] * lk2[e];
    const T lambda = static_cast<T>(std::exp(s1) - std::exp(s2) + diff_lambda_init(l));
    const T scale = static_cast<T>(1.0 - diff_lambda_init(l));
    std::vector<T> o(static_cast<size_t>(H) * dv), comb(static_cast<size_t>(Hd) * dv), r_hd(Hd);
    for (int r = 0; r < n; ++r) {
      const size_t off = static_cast<size_t>(r) * C;
      attn_[l].step(q.data() + off, k.data() + off, v.data() + off, AttnParams<T>{}, o.data());
      for (int h = 0; h < Hd; ++h)
        for (int e = 0; e < dv; ++e) comb[h * dv + e] = o[(2 * h) * dv + e] - lambda * o[(2 * h + 1) * dv + e];
      T* dst = att.data() + off;  // [Hd][2d] = C values
      cpu::rmsnorm_forward(comb.data(), w("attention.subln.weight"), dst, r_hd.data(), Hd, dv, T(1e-5));
      for (int e = 0; e < C; ++e) dst[e] *= scale;
    }
  }
  // Residual: x += att Wo^T; feed-forward: x += W2 (silu(W1 xn2) * W3 xn2).
  cpu::linear_forward(att.data(), w("attention.wo.weight"), tmp.data(), n, C, C);
  for (size_t i = 0; i < NC; ++i) x[i] = x[i] + tmp[i];
  std::vector<T> h1(NF), h3(NF), g(NF);
  cpu::rmsnorm_forward(x, w("ffn_norm.weight"), xn.data(), rstd.data(), n, C, eps);
  cpu::linear_forward(xn.data(), w("feed_forward.w1.weight"), h1.data(), n, C, F);
  cpu::linear_forward(xn.data(), w("feed_forward.w3.weight"), h3.data(), n, C, F);
  cpu::swiglu_forward(h1.data(), h3.data(), g.data(), static_cast<long long>(NF));
  cpu::linear_forward(g.data(), w("feed_forward.w2.weight"), tmp.data(), n, F, C);
  for (size_t i = 0; i < NC; ++i) x[i] = x[i] + tmp[i];
}

template class DecoderT<float>;
template class DecoderT<double>;

}  // namespace mta
