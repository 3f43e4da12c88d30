#include "attention/mta_incremental.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace mta {
namespace {

// Enough work in a step to be worth spreading the heads over threads.
bool parallel_worth(int heads, int n, int D) { return 1LL * heads * n * D >= (1 << 15); }

// out[j] = sum_{a,c} W[a,c] * row(i-(cq-1)+a)[j-o+c] for j <= i, where row(ii) (slot ii % cq of the
// ring) holds the ii+1 causal entries of row ii; entries outside [0, ii] and rows ii < 0 are zero.
// The loop order is the reference's (attention/mta_cpu.cpp), so equal inputs give equal outputs.
template <typename T>
void conv_row(const std::vector<std::vector<T>>& ring, const T* W, const KqConv& kc, int i, T* out) {
  const int cq = kc.q, ck = kc.k, o = kc.key_offset();
  std::fill(out, out + i + 1, T(0));
  for (int a = 0; a < cq; ++a) {
    const int ii = i - (cq - 1) + a;
    if (ii < 0) continue;
    const T* irow = ring[ii % cq].data();
    for (int c = 0; c < ck; ++c) {
      const T w = W[a * ck + c];
      if (w == T(0)) continue;
      const int shift = c - o;
      const int jlo = std::max(0, -shift), jhi = std::min(i, ii - shift);
      for (int j = jlo; j <= jhi; ++j) out[j] += w * irow[j + shift];
    }
  }
}

// out[x] = sum_y M[group(x), x % g, y] * in[group(x) * g + y] over the n entries of the row.
template <typename T>
void mix_row(const std::vector<std::vector<T>>& in, std::vector<std::vector<T>>& out, const T* M, int g, int n) {
  const int H = static_cast<int>(in.size());
#pragma omp parallel for schedule(static) if (parallel_worth(H, n, g))
  for (int x = 0; x < H; ++x) {
    const int grp = x / g, xg = x % g;
    const T* m = M + (static_cast<long long>(grp) * g + xg) * g;
    T* orow = out[x].data();
    std::fill(orow, orow + n, T(0));
    for (int y = 0; y < g; ++y) {
      const T w = m[y];
      if (w == T(0)) continue;
      const T* irow = in[grp * g + y].data();
      for (int j = 0; j < n; ++j) orow[j] += w * irow[j];
    }
  }
}

template <typename T>
void softmax_row(T* p, int n) {
  T m = p[0];
  for (int j = 1; j < n; ++j) m = std::max(m, p[j]);
  T sum = 0;
  for (int j = 0; j < n; ++j) {
    p[j] = std::exp(p[j] - m);
    sum += p[j];
  }
  const T inv = T(1) / sum;
  for (int j = 0; j < n; ++j) p[j] *= inv;
}

// Steps 8-10 of the semantics on one head's output row, in place.
template <typename T>
void epilogue_row(const AttentionSpec& spec, const AttnParams<T>& p, T* o, int D) {
  if (spec.norm) {
    T ms = 0;
    for (int d = 0; d < D; ++d) ms += o[d] * o[d];
    const T r = T(1) / std::sqrt(ms / T(D) + T(kGroupNormEps));
    for (int d = 0; d < D; ++d) o[d] = o[d] * r * p.norm[d];
  }
  if (spec.depth_scale_layer) {
    const T s = static_cast<T>(spec.depth_scale());
    for (int d = 0; d < D; ++d) o[d] *= s;
  }
  if (spec.gate) {
    T z = p.gate_b[0];
    for (int d = 0; d < D; ++d) z += o[d] * p.gate_w[d];
    z = T(1) / (T(1) + std::exp(-z));
    for (int d = 0; d < D; ++d) o[d] *= z;
  }
}

}  // namespace

template <typename T>
MtaIncremental<T>::MtaIncremental(const AttentionSpec& spec, int value_heads, int value_dim)
    : spec_(spec), H_(spec.heads), D_(spec.head_dim), Hv_(value_heads), Dv_(value_dim) {
  spec_.validate();
  if (Hv_ < 1 || H_ % Hv_ != 0 || Dv_ < 1)
    throw std::invalid_argument("MtaIncremental: value heads must divide the heads");
  reset();
}

template <typename T>
void MtaIncremental<T>::reset() {
  len_ = 0;
  keys_.clear(), values_.clear();
  pre_rows_.assign(spec_.kq_pre ? H_ : 0, std::vector<std::vector<T>>(spec_.kq_pre ? spec_.kq_pre->q : 0));
  post_rows_.assign(spec_.kq_post ? H_ : 0, std::vector<std::vector<T>>(spec_.kq_post ? spec_.kq_post->q : 0));
  x_.assign(H_, {}), y_.assign(H_, {});
}

template <typename T>
void MtaIncremental<T>::step(const T* q, const T* k, const T* v, const AttnParams<T>& p, T* out) {
  const int i = len_, n = i + 1, H = H_, D = D_, Dv = Dv_, share = H_ / Hv_;
  keys_.insert(keys_.end(), k, k + static_cast<long long>(H) * D);
  values_.insert(values_.end(), v, v + static_cast<long long>(Hv_) * Dv);
  ++len_;
  for (int h = 0; h < H; ++h) x_[h].resize(n), y_[h].resize(n);
  const T scale = T(1) / std::sqrt(T(D));
  const bool par = parallel_worth(H, n, D);

  // 1-2. Logits of row i (all causal: j <= i), then the key-query convolution over the kept rows.
#pragma omp parallel for schedule(static) if (par)
  for (int h = 0; h < H; ++h) {
    T* s = x_[h].data();
    if (spec_.kq_pre) {
      std::vector<T>& slot = pre_rows_[h][i % spec_.kq_pre->q];
      slot.resize(n);
      s = slot.data();
    }
    const T* qh = q + static_cast<long long>(h) * D;
    for (int j = 0; j < n; ++j) {
      const T* kj = keys_.data() + (static_cast<long long>(j) * H + h) * D;
      T dot = 0;
      for (int e = 0; e < D; ++e) dot += qh[e] * kj[e];
      s[j] = scale * dot;
    }
    if (spec_.kq_pre) {
      const KqConv& kc = *spec_.kq_pre;
      conv_row(pre_rows_[h], p.kq_pre + static_cast<long long>(h) * kc.q * kc.k, kc, i, x_[h].data());
    }
  }
  // 3. Head mixing before softmax; 4. softmax (the second mask: only j <= i exists here).
  if (spec_.head_pre) {
    mix_row(x_, y_, p.head_pre, spec_.head_pre->group, n);
    x_.swap(y_);
  }
  for (int h = 0; h < H; ++h) softmax_row(x_[h].data(), n);
  // 5. Key-query convolution after softmax, over the kept rows of A.
  if (spec_.kq_post) {
    const KqConv& kc = *spec_.kq_post;
    for (int h = 0; h < H; ++h) {
      post_rows_[h][i % kc.q] = x_[h];
      conv_row(post_rows_[h], p.kq_post + static_cast<long long>(h) * kc.q * kc.k, kc, i, y_[h].data());
    }
    x_.swap(y_);
  }
  // 6. Head mixing after softmax; 7. weights times values; 8-10. norm, depth scaling, gate.
  if (spec_.head_post) {
    mix_row(x_, y_, p.head_post, spec_.head_post->group, n);
    x_.swap(y_);
  }
  const bool epilogue = spec_.norm || spec_.depth_scale_layer || spec_.gate;
#pragma omp parallel for schedule(static) if (par)
  for (int h = 0; h < H; ++h) {
    T* o = out + static_cast<long long>(h) * Dv;
    std::fill(o, o + Dv, T(0));
    const T* a = x_[h].data();
    const int vh = h / share;
    for (int j = 0; j < n; ++j) {
      const T* vj = values_.data() + (static_cast<long long>(j) * Hv_ + vh) * Dv;
      for (int e = 0; e < Dv; ++e) o[e] += a[j] * vj[e];
    }
    if (epilogue) epilogue_row(spec_, p, o, Dv);
  }
}

template class MtaIncremental<float>;
template class MtaIncremental<double>;

}  // namespace mta
